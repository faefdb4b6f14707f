//! Forwarding: every change of a run, sent to the team's own systems (SPEC, "Forwarding to your
//! systems").
//!
//! - `target`: a configured target, checked, with its Standard Webhooks key;
//! - `wake`: how commits wake the delivery workers.
//!
//! The messages themselves are written by the store, in the transaction that commits each change
//! (`store::outbox`): a crash loses none.

mod target;
mod wake;

pub use target::Target;
pub use wake::ForwardWake;
