//! Forwarding: every change of a run, sent to the team's own systems (SPEC, "Forwarding to your
//! systems").
//!
//! - `target`: a configured target, checked, with its Standard Webhooks key;
//! - `admin`: what an operator asks of it: each target's queue, failed messages, retry, replay;
//! - `wake`: how commits wake the delivery workers.
//!
//! The messages themselves are written by the store, in the transaction that commits each change
//! (`store::outbox`): a crash loses none.

pub mod admin;
mod target;
mod wake;

pub use target::Target;
pub use wake::ForwardWake;
