//! Checkpoints beside the writer, not inside its commits.
//!
//! In WAL mode a commit appends pages to the log, and a checkpoint copies them back into the
//! database file and syncs it. SQLite runs one on the committing connection once the log holds
//! 1,000 pages: under load, every few batches, a commit also did that copy and a second sync,
//! and the callbacks of that batch waited for it (most of SQLite's p99). Here, every few
//! batches a `passive` checkpoint runs on a connection of its own: it copies what is committed
//! without taking the write lock, so the writer goes on meanwhile. The writer's own checkpoint
//! still comes at 1,000 pages, finds almost everything copied, and lets the log start over, so
//! the log stays small.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

/// Batches committed between two checkpoints. Measured at 64 connections: every 4 took p99
/// from 15 ms to 11 ms; every 16 did half as well.
const COMMITS_PER_CHECKPOINT: u64 = 4;

pub(super) struct Checkpointer {
    /// One connection, opened on first use.
    pool: SqlitePool,
    running: Arc<AtomicBool>,
    commits: AtomicU64,
}

impl Checkpointer {
    pub(super) fn new(options: &SqliteConnectOptions) -> Self {
        Self {
            pool: SqlitePoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(options.clone()),
            running: Arc::default(),
            commits: AtomicU64::new(0),
        }
    }

    /// Called after each committed batch: starts a checkpoint every
    /// [`COMMITS_PER_CHECKPOINT`] batches, unless one is still running.
    pub(super) fn after_commit(&self) {
        let committed = self.commits.fetch_add(1, Ordering::Relaxed) + 1;
        if !committed.is_multiple_of(COMMITS_PER_CHECKPOINT)
            || self.running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let pool = self.pool.clone();
        let running = Arc::clone(&self.running);
        tokio::spawn(async move {
            match checkpoint(&pool).await {
                Ok(done) => tracing::trace!(
                    busy = done.busy,
                    log_pages = done.log,
                    copied_pages = done.checkpointed,
                    "SQLite checkpoint"
                ),
                // Nothing is lost: the writer's own checkpoint still comes.
                Err(error) => tracing::warn!(%error, "a background SQLite checkpoint failed"),
            }
            running.store(false, Ordering::Release);
        });
    }
}

/// What one `passive` checkpoint did, in log pages (SQLite's own counts).
#[derive(Debug, sqlx::FromRow)]
struct Checkpointed {
    /// 1 when another checkpoint, or the writer's restart of the log, was in the way.
    busy: i64,
    log: i64,
    checkpointed: i64,
}

async fn checkpoint(pool: &SqlitePool) -> Result<Checkpointed, sqlx::Error> {
    sqlx::query_as("pragma wal_checkpoint(passive)")
        .fetch_one(pool)
        .await
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::sqlite::SqliteJournalMode;
    use sqlx::{ConnectOptions, Connection};

    use super::*;

    fn new_file(directory: &tempfile::TempDir) -> SqliteConnectOptions {
        SqliteConnectOptions::from_str(&format!("sqlite://{}/relay.db", directory.path().display()))
            .unwrap()
            .create_if_missing(true)
    }

    #[tokio::test]
    async fn copies_every_committed_page_while_the_writer_holds_its_connection() {
        let directory = tempfile::tempdir().unwrap();
        let options = new_file(&directory)
            .journal_mode(SqliteJournalMode::Wal)
            // Only the checkpointer copies anything.
            .pragma("wal_autocheckpoint", "0");
        let mut writer = options.connect().await.unwrap();
        sqlx::query("create table t (x blob)")
            .execute(&mut writer)
            .await
            .unwrap();
        for _ in 0..20 {
            sqlx::query("insert into t values (randomblob(8000))")
                .execute(&mut writer)
                .await
                .unwrap();
        }

        let done = checkpoint(&Checkpointer::new(&options).pool).await.unwrap();
        assert_eq!(done.busy, 0);
        assert!(done.log >= 40, "{done:?}");
        assert_eq!(done.checkpointed, done.log);
        writer.close().await.unwrap();
    }

    #[tokio::test]
    async fn one_checkpoint_every_few_commits() {
        let directory = tempfile::tempdir().unwrap();
        let options = new_file(&directory);
        let checkpointer = Checkpointer::new(&options);
        for _ in 1..COMMITS_PER_CHECKPOINT {
            checkpointer.after_commit();
            assert!(!checkpointer.running.load(Ordering::Acquire));
        }
        checkpointer.after_commit();
        // Set before the task is spawned, cleared by it: a second one cannot start meanwhile.
        assert!(checkpointer.running.load(Ordering::Acquire));
    }
}
