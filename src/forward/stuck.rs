//! Forwarding each stuck run once as `run.stuck` (SPEC, "Stuck runs").
//!
//! Every [`INTERVAL`] (as often as the stuck gauge counts), one task asks the store to queue
//! `run.stuck` for the runs that became stuck and have none queued since they last changed
//! ([`Outbox::queue_stuck_runs`](crate::store::Outbox::queue_stuck_runs), which writes the
//! messages and the marks in one transaction: once per stuck spell, across restarts and
//! replicas). It runs only when targets exist.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::{ForwardWake, OutboxSource};
use crate::runs::stuck::{StuckRule, GAUGE_INTERVAL};
use crate::store::StoreError;

pub const INTERVAL: Duration = GAUGE_INTERVAL;
/// Runs queued per transaction.
pub const BATCH: u32 = 500;

/// Queues `run.stuck` for every run stuck at `now`, a batch at a time until a batch comes back
/// short. Answers how many runs were queued.
pub async fn queue_stuck(
    outbox: &dyn OutboxSource,
    rule: StuckRule,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let queued = outbox
            .outbox()
            .queue_stuck_runs(rule.changed_before(now), BATCH, now)
            .await?;
        total += queued;
        if queued < u64::from(BATCH) {
            return Ok(total);
        }
    }
}

/// Every [`INTERVAL`] until `stop` is cancelled; wakes the workers when anything was queued.
pub async fn run(
    outbox: Arc<dyn OutboxSource>,
    rule: StuckRule,
    wake: ForwardWake,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let queued = tokio::select! {
            () = stop.cancelled() => return,
            queued = queue_stuck(outbox.as_ref(), rule, Utc::now()) => queued,
        };
        match queued {
            Ok(0) => {}
            Ok(runs) => {
                tracing::info!(runs, "queued run.stuck for runs that became stuck");
                wake.wake_all();
            }
            // Whatever was committed stays queued; the next tick picks up the rest.
            Err(error) => tracing::warn!(%error, "cannot queue run.stuck messages"),
        }
    }
}
