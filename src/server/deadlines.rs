//! The two per-connection clocks, kept by the connection's own IO: a request head must arrive
//! within `header_read_timeout`, and a keep-alive connection may sit idle for `idle_timeout`.
//!
//! hyper's own `header_read_timeout` is not used: in hyper 1.x it also runs while a keep-alive
//! connection waits for its next request, which would cut every idle connection at the header
//! timeout and leave `idle_timeout` meaningless. Here the clocks follow the connection's phase:
//!
//! - `Head`: from the accept, or from the first byte after an idle spell, until the service is
//!   called (hyper has parsed a whole head): `header_read_timeout`. A connection that sends
//!   nothing, a partial head or anything that is not HTTP/1 is closed when it runs out.
//! - `Busy`: a request is being handled. No clock: handlers bound their own waits (the callback
//!   body timeout, the ack timeout, the long-poll limit).
//! - `Idle`: the last response was produced and nothing new has arrived: `idle_timeout`. It
//!   covers writing the response too, so a client that never reads its answer is cut off.
//!
//! When a clock runs out, reads and writes fail with `TimedOut`; hyper then drops the
//! connection without an answer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long each phase may last.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
}

/// Requests of one connection being handled now, shared by its IO and its service.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.0.clone())
    }

    fn any(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Busy,
    Idle,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Head => "head",
            Phase::Busy => "busy",
            Phase::Idle => "idle",
        }
    }
}

/// A connection's stream, failing its reads and writes once its phase's clock runs out.
pub struct DeadlineIo<T> {
    inner: T,
    in_flight: InFlight,
    timeouts: Timeouts,
    phase: Phase,
    deadline: Pin<Box<Sleep>>,
    expired: bool,
}

impl<T> DeadlineIo<T> {
    /// Starts in `Head`: the first request head is due within `header_read`.
    pub fn new(inner: T, in_flight: InFlight, timeouts: Timeouts) -> Self {
        Self {
            inner,
            in_flight,
            timeouts,
            phase: Phase::Head,
            deadline: Box::pin(tokio::time::sleep(timeouts.header_read)),
            expired: false,
        }
    }

    /// Follows the phase the service reports, then fails if the current clock has run out.
    /// Polling the clock registers the task's waker, so an expiry wakes the connection.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.in_flight.any() {
            self.phase = Phase::Busy;
            return Ok(());
        }
        if self.phase == Phase::Busy {
            self.phase = Phase::Idle;
            self.restart(self.timeouts.idle);
        }
        if self.expired || self.deadline.as_mut().poll(cx).is_ready() {
            if !self.expired {
                self.expired = true;
                crate::metrics::record_connection_timeout(self.phase.label());
            }
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connection timed out in phase {}", self.phase.label()),
            ));
        }
        Ok(())
    }

    fn restart(&mut self, after: Duration) {
        self.deadline.as_mut().reset(Instant::now() + after);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for DeadlineIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.check(cx)?;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.phase == Phase::Idle && buf.filled().len() > before {
            // The next request has begun: its head is due within the header timeout.
            this.phase = Phase::Head;
            this.restart(this.timeouts.header_read);
            // Register the waker with the new deadline.
            let _ = this.deadline.as_mut().poll(cx);
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DeadlineIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connection's service, counting the requests it is handling for `DeadlineIo`.
///
/// hyper calls it as soon as a head is parsed, so the count rises before the connection reads
/// any further; it falls when the response is produced.
pub struct CountRequests<S> {
    inner: S,
    in_flight: InFlight,
}

impl<S> CountRequests<S> {
    pub fn new(inner: S, in_flight: InFlight) -> Self {
        Self { inner, in_flight }
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for CountRequests<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let guard = self.in_flight.enter();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(guard);
            response
        })
    }
}
