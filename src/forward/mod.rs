//! Forwarding: every change of a run, sent to the team's own systems (SPEC, "Forwarding to your
//! systems").
//!
//! - `target`: a configured target, checked, with its Standard Webhooks key;
//! - `admin`: what an operator asks of it: each target's queue, failed messages, retry, replay;
//! - `wake`: how commits wake the delivery workers;
//! - `envelope`, `signature`: the body and the Standard Webhooks headers of a message;
//! - `send`: one attempt, over the shared HTTP client;
//! - `backoff`: when a message that was not delivered goes again, or is kept as failed;
//! - `worker`: one per target, claiming, sending and recording;
//! - `gauges`, `stuck`, `prune`: the queue gauges, `run.stuck` messages, and pruning;
//! - `tasks`: starting and stopping all of them.
//!
//! The messages themselves are written by the store, in the transaction that commits each change
//! (`store::outbox`): a crash loses none.

pub mod admin;
mod backoff;
mod envelope;
mod gauges;
mod outage;
mod prune;
mod send;
mod signature;
mod stuck;
mod target;
mod tasks;
mod wake;
mod worker;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod worker_tests;

use std::sync::Arc;

pub use backoff::Backoff;
pub use envelope::body as envelope_body;
pub use signature::sign;
pub use target::Target;
pub use tasks::Forwarding;
pub use wake::ForwardWake;
pub use worker::{Worker, WorkerSettings};

use crate::store::{Outbox, Store};

/// Where the forwarding tasks find the outbox: the store, or an in-memory fake in tests.
pub trait OutboxSource: Send + Sync + 'static {
    fn outbox(&self) -> &dyn Outbox;
}

/// The store's own outbox.
struct StoreOutbox(Arc<dyn Store>);

impl OutboxSource for StoreOutbox {
    fn outbox(&self) -> &dyn Outbox {
        self.0.outbox()
    }
}
