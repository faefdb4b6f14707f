//! The forwarding outbox on PostgreSQL (`store::outbox`): claims, outcomes, listings, retry and
//! replay, stuck runs and pruning. The messages of a change are written with the change, in
//! `postgres.rs`.
//!
//! Every write is one statement, or one transaction that locks what it changes: several
//! replicas share the table, and `for update skip locked` keeps any two from taking the same
//! message (or run) while neither waits for the other. Pending rows are found through the
//! partial indexes of migration 0005, whose predicate `state = 'pending'` (and `'failed'`) the
//! statements repeat word for word so that the planner can use them. Lease owners are bound as
//! text and cast, as sqlx here is built without its `uuid` feature.

use chrono::{DateTime, Utc};

use super::PostgresStore;
use crate::store::outbox::{
    self, AttemptOutcome, FailedPage, FailedRow, FinishedAttempt, Lease, OutboxMessage, TargetQueue,
};
use crate::store::rows::RunRow;
use crate::store::StoreError;

/// Claimable messages of `$1` (see `outbox`), soonest due first, locked so that a concurrent
/// claim skips them, then leased. `for update` re-reads a row another claim just committed,
/// and its new lease leaves it out. Later messages of a run wait while an earlier one is
/// pending, leased or not: a message is claimable only as the first pending one of its run.
/// The order across runs is free; within a run it is the id's.
///
/// Written so that the plan stays a short walk whatever the statistics (a fresh table has none,
/// and the plan an anti-join got without them joined every pending row to every other: 32 s
/// for 12,000 messages): the outer scan walks the due part of `forward_outbox_pending` in its
/// own order and stops at `$2` claimable rows, and the head-of-run check is a `limit 1` probe
/// of `forward_outbox_pending_run` per due row, never a join. 200,000 pending messages, 66,000
/// of them due: 0.6 ms without statistics.
const CLAIM: &str = "\
update forward_outbox set lease_owner = $3::text::uuid, lease_until = $4
where id in (
    select m.id from forward_outbox as m
    where m.target = $1 and m.state = 'pending'
      and m.next_attempt_at <= $5
      and (m.lease_until is null or m.lease_until <= $5)
      and m.id = (
          select earlier.id from forward_outbox as earlier
          where earlier.target = m.target and earlier.message_id = m.message_id
            and earlier.state = 'pending'
          order by earlier.id
          limit 1)
    order by m.next_attempt_at
    limit $2
    for update skip locked)
returning id, target, message_id, event_type, run, committed_at, queued_at, attempts";

/// Every outcome of a batch in one statement: `$4` is the kind (`delivered`, `retry`,
/// `failed`). Only the lease holder's outcome counts; a delivery clears the error, which
/// described an attempt before it. Returns how many outcomes counted.
///
/// `held_back`: a message sent again later holds back the later pending messages of its run,
/// which cannot go before it anyway: they become due no sooner than it. Otherwise they stay
/// due while it waits, and every claim walks past them (the claim's order probe still decides;
/// this only keeps the walk short while a target is down). They are disjoint from `finished`:
/// a message behind a pending one of its run is never claimed.
const FINISH: &str = "\
with finished as (
    update forward_outbox as m set
        state = case f.kind when 'delivered' then 'delivered'
                            when 'failed' then 'failed'
                            else 'pending' end,
        attempts = m.attempts + 1,
        last_attempt_at = f.attempted_at,
        delivered_at = case when f.kind = 'delivered' then f.attempted_at else m.delivered_at end,
        next_attempt_at = coalesce(f.next_attempt_at, m.next_attempt_at),
        last_error = case when f.kind = 'delivered' then null else f.error end,
        lease_owner = null,
        lease_until = null
    from unnest($1::int8[], $2::text[], $3::timestamptz[], $4::text[], $5::timestamptz[],
                $6::text[]) as f(id, owner, attempted_at, kind, next_attempt_at, error)
    where m.id = f.id and m.state = 'pending' and m.lease_owner = f.owner::uuid
    returning m.id, m.target, m.message_id, m.state, m.next_attempt_at),
held_back as (
    update forward_outbox as later set next_attempt_at = finished.next_attempt_at
    from finished
    where finished.state = 'pending'
      and later.target = finished.target and later.message_id = finished.message_id
      and later.state = 'pending' and later.id > finished.id
      and later.next_attempt_at < finished.next_attempt_at)
select count(*) from finished";

/// The soonest `next_attempt_at` after `$2`: one step into `forward_outbox_pending`.
const NEXT_DUE: &str = "\
select min(next_attempt_at) from forward_outbox
where target = $1 and state = 'pending' and next_attempt_at > $2";

/// A target's queue: every count and lookup walks a partial index, pending or failed, never
/// the delivered messages kept for replay. The latest error is looked up in each state apart:
/// `state in ('pending', 'failed')` was planned as a scan of the whole table, every
/// `gauges::INTERVAL`.
const QUEUE: &str = "\
select
    (select count(*) from forward_outbox where target = $1 and state = 'pending'),
    (select min(queued_at) from forward_outbox where target = $1 and state = 'pending'),
    (select count(*) from forward_outbox where target = $1 and state = 'failed'),
    (select last_error from (
         (select last_error, last_attempt_at, id from forward_outbox
          where target = $1 and state = 'pending' and last_error is not null
          order by last_attempt_at desc nulls last, id desc
          limit 1)
         union all
         (select last_error, last_attempt_at, id from forward_outbox
          where target = $1 and state = 'failed' and last_error is not null
          order by last_attempt_at desc nulls last, id desc
          limit 1)) as latest
     order by last_attempt_at desc nulls last, id desc
     limit 1)";

const LIST_FAILED: &str = "\
select id, event_type, message_id, committed_at, queued_at, attempts, last_attempt_at, last_error
from forward_outbox
where target = $1 and state = 'failed' and id < $2
order by id desc
limit $3";

const RETRY_FAILED: &str = "\
update forward_outbox set
    state = 'pending', attempts = 0, queued_at = $2, next_attempt_at = $2,
    lease_owner = null, lease_until = null
where target = $1 and state = 'failed'";

/// Delivered and failed messages committed in `[$2, $3)` go again; `delivered_at` belongs to
/// the delivery before and goes.
const REPLAY: &str = "\
update forward_outbox set
    state = 'pending', attempts = 0, queued_at = $4, next_attempt_at = $4,
    lease_owner = null, lease_until = null, delivered_at = null
where target = $1 and state in ('delivered', 'failed')
  and committed_at >= $2 and ($3::timestamptz is null or committed_at < $3)";

/// One message per run and target, due at once.
const INSERT_STUCK: &str = "\
insert into forward_outbox (target, message_id, event_type, run, committed_at, queued_at,
                            next_attempt_at)
select t.target, r.message_id, $4, r.run, $5, $5, $5
from unnest($1::text[]) as t(target)
cross join unnest($2::text[], $3::text[]) as r(message_id, run)";

const PRUNE: &str = "\
delete from forward_outbox where id in (
    select id from forward_outbox
    where state in ('delivered', 'failed')
      and coalesce(delivered_at, last_attempt_at, queued_at) < $1
    limit $2
    for update skip locked)";

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    id: i64,
    target: String,
    message_id: String,
    event_type: String,
    run: String,
    committed_at: DateTime<Utc>,
    queued_at: DateTime<Utc>,
    attempts: i32,
}

pub(super) async fn claim(
    store: &PostgresStore,
    target: &str,
    limit: u32,
    lease: Lease,
    now: DateTime<Utc>,
) -> Result<Vec<OutboxMessage>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let rows: Vec<ClaimedRow> = sqlx::query_as(CLAIM)
        .bind(target)
        .bind(i64::from(limit))
        .bind(lease.owner.to_string())
        .bind(lease.until)
        .bind(now)
        .fetch_all(&store.pool)
        .await?;
    let mut messages: Vec<OutboxMessage> = rows
        .into_iter()
        .map(|row| OutboxMessage {
            id: row.id,
            target: row.target,
            message_id: row.message_id,
            event_type: row.event_type,
            run: row.run,
            committed_at: row.committed_at,
            queued_at: row.queued_at,
            attempts: row.attempts,
        })
        .collect();
    // `returning` follows no order.
    messages.sort_by_key(|message| message.id);
    Ok(messages)
}

pub(super) async fn finish(
    store: &PostgresStore,
    attempts: &[FinishedAttempt],
) -> Result<u64, StoreError> {
    if attempts.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(attempts.len());
    let mut owners = Vec::with_capacity(attempts.len());
    let mut attempted_at = Vec::with_capacity(attempts.len());
    let mut kinds = Vec::with_capacity(attempts.len());
    let mut next_attempt_at = Vec::with_capacity(attempts.len());
    let mut errors = Vec::with_capacity(attempts.len());
    for attempt in attempts {
        ids.push(attempt.id);
        owners.push(attempt.lease_owner.to_string());
        attempted_at.push(attempt.attempted_at);
        let (kind, next, error) = match &attempt.outcome {
            AttemptOutcome::Delivered => ("delivered", None, None),
            AttemptOutcome::Retry {
                next_attempt_at,
                error,
            } => ("retry", Some(*next_attempt_at), Some(error.as_str())),
            AttemptOutcome::Failed { error } => ("failed", None, Some(error.as_str())),
        };
        kinds.push(kind);
        next_attempt_at.push(next);
        errors.push(error);
    }
    let counted: i64 = sqlx::query_scalar(FINISH)
        .bind(&ids)
        .bind(&owners)
        .bind(&attempted_at)
        .bind(&kinds)
        .bind(&next_attempt_at)
        .bind(&errors)
        .fetch_one(&store.pool)
        .await?;
    Ok(u64::try_from(counted).unwrap_or(0))
}

pub(super) async fn next_due(
    store: &PostgresStore,
    target: &str,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    Ok(sqlx::query_scalar(NEXT_DUE)
        .bind(target)
        .bind(now)
        .fetch_one(&store.pool)
        .await?)
}

pub(super) async fn queue(store: &PostgresStore, target: &str) -> Result<TargetQueue, StoreError> {
    let (pending, oldest, failed, last_error): (i64, Option<DateTime<Utc>>, i64, Option<String>) =
        sqlx::query_as(QUEUE)
            .bind(target)
            .fetch_one(&store.pool)
            .await?;
    Ok(TargetQueue {
        pending: u64::try_from(pending).unwrap_or(0),
        oldest_pending_queued_at: oldest,
        failed: u64::try_from(failed).unwrap_or(0),
        last_error,
    })
}

pub(super) async fn list_failed(
    store: &PostgresStore,
    target: &str,
    limit: u32,
    before: Option<i64>,
) -> Result<FailedPage, StoreError> {
    let rows: Vec<FailedRow<DateTime<Utc>>> = sqlx::query_as(LIST_FAILED)
        .bind(target)
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit) + 1)
        .fetch_all(&store.pool)
        .await?;
    outbox::failed_page(rows, limit, Ok)
}

pub(super) async fn retry_failed(
    store: &PostgresStore,
    target: &str,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let done = sqlx::query(RETRY_FAILED)
        .bind(target)
        .bind(now)
        .execute(&store.pool)
        .await?;
    Ok(done.rows_affected())
}

pub(super) async fn replay(
    store: &PostgresStore,
    target: &str,
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let mut tx = super::begin_with_custom_plans(&store.pool).await?;
    let done = sqlx::query(REPLAY)
        .bind(target)
        .bind(since)
        .bind(until)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

pub(super) async fn queue_stuck(
    store: &PostgresStore,
    changed_before: DateTime<Utc>,
    limit: u32,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    if store.forward_targets.is_empty() || limit == 0 {
        return Ok(0);
    }
    let mut tx = store.pool.begin().await?;
    // Locked until commit, and skipped by another replica's sweep meanwhile: a run is queued
    // once whichever replica gets to it.
    let mut rows: Vec<RunRow<DateTime<Utc>>> = sqlx::query_as(super::MARK_STUCK_RUNS)
        .bind(changed_before)
        .bind(i64::from(limit))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
    // `returning` follows no order; the messages go in the runs' order.
    rows.sort_by_key(|row| row.seq);
    if rows.is_empty() {
        return Ok(0);
    }
    let mut message_ids = Vec::with_capacity(rows.len());
    let mut runs = Vec::with_capacity(rows.len());
    for row in rows {
        let run = row.into_run(Ok)?;
        message_ids.push(run.message_id.clone());
        runs.push(outbox::stuck_run_json(run)?);
    }
    sqlx::query(INSERT_STUCK)
        .bind(&store.forward_targets)
        .bind(&message_ids)
        .bind(&runs)
        .bind(outbox::STUCK)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(message_ids.len() as u64)
}

pub(super) async fn prune(
    store: &PostgresStore,
    before: DateTime<Utc>,
    limit: u32,
) -> Result<u64, StoreError> {
    let mut tx = super::begin_with_custom_plans(&store.pool).await?;
    let done = sqlx::query(PRUNE)
        .bind(before)
        .bind(i64::from(limit))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}
