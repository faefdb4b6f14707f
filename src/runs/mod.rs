//! Runs: their status order, starting them on Nen, idempotency, and reading them back.

pub mod query;
pub mod status;
