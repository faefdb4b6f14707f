//! What a retention sweep asks of a store: batches of pruning and deleting, each bounded and each
//! its own transaction. Which batches to run, in what order and how often is decided once, in
//! `crate::retention`; each backend writes the SQL of a batch (`postgres/sweep.rs`,
//! `sqlite/sweep.rs`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;

/// One batch of [`SweepSession::prune_payloads`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrunedPayloads {
    /// Events whose payload was removed.
    pub events: u64,
    /// The latest arrival among them: the next batch starts there, so that the events it had to
    /// step over (runs not yet terminal, or terminal too recently) are read once per sweep, not
    /// once per batch.
    pub reached: Option<DateTime<Utc>>,
}

/// A sweep in progress. While a session is open no other replica sweeps the same database; it
/// ends when the session is dropped.
///
/// Every call is one short transaction that touches at most `limit` rows, so that a sweep never
/// holds locks callbacks wait for longer than one small batch takes, and a failure loses one
/// batch at most. Rows a callback is writing at that moment are skipped, and left for the next
/// sweep.
#[async_trait]
pub trait SweepSession: Send {
    /// Removes the payloads of at most `limit` events that arrived before `cutoff`, and whose
    /// run turned terminal before `cutoff`, taken in arrival order from `from` on. The event,
    /// its counters and its body hash stay: a redelivery is still a duplicate.
    async fn prune_payloads(
        &mut self,
        cutoff: DateTime<Utc>,
        from: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<PrunedPayloads, StoreError>;

    /// Deletes at most `limit` runs that turned terminal before `cutoff`, with their events.
    /// Returns how many runs.
    async fn delete_runs(&mut self, cutoff: DateTime<Utc>, limit: u32) -> Result<u64, StoreError>;

    /// Deletes at most `limit` rejected payloads received before `cutoff`.
    async fn delete_rejected_payloads(
        &mut self,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// Deletes at most `limit` `Idempotency-Key` claims expired at `now`.
    async fn delete_expired_idempotency_keys(
        &mut self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;
}
