//! The hand-off at SIGTERM, so that a rolling deploy loses no request:
//!
//! 1. `/readyz` answers 503 at once, on every listener: load balancers take the replica out.
//! 2. Serving goes on for `http.shutdown_delay` (0 local, 5 s production), the time they take
//!    to notice; requests that still arrive are served.
//! 3. The listeners close (new connections are refused by the system), the handlers' draining
//!    token is cancelled (long polls answer at once), idle keep-alive connections close, and
//!    in-flight requests finish.
//! 4. The ingest writers commit what is queued.
//! 5. Forwarding stops claiming; sends in flight finish and are recorded (`forward::Forwarding`).
//!
//! Steps 3 to 5 share `http.shutdown_timeout`: the whole shutdown takes at most
//! `shutdown_delay + shutdown_timeout`. A callback still waiting when it runs out was never
//! acknowledged, so Nen sends it again.

use std::future::Future;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::callbacks::ingest::Writers;
use crate::http::readiness::Readiness;

/// Waits for `signal`, then steps 1 and 2; cancels `stop_accepting` when they are over.
pub async fn hand_off(
    signal: impl Future<Output = ()>,
    readiness: &Readiness,
    delay: Duration,
    stop_accepting: &CancellationToken,
) {
    signal.await;
    readiness.begin_shutdown();
    tracing::info!(
        delay_ms = delay.as_millis() as u64,
        "shutting down: not ready any more, serving on until the delay is over"
    );
    tokio::time::sleep(delay).await;
    stop_accepting.cancel();
}

/// Steps 3 and 4, once the listeners are closed, within `timeout` in all.
pub async fn drain(graceful: GracefulShutdown, writers: Writers, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    tracing::info!("shutting down: finishing in-flight requests");
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {timeout:?}");
    }
    // With the connections gone, nothing holds the ingest queue any more: the writers commit
    // what is queued and stop.
    writers
        .drain(deadline.saturating_duration_since(Instant::now()))
        .await;
}
