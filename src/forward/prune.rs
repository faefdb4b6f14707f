//! Deleting delivered and failed messages older than `forward.keep_delivered`, every
//! [`INTERVAL`], a batch of [`BATCH`] per transaction, so that a prune never holds up commits
//! for long. Pending messages are never pruned.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::OutboxSource;
use crate::store::StoreError;

pub const INTERVAL: Duration = Duration::from_secs(3600);
pub const BATCH: u32 = 1000;

/// Deletes every delivered or failed message last touched before `before`, batch after batch.
pub async fn prune(outbox: &dyn OutboxSource, before: DateTime<Utc>) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let deleted = outbox.outbox().prune_forwarded(before, BATCH).await?;
        total += deleted;
        if deleted < u64::from(BATCH) {
            return Ok(total);
        }
    }
}

/// Every [`INTERVAL`], the first one interval after start (like the retention sweep), until
/// `stop` is cancelled.
pub async fn run(outbox: Arc<dyn OutboxSource>, keep: Duration, stop: CancellationToken) {
    let Ok(keep) = chrono::Duration::from_std(keep) else {
        return;
    };
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + INTERVAL, INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(before) = Utc::now().checked_sub_signed(keep) else {
            continue;
        };
        let pruned = tokio::select! {
            () = stop.cancelled() => return,
            pruned = prune(outbox.as_ref(), before) => pruned,
        };
        match pruned {
            Ok(0) => {}
            Ok(messages) => tracing::info!(messages, "pruned forwarded messages"),
            Err(error) => {
                tracing::warn!(%error, "cannot prune forwarded messages; the next prune tries again")
            }
        }
    }
}
