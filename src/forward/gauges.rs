//! `nen_relay_forward_pending{target}` and `nen_relay_forward_oldest_pending_seconds{target}`,
//! counted by one task every [`INTERVAL`], never per scrape: a scrape costs nothing, and the
//! count costs the store one query per target every 15 s.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::OutboxSource;
use crate::metrics;

pub const INTERVAL: Duration = Duration::from_secs(15);

/// Counts every target's queue every [`INTERVAL`] until `stop` is cancelled.
pub async fn run(outbox: Arc<dyn OutboxSource>, targets: Vec<String>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        for target in &targets {
            match outbox.outbox().forward_queue(target).await {
                Ok(queue) => {
                    let oldest = queue
                        .oldest_pending_queued_at
                        .map(|queued_at| (Utc::now() - queued_at).num_milliseconds().max(0))
                        .unwrap_or(0);
                    metrics::set_forward_queue(target, queue.pending, oldest as f64 / 1000.0);
                }
                // The gauges keep their last values; /readyz reports the store's state.
                Err(error) => {
                    tracing::debug!(target_name = %target, %error, "cannot count the forwarding queue")
                }
            }
        }
    }
}
