//! Persistence behind one small domain trait, with a PostgreSQL and an embedded SQLite backend.
//!
//! Handlers and the ingest pipeline only see [`Store`] and the types in [`model`]; neither backend
//! leaks `sqlx` types past this module.
//!
//! The two backends share decisions, never SQL. Each decision is written once, in Rust:
//! - `plan`: which deliveries of a batch repeat each other, how a run moves when several of its
//!   statuses arrive together, and what each delivery is answered;
//! - `forward_only`: what a run becomes when callbacks move it or this service starts it, and
//!   which terminal statuses conflict;
//! - `changes`: which writes change a run, and the forwarding messages (`outbox`) a change
//!   queues in its own transaction;
//! - `claim`: what a claim of an `Idempotency-Key` answers, from what the store found;
//! - `listing`: which listing statement a query needs, and the page its rows make;
//! - `rows`: how a selected row becomes a [`Run`] or an [`Event`];
//! - `migrations`: how a migration that waited too long for a lock is reported.
//!
//! A retention sweep (`crate::retention`) works through a [`SweepSession`] (`retention`), whose
//! batches each backend writes in a file of its own (`postgres/sweep.rs`, `sqlite/sweep.rs`).
//!
//! Each backend writes its own SQL, whole, in its own file. The SQLite store runs every rule in
//! Rust. The PostgreSQL store writes a batch with one statement, so that statement implements
//! two of them in SQL (`BatchPlan::run_changes` and `RunState::advanced`), and says so; the
//! shared behaviour suite, with a property test that feeds both stores the same random batches,
//! keeps the two equal. With forwarding targets, a PostgreSQL batch is a short transaction
//! around that statement instead, which locks the runs first to know what changed
//! (`postgres::RECORD_BATCH`).

mod changes;
mod claim;
pub mod feed;
mod forward_only;
pub mod handoff;
mod listing;
mod migrations;
pub mod model;
pub mod outbox;
mod plan;
mod pool_usage;
pub mod postgres;
pub mod retention;
mod rows;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};

pub use feed::{FeedEvent, TerminalRunFeed};
pub use handoff::{HandedMessage, Handoff, Reservation};
pub use model::{
    ClaimOutcome, Delivery, DeliveryOutcome, Event, IdempotencyClaim, RejectedPayload, Run,
    RunCursor, RunPage, RunQuery, StoredResponse, TriggeredRun,
};
pub use outbox::{
    AttemptOutcome, FailedMessage, FailedPage, FinishedAttempt, Lease, OutboxMessage, TargetQueue,
};
pub use pool_usage::PoolUsage;
pub use retention::{PrunedPayloads, SweepSession};

/// Why a store call failed, in the terms the HTTP layer needs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached, or did not answer in time: the caller should retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug or a schema mismatch, not the caller's fault.
    #[error("store error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &error {
            E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::WorkerCrashed => {
                StoreError::Unavailable(error.to_string())
            }
            E::Database(db) => {
                // PostgreSQL: 57014 statement timeout / query canceled, 55P03 lock timeout,
                // 57P01..57P03 shutdown / cannot connect now, 08xxx connection exceptions,
                // 53xxx insufficient resources, 40001/40P01 serialization failure / deadlock.
                // SQLite: 5 SQLITE_BUSY, 6 SQLITE_LOCKED, 261/262/517 their extended codes.
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                let transient = code == "57014"
                    || code == "55P03"
                    || code.starts_with("57P")
                    || code.starts_with("08")
                    || code.starts_with("53")
                    || code == "40001"
                    || code == "40P01"
                    || matches!(code.as_str(), "5" | "6" | "261" | "262" | "517");
                if transient {
                    StoreError::Unavailable(error.to_string())
                } else {
                    StoreError::Internal(error.to_string())
                }
            }
            _ => StoreError::Internal(error.to_string()),
        }
    }
}

/// Everything nen-relay keeps. One implementation per backend.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records verified callbacks in one transaction. Outcome `i` belongs to `deliveries[i]`.
    ///
    /// Guarantees, whatever the batch holds and whatever other writers do at the same time:
    /// - one event per `(message_id, status)`; every further copy counts as a duplicate, and one
    ///   whose body differs from the stored one is flagged;
    /// - a run's status only moves forward; a terminal status that differs from the run's
    ///   terminal status is kept as an event and flagged as conflicting;
    /// - nothing is visible to readers until the whole batch is committed.
    async fn record_deliveries(
        &self,
        deliveries: &[Delivery],
    ) -> Result<Vec<DeliveryOutcome>, StoreError>;

    /// Keeps a signed but malformed callback body for inspection.
    async fn record_rejected_payload(&self, rejected: &RejectedPayload) -> Result<(), StoreError>;

    async fn get_run(&self, message_id: &str) -> Result<Option<Run>, StoreError>;

    /// Newest first, keyset-paginated.
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError>;

    /// Every distinct delivery of a run, in arrival order (empty when the run is unknown).
    async fn list_events(&self, message_id: &str) -> Result<Vec<Event>, StoreError>;

    /// Records a run this service started on Nen, as `submitted` unless a callback got there first.
    async fn record_triggered_run(&self, run: &TriggeredRun) -> Result<(), StoreError>;

    /// Claims an `Idempotency-Key` before Nen is called, atomically across replicas.
    async fn claim_idempotency_key(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<ClaimOutcome, StoreError>;

    /// Stores the answer given for a claimed key, so that repeats get the same answer.
    async fn complete_idempotency_key(
        &self,
        key: &str,
        response: &StoredResponse,
    ) -> Result<(), StoreError>;

    /// Frees a claimed key whose request failed, so that the client may try again.
    async fn release_idempotency_key(&self, key: &str) -> Result<(), StoreError>;

    /// Answers when the database does (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Each connection pool's name, open connections and idle ones, for `/metrics`.
    fn pool_usage(&self) -> Vec<PoolUsage>;
    /// Runs that are not terminal and last changed before `changed_before`, newest first,
    /// keyset-paginated like [`Store::list_runs`] (whose filters also apply). Walks the index
    /// of unfinished runs (migration 0003), so the cost follows how many runs are unfinished,
    /// not how many are stored.
    async fn list_stuck_runs(
        &self,
        query: &RunQuery,
        changed_before: DateTime<Utc>,
    ) -> Result<RunPage, StoreError>;

    /// How many runs are not terminal and last changed before `changed_before`, counting no
    /// further than `cap` (through the same index).
    async fn count_stuck_runs(
        &self,
        changed_before: DateTime<Utc>,
        cap: u32,
    ) -> Result<u64, StoreError>;

    /// Subscribes to runs that any writer sharing the database turns terminal, or `None` when
    /// this process is the only writer (SQLite), whose own commits wake its waiters. See `feed`.
    async fn terminal_run_feed(&self) -> Result<Option<Box<dyn TerminalRunFeed>>, StoreError>;

    /// Opens a retention sweep, or answers `None` while another replica sweeps this database.
    async fn begin_sweep(&self) -> Result<Option<Box<dyn SweepSession>>, StoreError>;

    /// The forwarding outbox of this store.
    fn outbox(&self) -> &dyn Outbox;
}

/// The forwarding outbox (`outbox`). Messages are written by `Store::record_deliveries`,
/// `Store::record_triggered_run` and [`Outbox::queue_stuck_runs`], one per target in
/// `StoreOptions::forward_targets`, in the transaction of the change.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// From now on, writes the messages of a change leased to `handoff`'s workers when they
    /// have room, and reports every commit that queued messages to it (`handoff`). Answers
    /// whether it will: a store without hand-offs answers `false`, and its messages are all
    /// claimed; only the first call is taken.
    fn hand_off_to(&self, _handoff: Arc<dyn Handoff>) -> bool {
        false
    }

    /// Claims up to `limit` claimable messages of `target` (see `outbox`), soonest due first
    /// (a run's own messages one at a time, in id order), and leases them: until the lease
    /// ends, no other claim returns them, on any replica.
    async fn claim_forward_messages(
        &self,
        target: &str,
        limit: u32,
        lease: Lease,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxMessage>, StoreError>;

    /// Records attempts and releases their leases. An attempt whose lease is no longer its
    /// owner's (it ended and another claim took the message) is ignored. Answers how many were
    /// recorded.
    async fn finish_forward_attempts(
        &self,
        attempts: &[FinishedAttempt],
    ) -> Result<u64, StoreError>;

    /// The soonest `next_attempt_at` after `now` among pending messages of `target`, or `None`
    /// when none comes due later: when a worker that claimed everything claimable should look
    /// again. One index lookup, however long the queue. What is due already but was not
    /// claimable (waiting for an earlier message of its run, or leased) is left out: an outcome
    /// of this worker, or its poll, brings it.
    async fn next_forward_due(
        &self,
        target: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// A target's queue: pending, oldest pending, failed, last error.
    async fn forward_queue(&self, target: &str) -> Result<TargetQueue, StoreError>;

    /// Failed messages of `target`, newest first, strictly before the id `before` when given.
    async fn list_failed_forwards(
        &self,
        target: &str,
        limit: u32,
        before: Option<i64>,
    ) -> Result<FailedPage, StoreError>;

    /// Queues every failed message of `target` again (attempts from zero, `queued_at = now`).
    /// Answers how many.
    async fn retry_failed_forwards(
        &self,
        target: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// Queues again every delivered or failed message of `target` whose change was committed
    /// at or after `since` and before `until` (no end when `None`); pending ones are left as
    /// they are. Answers how many.
    async fn replay_forwards(
        &self,
        target: &str,
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// Queues `run.stuck` for up to `limit` runs that are not terminal, last changed before
    /// `changed_before`, and have had no stuck message queued since they last changed; the
    /// message's run shows `"stuck": true`. Messages and marks are written in one transaction.
    /// Answers how many runs were queued. Nothing when no target is configured.
    async fn queue_stuck_runs(
        &self,
        changed_before: DateTime<Utc>,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// Deletes up to `limit` delivered or failed messages last touched before `before`.
    /// Answers how many.
    async fn prune_forwarded(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError>;
}

/// Connection settings shared by both backends.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub max_connections: u32,
    /// How long a request may wait for a pooled connection before the store counts as unavailable.
    pub acquire_timeout: Duration,
    /// Server-side cap on one statement (PostgreSQL) or on waiting for the write lock (SQLite).
    pub statement_timeout: Duration,
    /// How long migrations wait for a lock. They run on a connection of their own, without
    /// `statement_timeout`.
    pub migrate_lock_timeout: Duration,
    /// The forwarding targets' names (`forward.<name>`). Every change of a run writes one
    /// outbox message per target in the transaction that commits it; none when empty.
    pub forward_targets: Vec<String>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            // The ingest writers (1 by default, up to a few) plus room for reads and health checks.
            max_connections: 16,
            acquire_timeout: Duration::from_millis(1000),
            statement_timeout: Duration::from_millis(1500),
            migrate_lock_timeout: Duration::from_secs(60),
            forward_targets: Vec::new(),
        }
    }
}

/// Which backend a `DATABASE_URL` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(StoreError::Internal(
                "DATABASE_URL must start with postgres://, postgresql:// or sqlite://".into(),
            ))
        }
    }
}

/// Opens the store a `DATABASE_URL` names, applying migrations first when asked.
pub async fn connect(
    url: &SecretString,
    options: &StoreOptions,
    migrate: bool,
) -> Result<Arc<dyn Store>, StoreError> {
    let url = url.expose_secret();
    match Backend::from_url(url)? {
        Backend::Postgres => {
            let store = postgres::PostgresStore::connect(url, options).await?;
            if migrate {
                store.migrate(options.migrate_lock_timeout).await?;
            }
            Ok(Arc::new(store))
        }
        Backend::Sqlite => {
            let store = sqlite::SqliteStore::connect(url, options).await?;
            if migrate {
                store.migrate(options.migrate_lock_timeout).await?;
            }
            Ok(Arc::new(store))
        }
    }
}
