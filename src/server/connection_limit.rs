//! At most `http.max_connections` connections per listener. A connection holds its permit for
//! as long as it lives; the gauge of open connections moves with the permits.

use std::sync::Arc;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The permits of one listener, and a signal raised whenever one comes back.
#[derive(Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    released: Arc<Notify>,
    listener: &'static str,
}

impl ConnectionLimit {
    pub fn new(max_connections: usize, listener: &'static str) -> Self {
        crate::metrics::set_connections_open(listener, 0);
        Self {
            permits: Arc::new(Semaphore::new(max_connections)),
            released: Arc::new(Notify::new()),
            listener,
        }
    }

    /// A permit for one more connection, or `None` at the cap: the caller refuses at once
    /// rather than waiting, so that the rest keep being served.
    pub fn try_open(&self) -> Option<OpenConnection> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        crate::metrics::connection_opened(self.listener);
        Some(OpenConnection {
            _permit: permit,
            released: self.released.clone(),
            listener: self.listener,
        })
    }

    /// Completes when a connection closes (or one closed since the last call): its file
    /// descriptor is free again.
    pub async fn released(&self) {
        self.released.notified().await;
    }
}

/// Held by a connection's task; dropping it gives the permit back.
pub struct OpenConnection {
    _permit: OwnedSemaphorePermit,
    released: Arc<Notify>,
    listener: &'static str,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        crate::metrics::connection_closed(self.listener);
        // notify_one keeps the wake-up for an accept loop that is not waiting yet.
        self.released.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_holds_and_a_closed_connection_frees_its_place() {
        let limit = ConnectionLimit::new(2, "test");
        let first = limit.try_open().expect("room for the first");
        let _second = limit.try_open().expect("room for the second");
        assert!(limit.try_open().is_none(), "a third is refused");
        drop(first);
        assert!(limit.try_open().is_some(), "a closed one frees its place");
    }
}
