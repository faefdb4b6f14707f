//! The forwarding outbox on SQLite (`store::outbox`): claims, outcomes, listings, retry and
//! replay, stuck runs and pruning. The messages of a change are written with the change, in
//! `sqlite.rs`.

use chrono::{DateTime, Utc};

use super::SqliteStore;
use crate::store::outbox::{FailedPage, FinishedAttempt, Lease, OutboxMessage, TargetQueue};
use crate::store::StoreError;

fn not_built() -> StoreError {
    StoreError::Internal("the forwarding outbox is not built yet".into())
}

pub(super) async fn claim(
    _store: &SqliteStore,
    _target: &str,
    _limit: u32,
    _lease: Lease,
    _now: DateTime<Utc>,
) -> Result<Vec<OutboxMessage>, StoreError> {
    Err(not_built())
}

pub(super) async fn finish(
    _store: &SqliteStore,
    _attempts: &[FinishedAttempt],
) -> Result<u64, StoreError> {
    Err(not_built())
}

pub(super) async fn next_due(
    _store: &SqliteStore,
    _target: &str,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    Err(not_built())
}

pub(super) async fn queue(_store: &SqliteStore, _target: &str) -> Result<TargetQueue, StoreError> {
    Err(not_built())
}

pub(super) async fn list_failed(
    _store: &SqliteStore,
    _target: &str,
    _limit: u32,
    _before: Option<i64>,
) -> Result<FailedPage, StoreError> {
    Err(not_built())
}

pub(super) async fn retry_failed(
    _store: &SqliteStore,
    _target: &str,
    _now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    Err(not_built())
}

pub(super) async fn replay(
    _store: &SqliteStore,
    _target: &str,
    _since: DateTime<Utc>,
    _until: Option<DateTime<Utc>>,
    _now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    Err(not_built())
}

pub(super) async fn queue_stuck(
    _store: &SqliteStore,
    _changed_before: DateTime<Utc>,
    _limit: u32,
    _now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    Err(not_built())
}

pub(super) async fn prune(
    _store: &SqliteStore,
    _before: DateTime<Utc>,
    _limit: u32,
) -> Result<u64, StoreError> {
    Err(not_built())
}
