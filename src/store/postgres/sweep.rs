//! The retention sweep's SQL on PostgreSQL (see `store::retention`).
//!
//! A sweep runs on a connection of its own, opened for it, with the pool's statement and lock
//! timeouts: it takes nothing from the pool callbacks use, and no batch can run long. That
//! connection holds a session advisory lock while the sweep lasts, so that one replica sweeps at
//! a time; the lock goes with the connection, even when the process dies mid-sweep.
//!
//! Each batch is one statement (its own transaction) that picks its rows with
//! `for update skip locked`: a row a callback is writing is left for the next sweep rather than
//! waited for.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;

use crate::store::retention::{PrunedPayloads, SweepSession};
use crate::store::StoreError;

/// The advisory lock key of the retention sweep ("nen-rlay" in ASCII). sqlx's migrator derives
/// its key from the database name, times 0x3d32ad9e; this constant is not such a product.
const SWEEP_LOCK: i64 = 0x6e65_6e2d_726c_6179;

pub struct PostgresSweep {
    connection: PgConnection,
}

impl PostgresSweep {
    /// Opens the sweep's connection and takes the lock; `None` when another replica holds it.
    pub async fn begin(options: &PgConnectOptions) -> Result<Option<Self>, StoreError> {
        let mut connection =
            PgConnection::connect_with(&options.clone().application_name("nen-relay sweep"))
                .await?;
        let locked: bool = sqlx::query_scalar("select pg_try_advisory_lock($1)")
            .bind(SWEEP_LOCK)
            .fetch_one(&mut connection)
            .await?;
        if !locked {
            let _ = connection.close().await;
            return Ok(None);
        }
        Ok(Some(Self { connection }))
    }
}

/// Walks `events_unpruned_received_at` from `$3`; each event's run is found by its key.
const PRUNE_PAYLOADS: &str = "\
with due as (
    select events.id
    from events
    join runs on runs.message_id = events.message_id
    where not events.payload_pruned
      and events.received_at < $1
      and events.received_at >= coalesce($3, '-infinity'::timestamptz)
      and runs.status_rank = 2
      and runs.completed_at < $1
    order by events.received_at
    limit $2
    for update of events skip locked),
pruned as (
    update events set payload = '', payload_pruned = true
    from due
    where events.id = due.id
    returning events.received_at)
select count(*), max(received_at) from pruned";

// The deletions name their rows as `= any(array(...))`: an index lookup per row. Written as a
// join, the planner hashed the whole table for every batch of a thousand (seen at 100,000 runs).

/// Walks `runs_terminal_completed_at`; the events go in the same statement, by their key.
const DELETE_RUNS: &str = "\
with due as materialized (
    select message_id
    from runs
    where status_rank = 2 and completed_at < $1
    order by completed_at
    limit $2
    for update skip locked),
deleted_events as (
    delete from events where message_id = any(array(select message_id from due)))
delete from runs where message_id = any(array(select message_id from due))";

const DELETE_REJECTED_PAYLOADS: &str = "\
delete from rejected_payloads
where id = any(array(
    select id from rejected_payloads
    where received_at < $1
    order by received_at
    limit $2
    for update skip locked))";

/// Expired as `claim_idempotency_key` sees it: `expires_at <= now`.
const DELETE_EXPIRED_IDEMPOTENCY_KEYS: &str = "\
delete from idempotency_keys
where key = any(array(
    select key from idempotency_keys
    where expires_at <= $1
    order by expires_at
    limit $2
    for update skip locked))";

#[async_trait]
impl SweepSession for PostgresSweep {
    async fn prune_payloads(
        &mut self,
        cutoff: DateTime<Utc>,
        from: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<PrunedPayloads, StoreError> {
        let (events, reached): (i64, Option<DateTime<Utc>>) = sqlx::query_as(PRUNE_PAYLOADS)
            .bind(cutoff)
            .bind(i64::from(limit))
            .bind(from)
            .fetch_one(&mut self.connection)
            .await?;
        Ok(PrunedPayloads {
            events: events.max(0) as u64,
            reached,
        })
    }

    async fn delete_runs(&mut self, cutoff: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        self.delete(DELETE_RUNS, cutoff, limit).await
    }

    async fn delete_rejected_payloads(
        &mut self,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.delete(DELETE_REJECTED_PAYLOADS, cutoff, limit).await
    }

    async fn delete_expired_idempotency_keys(
        &mut self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.delete(DELETE_EXPIRED_IDEMPOTENCY_KEYS, now, limit)
            .await
    }
}

impl PostgresSweep {
    async fn delete(
        &mut self,
        statement: &'static str,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(statement)
            .bind(before)
            .bind(i64::from(limit))
            .execute(&mut self.connection)
            .await?;
        Ok(done.rows_affected())
    }
}
