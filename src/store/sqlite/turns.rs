//! Turns at writing: the two write connections of this process never collide.
//!
//! The ingest path writes on a thread of its own (`writer`); everything else writes through
//! sqlx's one write connection. Both are the same process, so rather than letting SQLite's
//! file lock decide (a transaction that finds the lock taken sleeps in its busy handler, 1 ms,
//! then 2, then 5...), each write transaction first takes a turn here, in arrival order. The
//! file lock then only ever waits for another process (a migration, an operator's `sqlite3`).
//! A write waits for its turn at most `store.acquire_timeout`, as it waited for the one write
//! connection before there were two: past it the store is unavailable, and the caller answers
//! 503.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{Sqlite, SqliteArguments, SqliteConnection, SqlitePool, SqliteQueryResult};
use sqlx::Transaction;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// The one gate both write connections pass; a clone shares it.
#[derive(Clone)]
pub(super) struct Turns {
    gate: Arc<Mutex<()>>,
    wait: Duration,
}

/// Held for as long as a write transaction is open.
pub(super) type Turn = OwnedMutexGuard<()>;

impl Turns {
    /// Turns that each wait at most `wait`.
    pub(super) fn new(wait: Duration) -> Self {
        Self {
            gate: Arc::default(),
            wait,
        }
    }

    /// The next turn, or `PoolTimedOut` after the wait: the same error, and answer, as a pool
    /// that has no connection to give in time.
    pub(super) async fn take(&self) -> Result<Turn, sqlx::Error> {
        tokio::time::timeout(self.wait, self.gate.clone().lock_owned())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)
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
        let turn = self.turns.take().await?;
        let transaction = self.pool.begin_with("begin immediate").await?;
        Ok(TurnTransaction { transaction, turn })
    }

    /// One statement, in a turn.
    pub(super) async fn execute<'q>(
        &self,
        query: sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    ) -> Result<SqliteQueryResult, sqlx::Error> {
        let _turn = self.turns.take().await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_turn_not_given_within_the_wait_is_a_pool_timeout() {
        let turns = Turns::new(Duration::from_millis(50));
        let held = turns.take().await.unwrap();
        // Held throughout: the second can only time out.
        let waited = turns.take().await;
        assert!(
            matches!(waited, Err(sqlx::Error::PoolTimedOut)),
            "{waited:?}"
        );
        assert!(matches!(
            crate::store::StoreError::from(waited.unwrap_err()),
            crate::store::StoreError::Unavailable(_)
        ));
        drop(held);
        turns.take().await.unwrap();
    }
}
