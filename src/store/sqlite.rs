//! The embedded SQLite store: one file, no server, for a single instance.
//!
//! SQLite lets one connection write at a time. Rather than letting concurrent writers collide and
//! fail with "database is locked", every write goes through a pool of exactly one connection, in
//! `begin immediate` transactions: writers queue in the pool and take turns. Reads have a pool of
//! their own; in WAL mode they never wait for the writer, and see only committed batches.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::LazyLock;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::value::RawValue;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::forward_only::run_conflict_clause;
use super::model::*;
use super::plan::BatchPlan;
use super::run_row;
use super::{Store, StoreError, StoreOptions};

pub struct SqliteStore {
    /// One connection: the only way anything is written.
    writer: SqlitePool,
    /// Read-only connections (`query_only`), so that no write can bypass the queue above.
    readers: SqlitePool,
}

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
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            // Kept open for good: it holds the WAL and its index open for the readers, and a
            // reconnect per burst would redo the pragmas for nothing.
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
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
            .connect_lazy_with(base.pragma("query_only", "true"));
        Ok(Self { writer, readers })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/sqlite")
            .run(&self.writer)
            .await
            .map_err(|error| match error {
                sqlx::migrate::MigrateError::Execute(inner) => StoreError::from(inner),
                other => StoreError::Internal(format!("migration failed: {other}")),
            })
    }

    async fn try_record(&self, plan: &BatchPlan<'_>) -> Result<Vec<DeliveryOutcome>, sqlx::Error> {
        // `immediate` takes the write lock at once: a transaction that started as a reader
        // could not be upgraded if another process wrote in between, and would fail.
        let mut tx = self.writer.begin_with("begin immediate").await?;
        let inserted = insert_events(&mut tx, plan).await?;
        let stored_sha256 = count_duplicates(&mut tx, plan, &inserted).await?;
        let final_status = apply_run_changes(&mut tx, plan, &inserted).await?;
        tx.commit().await?;
        let conflicting = plan.conflicting_terminals(&inserted, &final_status);
        Ok(plan.outcomes(&inserted, &stored_sha256, &conflicting))
    }
}

/// Creates or moves forward one run (see `forward_only`); returns its final status.
static APPLY_RUN_CHANGE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "insert into runs as r (message_id, workflow_id, status, status_rank, created_at, \
                                updated_at, completed_at, expires_at, result, assets_url, error) \
         values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         {} \
         returning message_id, status",
        run_conflict_clause("max")
    )
});

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
fn time_text(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string()
}

fn time_from_text(text: &str) -> Result<DateTime<Utc>, StoreError> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.fZ")
        .map(|time| time.and_utc())
        .map_err(|error| {
            StoreError::Internal(format!("stored time {text:?} does not parse: {error}"))
        })
}

/// Inserts each group's first delivery as an event unless `(message_id, status)` exists.
/// Returns, per group, whether it became a new event. Groups are inserted in arrival order, so
/// that event ids follow arrival within a batch too.
async fn insert_events(
    connection: &mut SqliteConnection,
    plan: &BatchPlan<'_>,
) -> Result<Vec<bool>, sqlx::Error> {
    let mut inserted = Vec::with_capacity(plan.groups.len());
    for group in &plan.groups {
        let first = plan.first(group);
        let done = sqlx::query(
            "insert into events (message_id, status, received_at, last_received_at, payload, \
                                 body_sha256, key_id, duplicates, differing_duplicates) \
             values (?, ?, ?, ?, ?, ?, ?, ?, ?) \
             on conflict (message_id, status) do nothing",
        )
        .bind(&first.message_id)
        .bind(&first.status)
        .bind(time_text(first.received_at))
        .bind(time_text(plan.last_received_at(group)))
        .bind(first.body_text())
        .bind(first.body_sha256.as_slice())
        .bind(&first.key_id)
        .bind(group.repeats.len() as i64)
        .bind(plan.differing_repeats(group) as i64)
        .execute(&mut *connection)
        .await?;
        inserted.push(done.rows_affected() == 1);
    }
    Ok(inserted)
}

/// Adds every copy of an existing event to its counters. Returns, per group that was not
/// inserted, the stored body's hash (to tell identical copies from differing ones).
async fn count_duplicates(
    connection: &mut SqliteConnection,
    plan: &BatchPlan<'_>,
    inserted: &[bool],
) -> Result<Vec<Option<[u8; 32]>>, sqlx::Error> {
    let mut stored = vec![None; plan.groups.len()];
    for (g, group) in plan.groups.iter().enumerate() {
        if inserted[g] {
            continue;
        }
        let first = plan.first(group);
        let (id, hash): (i64, Vec<u8>) = sqlx::query_as(
            "select id, body_sha256 from events where message_id = ? and status = ?",
        )
        .bind(&first.message_id)
        .bind(&first.status)
        .fetch_one(&mut *connection)
        .await?;
        let copies: Vec<&Delivery> = std::iter::once(&group.first)
            .chain(&group.repeats)
            .map(|&i| &plan.deliveries[i])
            .collect();
        let differing = copies
            .iter()
            .filter(|copy| copy.body_sha256.as_slice() != hash.as_slice())
            .count();
        sqlx::query(
            "update events \
             set duplicates = duplicates + ?, \
                 differing_duplicates = differing_duplicates + ?, \
                 last_received_at = max(last_received_at, ?) \
             where id = ?",
        )
        .bind(copies.len() as i64)
        .bind(differing as i64)
        .bind(time_text(plan.last_received_at(group)))
        .bind(id)
        .execute(&mut *connection)
        .await?;
        stored[g] = <[u8; 32]>::try_from(hash.as_slice()).ok();
    }
    Ok(stored)
}

/// Creates or moves forward every run that got a new event. Returns each one's final status.
async fn apply_run_changes(
    connection: &mut SqliteConnection,
    plan: &BatchPlan<'_>,
    inserted: &[bool],
) -> Result<HashMap<String, String>, sqlx::Error> {
    let mut final_status = HashMap::new();
    for change in plan.run_changes(inserted) {
        let (message_id, status): (String, String) = sqlx::query_as(&APPLY_RUN_CHANGE)
            .bind(&change.message_id)
            .bind(&change.workflow_id)
            .bind(&change.status)
            .bind(change.rank.as_i16())
            .bind(time_text(change.first_received_at))
            .bind(time_text(change.last_received_at))
            .bind(change.completed_at.map(time_text))
            .bind(change.expires_at.map(time_text))
            .bind(&change.result)
            .bind(&change.assets_url)
            .bind(&change.error)
            .fetch_one(&mut *connection)
            .await?;
        final_status.insert(message_id, status);
    }
    Ok(final_status)
}

static RUN_COLUMNS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "message_id, workflow_id, status, created_at, updated_at, completed_at, expires_at, \
         result, assets_url, error, triggered_here, {}, workflow_params, seq",
        run_row::CONFLICTING_TERMINALS
    )
});

static GET_RUN: LazyLock<String> =
    LazyLock::new(|| format!("select {} from runs where message_id = ?", *RUN_COLUMNS));

static LIST_EVENTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "select status, received_at, duplicates, differing_duplicates, {}, key_id, \
                    last_received_at, payload \
             from events where message_id = ? order by received_at, id",
        run_row::CONFLICTING_TERMINAL
    )
});

type RunRow = run_row::RunRow<String>;

fn run_from_row(row: RunRow) -> Result<Run, StoreError> {
    run_row::run_from_row(row, |text| time_from_text(&text))
}

type EventRow = (String, String, i64, i64, bool, String, String, String);

fn event_from_row(row: EventRow) -> Result<Event, StoreError> {
    let (status, received_at, duplicates, differing, conflicting, key_id, last, payload) = row;
    Ok(Event {
        status,
        received_at: time_from_text(&received_at)?,
        duplicates,
        differing_duplicates: differing,
        conflicting_terminal: conflicting,
        key_id,
        last_received_at: time_from_text(&last)?,
        payload: RawValue::from_string(payload).map_err(|error| {
            StoreError::Internal(format!("stored payload does not parse: {error}"))
        })?,
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
        let plan = BatchPlan::new(deliveries);
        Ok(self.try_record(&plan).await?)
    }

    async fn record_rejected_payload(&self, rejected: &RejectedPayload) -> Result<(), StoreError> {
        sqlx::query(
            "insert into rejected_payloads (received_at, key_id, reason, body) \
             values (?, ?, ?, ?)",
        )
        .bind(time_text(rejected.received_at))
        .bind(&rejected.key_id)
        .bind(&rejected.reason)
        .bind(rejected.raw_body.as_ref())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn get_run(&self, message_id: &str) -> Result<Option<Run>, StoreError> {
        let row: Option<RunRow> = sqlx::query_as(&GET_RUN)
            .bind(message_id)
            .fetch_optional(&self.readers)
            .await?;
        row.map(run_from_row).transpose()
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        let sql = format!(
            "select {} from runs{}",
            *RUN_COLUMNS,
            run_row::listing_clauses(query, false)
        );
        let mut statement = sqlx::query_as::<_, RunRow>(&sql);
        if let Some(workflow_id) = &query.workflow_id {
            statement = statement.bind(workflow_id);
        }
        if let Some(status) = &query.status {
            statement = statement.bind(status);
        }
        if let Some(after) = query.after {
            statement = statement.bind(after.seq);
        }
        let limit = query.limit.max(1);
        let rows = statement
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.readers)
            .await?;
        let runs = rows
            .into_iter()
            .map(run_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RunPage::from_overfetch(runs, limit))
    }

    async fn list_events(&self, message_id: &str) -> Result<Vec<Event>, StoreError> {
        // Arrival order is `received_at`, as on PostgreSQL: ids follow insertion, and with
        // several ingest writers a later delivery may be committed first.
        let rows: Vec<EventRow> = sqlx::query_as(&LIST_EVENTS)
            .bind(message_id)
            .fetch_all(&self.readers)
            .await?;
        rows.into_iter().map(event_from_row).collect()
    }

    async fn record_triggered_run(&self, run: &TriggeredRun) -> Result<(), StoreError> {
        // A callback may have created the run already (Nen can call back before its 202
        // reaches us): then only mark it as ours, never touch its status.
        sqlx::query(
            "insert into runs as r (message_id, workflow_id, status, status_rank, created_at, \
                                    updated_at, triggered_here, workflow_params) \
             values (?1, ?2, 'submitted', 0, ?3, ?3, 1, ?4) \
             on conflict (message_id) do update set \
                 triggered_here = 1, \
                 workflow_id = coalesce(r.workflow_id, excluded.workflow_id), \
                 workflow_params = coalesce(excluded.workflow_params, r.workflow_params), \
                 created_at = min(r.created_at, excluded.created_at)",
        )
        .bind(&run.message_id)
        .bind(&run.workflow_id)
        .bind(time_text(run.created_at))
        .bind(run.workflow_params.as_deref())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn claim_idempotency_key(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<ClaimOutcome, StoreError> {
        // Claims queue for the one write connection, and `immediate` holds the write lock from
        // the first statement: exactly one of several concurrent claims of a key inserts it.
        let mut tx = self.writer.begin_with("begin immediate").await?;
        sqlx::query("delete from idempotency_keys where key = ? and expires_at <= ?")
            .bind(&claim.key)
            .bind(time_text(claim.now))
            .execute(&mut *tx)
            .await?;
        let claimed = sqlx::query(
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
        let outcome = if claimed {
            ClaimOutcome::Claimed
        } else {
            let (hash, status, body): (Vec<u8>, Option<i64>, Option<String>) = sqlx::query_as(
                "select request_sha256, response_status, response_body \
                 from idempotency_keys where key = ?",
            )
            .bind(&claim.key)
            .fetch_one(&mut *tx)
            .await?;
            if hash.as_slice() != claim.request_sha256.as_slice() {
                ClaimOutcome::Conflict
            } else if let (Some(status), Some(body)) = (status, body) {
                ClaimOutcome::Completed(StoredResponse {
                    status: u16::try_from(status).map_err(|_| {
                        StoreError::Internal(format!("stored response status {status} is invalid"))
                    })?,
                    body,
                })
            } else {
                ClaimOutcome::InProgress
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn complete_idempotency_key(
        &self,
        key: &str,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "update idempotency_keys set response_status = ?2, response_body = ?3 where key = ?1",
        )
        .bind(key)
        .bind(i64::from(response.status))
        .bind(&response.body)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn release_idempotency_key(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("delete from idempotency_keys where key = ? and response_status is null")
            .bind(key)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("select 1").execute(&self.readers).await?;
        Ok(())
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
    fn far_away_years_still_read_back() {
        for millis in [8_200_000_000_000_000, -8_200_000_000_000_000, -1] {
            let time = Utc.timestamp_millis_opt(millis).unwrap();
            assert_eq!(time_from_text(&time_text(time)).unwrap(), time);
        }
    }
}
