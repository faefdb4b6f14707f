//! Turns at writing: the two write connections of this process never collide.
//!
//! The ingest path writes on a thread of its own (`writer`); everything else writes through
//! sqlx's one write connection. Both are the same process, so rather than letting SQLite's
//! file lock decide (a transaction that finds the lock taken sleeps in its busy handler, 1 ms,
//! then 2, then 5...), each write transaction first takes a turn here, in arrival order. The
//! file lock then only ever waits for another process (a migration, an operator's `sqlite3`).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use sqlx::sqlite::{Sqlite, SqliteArguments, SqliteConnection, SqlitePool, SqliteQueryResult};
use sqlx::Transaction;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// The one gate both write connections pass; a clone shares it.
#[derive(Clone, Default)]
pub(super) struct Turns(Arc<Mutex<()>>);

/// Held for as long as a write transaction is open.
pub(super) type Turn = OwnedMutexGuard<()>;

impl Turns {
    pub(super) async fn take(&self) -> Turn {
        self.0.clone().lock_owned().await
    }

    /// For the writer thread, which is outside the runtime and may block.
    pub(super) fn take_blocking(&self) -> Turn {
        self.0.clone().blocking_lock_owned()
    }
}

/// sqlx's write connection (a pool of one), reachable only through a turn.
#[derive(Clone)]
pub(super) struct SqlxWriter {
    pool: SqlitePool,
    turns: Turns,
}

impl SqlxWriter {
    pub(super) fn new(pool: SqlitePool, turns: Turns) -> Self {
        Self { pool, turns }
    }

    /// A `begin immediate` transaction, holding its turn until committed or dropped.
    pub(super) async fn begin(&self) -> Result<TurnTransaction, sqlx::Error> {
        let turn = self.turns.take().await;
        let transaction = self.pool.begin_with("begin immediate").await?;
        Ok(TurnTransaction { transaction, turn })
    }

    /// One statement, in a turn.
    pub(super) async fn execute<'q>(
        &self,
        query: sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    ) -> Result<SqliteQueryResult, sqlx::Error> {
        let _turn = self.turns.take().await;
        query.execute(&self.pool).await
    }

    pub(super) fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// A transaction on sqlx's write connection and the turn it holds. Dropped uncommitted, it rolls
/// back as sqlx's own does: the rollback runs on sqlx's thread soon after, and until it has, a
/// writer whose turn came finds the file still locked and waits for it (`busy_timeout`). Only a
/// failed transaction pays that.
pub(super) struct TurnTransaction {
    // Declared first, so dropped first: the rollback is queued before the turn passes on.
    transaction: Transaction<'static, Sqlite>,
    turn: Turn,
}

impl TurnTransaction {
    pub(super) async fn commit(self) -> Result<(), sqlx::Error> {
        let Self { transaction, turn } = self;
        transaction.commit().await?;
        drop(turn);
        Ok(())
    }

    /// Rolls back before the turn passes on (see above for dropping one instead).
    pub(super) async fn rollback(self) -> Result<(), sqlx::Error> {
        let Self { transaction, turn } = self;
        transaction.rollback().await?;
        drop(turn);
        Ok(())
    }
}

impl Deref for TurnTransaction {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.transaction
    }
}

impl DerefMut for TurnTransaction {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.transaction
    }
}
