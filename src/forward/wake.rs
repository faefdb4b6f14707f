//! Waking the delivery workers when messages are queued, instead of polling.
//!
//! One [`Notify`] per target: `notify_one` keeps a permit when the worker is busy, so a wake
//! that arrives between its claim and its wait is never lost. Commits in this process wake it
//! directly; commits on other replicas arrive through the store's feed (PostgreSQL
//! `LISTEN/NOTIFY`); `forward.poll_interval` is the safety net behind both.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::Notify;

/// Cheap to clone; every clone wakes the same workers.
#[derive(Clone, Default)]
pub struct ForwardWake {
    targets: Arc<BTreeMap<String, Arc<Notify>>>,
}

impl ForwardWake {
    pub fn new<'a>(targets: impl IntoIterator<Item = &'a str>) -> Self {
        ForwardWake {
            targets: Arc::new(
                targets
                    .into_iter()
                    .map(|name| (name.to_owned(), Arc::new(Notify::new())))
                    .collect(),
            ),
        }
    }

    /// Messages were queued for every target: wake each worker (or leave it a permit).
    pub fn wake_all(&self) {
        for notify in self.targets.values() {
            notify.notify_one();
        }
    }

    /// Whether any target is configured: with none, nothing is ever queued.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// What a target's worker waits on.
    pub fn notified(&self, target: &str) -> Option<Arc<Notify>> {
        self.targets.get(target).cloned()
    }
}
