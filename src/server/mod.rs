//! Serving HTTP/1.1 on a listener, with limits no client can get around.
//!
//! - `accept.rs`: the accept loop's step, which survives running out of file descriptors.
//! - `connection_limit.rs`: at most `http.max_connections` open connections per listener.
//! - `refusal.rs`: a connection past a limit is refused at once (a best-effort 503, closed).
//! - `deadlines.rs`: the header-read and idle clocks of each connection.
//! - `shutdown.rs`: the hand-off at SIGTERM: not ready, delay, stop accepting, drain.
//!
//! Only HTTP/1.1 is served. Nen's callbacks are HTTP/1.1 POSTs and proxies speak HTTP/1.1 to
//! their upstreams; HTTP/2 in clear text (prior knowledge) would only add a second protocol
//! state machine for anonymous clients to probe. An HTTP/2 preface is answered 400 and closed
//! as soon as its first line is in, and a partial one is closed by the header clock.

mod accept;
mod connection_limit;
mod deadlines;
mod refusal;
pub mod shutdown;

use std::net::SocketAddr;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::HttpSettings;
use accept::Acceptor;
use connection_limit::ConnectionLimit;
use deadlines::{CountRequests, DeadlineIo, InFlight, Timeouts};
use refusal::{refuse, Refusal};

/// One listener and the router it serves.
pub struct Server {
    acceptor: Acceptor,
    router: Router,
    limit: ConnectionLimit,
    timeouts: Timeouts,
    name: &'static str,
}

impl Server {
    /// `name` labels this listener's metrics and logs (`public`, `ops`).
    pub fn new(
        name: &'static str,
        listener: TcpListener,
        router: Router,
        http: &HttpSettings,
    ) -> Self {
        Self {
            acceptor: Acceptor::new(listener, name),
            router,
            limit: ConnectionLimit::new(http.max_connections, name),
            timeouts: Timeouts {
                header_read: http.header_read_timeout,
                idle: http.idle_timeout,
            },
            name,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.acceptor
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Accepts until `stop` is cancelled, then closes the listener (new connections are
    /// refused by the system). Accepted connections go on under `graceful`.
    pub async fn accept_until(mut self, stop: &CancellationToken, graceful: &GracefulShutdown) {
        loop {
            let stream = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                stream = self.acceptor.next(&self.limit) => stream,
            };
            let Some(open) = self.limit.try_open() else {
                refuse(stream, self.name, Refusal::MaxConnections);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let in_flight = InFlight::default();
            let io = TokioIo::new(DeadlineIo::new(stream, in_flight.clone(), self.timeouts));
            let service =
                CountRequests::new(TowerToHyperService::new(self.router.clone()), in_flight);
            let connection = http1::Builder::new()
                .keep_alive(true)
                // The clocks are `DeadlineIo`'s (see deadlines.rs for why not hyper's).
                .header_read_timeout(None)
                .serve_connection(io, service);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                let _ = connection.await;
                drop(open);
            });
        }
        tracing::info!(listener = self.name, "stopped accepting connections");
    }
}
