//! The forwarding outbox on SQLite (`store::outbox`): claims, outcomes, listings, retry and
//! replay, stuck runs and pruning. The messages of a change are written with the change, in
//! `sqlite.rs`.
//!
//! One process writes, one transaction at a time (`turns`), so a claim needs no row locks: a
//! `begin immediate` transaction is alone. Times are the store's fixed-width text, so
//! comparing text compares times. The statements repeat the partial indexes' predicates
//! (`state = 'pending'`, `state = 'failed'`, `status_rank < 2`) word for word so that the
//! planner can use them.

use chrono::{DateTime, Utc};

use super::{run_from_row, time_from_text, time_read_leniently, time_text, SqliteStore};
use crate::store::outbox::{
    self, AttemptOutcome, FailedPage, FailedRow, FinishedAttempt, Lease, OutboxMessage, TargetQueue,
};
use crate::store::rows::{RunRow, StoredText};
use crate::store::StoreError;

/// Claimable messages of `?1` (see `outbox`), soonest due first, leased. Later messages of a run
/// wait while an earlier one is pending, leased or not (`forward_outbox_pending_run`).
const CLAIM: &str = "\
update forward_outbox set lease_owner = ?3, lease_until = ?4
where id in (
    select m.id from forward_outbox as m
    where m.target = ?1 and m.state = 'pending'
      and m.next_attempt_at <= ?5
      and (m.lease_until is null or m.lease_until <= ?5)
      and m.id = (
          select earlier.id from forward_outbox as earlier
          where earlier.target = m.target and earlier.message_id = m.message_id
            and earlier.state = 'pending'
          order by earlier.id
          limit 1)
    order by m.next_attempt_at
    limit ?2)
returning id, target, message_id, event_type, run, committed_at, queued_at, attempts";

/// One attempt's outcome, recorded only for the lease holder. `?3` is the kind (`delivered`,
/// `retry`, `failed`); a delivery clears the error, which described an attempt before it.
const FINISH: &str = "\
update forward_outbox set
    state = case ?3 when 'delivered' then 'delivered' when 'failed' then 'failed'
                    else 'pending' end,
    attempts = attempts + 1,
    last_attempt_at = ?4,
    delivered_at = case when ?3 = 'delivered' then ?4 else delivered_at end,
    next_attempt_at = coalesce(?5, next_attempt_at),
    last_error = case when ?3 = 'delivered' then null else ?6 end,
    lease_owner = null,
    lease_until = null
where id = ?1 and state = 'pending' and lease_owner = ?2";

/// After `?1` was set to go again at `?2`: the later pending messages of its run become due no
/// sooner than it, which they cannot go before anyway. Otherwise they stay due while it waits,
/// and every claim walks past them (the claim's order probe still decides; this only keeps the
/// walk short while a target is down).
const HOLD_BACK: &str = "\
update forward_outbox set next_attempt_at = ?2
where state = 'pending' and next_attempt_at < ?2 and id > ?1
  and (target, message_id) = (select target, message_id from forward_outbox where id = ?1)";

/// The soonest a message at the head of its run can be claimed: later messages of a run wait
/// for the head, whose outcome wakes the worker anyway. (`max` of several values is null when
/// one is, hence the `coalesce`.)
const NEXT_DUE: &str = "\
select min(next_attempt_at) from forward_outbox
where target = ?1 and state = 'pending' and next_attempt_at > ?2";

const QUEUE: &str = "\
select
    (select count(*) from forward_outbox where target = ?1 and state = 'pending'),
    (select min(queued_at) from forward_outbox where target = ?1 and state = 'pending'),
    (select count(*) from forward_outbox where target = ?1 and state = 'failed'),
    (select last_error from forward_outbox
     where target = ?1 and state in ('pending', 'failed') and last_error is not null
     order by last_attempt_at desc, id desc
     limit 1)";

const LIST_FAILED: &str = "\
select id, event_type, message_id, committed_at, queued_at, attempts, last_attempt_at, last_error
from forward_outbox
where target = ?1 and state = 'failed' and id < ?2
order by id desc
limit ?3";

const RETRY_FAILED: &str = "\
update forward_outbox set
    state = 'pending', attempts = 0, queued_at = ?2, next_attempt_at = ?2,
    lease_owner = null, lease_until = null
where target = ?1 and state = 'failed'";

/// Delivered and failed messages committed in `[?2, ?3)` go again; `delivered_at` belongs to
/// the delivery before and goes.
const REPLAY: &str = "\
update forward_outbox set
    state = 'pending', attempts = 0, queued_at = ?4, next_attempt_at = ?4,
    lease_owner = null, lease_until = null, delivered_at = null
where target = ?1 and state in ('delivered', 'failed')
  and committed_at >= ?2 and (?3 is null or committed_at < ?3)";

const INSERT_STUCK: &str = "\
insert into forward_outbox (target, message_id, event_type, run, committed_at, queued_at,
                            next_attempt_at)
values (?1, ?2, ?3, ?4, ?5, ?5, ?5)";

const MARK_STUCK_QUEUED: &str = "update runs set stuck_queued_at = ?2 where message_id = ?1";

const PRUNE: &str = "\
delete from forward_outbox where id in (
    select id from forward_outbox
    where state in ('delivered', 'failed')
      and coalesce(delivered_at, last_attempt_at, queued_at) < ?1
    limit ?2)";

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    id: i64,
    target: StoredText,
    message_id: StoredText,
    event_type: StoredText,
    run: StoredText,
    committed_at: StoredText,
    queued_at: StoredText,
    attempts: i32,
}

fn stored_time(text: StoredText) -> Result<DateTime<Utc>, StoreError> {
    Ok(time_read_leniently(&text.0))
}

pub(super) async fn claim(
    store: &SqliteStore,
    target: &str,
    limit: u32,
    lease: Lease,
    now: DateTime<Utc>,
) -> Result<Vec<OutboxMessage>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut tx = store.sqlx_writer.begin().await?;
    let rows: Vec<ClaimedRow> = sqlx::query_as(CLAIM)
        .bind(target)
        .bind(i64::from(limit))
        .bind(lease.owner.to_string())
        .bind(time_text(lease.until))
        .bind(time_text(now))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    let mut messages = rows
        .into_iter()
        .map(|row| {
            Ok(OutboxMessage {
                id: row.id,
                target: row.target.into_string(),
                message_id: row.message_id.into_string(),
                event_type: row.event_type.into_string(),
                run: row.run.into_string(),
                committed_at: stored_time(row.committed_at)?,
                queued_at: stored_time(row.queued_at)?,
                attempts: row.attempts,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    // `returning` follows no order.
    messages.sort_by_key(|message| message.id);
    Ok(messages)
}

pub(super) async fn finish(
    store: &SqliteStore,
    attempts: &[FinishedAttempt],
) -> Result<u64, StoreError> {
    if attempts.is_empty() {
        return Ok(0);
    }
    let mut tx = store.sqlx_writer.begin().await?;
    let mut recorded = 0;
    for attempt in attempts {
        let (kind, next, error) = match &attempt.outcome {
            AttemptOutcome::Delivered => ("delivered", None, None),
            AttemptOutcome::Retry {
                next_attempt_at,
                error,
            } => (
                "retry",
                Some(time_text(*next_attempt_at)),
                Some(error.as_str()),
            ),
            AttemptOutcome::Failed { error } => ("failed", None, Some(error.as_str())),
        };
        let counted = sqlx::query(FINISH)
            .bind(attempt.id)
            .bind(attempt.lease_owner.to_string())
            .bind(kind)
            .bind(time_text(attempt.attempted_at))
            .bind(next.as_deref())
            .bind(error)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if let (1, Some(next)) = (counted, next.as_deref()) {
            sqlx::query(HOLD_BACK)
                .bind(attempt.id)
                .bind(next)
                .execute(&mut *tx)
                .await?;
        }
        recorded += counted;
    }
    tx.commit().await?;
    Ok(recorded)
}

pub(super) async fn next_due(
    store: &SqliteStore,
    target: &str,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    let due: Option<String> = sqlx::query_scalar(NEXT_DUE)
        .bind(target)
        .bind(time_text(now))
        .fetch_one(&store.readers)
        .await?;
    // A worker's schedule, not something shown: a time that does not parse is an error.
    due.as_deref().map(time_from_text).transpose()
}

pub(super) async fn queue(store: &SqliteStore, target: &str) -> Result<TargetQueue, StoreError> {
    let (pending, oldest, failed, last_error): (i64, Option<StoredText>, i64, Option<StoredText>) =
        sqlx::query_as(QUEUE)
            .bind(target)
            .fetch_one(&store.readers)
            .await?;
    Ok(TargetQueue {
        pending: u64::try_from(pending).unwrap_or(0),
        oldest_pending_queued_at: oldest.map(stored_time).transpose()?,
        failed: u64::try_from(failed).unwrap_or(0),
        last_error: last_error.map(StoredText::into_string),
    })
}

pub(super) async fn list_failed(
    store: &SqliteStore,
    target: &str,
    limit: u32,
    before: Option<i64>,
) -> Result<FailedPage, StoreError> {
    let rows: Vec<FailedRow<StoredText>> = sqlx::query_as(LIST_FAILED)
        .bind(target)
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit) + 1)
        .fetch_all(&store.readers)
        .await?;
    outbox::failed_page(rows, limit, stored_time)
}

pub(super) async fn retry_failed(
    store: &SqliteStore,
    target: &str,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let mut tx = store.sqlx_writer.begin().await?;
    let done = sqlx::query(RETRY_FAILED)
        .bind(target)
        .bind(time_text(now))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

pub(super) async fn replay(
    store: &SqliteStore,
    target: &str,
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let mut tx = store.sqlx_writer.begin().await?;
    let done = sqlx::query(REPLAY)
        .bind(target)
        .bind(time_text(since))
        .bind(until.map(time_text))
        .bind(time_text(now))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

pub(super) async fn queue_stuck(
    store: &SqliteStore,
    changed_before: DateTime<Utc>,
    limit: u32,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    if store.forward_targets.is_empty() || limit == 0 {
        return Ok(0);
    }
    let now = time_text(now);
    let mut tx = store.sqlx_writer.begin().await?;
    let rows: Vec<RunRow<StoredText>> = sqlx::query_as(super::RUNS_TO_QUEUE_STUCK)
        .bind(time_text(changed_before))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
    let queued = rows.len() as u64;
    for row in rows {
        let run = run_from_row(row)?;
        let message_id = run.message_id.clone();
        let json = outbox::stuck_run_json(run)?;
        for target in store.forward_targets.iter() {
            sqlx::query(INSERT_STUCK)
                .bind(target)
                .bind(&message_id)
                .bind(outbox::STUCK)
                .bind(&json)
                .bind(&now)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(MARK_STUCK_QUEUED)
            .bind(&message_id)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(queued)
}

pub(super) async fn prune(
    store: &SqliteStore,
    before: DateTime<Utc>,
    limit: u32,
) -> Result<u64, StoreError> {
    let mut tx = store.sqlx_writer.begin().await?;
    let done = sqlx::query(PRUNE)
        .bind(time_text(before))
        .bind(i64::from(limit))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}
