//! The background task that sweeps every `retention.sweep_interval` until the service drains.

use std::sync::Arc;

use chrono::Utc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{RetentionPolicy, Sweeper};
use crate::config::RetentionSettings;
use crate::metrics::{record_retention_sweep, SweepOutcome};
use crate::store::Store;

/// Sweeps `store` every `settings.sweep_interval`, the first time one interval after start (a
/// start is busy enough, and a crash loop should not sweep on every start), until `stop` is
/// cancelled. A failed sweep is logged and counted, and the next one tries again: each batch
/// committed on its own, so nothing done is lost.
pub fn spawn(
    store: Arc<dyn Store>,
    settings: &RetentionSettings,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let sweeper = Sweeper::new(store, RetentionPolicy::from(settings));
    let interval = settings.sweep_interval;
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        // A sweep longer than the interval is followed by the next one, not by a burst.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            // Stopping mid-sweep abandons the batch in flight, which rolls back: each batch is
            // its own transaction.
            let outcome = tokio::select! {
                () = stop.cancelled() => return,
                outcome = sweeper.sweep(Utc::now()) => outcome,
            };
            match outcome {
                Ok(report) if report.skipped => record_retention_sweep(SweepOutcome::Skipped),
                Ok(_) => record_retention_sweep(SweepOutcome::Done),
                Err(error) => {
                    tracing::warn!(%error, "retention sweep failed; the next one tries again");
                    record_retention_sweep(SweepOutcome::Failed);
                }
            }
        }
    })
}
