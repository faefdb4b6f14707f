//! Runs: their status order, starting them on Nen, idempotency, reading them back, waiting
//! for them to finish, and telling which are stuck.

pub mod feed_listener;
pub mod idempotency;
pub mod query;
pub mod start;
pub mod status;
pub mod stuck;
pub mod wait;
pub mod waiters;
