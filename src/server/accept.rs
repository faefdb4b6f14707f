//! The accept loop's one step: the next connection, whatever accept(2) says meanwhile.
//!
//! Running out of file descriptors (EMFILE, ENFILE) must neither stop the loop nor spin it:
//! the pending connection stays in the backlog and accept fails again at once. Two answers:
//!
//! - A spare descriptor (`/dev/null`) is held from the start. On EMFILE it is closed, the
//!   waiting connection accepted with the freed slot and refused at once (503), and the spare
//!   reopened: clients are told at once instead of hanging in the backlog.
//! - When that is not possible (the spare could not be reopened, or the error is another
//!   one), the loop waits: until one of this listener's connections closes (a descriptor is
//!   free again) or a short backoff passes, doubling up to 250 ms while errors last. Each
//!   retry first tries to get the spare back.
//!
//! Warnings are rate-limited: one per `WARN_EVERY`, with the count of errors since the last.

use std::fs::File;
use std::io;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use super::connection_limit::ConnectionLimit;
use super::refusal::{refuse, Refusal};

const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(250);
const WARN_EVERY: Duration = Duration::from_secs(10);
const SPARE_ACCEPT_WAIT: Duration = Duration::from_millis(10);

pub struct Acceptor {
    listener: TcpListener,
    name: &'static str,
    spare: Option<File>,
    backoff: Duration,
    last_warning: Option<Instant>,
    unreported: u64,
}

impl Acceptor {
    pub fn new(listener: TcpListener, name: &'static str) -> Self {
        Self {
            listener,
            name,
            spare: open_spare(),
            backoff: FIRST_BACKOFF,
            last_warning: None,
            unreported: 0,
        }
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// The next accepted connection. Never fails; cancel-safe.
    pub async fn next(&mut self, limit: &ConnectionLimit) -> TcpStream {
        loop {
            let error = match self.listener.accept().await {
                Ok((stream, _peer)) => {
                    self.backoff = FIRST_BACKOFF;
                    if self.spare.is_none() {
                        self.spare = open_spare();
                    }
                    return stream;
                }
                Err(error) => error,
            };
            if is_per_connection(&error) {
                // That one connection failed (e.g. reset before it was accepted); the
                // listener is fine.
                continue;
            }
            self.warn(&error);
            if self.spare.is_none() {
                // Lost to another opener the last time; a descriptor may be free again.
                self.spare = open_spare();
            }
            if is_out_of_descriptors(&error) && self.refuse_one_with_the_spare().await {
                continue;
            }
            tokio::select! {
                () = limit.released() => {}
                () = tokio::time::sleep(self.backoff) => {}
            }
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Frees the spare descriptor to accept one waiting connection and refuse it. False when
    /// there is no spare, or nothing could be accepted with it.
    async fn refuse_one_with_the_spare(&mut self) -> bool {
        let Some(spare) = self.spare.take() else {
            return false;
        };
        drop(spare);
        // A connection is waiting (accept just failed on it), so this returns at once; the
        // bound only covers one that went away meanwhile. Awaited rather than polled once, so
        // that tokio's cooperative budget delays it (a yield) instead of failing it.
        let accepted = tokio::time::timeout(SPARE_ACCEPT_WAIT, self.listener.accept()).await;
        let refused = match accepted {
            Ok(Ok((stream, _peer))) => {
                refuse(stream, self.name, Refusal::OutOfFileDescriptors);
                true
            }
            _ => false,
        };
        self.spare = open_spare();
        refused && self.spare.is_some()
    }

    fn warn(&mut self, error: &io::Error) {
        self.unreported += 1;
        let due = self
            .last_warning
            .is_none_or(|last| last.elapsed() >= WARN_EVERY);
        if due {
            tracing::warn!(
                %error,
                listener = self.name,
                errors = self.unreported,
                "accept failed; refusing or waiting until descriptors are free"
            );
            self.last_warning = Some(Instant::now());
            self.unreported = 0;
        }
    }
}

/// A descriptor kept in reserve to refuse connections when the process has none left.
fn open_spare() -> Option<File> {
    File::open("/dev/null").ok()
}

fn is_out_of_descriptors(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Errors about the one connection being accepted, not about the listener or the process.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    ) || matches!(error.raw_os_error(), Some(libc::EPROTO))
}
