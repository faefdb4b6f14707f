//! Keeps this process subscribed to the terminal-run feed (PostgreSQL: one `LISTEN`
//! connection per process), and wakes the waiters each announcement names, and the forwarding
//! workers when another replica queued messages.
//!
//! A lost subscription is opened again with backoff (doubling from [`FIRST_BACKOFF`] up to
//! [`MAX_BACKOFF`]); once it is back, every waiter reads its run again and every forwarding
//! worker looks for due messages, since announcements made in between were missed. Meanwhile waiters still wake on this process's own commits and
//! on their own slow re-read (`query.wait_recheck`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::waiters::Waiters;
use crate::forward::ForwardWake;
use crate::metrics;
use crate::store::{FeedEvent, Store};

pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Listens until `stop` is cancelled. Does nothing for a store without a feed (SQLite).
pub fn spawn(
    store: Arc<dyn Store>,
    waiters: Waiters,
    forward_wake: ForwardWake,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            () = listen(store.as_ref(), &waiters, &forward_wake) => {}
            () = stop.cancelled() => {}
        }
    })
}

async fn listen(store: &dyn Store, waiters: &Waiters, forward_wake: &ForwardWake) {
    let mut backoff = FIRST_BACKOFF;
    let mut lost = false;
    loop {
        match store.terminal_run_feed().await {
            Ok(None) => return,
            Ok(Some(mut feed)) => {
                if lost {
                    resumed(waiters, forward_wake);
                }
                backoff = FIRST_BACKOFF;
                loop {
                    match feed.next().await {
                        Ok(FeedEvent::Terminal(message_ids)) => {
                            waiters.wake(message_ids.iter().map(String::as_str));
                        }
                        Ok(FeedEvent::WakeAll) => {
                            let rechecked = waiters.wake_all();
                            tracing::debug!(rechecked, "the terminal-run feed woke every waiter");
                        }
                        Ok(FeedEvent::Resumed) => resumed(waiters, forward_wake),
                        Ok(FeedEvent::ForwardQueued) => forward_wake.wake_all(),
                        Err(error) => {
                            tracing::warn!(%error, "terminal-run feed lost; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "cannot listen for terminal runs");
            }
        }
        lost = true;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The feed is back after a gap in which announcements may have been missed.
fn resumed(waiters: &Waiters, forward_wake: &ForwardWake) {
    let rechecked = waiters.wake_all();
    forward_wake.wake_all();
    metrics::record_feed_reconnect();
    tracing::info!(
        rechecked,
        "terminal-run feed reconnected; waiting requests re-read their runs"
    );
}
