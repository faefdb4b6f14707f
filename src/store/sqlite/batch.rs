//! What a batch of callbacks, or a run this service started, writes: run inside the writer
//! thread's transaction (`writer`), a statement per row, each prepared once and kept for the
//! next transaction.
//!
//! Nothing else writes while the transaction holds the lock, so the store reads what it needs
//! and decides in Rust (`plan`, `forward_only`, `changes`); the statements only store the
//! result. In process, a statement per row costs microseconds, which multi-row statements
//! would not save: what they saved were round trips, and there are none here.

use std::collections::HashMap;

use chrono::Utc;
use rusqlite::{params, OptionalExtension, Row, Transaction};

use super::{run_from_row, time_from_text, time_text, GET_RUN};
use crate::store::changes;
use crate::store::forward_only::RunState;
use crate::store::model::{DeliveryOutcome, Run, TriggeredRun};
use crate::store::outbox::STATUS_CHANGED;
use crate::store::plan::BatchPlan;
use crate::store::rows::{RunRow, StoredText};
use crate::store::StoreError;

/// Records a batch: the counters of the copies of stored events, the runs the new events move,
/// the new events themselves, and with forwarding `targets` a message per target for each run
/// that changed. Returns each delivery's outcome.
///
/// Events are keyed by their run's `seq` (migration 0007), so a new event is written after its
/// run, which gives it that `seq`. Only a stored event can be a copy, and every stored event has
/// its run, so the copies are counted first and the rest are new.
pub(super) fn record(
    transaction: &Transaction<'_>,
    plan: &BatchPlan<'_>,
    targets: &[String],
) -> Result<Vec<DeliveryOutcome>, StoreError> {
    let stored_sha256 = count_duplicates(transaction, plan)?;
    let inserted: Vec<bool> = stored_sha256.iter().map(Option::is_none).collect();
    let mut final_status = HashMap::new();
    let mut run_seqs = HashMap::new();
    let mut changed = Vec::new();
    for change in plan.run_changes(&inserted) {
        let before = read_run(transaction, &change.message_id)?;
        let before_status = before.as_ref().map(|run| run.status.clone());
        let run = RunState::advanced(before, &change);
        let seq = write_run(transaction, &change.message_id, &run)?;
        if changes::is_change(before_status.as_deref(), &run.status) {
            changed.push(change.message_id.clone());
        }
        run_seqs.insert(change.message_id.clone(), seq);
        final_status.insert(change.message_id, run.status);
    }
    insert_events(transaction, plan, &inserted, &run_seqs)?;
    if !targets.is_empty() {
        queue_changes(transaction, targets, &changed)?;
    }
    let conflicting = plan.conflicting_terminals(&inserted, &final_status);
    Ok(plan.outcomes(&inserted, &stored_sha256, &conflicting))
}

/// Records a run started through `POST /v1/runs`. Only a new run changes: a trigger never moves
/// a run a callback created first.
pub(super) fn record_triggered_run(
    transaction: &Transaction<'_>,
    run: &TriggeredRun,
    targets: &[String],
) -> Result<(), StoreError> {
    let before = read_run(transaction, &run.message_id)?;
    let created = before.is_none();
    write_run(
        transaction,
        &run.message_id,
        &RunState::triggered(before, run),
    )?;
    if created && !targets.is_empty() {
        queue_changes(transaction, targets, std::slice::from_ref(&run.message_id))?;
    }
    Ok(())
}

/// Adds every copy of a stored event to its counters. Returns, per group, the stored body's hash
/// (to tell identical copies from differing ones), or `None` when `(message_id, status)` is not
/// stored yet: the group is a new event.
fn count_duplicates(
    transaction: &Transaction<'_>,
    plan: &BatchPlan<'_>,
) -> Result<Vec<Option<[u8; 32]>>, StoreError> {
    let mut count = transaction.prepare_cached(
        "update events \
         set duplicates = duplicates + ?3, last_received_at = max(last_received_at, ?4) \
         where run_seq = (select seq from runs where message_id = ?1) and status = ?2 \
         returning id, body_sha256",
    )?;
    let mut differing = transaction.prepare_cached(
        "update events set differing_duplicates = differing_duplicates + ?2 where id = ?1",
    )?;
    let mut stored = Vec::with_capacity(plan.groups.len());
    for group in &plan.groups {
        let first = plan.first(group);
        let found: Option<(i64, Vec<u8>)> = count
            .query_row(
                params![
                    first.message_id,
                    first.status,
                    plan.copies(group).count() as i64,
                    time_text(plan.last_received_at(group)),
                ],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((id, stored_sha256)) = found else {
            stored.push(None);
            continue;
        };
        let copies = plan.differing_copies(group, &stored_sha256) as i64;
        if copies > 0 {
            differing.execute(params![id, copies])?;
        }
        let stored_sha256 = <[u8; 32]>::try_from(stored_sha256.as_slice()).map_err(|_| {
            StoreError::Internal(format!(
                "event {id} stores a body hash that is not 32 bytes"
            ))
        })?;
        stored.push(Some(stored_sha256));
    }
    Ok(stored)
}

/// Inserts each new group's first delivery as an event of its run (`run_seqs`, written just
/// before), in arrival order, so that event ids follow arrival.
fn insert_events(
    transaction: &Transaction<'_>,
    plan: &BatchPlan<'_>,
    inserted: &[bool],
    run_seqs: &HashMap<String, i64>,
) -> Result<(), StoreError> {
    let mut insert = transaction.prepare_cached(
        "insert into events (run_seq, message_id, status, received_at, last_received_at, \
                             payload, body_sha256, key_id, duplicates, differing_duplicates) \
         values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for (group, _) in plan.groups.iter().zip(inserted).filter(|(_, &new)| new) {
        let first = plan.first(group);
        // Every new event moves its run (`BatchPlan::run_changes`), which was written above.
        let run_seq = run_seqs.get(&first.message_id).ok_or_else(|| {
            StoreError::Internal(format!(
                "the run of a new event ({}, {}) was not written",
                first.message_id, first.status
            ))
        })?;
        insert.execute(params![
            run_seq,
            first.message_id,
            first.status,
            time_text(first.received_at),
            time_text(plan.last_received_at(group)),
            first.body_text(),
            first.body_sha256.as_slice(),
            first.key_id,
            group.repeats.len() as i64,
            plan.differing_repeats(group) as i64,
        ])?;
    }
    Ok(())
}

/// The stored state of a run, if it exists.
fn read_run(
    transaction: &Transaction<'_>,
    message_id: &str,
) -> Result<Option<RunState>, StoreError> {
    let mut read = transaction.prepare_cached(
        "select workflow_id, status, created_at, updated_at, completed_at, expires_at, result, \
                assets_url, error, triggered_here, workflow_params \
         from runs where message_id = ?1",
    )?;
    let Some(row) = read.query_row([message_id], run_state_columns).optional()? else {
        return Ok(None);
    };
    let time = |text: Option<String>| text.as_deref().map(time_from_text).transpose();
    Ok(Some(RunState {
        workflow_id: row.workflow_id,
        status: row.status,
        created_at: time_from_text(&row.created_at)?,
        updated_at: time_from_text(&row.updated_at)?,
        completed_at: time(row.completed_at)?,
        expires_at: time(row.expires_at)?,
        result: row.result,
        assets_url: row.assets_url,
        error: row.error,
        triggered_here: row.triggered_here,
        workflow_params: row.workflow_params,
    }))
}

/// A run as `read_run` selects it, its times still text.
struct RunStateColumns {
    workflow_id: Option<String>,
    status: String,
    created_at: String,
    updated_at: String,
    completed_at: Option<String>,
    expires_at: Option<String>,
    result: Option<String>,
    assets_url: Option<String>,
    error: Option<String>,
    triggered_here: bool,
    workflow_params: Option<String>,
}

fn run_state_columns(row: &Row<'_>) -> rusqlite::Result<RunStateColumns> {
    Ok(RunStateColumns {
        workflow_id: row.get(0)?,
        status: row.get(1)?,
        created_at: row.get(2)?,
        updated_at: row.get(3)?,
        completed_at: row.get(4)?,
        expires_at: row.get(5)?,
        result: row.get(6)?,
        assets_url: row.get(7)?,
        error: row.get(8)?,
        triggered_here: row.get(9)?,
        workflow_params: row.get(10)?,
    })
}

/// Stores a run as [`RunState`] decided it, creating it when new, and returns its `seq`. Only
/// called inside the write transaction that read the run first, so nothing is left to decide
/// here.
fn write_run(
    transaction: &Transaction<'_>,
    message_id: &str,
    run: &RunState,
) -> Result<i64, StoreError> {
    let mut write = transaction.prepare_cached(
        "insert into runs (message_id, workflow_id, status, status_rank, created_at, updated_at, \
                           completed_at, expires_at, result, assets_url, error, triggered_here, \
                           workflow_params) \
         values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
         on conflict (message_id) do update set \
             workflow_id = excluded.workflow_id, \
             status = excluded.status, \
             status_rank = excluded.status_rank, \
             created_at = excluded.created_at, \
             updated_at = excluded.updated_at, \
             completed_at = excluded.completed_at, \
             expires_at = excluded.expires_at, \
             result = excluded.result, \
             assets_url = excluded.assets_url, \
             error = excluded.error, \
             triggered_here = excluded.triggered_here, \
             workflow_params = excluded.workflow_params \
         returning seq",
    )?;
    let seq = write.query_row(
        params![
            message_id,
            run.workflow_id,
            run.status,
            run.rank().as_i16(),
            time_text(run.created_at),
            time_text(run.updated_at),
            run.completed_at.map(time_text),
            run.expires_at.map(time_text),
            run.result,
            run.assets_url,
            run.error,
            run.triggered_here,
            run.workflow_params,
        ],
        |row| row.get(0),
    )?;
    Ok(seq)
}

/// Queues a `run.status_changed` message per target for each run named, in the order given
/// (ids number a run's messages in the order of its changes), each run as the transaction holds
/// it now, read as `get_run` reads it.
fn queue_changes(
    transaction: &Transaction<'_>,
    targets: &[String],
    message_ids: &[String],
) -> Result<(), StoreError> {
    if message_ids.is_empty() {
        return Ok(());
    }
    let mut get_run = transaction.prepare_cached(GET_RUN)?;
    let runs = message_ids
        .iter()
        .map(|message_id| run_from_row(get_run.query_row([message_id], run_row)?))
        .collect::<Result<Vec<Run>, StoreError>>()?;
    let mut insert = transaction.prepare_cached(
        "insert into forward_outbox (target, message_id, event_type, run, committed_at, \
                                     queued_at, next_attempt_at) \
         values (?1, ?2, ?3, ?4, ?5, ?5, ?5)",
    )?;
    let now = time_text(Utc::now());
    for message in changes::status_changed(targets, &runs)? {
        insert.execute(params![
            message.target,
            message.message_id,
            STATUS_CHANGED,
            message.run,
            now,
        ])?;
    }
    Ok(())
}

/// A row of [`GET_RUN`].
fn run_row(row: &Row<'_>) -> rusqlite::Result<RunRow<StoredText>> {
    Ok(RunRow {
        message_id: row.get("message_id")?,
        workflow_id: row.get("workflow_id")?,
        status: row.get("status")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
        completed_at: row.get("completed_at")?,
        expires_at: row.get("expires_at")?,
        result: row.get("result")?,
        assets_url: row.get("assets_url")?,
        error: row.get("error")?,
        triggered_here: row.get("triggered_here")?,
        conflicting_terminals: row.get("conflicting_terminals")?,
        workflow_params: row.get("workflow_params")?,
        seq: row.get("seq")?,
    })
}
