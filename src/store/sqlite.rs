//! The embedded SQLite store: one file, no server, for a single instance.
//!
//! SQLite lets one connection write at a time. Rather than letting concurrent writers collide and
//! fail with "database is locked", every write is a `begin immediate` transaction that first
//! takes its turn (`turns`), in arrival order, on one of two write connections: the ingest
//! path's own (`writer`) or sqlx's (a pool of exactly one). Reads have a pool of their own; in
//! WAL mode they never wait for a writer, and see only committed batches.
//!
//! Because nothing else writes while a transaction holds the lock, this store reads what it needs
//! and decides in Rust (`plan`, `forward_only`); its statements only store the result. That
//! includes forwarding (`changes`): a change of a run queues its outbox messages in the same
//! transaction, and one writer numbers them in commit order.
//!
//! sqlx runs each statement on the connection's own thread, and each hand-off to it waits to be
//! scheduled: with a statement per step of a batch, those waits were most of its time, all of it
//! under the write lock. So the two writes on the ingest path, a batch of callbacks and a run
//! started here (`batch`), run with rusqlite on a thread that owns its connection (`writer`):
//! one hand-off there and one back per transaction. Everything else, rarer, goes through sqlx.
//! Checkpoints run beside the writer (`checkpoint`).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::claim::ExistingClaim;
use super::feed::TerminalRunFeed;
use super::listing::{Listing, ListingFilter};
use super::model::*;
use super::outbox::{FailedPage, FinishedAttempt, Lease, OutboxMessage, TargetQueue};
use super::plan::BatchPlan;
use super::retention::SweepSession;
use super::rows::{EventRow, RunRow, StoredText};
use super::{migrations, Outbox, PoolUsage, Store, StoreError, StoreOptions};
use checkpoint::Checkpointer;
use turns::{SqlxWriter, Turns};
use writer::WriterThread;

mod batch;
mod checkpoint;
mod outbox;
mod sweep;
mod turns;
mod writer;

pub struct SqliteStore {
    /// The ingest path's writes: batches of callbacks, triggered runs.
    writer: WriterThread,
    /// Every other write: sqlx's one write connection, in turn with `writer`.
    sqlx_writer: SqlxWriter,
    /// Read-only connections (`query_only`), so that no write can bypass the turns above.
    readers: SqlitePool,
    /// What every connection is opened with; migrations open their own with a longer wait.
    base: SqliteConnectOptions,
    /// `StoreOptions::forward_targets`: each change of a run queues a message per target in
    /// its write transaction; with none, nothing more is written or read.
    forward_targets: Arc<[String]>,
    /// Copies committed batches into the database file beside the writer.
    checkpointer: Checkpointer,
}

/// The page cache of each reader connection: `cache_size` in KiB when negative.
const READER_CACHE_SIZE: &str = "-256";

impl SqliteStore {
    /// Opens (creating it and its directory when missing) the file a `sqlite://` URL names:
    /// `sqlite://relative/path.db`, `sqlite:///absolute/path.db`.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let base = SqliteConnectOptions::from_str(url)
            .map_err(|error| StoreError::Internal(format!("invalid DATABASE_URL: {error}")))?
            // Waiting for a lock held by another process (a migration, an operator's sqlite3)
            // is capped like a statement on PostgreSQL; past it the store answers unavailable
            // and the callback is retried by Nen.
            .busy_timeout(options.statement_timeout)
            // An acknowledged callback must survive a power failure. In WAL mode `normal` only
            // syncs at checkpoints, so the last commits before a power cut can vanish although
            // Nen was told they were stored; `full` syncs the WAL on every commit. Group commit
            // shares that sync among every delivery of a batch.
            .synchronous(SqliteSynchronous::Full)
            // The schema has no foreign keys: skip the per-statement checks.
            .foreign_keys(false);
        create_parent_directory(base.get_filename())?;
        let sqlx_writer = SqlitePoolOptions::new()
            .max_connections(1)
            // Kept open for good: it holds the WAL and its index open for the readers, and a
            // reconnect per burst would redo the pragmas for nothing.
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            // Every statement is a round trip to the connection's worker thread; a ping per
            // checkout would add one to every batch. A broken connection fails its first
            // statement instead.
            .test_before_acquire(false)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(
                base.clone()
                    .create_if_missing(true)
                    // WAL: readers and the writer do not block each other, and a commit is one
                    // sequential append. Set by the writer, which connects first; the mode is
                    // stored in the file, so readers find it set.
                    .journal_mode(SqliteJournalMode::Wal),
            )
            .await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(
                base.clone()
                    .pragma("query_only", "true")
                    // Each connection keeps a private page cache (2 MiB by default), which a
                    // full reader pool multiplies: 16 readers were most of a 61 MiB peak RSS.
                    // Readers re-read pages from the operating system's cache instead, which
                    // every connection shares and which is not the process's memory.
                    .pragma("cache_size", READER_CACHE_SIZE),
            );
        let turns = Turns::new(options.acquire_timeout);
        let writer = WriterThread::start(
            base.get_filename(),
            options.statement_timeout,
            turns.clone(),
        )?;
        Ok(Self {
            writer,
            sqlx_writer: SqlxWriter::new(sqlx_writer, turns),
            readers,
            checkpointer: Checkpointer::new(&base),
            base,
            forward_targets: options.forward_targets.clone().into(),
        })
    }

    /// Applies the migrations on a connection of their own, which waits up to `lock_timeout`
    /// for the write lock another process holds (the store's own writer holds none between
    /// transactions).
    pub async fn migrate(&self, lock_timeout: Duration) -> Result<(), StoreError> {
        // A pool of one connection, its own: `Migrator::run` takes a pool where a bare
        // connection trips a compiler limitation in spawned tasks.
        let connection = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(self.base.clone().busy_timeout(lock_timeout))
            .await?;
        let result = migrations::tolerating_newer(sqlx::migrate!("migrations/sqlite"))
            .run(&connection)
            .await;
        connection.close().await;
        result.map_err(|error| migrations::failed(error, lock_timeout))
    }
}

fn create_parent_directory(file: &Path) -> Result<(), StoreError> {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => {
            std::fs::create_dir_all(parent).map_err(|error| {
                StoreError::Internal(format!(
                    "cannot create the directory {} for the SQLite database: {error}",
                    parent.display()
                ))
            })
        }
        _ => Ok(()),
    }
}

/// How times are stored: fixed width and always UTC, so that text order is time order (the
/// schema relies on it for `min`/`max`) and nothing is lost (nanoseconds). Years beyond 9999
/// (far-future `expires_at` values) get a sign and still read back.
///
/// The same text as `format("%Y-%m-%dT%H:%M:%S%.9fZ")`, without parsing a format string on
/// every call: a batch writes several times per callback, and on the writer that parsing was
/// a twentieth of its CPU.
fn time_text(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn time_from_text(text: &str) -> Result<DateTime<Utc>, StoreError> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.fZ")
        .map(|time| time.and_utc())
        .map_err(|error| {
            StoreError::Internal(format!("stored time {text:?} does not parse: {error}"))
        })
}

/// The columns of a [`RunRow`], selected from `runs`. `conflicting_terminals` follows
/// `forward_only::terminals_conflict`: the run is terminal, and one of its events has another
/// terminal status.
macro_rules! run_columns {
    () => {
        "message_id, workflow_id, status, created_at, updated_at, completed_at, expires_at,
         result, assets_url, error, triggered_here,
         (status_rank = 2 and exists (
             select 1 from events
             where events.run_seq = runs.seq
               and events.status <> runs.status
               and events.status not in ('submitted', 'processing'))) as conflicting_terminals,
         workflow_params, seq"
    };
}

const GET_RUN: &str = concat!("select ", run_columns!(), " from runs where message_id = ?");

// The listing statements, one per filter (see `listing`). Each walks an index backwards.
const LIST_RUNS: &str = concat!(
    "select ",
    run_columns!(),
    " from runs
      where seq < ?
      order by seq desc limit ?"
);
const LIST_RUNS_OF_WORKFLOW: &str = concat!(
    "select ",
    run_columns!(),
    " from runs
      where workflow_id = ? and seq < ?
      order by seq desc limit ?"
);
const LIST_RUNS_WITH_STATUS: &str = concat!(
    "select ",
    run_columns!(),
    " from runs
      where status = ? and seq < ?
      order by seq desc limit ?"
);
const LIST_RUNS_OF_WORKFLOW_WITH_STATUS: &str = concat!(
    "select ",
    run_columns!(),
    " from runs
      where workflow_id = ? and status = ? and seq < ?
      order by seq desc limit ?"
);

/// A run's events in arrival order, which is `received_at`, as on PostgreSQL: ids follow
/// insertion, and with several ingest writers a later delivery may be committed first.
/// `conflicting_terminal` follows `forward_only::terminals_conflict`: a terminal event whose run
/// settled on another terminal status. Events are found through their run (migration 0007).
const LIST_EVENTS: &str = "\
select events.status, events.received_at, events.duplicates, events.differing_duplicates,
       (events.status not in ('submitted', 'processing')
        and runs.status_rank = 2
        and runs.status <> events.status) as conflicting_terminal,
       events.key_id, events.last_received_at, events.payload, events.payload_pruned
from runs
join events on events.run_seq = runs.seq
where runs.message_id = ?
order by events.received_at, events.id";

/// Stuck runs (`Store::list_stuck_runs`): unfinished, unchanged since `?1` (times are text in
/// one fixed-width form, so text order is time order), walked backwards through
/// `runs_unfinished` (migration 0003), whose predicate `status_rank < 2` this repeats word for
/// word so that the planner can use it. The optional filters only narrow that walk.
const LIST_STUCK_RUNS: &str = concat!(
    "select ",
    run_columns!(),
    " from runs
      where status_rank < 2 and updated_at < ?1
        and (?2 is null or workflow_id = ?2)
        and (?3 is null or status = ?3)
        and seq < ?4
      order by seq desc limit ?5"
);

/// Stuck runs whose `run.stuck` is not queued since they last changed
/// (`Outbox::queue_stuck_runs`), through `runs_unfinished`; read in the writer's transaction
/// that queues them.
const RUNS_TO_QUEUE_STUCK: &str = concat!(
    "select ",
    run_columns!(),
    " from runs
      where status_rank < 2 and updated_at < ?1
        and (stuck_queued_at is null or stuck_queued_at < updated_at)
      order by seq
      limit ?2"
);

/// Counts stuck runs through `runs_unfinished`, stopping at `?2`.
const COUNT_STUCK_RUNS: &str = "\
select count(*) from (
    select 1 from runs where status_rank < 2 and updated_at < ?1 limit ?2)";

fn run_from_row(row: RunRow<StoredText>) -> Result<Run, StoreError> {
    row.into_run(|text| Ok(time_read_leniently(&text.0)))
}

/// A stored time on the read path. This service writes only `time_text`, but a row written by
/// another program may hold another form: RFC 3339 and SQLite's own `YYYY-MM-DD HH:MM:SS` are
/// read too, and anything else is served as the Unix epoch with a warning, so that one row
/// cannot make a read endpoint fail.
fn time_read_leniently(text: &str) -> DateTime<Utc> {
    time_from_text(text)
        .ok()
        .or_else(|| {
            DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|time| time.with_timezone(&Utc))
        })
        .or_else(|| {
            NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
                .ok()
                .map(|time| time.and_utc())
        })
        .unwrap_or_else(|| {
            tracing::warn!("a stored time does not parse; it is served as the Unix epoch");
            DateTime::UNIX_EPOCH
        })
}

#[async_trait]
impl Store for SqliteStore {
    async fn record_deliveries(
        &self,
        deliveries: &[Delivery],
    ) -> Result<Vec<DeliveryOutcome>, StoreError> {
        if deliveries.is_empty() {
            return Ok(Vec::new());
        }
        // One writer means no deadlocks or serialization failures to retry: a lock held by
        // another process is waited for (busy_timeout), then reported as unavailable.
        let deliveries = deliveries.to_vec();
        let targets = Arc::clone(&self.forward_targets);
        let outcomes = self
            .writer
            .transaction(move |transaction| {
                batch::record(transaction, &BatchPlan::new(&deliveries), &targets)
            })
            .await?;
        self.checkpointer.after_commit();
        Ok(outcomes)
    }

    async fn record_rejected_payload(&self, rejected: &RejectedPayload) -> Result<(), StoreError> {
        let insert = sqlx::query(
            "insert into rejected_payloads (received_at, key_id, reason, body) \
             values (?, ?, ?, ?)",
        )
        .bind(time_text(rejected.received_at))
        .bind(&rejected.key_id)
        .bind(&rejected.reason)
        .bind(rejected.raw_body.as_ref());
        self.sqlx_writer.execute(insert).await?;
        Ok(())
    }

    async fn get_run(&self, message_id: &str) -> Result<Option<Run>, StoreError> {
        let row: Option<RunRow<StoredText>> = sqlx::query_as(GET_RUN)
            .bind(message_id)
            .fetch_optional(&self.readers)
            .await?;
        row.map(run_from_row).transpose()
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        let listing = Listing::of(query);
        let statement = match listing.filter {
            ListingFilter::All => sqlx::query_as(LIST_RUNS),
            ListingFilter::Workflow(workflow_id) => {
                sqlx::query_as(LIST_RUNS_OF_WORKFLOW).bind(workflow_id)
            }
            ListingFilter::Status(status) => sqlx::query_as(LIST_RUNS_WITH_STATUS).bind(status),
            ListingFilter::WorkflowAndStatus(workflow_id, status) => {
                sqlx::query_as(LIST_RUNS_OF_WORKFLOW_WITH_STATUS)
                    .bind(workflow_id)
                    .bind(status)
            }
        };
        let rows: Vec<RunRow<StoredText>> = statement
            .bind(listing.before_seq)
            .bind(listing.fetch)
            .fetch_all(&self.readers)
            .await?;
        listing.page_of(rows, run_from_row)
    }

    async fn list_events(&self, message_id: &str) -> Result<Vec<Event>, StoreError> {
        let rows: Vec<EventRow<StoredText>> = sqlx::query_as(LIST_EVENTS)
            .bind(message_id)
            .fetch_all(&self.readers)
            .await?;
        rows.into_iter()
            .map(|row| row.into_event(|text| Ok(time_read_leniently(&text.0))))
            .collect()
    }

    async fn record_triggered_run(&self, run: &TriggeredRun) -> Result<(), StoreError> {
        let run = run.clone();
        let targets = Arc::clone(&self.forward_targets);
        self.writer
            .transaction(move |transaction| {
                batch::record_triggered_run(transaction, &run, &targets)
            })
            .await
    }

    async fn claim_idempotency_key(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<ClaimOutcome, StoreError> {
        // Claims take their turn with every other write, and `immediate` holds the write lock
        // from the first statement: exactly one of several concurrent claims of a key inserts it.
        let mut tx = self.sqlx_writer.begin().await?;
        sqlx::query("delete from idempotency_keys where key = ? and expires_at <= ?")
            .bind(&claim.key)
            .bind(time_text(claim.now))
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "insert into idempotency_keys (key, request_sha256, created_at, expires_at) \
             values (?, ?, ?, ?) on conflict (key) do nothing",
        )
        .bind(&claim.key)
        .bind(claim.request_sha256.as_slice())
        .bind(time_text(claim.now))
        .bind(time_text(claim.expires_at))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let existing = if inserted {
            None
        } else {
            let (request_sha256, response_status, response_body): (
                Vec<u8>,
                Option<i64>,
                Option<String>,
            ) = sqlx::query_as(
                "select request_sha256, response_status, response_body \
                 from idempotency_keys where key = ?",
            )
            .bind(&claim.key)
            .fetch_one(&mut *tx)
            .await?;
            Some(ExistingClaim {
                request_sha256,
                response_status,
                response_body,
            })
        };
        tx.commit().await?;
        ClaimOutcome::from_existing(existing, &claim.request_sha256)
    }

    async fn complete_idempotency_key(
        &self,
        key: &str,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let update = sqlx::query(
            "update idempotency_keys set response_status = ?2, response_body = ?3 where key = ?1",
        )
        .bind(key)
        .bind(i64::from(response.status))
        .bind(&response.body);
        self.sqlx_writer.execute(update).await?;
        Ok(())
    }

    async fn release_idempotency_key(&self, key: &str) -> Result<(), StoreError> {
        let delete =
            sqlx::query("delete from idempotency_keys where key = ? and response_status is null")
                .bind(key);
        self.sqlx_writer.execute(delete).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("select 1").execute(&self.readers).await?;
        Ok(())
    }

    fn pool_usage(&self) -> Vec<PoolUsage> {
        vec![
            PoolUsage::of("writer", self.sqlx_writer.pool()),
            PoolUsage::of("readers", &self.readers),
        ]
    }

    async fn list_stuck_runs(
        &self,
        query: &RunQuery,
        changed_before: DateTime<Utc>,
    ) -> Result<RunPage, StoreError> {
        let listing = Listing::of(query);
        let rows: Vec<RunRow<StoredText>> = sqlx::query_as(LIST_STUCK_RUNS)
            .bind(time_text(changed_before))
            .bind(query.workflow_id.as_deref())
            .bind(query.status.as_deref())
            .bind(listing.before_seq)
            .bind(listing.fetch)
            .fetch_all(&self.readers)
            .await?;
        listing.page_of(rows, run_from_row)
    }

    async fn count_stuck_runs(
        &self,
        changed_before: DateTime<Utc>,
        cap: u32,
    ) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(COUNT_STUCK_RUNS)
            .bind(time_text(changed_before))
            .bind(i64::from(cap))
            .fetch_one(&self.readers)
            .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// None: every write goes through this process, whose ingest wakes its own waiters.
    async fn terminal_run_feed(&self) -> Result<Option<Box<dyn TerminalRunFeed>>, StoreError> {
        Ok(None)
    }

    /// One process writes the file: nothing to exclude, every batch goes through the writer.
    async fn begin_sweep(&self) -> Result<Option<Box<dyn SweepSession>>, StoreError> {
        Ok(Some(Box::new(sweep::SqliteSweep::new(
            self.sqlx_writer.clone(),
        ))))
    }

    fn outbox(&self) -> &dyn Outbox {
        self
    }
}

#[async_trait]
impl Outbox for SqliteStore {
    async fn claim_forward_messages(
        &self,
        target: &str,
        limit: u32,
        lease: Lease,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        outbox::claim(self, target, limit, lease, now).await
    }

    async fn finish_forward_attempts(
        &self,
        attempts: &[FinishedAttempt],
    ) -> Result<u64, StoreError> {
        outbox::finish(self, attempts).await
    }

    async fn next_forward_due(
        &self,
        target: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        outbox::next_due(self, target, now).await
    }

    async fn forward_queue(&self, target: &str) -> Result<TargetQueue, StoreError> {
        outbox::queue(self, target).await
    }

    async fn list_failed_forwards(
        &self,
        target: &str,
        limit: u32,
        before: Option<i64>,
    ) -> Result<FailedPage, StoreError> {
        outbox::list_failed(self, target, limit, before).await
    }

    async fn retry_failed_forwards(
        &self,
        target: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        outbox::retry_failed(self, target, now).await
    }

    async fn replay_forwards(
        &self,
        target: &str,
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        outbox::replay(self, target, since, until, now).await
    }

    async fn queue_stuck_runs(
        &self,
        changed_before: DateTime<Utc>,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        outbox::queue_stuck(self, changed_before, limit, now).await
    }

    async fn prune_forwarded(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        outbox::prune(self, before, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn stored_times_round_trip_and_sort_as_text() {
        let times = [
            Utc.timestamp_opt(1_730_319_600, 0).unwrap(),
            Utc.timestamp_opt(1_730_319_600, 5).unwrap(),
            Utc.timestamp_opt(1_730_319_600, 500_000_000).unwrap(),
            Utc.timestamp_opt(1_730_319_601, 0).unwrap(),
        ];
        let texts: Vec<String> = times.iter().copied().map(time_text).collect();
        let mut sorted = texts.clone();
        sorted.sort();
        assert_eq!(sorted, texts);
        for (time, text) in times.iter().zip(&texts) {
            assert_eq!(&time_from_text(text).unwrap(), time);
        }
        assert_eq!(texts[2], "2024-10-30T20:20:00.500000000Z");
    }

    #[test]
    fn times_written_by_other_programs_are_read_without_failing() {
        let noon = Utc.timestamp_opt(1_730_289_600, 0).unwrap();
        for text in [
            "2024-10-30T12:00:00.000000000Z",
            "2024-10-30T12:00:00Z",
            "2024-10-30T14:00:00+02:00",
            "2024-10-30 12:00:00",
        ] {
            assert_eq!(time_read_leniently(text), noon, "{text:?}");
        }
        for text in ["", "yesterday", "caf\u{fffd}"] {
            assert_eq!(time_read_leniently(text), DateTime::UNIX_EPOCH, "{text:?}");
        }
    }

    #[test]
    fn stored_times_are_the_fixed_width_form_of_earlier_releases() {
        let millis = [
            0,
            1,
            1_730_319_600_123,
            253_402_300_799_999,
            8_200_000_000_000_000,
            -8_200_000_000_000_000,
            -1,
        ];
        for time in millis.map(|m| Utc.timestamp_millis_opt(m).unwrap()) {
            let earlier = time.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string();
            assert_eq!(time_text(time), earlier);
        }
        let nanos = Utc.timestamp_opt(1_730_319_600, 7).unwrap();
        assert_eq!(time_text(nanos), "2024-10-30T20:20:00.000000007Z");
    }

    #[test]
    fn far_away_years_still_read_back() {
        for millis in [8_200_000_000_000_000, -8_200_000_000_000_000, -1] {
            let time = Utc.timestamp_millis_opt(millis).unwrap();
            assert_eq!(time_from_text(&time_text(time)).unwrap(), time);
        }
    }
}
