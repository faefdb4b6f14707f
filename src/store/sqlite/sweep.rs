//! The retention sweep's SQL on SQLite (see `store::retention`).
//!
//! One process writes a SQLite file, so no lock between replicas is needed. Each batch is one
//! `begin immediate` transaction in its turn (`turns`): callback batches take their turns in
//! the same queue, between two of the sweep's, so a sweep delays a callback by one small batch
//! at most.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::turns::SqlxWriter;
use super::{time_from_text, time_text};
use crate::store::retention::{PrunedPayloads, SweepSession};
use crate::store::StoreError;

pub struct SqliteSweep {
    writer: SqlxWriter,
}

impl SqliteSweep {
    pub(super) fn new(writer: SqlxWriter) -> Self {
        Self { writer }
    }
}

/// Walks `events_unpruned_received_at` (its condition is spelled `payload_pruned = 0`, so that
/// SQLite uses it) from `?3`; each event's run is found by its key.
const PRUNE_PAYLOADS: &str = "\
update events set payload = '', payload_pruned = 1
where id in (
    select events.id
    from events
    join runs on runs.seq = events.run_seq
    where events.payload_pruned = 0
      and events.received_at < ?1
      and events.received_at >= ?3
      and runs.status_rank = 2
      and runs.completed_at < ?1
    order by events.received_at
    limit ?2)
returning received_at";

const DUE_RUNS: &str = "\
select message_id from runs
where status_rank = 2 and completed_at < ?1
order by completed_at
limit ?2";

/// Before `DELETE_RUNS`: events are found through their run (migration 0007).
const DELETE_EVENTS_OF_RUNS: &str = "\
delete from events where run_seq in (
    select seq from runs where message_id in (select value from json_each(?1)))";

const DELETE_RUNS: &str = "delete from runs where message_id in (select value from json_each(?1))";

const DELETE_REJECTED_PAYLOADS: &str = "\
delete from rejected_payloads
where id in (
    select id from rejected_payloads
    where received_at < ?1
    order by received_at
    limit ?2)";

/// Expired as `claim_idempotency_key` sees it: `expires_at <= now`.
const DELETE_EXPIRED_IDEMPOTENCY_KEYS: &str = "\
delete from idempotency_keys
where key in (
    select key from idempotency_keys
    where expires_at <= ?1
    order by expires_at
    limit ?2)";

#[async_trait]
impl SweepSession for SqliteSweep {
    async fn prune_payloads(
        &mut self,
        cutoff: DateTime<Utc>,
        from: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<PrunedPayloads, StoreError> {
        let mut tx = self.writer.begin().await?;
        let arrivals: Vec<String> = sqlx::query_scalar(PRUNE_PAYLOADS)
            .bind(time_text(cutoff))
            .bind(i64::from(limit))
            // Every stored time sorts after the empty text.
            .bind(from.map(time_text).unwrap_or_default())
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        // Fixed-width times sort as text: the greatest text is the latest arrival.
        let reached = arrivals
            .iter()
            .max()
            .map(|text| time_from_text(text))
            .transpose()?;
        Ok(PrunedPayloads {
            events: arrivals.len() as u64,
            reached,
        })
    }

    async fn delete_runs(&mut self, cutoff: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        let mut tx = self.writer.begin().await?;
        let due: Vec<String> = sqlx::query_scalar(DUE_RUNS)
            .bind(time_text(cutoff))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        if due.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let due = serde_json::to_string(&due).map_err(|error| {
            StoreError::Internal(format!("cannot list the runs to delete: {error}"))
        })?;
        sqlx::query(DELETE_EVENTS_OF_RUNS)
            .bind(&due)
            .execute(&mut *tx)
            .await?;
        let deleted = sqlx::query(DELETE_RUNS)
            .bind(&due)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(deleted)
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

impl SqliteSweep {
    /// One statement on the write connection: its own transaction.
    async fn delete(
        &mut self,
        statement: &'static str,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let delete = sqlx::query(statement)
            .bind(time_text(before))
            .bind(i64::from(limit));
        let done = self.writer.execute(delete).await?;
        Ok(done.rows_affected())
    }
}
