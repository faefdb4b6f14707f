//! The ingest path's write transactions, on a thread that owns a connection of its own.
//!
//! Through sqlx, each batch first took the write connection from its pool (which had pinged it
//! on sqlx's thread when it was last given back), moved to a blocking thread, then asked sqlx's
//! thread to park (`lock_handle`): several hand-offs between threads before the first
//! statement, each waiting to be scheduled on a busy machine, about a quarter of a batch's time
//! (docs/performance.md). Here one thread owns a rusqlite connection for the store's life: a
//! transaction is one hand-off to it and one back, and its statements stay prepared from one
//! transaction to the next. It takes its turn (`turns`) like every other write.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};
use tokio::sync::oneshot;

use super::turns::Turns;
use crate::store::StoreError;

/// Statements kept prepared: every statement of a batch and of a triggered run, with room.
const PREPARED_STATEMENTS: usize = 32;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The thread's mailbox. Dropping it (with the store) ends the thread, after the transactions
/// already sent, and closes its connection.
pub(super) struct WriterThread {
    jobs: mpsc::Sender<Job>,
    turns: Turns,
}

impl WriterThread {
    /// Opens a connection to `file`, which must exist and already be in WAL mode (the sqlx
    /// write connection, opened first, sees to both), with the settings every connection of the
    /// store has, and starts the thread.
    pub(super) fn start(
        file: &Path,
        busy_timeout: Duration,
        turns: Turns,
    ) -> Result<Self, StoreError> {
        let connection = Connection::open_with_flags(
            file,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        connection.busy_timeout(busy_timeout)?;
        // As for sqlx's connections (`SqliteStore::connect`): a commit syncs the log, so an
        // acknowledged callback survives a power failure; the schema has no foreign keys.
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.pragma_update(None, "foreign_keys", false)?;
        connection.set_prepared_statement_cache_capacity(PREPARED_STATEMENTS);
        let (jobs, mailbox) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let mut connection = connection;
                for job in mailbox {
                    job(&mut connection);
                }
            })
            .map_err(|error| {
                StoreError::Internal(format!("cannot start the SQLite writer thread: {error}"))
            })?;
        Ok(Self { jobs, turns })
    }

    /// Runs `work` in one `begin immediate` transaction on the thread, in its turn, and commits
    /// it; any error rolls it back. Dropping the future before the thread starts the work
    /// writes nothing; after, the transaction still commits, and its caller has been told
    /// nothing (a callback is then retried by Nen and answered as a duplicate).
    pub(super) async fn transaction<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        // Taken here, where waiting costs no thread, and handed to the thread with the work:
        // it passes on once the transaction is over.
        let turn = self.turns.take().await?;
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |connection| {
            // A caller that has given up (its timeout answered 503) has nothing written: what
            // it asked for is retried.
            if reply.is_closed() {
                return;
            }
            // A panic rolls the transaction back as it unwinds, and the thread goes on: the
            // dropped `reply` tells the caller.
            let result =
                std::panic::catch_unwind(AssertUnwindSafe(|| in_transaction(connection, work)));
            drop(turn);
            if let Ok(result) = result {
                let _ = reply.send(result);
            }
        });
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Internal("the SQLite writer thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Internal("an SQLite write panicked".into()))?
    }
}

fn in_transaction<T>(
    connection: &mut Connection,
    work: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    // `immediate` takes the write lock at once: a transaction that started as a reader could
    // not be upgraded if another process wrote in between, and would fail.
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
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

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

    use super::*;
    use crate::store::sqlite::turns::SqlxWriter;

    /// Both write connections on a fresh file, neither willing to wait for SQLite's lock.
    async fn both_writers(directory: &tempfile::TempDir) -> (WriterThread, SqlxWriter) {
        let file = directory.path().join("relay.db");
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", file.display()))
            .unwrap()
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::ZERO);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        sqlx::query("create table t (who text not null)")
            .execute(&pool)
            .await
            .unwrap();
        let turns = Turns::new(Duration::from_secs(10));
        let thread = WriterThread::start(&file, Duration::ZERO, turns.clone()).unwrap();
        (thread, SqlxWriter::new(pool, turns))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_two_writers_take_turns_instead_of_colliding() {
        let directory = tempfile::tempdir().unwrap();
        let (thread, sqlx_writer) = both_writers(&directory).await;
        // With no wait for SQLite's lock, a transaction that found the other connection's
        // open would fail with "database is locked" at once.
        let on_thread = async {
            for _ in 0..200 {
                thread
                    .transaction(|transaction| {
                        transaction.execute("insert into t values ('thread')", [])?;
                        Ok(())
                    })
                    .await
                    .unwrap();
            }
        };
        let on_sqlx = async {
            for _ in 0..200 {
                let mut transaction = sqlx_writer.begin().await.unwrap();
                sqlx::query("insert into t values ('sqlx')")
                    .execute(&mut *transaction)
                    .await
                    .unwrap();
                transaction.commit().await.unwrap();
            }
        };
        tokio::join!(on_thread, on_sqlx);
        let rows: i64 = sqlx::query_scalar("select count(*) from t")
            .fetch_one(sqlx_writer.pool())
            .await
            .unwrap();
        assert_eq!(rows, 400);
    }

    #[tokio::test]
    async fn a_panicking_transaction_rolls_back_and_the_thread_goes_on() {
        let directory = tempfile::tempdir().unwrap();
        let (thread, sqlx_writer) = both_writers(&directory).await;
        let failed = thread
            .transaction(|transaction| -> Result<(), StoreError> {
                transaction.execute("insert into t values ('lost')", [])?;
                panic!("a bug in a batch");
            })
            .await;
        assert!(
            matches!(&failed, Err(StoreError::Internal(message)) if message.contains("panicked")),
            "{failed:?}"
        );
        let rows = thread
            .transaction(|transaction| {
                transaction.execute("insert into t values ('kept')", [])?;
                Ok(
                    transaction.query_row("select group_concat(who) from t", [], |row| {
                        row.get::<_, String>(0)
                    })?,
                )
            })
            .await
            .unwrap();
        assert_eq!(rows, "kept");
        // And the turn it held was given back.
        sqlx_writer
            .execute(sqlx::query("insert into t values ('sqlx')"))
            .await
            .unwrap();
    }
}
