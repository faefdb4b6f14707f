//! Write transactions run in place, on the writer's own connection.
//!
//! sqlx runs every statement on a thread of the connection's own, a hand-off per statement
//! and per row, and on a busy machine each hand-off waits to be scheduled. The transaction
//! held the write lock through all of those waits, so they, not SQLite, were most of a batch's
//! time. Here sqlx parks that thread (`lock_handle`) and the whole transaction runs with
//! rusqlite on a blocking thread: one hand-off per transaction, whatever its size. It is still
//! the same one connection, taken from the same pool, so these writes queue with every other.

use rusqlite::{ErrorCode, Transaction, TransactionBehavior};
use sqlx::SqlitePool;

use crate::store::StoreError;

/// Runs `work` in one `begin immediate` transaction on the writer connection of `pool`, and
/// commits it; any error rolls it back.
pub(super) async fn in_write_transaction<T, F>(pool: &SqlitePool, work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
{
    let mut connection = pool.acquire().await?;
    let runtime = tokio::runtime::Handle::current();
    let (connection, result) = tokio::task::spawn_blocking(move || {
        let result = run_locked(&runtime, &mut connection, work);
        (connection, result)
    })
    .await
    .map_err(|error| StoreError::Internal(format!("an SQLite write panicked: {error}")))?;
    // Back to the pool from here, not from the blocking thread.
    drop(connection);
    result
}

fn run_locked<T>(
    runtime: &tokio::runtime::Handle,
    connection: &mut sqlx::SqliteConnection,
    work: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut handle = runtime.block_on(connection.lock_handle())?;
    // SAFETY: sqlx's thread leaves the handle alone until `handle` is dropped, and `db` (declared
    // after it) is dropped first, finalizing its statements. `from_handle` never closes the
    // connection, which stays sqlx's.
    let mut db = unsafe { rusqlite::Connection::from_handle(handle.as_raw_handle().as_ptr()) }?;
    // `immediate` takes the write lock at once: a transaction that started as a reader could
    // not be upgraded if another process wrote in between, and would fail.
    let transaction = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let value = work(&transaction)?;
    transaction.commit()?;
    Ok(value)
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        // As `From<sqlx::Error>`: a lock another process holds past `busy_timeout` is worth a
        // retry; anything else is not.
        match error.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                StoreError::Unavailable(error.to_string())
            }
            _ => StoreError::Internal(error.to_string()),
        }
    }
}
