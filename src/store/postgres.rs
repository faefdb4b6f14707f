//! The PostgreSQL store: the production backend, safe for several replicas on one database.
//!
//! A batch of deliveries is written with one multi-row statement per step (`unnest` of arrays),
//! in one transaction, so the cost of a commit is shared by everything in the batch.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::LazyLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::query::QueryAs;
use sqlx::{Postgres, Transaction};

use super::forward_only::run_conflict_clause;
use super::model::*;
use super::plan::{BatchPlan, RunChange};
use super::run_row;
use super::{Store, StoreError, StoreOptions};

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
        let mut tx = self.pool.begin().await?;
        let inserted = insert_events(&mut tx, plan).await?;
        let (stored_sha256, final_status) = settle(&mut tx, plan, &inserted).await?;
        let conflicting = plan.conflicting_terminals(&inserted, &final_status);
        if !conflicting.is_empty() {
            flag_conflicts(&mut tx, plan, &conflicting).await?;
        }
        tx.commit().await?;
        Ok(plan.outcomes(&inserted, &stored_sha256, &conflicting))
    }
}

/// Inserts each group's first delivery as an event unless `(message_id, status)` exists.
/// Returns, per group, whether it became a new event.
async fn insert_events(
    tx: &mut Transaction<'_, Postgres>,
    plan: &BatchPlan<'_>,
) -> Result<Vec<bool>, sqlx::Error> {
    // Key order, so that concurrent writers take row locks in the same order.
    let mut order: Vec<usize> = (0..plan.groups.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (plan.first(&plan.groups[a]), plan.first(&plan.groups[b]));
        (&a.message_id, &a.status).cmp(&(&b.message_id, &b.status))
    });
    let size = order.len();
    let (mut ids, mut statuses, mut received, mut last, mut payloads) = (
        Vec::with_capacity(size),
        Vec::with_capacity(size),
        Vec::with_capacity(size),
        Vec::with_capacity(size),
        Vec::with_capacity(size),
    );
    let (mut hashes, mut keys, mut duplicates, mut differing) = (
        Vec::with_capacity(size),
        Vec::with_capacity(size),
        Vec::with_capacity(size),
        Vec::with_capacity(size),
    );
    for &g in &order {
        let group = &plan.groups[g];
        let first = plan.first(group);
        ids.push(first.message_id.as_str());
        statuses.push(first.status.as_str());
        received.push(first.received_at);
        last.push(plan.last_received_at(group));
        payloads.push(first.body_text());
        hashes.push(first.body_sha256.to_vec());
        keys.push(first.key_id.as_str());
        duplicates.push(group.repeats.len() as i64);
        differing.push(plan.differing_repeats(group) as i64);
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "insert into events (message_id, status, received_at, last_received_at, payload, \
                             body_sha256, key_id, duplicates, differing_duplicates) \
         select * from unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], \
                              $5::text[], $6::bytea[], $7::text[], $8::int8[], $9::int8[]) \
         on conflict (message_id, status) do nothing \
         returning message_id, status",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&received)
    .bind(&last)
    .bind(&payloads)
    .bind(&hashes)
    .bind(&keys)
    .bind(&duplicates)
    .bind(&differing)
    .fetch_all(&mut **tx)
    .await?;
    let index = group_index(plan);
    let mut inserted = vec![false; plan.groups.len()];
    for (message_id, status) in &rows {
        if let Some(&g) = index.get(&(message_id.as_str(), status.as_str())) {
            inserted[g] = true;
        }
    }
    Ok(inserted)
}

/// Adds every copy of an existing event to its counters. Parameters `$1..$4`; returns
/// `(message_id, status, stored body_sha256)` per counted event.
const COUNT_DUPLICATES: &str = "\
    with copies (message_id, status, body_sha256, received_at) as ( \
        select * from unnest($1::text[], $2::text[], $3::bytea[], $4::timestamptz[])), \
    tally as ( \
        select e.id, count(*) as copies, \
               count(*) filter (where c.body_sha256 <> e.body_sha256) as differing, \
               max(c.received_at) as last_received_at \
        from copies c join events e using (message_id, status) \
        group by e.id) \
    update events e \
    set duplicates = e.duplicates + tally.copies, \
        differing_duplicates = e.differing_duplicates + tally.differing, \
        last_received_at = greatest(e.last_received_at, tally.last_received_at) \
    from (select * from tally order by id) tally \
    where e.id = tally.id \
    returning e.message_id, e.status, e.body_sha256";

/// Creates or moves forward every run that got a new event. Parameters `$1..$11`; returns
/// `(message_id, final status)` per run.
static APPLY_RUN_CHANGES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "insert into runs as r (message_id, workflow_id, status, status_rank, created_at, \
                                updated_at, completed_at, expires_at, result, assets_url, error) \
         select m, w, s, k, c, u, d, e, res::jsonb, a, er \
         from unnest($1::text[], $2::text[], $3::text[], $4::int2[], $5::timestamptz[], \
                     $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::text[], \
                     $10::text[], $11::text[]) as t(m, w, s, k, c, u, d, e, res, a, er) \
         {} \
         returning message_id, status",
        run_conflict_clause("greatest")
    )
});

/// `settle`'s three statements, built once: repeats only, run changes only, or both.
static SETTLE_COUNT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "with counted as ({COUNT_DUPLICATES}) select message_id, status, body_sha256 from counted"
    )
});
static SETTLE_MOVE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "with moved as ({}) select message_id, status, null::bytea from moved",
        *APPLY_RUN_CHANGES
    )
});
static SETTLE_BOTH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "with counted as ({COUNT_DUPLICATES}), moved as ({}) \
         select message_id, status, body_sha256 from counted \
         union all select message_id, status, null::bytea from moved",
        renumber_parameters(&APPLY_RUN_CHANGES, 4)
    )
});

/// Every copy of a group that did not become a new event, as `COUNT_DUPLICATES` binds them.
struct Copies<'a> {
    ids: Vec<&'a str>,
    statuses: Vec<&'a str>,
    hashes: Vec<Vec<u8>>,
    received: Vec<DateTime<Utc>>,
}

impl<'a> Copies<'a> {
    fn of(plan: &BatchPlan<'a>, inserted: &[bool]) -> Self {
        let mut copies = Copies {
            ids: vec![],
            statuses: vec![],
            hashes: vec![],
            received: vec![],
        };
        for (g, group) in plan.groups.iter().enumerate() {
            if inserted[g] {
                continue;
            }
            for &i in std::iter::once(&group.first).chain(&group.repeats) {
                let delivery = &plan.deliveries[i];
                copies.ids.push(delivery.message_id.as_str());
                copies.statuses.push(delivery.status.as_str());
                copies.hashes.push(delivery.body_sha256.to_vec());
                copies.received.push(delivery.received_at);
            }
        }
        copies
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn bind<'q, O>(
        &'q self,
        query: QueryAs<'q, Postgres, O, PgArguments>,
    ) -> QueryAs<'q, Postgres, O, PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.statuses)
            .bind(&self.hashes)
            .bind(&self.received)
    }
}

/// The run changes of a batch, column by column, as `APPLY_RUN_CHANGES` binds them.
struct RunColumns<'a> {
    ids: Vec<&'a str>,
    workflows: Vec<Option<&'a str>>,
    statuses: Vec<&'a str>,
    ranks: Vec<i16>,
    created: Vec<DateTime<Utc>>,
    updated: Vec<DateTime<Utc>>,
    completed: Vec<Option<DateTime<Utc>>>,
    expires: Vec<Option<DateTime<Utc>>>,
    results: Vec<Option<&'a str>>,
    assets: Vec<Option<&'a str>>,
    errors: Vec<Option<&'a str>>,
}

impl<'a> RunColumns<'a> {
    fn of(changes: &'a [RunChange]) -> Self {
        RunColumns {
            ids: changes.iter().map(|c| c.message_id.as_str()).collect(),
            workflows: changes.iter().map(|c| c.workflow_id.as_deref()).collect(),
            statuses: changes.iter().map(|c| c.status.as_str()).collect(),
            ranks: changes.iter().map(|c| c.rank.as_i16()).collect(),
            created: changes.iter().map(|c| c.first_received_at).collect(),
            updated: changes.iter().map(|c| c.last_received_at).collect(),
            completed: changes.iter().map(|c| c.completed_at).collect(),
            expires: changes.iter().map(|c| c.expires_at).collect(),
            results: changes.iter().map(|c| c.result.as_deref()).collect(),
            assets: changes.iter().map(|c| c.assets_url.as_deref()).collect(),
            errors: changes.iter().map(|c| c.error.as_deref()).collect(),
        }
    }

    fn bind<'q, O>(
        &'q self,
        query: QueryAs<'q, Postgres, O, PgArguments>,
    ) -> QueryAs<'q, Postgres, O, PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.workflows)
            .bind(&self.statuses)
            .bind(&self.ranks)
            .bind(&self.created)
            .bind(&self.updated)
            .bind(&self.completed)
            .bind(&self.expires)
            .bind(&self.results)
            .bind(&self.assets)
            .bind(&self.errors)
    }
}

/// After the events are in: counts the copies of events that already existed, and moves every
/// run that got a new event. Returns, per group that was not inserted, the stored body's hash
/// (to tell identical copies from differing ones), and each changed run's final status.
///
/// When a batch needs both, they go in one statement: the two touch different tables, and every
/// statement saved is a round trip (and, on a busy machine, a wake-up) less per commit. Its
/// snapshot is taken after the insert, so it sees events that concurrent writers committed
/// meanwhile, exactly as two statements would.
async fn settle(
    tx: &mut Transaction<'_, Postgres>,
    plan: &BatchPlan<'_>,
    inserted: &[bool],
) -> Result<(Vec<Option<[u8; 32]>>, HashMap<String, String>), sqlx::Error> {
    let copies = Copies::of(plan, inserted);
    let changes = plan.run_changes(inserted);
    let runs = RunColumns::of(&changes);
    let rows: Vec<(String, String, Option<Vec<u8>>)> = match (copies.is_empty(), changes.is_empty())
    {
        (true, true) => Vec::new(),
        (false, true) => {
            copies
                .bind(sqlx::query_as(&SETTLE_COUNT))
                .fetch_all(&mut **tx)
                .await?
        }
        (true, false) => {
            runs.bind(sqlx::query_as(&SETTLE_MOVE))
                .fetch_all(&mut **tx)
                .await?
        }
        (false, false) => {
            runs.bind(copies.bind(sqlx::query_as(&SETTLE_BOTH)))
                .fetch_all(&mut **tx)
                .await?
        }
    };
    let index = group_index(plan);
    let mut stored = vec![None; plan.groups.len()];
    let mut final_status = HashMap::with_capacity(changes.len());
    for (message_id, status, hash) in rows {
        match hash {
            // events.body_sha256 is never null: a row with a hash is a counted event.
            Some(hash) => {
                if let (Some(&g), Ok(hash)) = (
                    index.get(&(message_id.as_str(), status.as_str())),
                    <[u8; 32]>::try_from(hash.as_slice()),
                ) {
                    stored[g] = Some(hash);
                }
            }
            None => {
                final_status.insert(message_id, status);
            }
        }
    }
    Ok((stored, final_status))
}

/// Shifts every `$n` in `sql` by `offset`, so that a statement can follow another's parameters.
fn renumber_parameters(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '$' {
            continue;
        }
        let mut digits = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            digits.push(*d);
            chars.next();
        }
        match digits.parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&digits),
        }
    }
    out
}

async fn flag_conflicts(
    tx: &mut Transaction<'_, Postgres>,
    plan: &BatchPlan<'_>,
    conflicting: &[usize],
) -> Result<(), sqlx::Error> {
    let deliveries: Vec<_> = conflicting
        .iter()
        .map(|&g| plan.first(&plan.groups[g]))
        .collect();
    let ids: Vec<&str> = deliveries.iter().map(|d| d.message_id.as_str()).collect();
    let statuses: Vec<&str> = deliveries.iter().map(|d| d.status.as_str()).collect();
    sqlx::query(
        "update events set conflicting_terminal = true \
         where (message_id, status) in (select * from unnest($1::text[], $2::text[]))",
    )
    .bind(&ids)
    .bind(&statuses)
    .execute(&mut **tx)
    .await?;
    sqlx::query("update runs set conflicting_terminals = true where message_id = any($1)")
        .bind(&ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
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

const RUN_COLUMNS: &str = "message_id, workflow_id, status, created_at, updated_at, completed_at, \
     expires_at, result::text, assets_url, error, triggered_here, conflicting_terminals, \
     workflow_params::text, seq";

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
        let row: Option<RunRow> = sqlx::query_as(&format!(
            "select {RUN_COLUMNS} from runs where message_id = $1"
        ))
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(run_from_row).transpose()
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        let sql = format!(
            "select {RUN_COLUMNS} from runs{}",
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
        let rows: Vec<EventRow> = sqlx::query_as(
            "select status, received_at, duplicates, differing_duplicates, conflicting_terminal, \
                    key_id, last_received_at, payload \
             from events where message_id = $1 order by received_at, id",
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_renumbered_past_the_first_statement() {
        assert_eq!(
            renumber_parameters("select $1::text[], $10, '$', $2x", 4),
            "select $5::text[], $14, '$', $6x"
        );
    }
}
