//! Retention: what is pruned or deleted, and when (`retention.*` settings).
//!
//! - payloads of events whose run turned terminal more than `retention.payloads` ago (the
//!   events stay, with their body hash, so deduplication is unchanged);
//! - runs terminal for more than `retention.runs`, with their events;
//! - rejected payloads older than `retention.rejected`;
//! - `Idempotency-Key` claims past their expiry, always.
//!
//! A [`Sweeper`] does all of it for one instant (`sweep(now)`, deterministic, which the tests
//! use); `task` runs it every `retention.sweep_interval`. The store does each step in small
//! batches (see `store::retention`), so that a sweep never holds up callbacks for long.

mod task;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::RetentionSettings;
use crate::metrics::{record_retention_swept, RetentionKind};
use crate::store::{Store, StoreError, SweepSession};

pub use task::spawn;

/// Rows per batch: each batch is one transaction, short enough that a callback waiting behind
/// one (SQLite's single writer) or on one of its rows (PostgreSQL) hardly notices.
pub const BATCH_SIZE: u32 = 1000;

/// After a full batch, a sweep rests as long as that batch took (at most this), so that it uses
/// at most about half of what the database can give, and callbacks keep the rest: measured with
/// `bench/retention-sweep.sh`, a payload sweep running flat out cut the callback rate by 45%.
const MAX_REST: Duration = Duration::from_secs(1);

/// How long each kind of data is kept; `None` keeps it forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionPolicy {
    pub payloads: Option<Duration>,
    pub runs: Option<Duration>,
    pub rejected: Option<Duration>,
}

impl From<&RetentionSettings> for RetentionPolicy {
    fn from(settings: &RetentionSettings) -> Self {
        Self {
            payloads: settings.payloads,
            runs: settings.runs,
            rejected: settings.rejected,
        }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SweepReport {
    /// Another replica was sweeping: this one did nothing.
    pub skipped: bool,
    pub runs_deleted: u64,
    pub payloads_pruned: u64,
    pub rejected_deleted: u64,
    pub idempotency_keys_deleted: u64,
    /// Statements run, over every kind (each its own transaction).
    pub batches: u64,
}

impl SweepReport {
    fn total(&self) -> u64 {
        self.runs_deleted
            + self.payloads_pruned
            + self.rejected_deleted
            + self.idempotency_keys_deleted
    }
}

/// Applies a [`RetentionPolicy`] to a store.
pub struct Sweeper {
    store: Arc<dyn Store>,
    policy: RetentionPolicy,
    batch_size: u32,
}

impl Sweeper {
    pub fn new(store: Arc<dyn Store>, policy: RetentionPolicy) -> Self {
        Self {
            store,
            policy,
            batch_size: BATCH_SIZE,
        }
    }

    /// Smaller batches (tests use this to sweep more rows than one batch holds).
    pub fn with_batch_size(mut self, batch_size: u32) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Sweeps everything due at `now`, batch after batch until nothing is left. Runs go before
    /// payloads, since deleting a run takes its events' payloads with it.
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<SweepReport, StoreError> {
        let Some(mut session) = self.store.begin_sweep().await? else {
            return Ok(SweepReport {
                skipped: true,
                ..SweepReport::default()
            });
        };
        let started = Instant::now();
        let mut report = SweepReport::default();
        let session = session.as_mut();
        if let Some(cutoff) = cutoff(now, self.policy.runs) {
            report.runs_deleted = self
                .delete(session, Deletion::Runs, cutoff, &mut report.batches)
                .await?;
        }
        if let Some(cutoff) = cutoff(now, self.policy.payloads) {
            report.payloads_pruned = self
                .prune_payloads(session, cutoff, &mut report.batches)
                .await?;
        }
        if let Some(cutoff) = cutoff(now, self.policy.rejected) {
            report.rejected_deleted = self
                .delete(session, Deletion::Rejected, cutoff, &mut report.batches)
                .await?;
        }
        report.idempotency_keys_deleted = self
            .delete(session, Deletion::IdempotencyKeys, now, &mut report.batches)
            .await?;
        if report.total() > 0 {
            tracing::info!(
                runs = report.runs_deleted,
                payloads = report.payloads_pruned,
                rejected = report.rejected_deleted,
                idempotency_keys = report.idempotency_keys_deleted,
                batches = report.batches,
                seconds = started.elapsed().as_secs_f64(),
                "retention sweep done"
            );
        }
        Ok(report)
    }

    /// Deletes in batches until one comes back with fewer rows than a batch holds.
    async fn delete(
        &self,
        session: &mut dyn SweepSession,
        deletion: Deletion,
        before: DateTime<Utc>,
        batches: &mut u64,
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let started = Instant::now();
            let deleted = match deletion {
                Deletion::Runs => session.delete_runs(before, self.batch_size).await?,
                Deletion::Rejected => {
                    session
                        .delete_rejected_payloads(before, self.batch_size)
                        .await?
                }
                Deletion::IdempotencyKeys => {
                    session
                        .delete_expired_idempotency_keys(before, self.batch_size)
                        .await?
                }
            };
            *batches += 1;
            total += deleted;
            record_retention_swept(deletion.kind(), deleted);
            if deleted < u64::from(self.batch_size) {
                return Ok(total);
            }
            rest_after(started).await;
        }
    }

    /// Like `delete`, each batch starting where the previous one stopped.
    async fn prune_payloads(
        &self,
        session: &mut dyn SweepSession,
        cutoff: DateTime<Utc>,
        batches: &mut u64,
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        let mut from = None;
        loop {
            let started = Instant::now();
            let pruned = session
                .prune_payloads(cutoff, from, self.batch_size)
                .await?;
            *batches += 1;
            total += pruned.events;
            record_retention_swept(RetentionKind::Payloads, pruned.events);
            if pruned.events < u64::from(self.batch_size) {
                return Ok(total);
            }
            from = pruned.reached.or(from);
            rest_after(started).await;
        }
    }
}

/// Rests as long as the batch that started at `started` took, at most [`MAX_REST`].
async fn rest_after(started: Instant) {
    tokio::time::sleep(started.elapsed().min(MAX_REST)).await;
}

/// What `Sweeper::delete` deletes.
#[derive(Debug, Clone, Copy)]
enum Deletion {
    Runs,
    Rejected,
    IdempotencyKeys,
}

impl Deletion {
    fn kind(self) -> RetentionKind {
        match self {
            Deletion::Runs => RetentionKind::Runs,
            Deletion::Rejected => RetentionKind::Rejected,
            Deletion::IdempotencyKeys => RetentionKind::IdempotencyKeys,
        }
    }
}

/// `now` minus `period`; `None` when the period is off, or reaches before any stored time.
fn cutoff(now: DateTime<Utc>, period: Option<Duration>) -> Option<DateTime<Utc>> {
    let period = chrono::Duration::from_std(period?).ok()?;
    now.checked_sub_signed(period)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_cutoff_is_now_minus_the_period_and_off_means_none() {
        let now = Utc.timestamp_opt(1_760_000_000, 0).unwrap();
        assert_eq!(
            cutoff(now, Some(Duration::from_secs(86_400))),
            Some(Utc.timestamp_opt(1_759_913_600, 0).unwrap())
        );
        assert_eq!(cutoff(now, None), None);
        assert_eq!(cutoff(now, Some(Duration::from_secs(u64::MAX))), None);
    }
}
