//! The PostgreSQL store: the production backend, safe for several replicas on one database.
//!
//! A batch of deliveries is written by one statement (`unnest` of arrays, data-modifying CTEs),
//! which is its own transaction: one round trip and one commit shared by the whole batch.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::LazyLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::query::QueryAs;
use sqlx::Postgres;

use super::forward_only::run_conflict_clause;
use super::model::*;
use super::plan::BatchPlan;
use super::run_row;
use super::{Store, StoreError, StoreOptions};
use crate::runs::status::StatusRank;

/// Deadlocks and serialization failures between concurrent writers are retried this often.
const MAX_ATTEMPTS: usize = 3;

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Builds the pool without connecting: the service can start (and report not ready) while
    /// the database is down, and connects as soon as it answers.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let statement_timeout = format!("{}", options.statement_timeout.as_millis().max(1));
        let connect = PgConnectOptions::from_str(url)
            .map_err(|error| StoreError::Internal(format!("invalid DATABASE_URL: {error}")))?
            .application_name("nen-relay")
            // Server-side caps, so that a slow database answers with an error the service turns
            // into 503 instead of holding requests past Nen's 5-second budget.
            .options([
                ("statement_timeout", statement_timeout.as_str()),
                ("lock_timeout", statement_timeout.as_str()),
                ("idle_in_transaction_session_timeout", "30000"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            // A ping per checkout would double the round trips of every batch; a dead
            // connection fails its first statement instead, and is replaced.
            .test_before_acquire(false)
            .connect_lazy_with(connect);
        Ok(Self { pool })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(|error| match error {
                sqlx::migrate::MigrateError::Execute(inner) => StoreError::from(inner),
                other => StoreError::Internal(format!("migration failed: {other}")),
            })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn try_record(&self, plan: &BatchPlan<'_>) -> Result<Vec<DeliveryOutcome>, sqlx::Error> {
        let groups = GroupColumns::of(plan);
        let rows: Vec<BatchRow> = groups
            .bind(sqlx::query_as(&RECORD_BATCH))
            .fetch_all(&self.pool)
            .await?;
        let index = group_index(plan);
        let mut inserted = vec![false; plan.groups.len()];
        let mut stored_sha256 = vec![None; plan.groups.len()];
        let mut final_status = HashMap::new();
        for (message_id, status, new_event, hash) in rows {
            match new_event {
                // A run row: the status the run settled on.
                None => {
                    final_status.insert(message_id, status);
                }
                Some(new_event) => {
                    let Some(&g) = index.get(&(message_id.as_str(), status.as_str())) else {
                        continue;
                    };
                    inserted[g] = new_event;
                    stored_sha256[g] = hash.and_then(|hash| <[u8; 32]>::try_from(hash).ok());
                }
            }
        }
        let conflicting = plan.conflicting_terminals(&inserted, &final_status);
        Ok(plan.outcomes(&inserted, &stored_sha256, &conflicting))
    }
}

/// A row of `RECORD_BATCH`: `(message_id, status, inserted, stored body_sha256)`.
type BatchRow = (String, String, Option<bool>, Option<Vec<u8>>);

/// A whole batch in one statement, so one round trip and one implicit transaction:
///
/// 1. `ev`: each group's first delivery becomes an event, or, when `(message_id, status)` is
///    already stored (committed earlier, or just now by another writer: `on conflict` waits for
///    it and sees it), every copy is added to that event's counters. `xmax = 0` tells the rows
///    this statement inserted from those it updated.
/// 2. `fresh`, `best`, `span`: the runs that got a new event, and how each moves. This is
///    `BatchPlan::run_changes` (which the SQLite store uses) in SQL, because which events are
///    new is only known inside the statement: the furthest new status wins, the first to arrive
///    among equally far ones; the run keeps the earliest and latest arrival, and a workflow_id or
///    expiry the winner lacks comes from the first new event that has one.
///    `span` is materialized: inlined into the join, its aggregate ran again for every run,
///    which made a batch cost quadratic in its size.
/// 3. `moved`: each of those runs is created or moved forward (`forward_only`).
///
/// Every group and every moved run comes back as a row: `(message_id, status, inserted,
/// stored body_sha256)` for groups, `(message_id, final status, null, null)` for runs.
/// Rows are written in key order, so that concurrent writers lock them in one order.
static RECORD_BATCH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "with input (m, s, g, k, rcv, lst, payload, sha, key_id, reps, diff, copies, \
                     w, x, res, a, er) as ( \
             select * from unnest($1::text[], $2::text[], $3::int4[], $4::int2[], \
                                  $5::timestamptz[], $6::timestamptz[], $7::text[], $8::bytea[], \
                                  $9::text[], $10::int8[], $11::int8[], $12::bytea[], \
                                  $13::text[], $14::timestamptz[], $15::text[], $16::text[], \
                                  $17::text[])), \
         ev as ( \
             insert into events as e (message_id, status, received_at, last_received_at, \
                                      payload, body_sha256, key_id, duplicates, \
                                      differing_duplicates) \
             select m, s, rcv, lst, payload, sha, key_id, reps, diff from input order by m, s \
             on conflict (message_id, status) do update set \
                 duplicates = e.duplicates + excluded.duplicates + 1, \
                 differing_duplicates = e.differing_duplicates + ( \
                     select count(*) from input i, \
                            generate_series(0, length(i.copies) / 32 - 1) as n \
                     where i.m = excluded.message_id and i.s = excluded.status \
                       and substring(i.copies from n * 32 + 1 for 32) <> e.body_sha256), \
                 last_received_at = greatest(e.last_received_at, excluded.last_received_at) \
             returning e.message_id, e.status, e.xmax = 0 as inserted, e.body_sha256), \
         fresh as ( \
             select i.* from input i join ev on ev.message_id = i.m and ev.status = i.s \
             where ev.inserted), \
         best as (select distinct on (m) * from fresh order by m, k desc, g), \
         span as materialized ( \
             select m, min(rcv) as first_at, max(rcv) as last_at, \
                    (array_agg(w order by g) filter (where w is not null))[1] as some_w, \
                    (array_agg(x order by g) filter (where x is not null))[1] as some_x \
             from fresh group by m), \
         moved as ( \
             insert into runs as r (message_id, workflow_id, status, status_rank, created_at, \
                                    updated_at, completed_at, expires_at, result, assets_url, \
                                    error) \
             select b.m, coalesce(b.w, span.some_w), b.s, b.k, span.first_at, span.last_at, \
                    case when b.k = {terminal} then b.rcv end, coalesce(b.x, span.some_x), \
                    b.res::jsonb, b.a, b.er \
             from best b join span using (m) order by b.m \
             {conflict} \
             returning r.message_id, r.status) \
         select message_id, status, inserted, \
                case when inserted then null else body_sha256 end from ev \
         union all select message_id, status, null, null from moved",
        terminal = StatusRank::Terminal.as_i16(),
        conflict = run_conflict_clause("greatest"),
    )
});

/// The groups of a batch, column by column in key order, as `RECORD_BATCH` binds them.
struct GroupColumns<'a> {
    ids: Vec<&'a str>,
    statuses: Vec<&'a str>,
    arrival: Vec<i32>,
    ranks: Vec<i16>,
    received: Vec<DateTime<Utc>>,
    last: Vec<DateTime<Utc>>,
    payloads: Vec<&'a str>,
    hashes: Vec<&'a [u8]>,
    keys: Vec<&'a str>,
    repeats: Vec<i64>,
    differing: Vec<i64>,
    /// Every copy's body hash (the first delivery's, then its repeats'), 32 bytes each.
    copies: Vec<Vec<u8>>,
    workflows: Vec<Option<&'a str>>,
    expires: Vec<Option<DateTime<Utc>>>,
    results: Vec<Option<&'a str>>,
    assets: Vec<Option<&'a str>>,
    errors: Vec<Option<&'a str>>,
}

impl<'a> GroupColumns<'a> {
    fn of(plan: &BatchPlan<'a>) -> Self {
        let mut order: Vec<usize> = (0..plan.groups.len()).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (plan.first(&plan.groups[a]), plan.first(&plan.groups[b]));
            (&a.message_id, &a.status).cmp(&(&b.message_id, &b.status))
        });
        let mut columns = GroupColumns::with_capacity(order.len());
        for g in order {
            let group = &plan.groups[g];
            let first = plan.first(group);
            columns.ids.push(&first.message_id);
            columns.statuses.push(&first.status);
            columns.arrival.push(i32::try_from(g).unwrap_or(i32::MAX));
            columns.ranks.push(first.rank().as_i16());
            columns.received.push(first.received_at);
            columns.last.push(plan.last_received_at(group));
            columns.payloads.push(first.body_text());
            columns.hashes.push(&first.body_sha256);
            columns.keys.push(&first.key_id);
            columns.repeats.push(group.repeats.len() as i64);
            columns.differing.push(plan.differing_repeats(group) as i64);
            columns.copies.push(
                std::iter::once(&group.first)
                    .chain(&group.repeats)
                    .flat_map(|&i| plan.deliveries[i].body_sha256)
                    .collect(),
            );
            columns.workflows.push(first.workflow_id.as_deref());
            columns.expires.push(first.expires_at);
            columns.results.push(first.result.as_deref());
            columns.assets.push(first.assets_url.as_deref());
            columns.errors.push(first.error.as_deref());
        }
        columns
    }

    fn with_capacity(size: usize) -> Self {
        GroupColumns {
            ids: Vec::with_capacity(size),
            statuses: Vec::with_capacity(size),
            arrival: Vec::with_capacity(size),
            ranks: Vec::with_capacity(size),
            received: Vec::with_capacity(size),
            last: Vec::with_capacity(size),
            payloads: Vec::with_capacity(size),
            hashes: Vec::with_capacity(size),
            keys: Vec::with_capacity(size),
            repeats: Vec::with_capacity(size),
            differing: Vec::with_capacity(size),
            copies: Vec::with_capacity(size),
            workflows: Vec::with_capacity(size),
            expires: Vec::with_capacity(size),
            results: Vec::with_capacity(size),
            assets: Vec::with_capacity(size),
            errors: Vec::with_capacity(size),
        }
    }

    fn bind<'q, O>(
        &'q self,
        query: QueryAs<'q, Postgres, O, PgArguments>,
    ) -> QueryAs<'q, Postgres, O, PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.statuses)
            .bind(&self.arrival)
            .bind(&self.ranks)
            .bind(&self.received)
            .bind(&self.last)
            .bind(&self.payloads)
            .bind(&self.hashes)
            .bind(&self.keys)
            .bind(&self.repeats)
            .bind(&self.differing)
            .bind(&self.copies)
            .bind(&self.workflows)
            .bind(&self.expires)
            .bind(&self.results)
            .bind(&self.assets)
            .bind(&self.errors)
    }
}

fn group_index<'a>(plan: &BatchPlan<'a>) -> HashMap<(&'a str, &'a str), usize> {
    plan.groups
        .iter()
        .enumerate()
        .map(|(g, group)| {
            let first = plan.first(group);
            ((first.message_id.as_str(), first.status.as_str()), g)
        })
        .collect()
}

fn is_retryable(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if matches!(db.code().as_deref(), Some("40P01") | Some("40001")))
}

static RUN_COLUMNS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "message_id, workflow_id, status, created_at, updated_at, completed_at, expires_at, \
         result::text, assets_url, error, triggered_here, {}, workflow_params::text, seq",
        run_row::CONFLICTING_TERMINALS
    )
});

static GET_RUN: LazyLock<String> =
    LazyLock::new(|| format!("select {} from runs where message_id = $1", *RUN_COLUMNS));

static LIST_EVENTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "select status, received_at, duplicates, differing_duplicates, {}, key_id, \
                    last_received_at, payload \
             from events where message_id = $1 order by received_at, id",
        run_row::CONFLICTING_TERMINAL
    )
});

type RunRow = run_row::RunRow<DateTime<Utc>>;

fn run_from_row(row: RunRow) -> Result<Run, StoreError> {
    run_row::run_from_row(row, Ok)
}

#[async_trait]
impl Store for PostgresStore {
    async fn record_deliveries(
        &self,
        deliveries: &[Delivery],
    ) -> Result<Vec<DeliveryOutcome>, StoreError> {
        if deliveries.is_empty() {
            return Ok(Vec::new());
        }
        let plan = BatchPlan::new(deliveries);
        let mut attempt = 1;
        loop {
            match self.try_record(&plan).await {
                Err(error) if is_retryable(&error) && attempt < MAX_ATTEMPTS => attempt += 1,
                result => return result.map_err(StoreError::from),
            }
        }
    }

    async fn record_rejected_payload(&self, rejected: &RejectedPayload) -> Result<(), StoreError> {
        sqlx::query(
            "insert into rejected_payloads (received_at, key_id, reason, body) \
             values ($1, $2, $3, $4)",
        )
        .bind(rejected.received_at)
        .bind(&rejected.key_id)
        .bind(&rejected.reason)
        .bind(rejected.raw_body.as_ref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_run(&self, message_id: &str) -> Result<Option<Run>, StoreError> {
        let row: Option<RunRow> = sqlx::query_as(&GET_RUN)
            .bind(message_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(run_from_row).transpose()
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        let sql = format!(
            "select {} from runs{}",
            *RUN_COLUMNS,
            run_row::listing_clauses(query, true)
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
            .fetch_all(&self.pool)
            .await?;
        let runs = rows
            .into_iter()
            .map(run_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RunPage::from_overfetch(runs, limit))
    }

    async fn list_events(&self, message_id: &str) -> Result<Vec<Event>, StoreError> {
        type EventRow = (
            String,
            DateTime<Utc>,
            i64,
            i64,
            bool,
            String,
            DateTime<Utc>,
            String,
        );
        // Arrival order is `received_at`: ids follow insertion, and a batch inserts its events
        // in key order (to take locks in one order), not in the order they arrived.
        let rows: Vec<EventRow> = sqlx::query_as(&LIST_EVENTS)
            .bind(message_id)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(
                |(
                    status,
                    received_at,
                    duplicates,
                    differing,
                    conflicting,
                    key_id,
                    last,
                    payload,
                )| {
                    Ok(Event {
                        status,
                        received_at,
                        duplicates,
                        differing_duplicates: differing,
                        conflicting_terminal: conflicting,
                        key_id,
                        last_received_at: last,
                        payload: RawValue::from_string(payload).map_err(|error| {
                            StoreError::Internal(format!("stored payload does not parse: {error}"))
                        })?,
                    })
                },
            )
            .collect()
    }

    async fn record_triggered_run(&self, run: &TriggeredRun) -> Result<(), StoreError> {
        // A callback may have created the run already (Nen can call back before its 202
        // reaches us): then only mark it as ours, never touch its status.
        sqlx::query(
            "insert into runs as r (message_id, workflow_id, status, status_rank, created_at, \
                                    updated_at, triggered_here, workflow_params) \
             values ($1, $2, 'submitted', 0, $3, $3, true, $4::jsonb) \
             on conflict (message_id) do update set \
                 triggered_here = true, \
                 workflow_id = coalesce(r.workflow_id, excluded.workflow_id), \
                 workflow_params = coalesce(excluded.workflow_params, r.workflow_params), \
                 created_at = least(r.created_at, excluded.created_at)",
        )
        .bind(&run.message_id)
        .bind(&run.workflow_id)
        .bind(run.created_at)
        .bind(run.workflow_params.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn claim_idempotency_key(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("delete from idempotency_keys where key = $1 and expires_at <= $2")
            .bind(&claim.key)
            .bind(claim.now)
            .execute(&mut *tx)
            .await?;
        // Waits for a concurrent claim of the same key to commit, then does nothing: exactly
        // one request across every replica gets `Claimed`.
        let claimed = sqlx::query(
            "insert into idempotency_keys (key, request_sha256, created_at, expires_at) \
             values ($1, $2, $3, $4) on conflict (key) do nothing",
        )
        .bind(&claim.key)
        .bind(claim.request_sha256.as_slice())
        .bind(claim.now)
        .bind(claim.expires_at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let outcome = if claimed {
            ClaimOutcome::Claimed
        } else {
            let (hash, status, body): (Vec<u8>, Option<i16>, Option<String>) = sqlx::query_as(
                "select request_sha256, response_status, response_body \
                 from idempotency_keys where key = $1",
            )
            .bind(&claim.key)
            .fetch_one(&mut *tx)
            .await?;
            if hash.as_slice() != claim.request_sha256.as_slice() {
                ClaimOutcome::Conflict
            } else if let (Some(status), Some(body)) = (status, body) {
                ClaimOutcome::Completed(StoredResponse {
                    status: status as u16,
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
            "update idempotency_keys set response_status = $2, response_body = $3 where key = $1",
        )
        .bind(key)
        .bind(response.status as i16)
        .bind(&response.body)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn release_idempotency_key(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("delete from idempotency_keys where key = $1 and response_status is null")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }
}
