//! Runs: their status order, starting them on Nen, idempotency, and reading them back.

pub mod idempotency;
pub mod query;
pub mod start;
pub mod status;
