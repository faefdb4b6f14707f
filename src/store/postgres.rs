//! The PostgreSQL store: the production backend, safe for several replicas on one database.
//!
//! A batch of deliveries is written by one statement (`unnest` of arrays, data-modifying CTEs),
//! which is its own transaction: one round trip and one commit shared by the whole batch. That
//! statement, and the one that records a triggered run, implement in SQL the rules the SQLite
//! store runs in Rust (`plan`, `forward_only`); each says which. With forwarding targets, the
//! same statement also queues the messages of the runs it changed
//! ([`RECORD_BATCH_FORWARDING`]); without targets nothing of that runs.

use std::borrow::Cow;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgConnection, PgExecutor, PgListener, PgPool, PgPoolOptions,
};
use sqlx::query::QueryAs;
use sqlx::Postgres;

use super::changes;
use super::claim::ExistingClaim;
use super::feed::{self, FeedEvent, TerminalRunFeed};
use super::listing::{Listing, ListingFilter};
use super::model::*;
use super::outbox::{
    FailedPage, FinishedAttempt, Lease, OutboxMessage, TargetQueue, STATUS_CHANGED,
};
use super::plan::BatchPlan;
use super::retention::SweepSession;
use super::rows::{EventRow, RunRow};
use super::{migrations, Handoff, Outbox, PoolUsage, Store, StoreError, StoreOptions};

mod handed;
mod outbox;
mod sweep;

use handed::{Handed, HandoffOffer, QueuedRow};

/// Deadlocks and serialization failures between concurrent writers are retried this often.
const MAX_ATTEMPTS: usize = 3;

pub struct PostgresStore {
    pool: PgPool,
    /// For the one connection that listens for terminal runs (`feed`), outside the pool.
    listen: PgConnectOptions,
    /// The `DATABASE_URL`, without the request timeouts: migrations connect with their own.
    url_options: PgConnectOptions,
    /// What every pooled connection is opened with; a sweep opens its own connection with it.
    connect: PgConnectOptions,
    /// `StoreOptions::forward_targets`. With none, a batch is the one statement
    /// [`RECORD_BATCH`]; with some, [`RECORD_BATCH_FORWARDING`], which also queues the changes.
    forward_targets: Vec<String>,
    /// This process's delivery workers, once forwarding started: a batch's messages are
    /// written leased to them when they have room (`store::handoff`).
    handoff: OnceLock<Arc<dyn Handoff>>,
}

impl PostgresStore {
    /// Builds the pool without connecting: the service can start (and report not ready) while
    /// the database is down, and connects as soon as it answers.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let statement_timeout = format!("{}", options.statement_timeout.as_millis().max(1));
        let url_options = PgConnectOptions::from_str(url)
            .map_err(|error| StoreError::Internal(format!("invalid DATABASE_URL: {error}")))?;
        let connect = url_options
            .clone()
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
            .connect_lazy_with(pooled(&connect));
        let listen = connect.clone().application_name("nen-relay-listener");
        Ok(Self {
            pool,
            listen,
            url_options,
            connect,
            forward_targets: options.forward_targets.clone(),
            handoff: OnceLock::new(),
        })
    }

    /// The pool's connections: open, and idle among them. The test
    /// `waiting::a_thousand_waiters_hold_no_database_connection` reads them while a thousand
    /// requests wait on runs.
    pub fn pool_connections(&self) -> (u32, usize) {
        (self.pool.size(), self.pool.num_idle())
    }

    /// Applies the migrations on a connection of their own: no statement timeout (a schema
    /// change may take longer than a request may), and lock waits capped at `lock_timeout`,
    /// sqlx's advisory lock included, which another replica holds while it migrates.
    pub async fn migrate(&self, lock_timeout: Duration) -> Result<(), StoreError> {
        let lock_timeout_ms = lock_timeout.as_millis().max(1).to_string();
        let options = self
            .url_options
            .clone()
            .application_name("nen-relay migrate")
            .options([
                ("statement_timeout", "0"),
                ("lock_timeout", lock_timeout_ms.as_str()),
                ("idle_in_transaction_session_timeout", "0"),
            ]);
        // A pool of one connection, its own: `Migrator::run` takes a pool where a bare
        // connection trips a compiler limitation in spawned tasks.
        let connection = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        let result = migrations::tolerating_newer(sqlx::migrate!("migrations/postgres"))
            .run(&connection)
            .await;
        connection.close().await;
        result.map_err(|error| migrations::failed(error, lock_timeout))
    }

    /// A batch: [`RECORD_BATCH`], or with targets [`RECORD_BATCH_FORWARDING`]. One statement,
    /// so one round trip and one implicit transaction either way. Messages written leased to
    /// this replica's workers go to them once it has committed (`store::handoff`).
    async fn try_record(&self, plan: &BatchPlan<'_>) -> Result<Vec<DeliveryOutcome>, sqlx::Error> {
        let (outcomes, handed) =
            record_batch(&self.pool, plan, &self.forward_targets, self.handoff.get()).await?;
        handed.hand_over();
        Ok(outcomes)
    }

    /// Queues a `run.status_changed` message per target for the run a triggered run created, as
    /// it is now in the transaction of `connection`, and announces them on
    /// `feed::FORWARD_CHANNEL` (at commit). Two statements. (A batch queues its messages in its
    /// own statement, [`RECORD_BATCH_FORWARDING`].)
    async fn queue_change(
        &self,
        connection: &mut PgConnection,
        message_id: &str,
    ) -> Result<(), sqlx::Error> {
        let rows: Vec<RunRow<DateTime<Utc>>> = sqlx::query_as(GET_RUN)
            .bind(message_id)
            .fetch_all(&mut *connection)
            .await?;
        let runs = rows
            .into_iter()
            .map(|row| row.into_run(Ok))
            .collect::<Result<Vec<Run>, StoreError>>()
            .map_err(|error| sqlx::Error::Decode(Box::new(error)))?;
        let queued = changes::status_changed(&self.forward_targets, &runs)
            .map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
        let (mut targets, mut queued_ids, mut queued_runs) = (Vec::new(), Vec::new(), Vec::new());
        for message in &queued {
            targets.push(message.target);
            queued_ids.push(message.message_id.as_str());
            queued_runs.push(message.run.as_str());
        }
        sqlx::query(QUEUE_CHANGES)
            .bind(&targets)
            .bind(&queued_ids)
            .bind(&queued_runs)
            .bind(STATUS_CHANGED)
            .bind(Utc::now())
            .bind(feed::FORWARD_CHANNEL)
            .execute(&mut *connection)
            .await?;
        Ok(())
    }
}

/// Writes a batch on `executor`, with [`RECORD_BATCH`], or [`RECORD_BATCH_FORWARDING`] when
/// `forward_targets` names any: each delivery's outcome, and the messages to report to
/// `handoff` once committed.
async fn record_batch<'c>(
    executor: impl PgExecutor<'c>,
    plan: &BatchPlan<'_>,
    forward_targets: &[String],
    handoff: Option<&Arc<dyn Handoff>>,
) -> Result<(Vec<DeliveryOutcome>, Handed), sqlx::Error> {
    let groups = GroupColumns::of(plan);
    let announcements = feed::payloads(feed::terminal_message_ids(plan.deliveries));
    // At the column's precision, so that a message handed over carries the same timestamp as
    // the stored one it is sent from on a retry.
    let committed_at = Utc::now().trunc_subsecs(6);
    // At most one message per run and target: room for every run of the batch.
    let offer = if forward_targets.is_empty() {
        None
    } else {
        let runs = plan
            .deliveries
            .iter()
            .map(|delivery| delivery.message_id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len();
        Some(HandoffOffer::reserve(handoff, forward_targets, runs))
    };
    let query = match &offer {
        None => groups
            .bind(sqlx::query_as(RECORD_BATCH))
            .bind(&announcements),
        Some(offer) => groups
            .bind(sqlx::query_as(RECORD_BATCH_FORWARDING))
            .bind(&announcements)
            .bind(forward_targets)
            .bind(STATUS_CHANGED)
            .bind(committed_at)
            .bind(feed::FORWARD_CHANNEL)
            .bind(offer.owners())
            .bind(offer.rooms())
            .bind(offer.until()),
    };
    let rows: Vec<BatchRow> = query.fetch_all(executor).await?;
    let mut queued = Vec::new();
    let index = group_index(plan);
    let mut inserted = vec![false; plan.groups.len()];
    let mut stored_sha256 = vec![None; plan.groups.len()];
    // Each run's status after the batch.
    let mut final_status = HashMap::new();
    for row in rows {
        if let (Some(id), Some(target)) = (row.outbox_id, row.outbox_target) {
            queued.push(QueuedRow {
                id,
                target,
                message_id: row.message_id,
                run: row.outbox_run,
            });
            continue;
        }
        match row.inserted {
            // A run row: the status the run settled on.
            None => {
                final_status.insert(row.message_id, row.status.unwrap_or_default());
            }
            Some(new_event) => {
                let key = (
                    row.message_id.as_str(),
                    row.status.as_deref().unwrap_or_default(),
                );
                let Some(&g) = index.get(&key) else {
                    continue;
                };
                inserted[g] = new_event;
                stored_sha256[g] = row
                    .stored_body_sha256
                    .and_then(|hash| <[u8; 32]>::try_from(hash).ok());
            }
        }
    }
    let conflicting = plan.conflicting_terminals(&inserted, &final_status);
    let handed = match offer {
        Some(offer) => offer.written(forward_targets, queued, committed_at),
        None => Handed::default(),
    };
    Ok((
        plan.outcomes(&inserted, &stored_sha256, &conflicting),
        handed,
    ))
}

/// A row of [`RECORD_BATCH`]: one per group of the batch, then one per run it moved.
#[derive(sqlx::FromRow)]
struct BatchRow {
    message_id: String,
    /// The group's status, or the status the run settled on; null for a message.
    status: Option<String>,
    /// For a group: whether it became a new event. Null for a run.
    inserted: Option<bool>,
    /// For a group whose event was already stored: that event's body hash.
    stored_body_sha256: Option<Vec<u8>>,
    /// [`RECORD_BATCH_FORWARDING`] only: one more row per message queued, with its id and
    /// target, and its run's JSON when it was written leased (`store::handoff`).
    #[sqlx(default)]
    outbox_id: Option<i64>,
    #[sqlx(default)]
    outbox_target: Option<String>,
    #[sqlx(default)]
    outbox_run: Option<String>,
}

/// The writes of [`RECORD_BATCH`] and [`RECORD_BATCH_FORWARDING`], up to `moved_runs`'
/// `returning` list, which each completes.
macro_rules! record_batch_writes {
    () => {
        "\
with batch (message_id, status, arrival, status_rank, received_at, last_received_at, payload,
            body_sha256, key_id, repeats, differing_repeats, copy_hashes,
            workflow_id, expires_at, result, assets_url, error) as (
    select * from unnest($1::text[], $2::text[], $3::int4[], $4::int2[],
                         $5::timestamptz[], $6::timestamptz[], $7::text[], $8::bytea[],
                         $9::text[], $10::int8[], $11::int8[], $12::bytea[],
                         $13::text[], $14::timestamptz[], $15::text[], $16::text[], $17::text[])),
recorded_events as (
    insert into events (message_id, status, received_at, last_received_at, payload,
                        body_sha256, key_id, duplicates, differing_duplicates)
    select message_id, status, received_at, last_received_at, payload,
           body_sha256, key_id, repeats, differing_repeats
    from batch
    order by message_id, status
    on conflict (message_id, status) do update set
        duplicates = events.duplicates + excluded.duplicates + 1,
        differing_duplicates = events.differing_duplicates + (
            select count(*)
            from batch as same_key,
                 generate_series(0, length(same_key.copy_hashes) / 32 - 1) as copy_number
            where same_key.message_id = excluded.message_id
              and same_key.status = excluded.status
              and substring(same_key.copy_hashes from copy_number * 32 + 1 for 32)
                  <> events.body_sha256),
        last_received_at = greatest(events.last_received_at, excluded.last_received_at)
    returning message_id, status, xmax = 0 as inserted, body_sha256),
new_events as (
    select batch.*
    from batch
    join recorded_events on recorded_events.message_id = batch.message_id
                        and recorded_events.status = batch.status
    where recorded_events.inserted),
furthest_new_events as (
    select distinct on (message_id) *
    from new_events
    order by message_id, status_rank desc, arrival),
new_event_spans as materialized (
    select message_id,
           min(received_at) as first_received_at,
           max(received_at) as last_received_at,
           (array_agg(workflow_id order by arrival)
               filter (where workflow_id is not null))[1] as first_workflow_id,
           (array_agg(expires_at order by arrival)
               filter (where expires_at is not null))[1] as first_expires_at
    from new_events
    group by message_id),
moved_runs as (
    insert into runs (message_id, workflow_id, status, status_rank, created_at, updated_at,
                      completed_at, expires_at, result, assets_url, error)
    select furthest.message_id,
           coalesce(furthest.workflow_id, span.first_workflow_id),
           furthest.status,
           furthest.status_rank,
           span.first_received_at,
           span.last_received_at,
           case when furthest.status_rank = 2 then furthest.received_at end,
           coalesce(furthest.expires_at, span.first_expires_at),
           furthest.result::jsonb,
           furthest.assets_url,
           furthest.error
    from furthest_new_events as furthest
    join new_event_spans as span using (message_id)
    order by furthest.message_id
    on conflict (message_id) do update set
        status = case when excluded.status_rank > runs.status_rank
                      then excluded.status else runs.status end,
        status_rank = greatest(runs.status_rank, excluded.status_rank),
        workflow_id = coalesce(runs.workflow_id, excluded.workflow_id),
        updated_at = greatest(runs.updated_at, excluded.updated_at),
        completed_at = case when excluded.status_rank > runs.status_rank
                            then excluded.completed_at else runs.completed_at end,
        expires_at = case when excluded.status_rank > runs.status_rank
                          then coalesce(excluded.expires_at, runs.expires_at)
                          else coalesce(runs.expires_at, excluded.expires_at) end,
        result = case when excluded.status_rank > runs.status_rank
                      then excluded.result else runs.result end,
        assets_url = case when excluded.status_rank > runs.status_rank
                          then excluded.assets_url else runs.assets_url end,
        error = case when excluded.status_rank > runs.status_rank
                     then excluded.error else runs.error end,
        previous_status_rank = runs.status_rank
"
    };
}

/// The end of [`RECORD_BATCH`] and [`RECORD_BATCH_FORWARDING`]: the terminal runs' announcement
/// and the answer rows, up to the `where` clause, which each completes.
macro_rules! record_batch_answer {
    ($extra_columns:literal) => {
        concat!(
            "announced as (
    select count(*) as sent
    from (select pg_notify('nen_relay_terminal_runs', payload)
          from unnest($18::text[]) as payload) as notifications)
select message_id, status, inserted,
       case when inserted then null else body_sha256 end as stored_body_sha256",
            $extra_columns,
            "
from recorded_events
union all
select message_id, status, null, null",
            $extra_columns,
            "
from moved_runs
"
        )
    };
}

/// A time column as `chrono` serializes a `DateTime<Utc>` (RFC 3339, `Z`, and 0, 3 or 6
/// fractional digits: as many as the value needs, PostgreSQL keeping microseconds).
macro_rules! json_time {
    ($column:literal) => {
        concat!(
            "('\"' || to_char(",
            $column,
            " at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS')",
            " || case when to_char(",
            $column,
            ", 'US') = '000000' then ''",
            " when right(to_char(",
            $column,
            ", 'US'), 3) = '000' then '.' || to_char(",
            $column,
            ", 'MS')",
            " else '.' || to_char(",
            $column,
            ", 'US') end || 'Z\"')"
        )
    };
}

/// `moved` (a row of `moved_runs` in [`RECORD_BATCH_FORWARDING`]) as JSON text, as `Run`'s
/// serialization writes it after `RunRow::into_run`: the fields in `Run`'s order, strings
/// escaped as `serde_json` escapes them (which `to_json` matches), the JSON columns as their
/// stored text (the read serves that text as it is), `stuck` false, and `workflow_params` only
/// when stored.
macro_rules! run_json {
    () => {
        concat!(
            "'{\"message_id\":' || to_json(moved.message_id)::text",
            " || ',\"workflow_id\":' || coalesce(to_json(moved.workflow_id)::text, 'null')",
            " || ',\"status\":' || to_json(moved.status)::text",
            " || ',\"created_at\":' || ",
            json_time!("moved.created_at"),
            " || ',\"updated_at\":' || ",
            json_time!("moved.updated_at"),
            " || ',\"completed_at\":' || coalesce(",
            json_time!("moved.completed_at"),
            ", 'null')",
            " || ',\"expires_at\":' || coalesce(",
            json_time!("moved.expires_at"),
            ", 'null')",
            " || ',\"result\":' || coalesce(moved.result::text, 'null')",
            " || ',\"assets_url\":' || coalesce(to_json(moved.assets_url)::text, 'null')",
            " || ',\"error\":' || coalesce(to_json(moved.error)::text, 'null')",
            " || ',\"triggered_here\":' || moved.triggered_here::text",
            " || ',\"conflicting_terminals\":' || (moved.status_rank = 2 and (
                exists (select 1 from events
                        where events.message_id = moved.message_id
                          and events.status <> moved.status
                          and events.status not in ('submitted', 'processing'))
                or exists (select 1 from new_events
                           where new_events.message_id = moved.message_id
                             and new_events.status <> moved.status
                             and new_events.status not in ('submitted', 'processing'))))::text",
            " || ',\"stuck\":false'",
            " || coalesce(',\"workflow_params\":' || moved.workflow_params::text, '')",
            " || '}'"
        )
    };
}

/// A whole batch in one statement, so one round trip and one implicit transaction. `batch` has
/// one row per group of deliveries with the same `(message_id, status)`, in key order
/// ([`GroupColumns`]).
///
/// 1. `recorded_events`: each group's first delivery becomes an event, or, when
///    `(message_id, status)` is already stored (committed earlier, or just now by another
///    writer: `on conflict` waits for it and sees it), every copy is added to that event's
///    counters, and those whose body differs from the stored one to `differing_duplicates`
///    (`BatchPlan::differing_copies` in SQL). `xmax = 0` tells the rows this statement inserted
///    from those it updated.
/// 2. `new_events`, `furthest_new_events`, `new_event_spans`: the runs that got a new event, and
///    how each moves: `BatchPlan::run_changes` in SQL, because which events are new is only
///    known inside the statement. The furthest new status wins, the first to arrive among
///    equally far ones; the run spans from the earliest to the latest arrival, and a workflow_id
///    or expiry the winner lacks comes from the first new event that has one.
///    `new_event_spans` is materialized: inlined into the join, its aggregate ran again for
///    every run, which made a batch cost quadratic in its size.
/// 3. `moved_runs`: each of those runs is created or moved forward: `RunState::advanced` in
///    SQL, as the `on conflict` clause. `status_rank` 2 is terminal (see the migration).
///
/// 4. `announced`: the runs the batch's terminal deliveries made (or found) terminal are
///    announced on `feed::CHANNEL`, one `pg_notify` per payload in `$18` (`feed::payloads`).
///    PostgreSQL delivers them at commit, so a listener never hears of a change before it can
///    read it, and never of a batch that rolled back. The last branch's one-time filter is what
///    makes the statement evaluate `announced`; it is always true.
///
/// Every group comes back as `(message_id, status, inserted, stored_body_sha256)`, and every
/// moved run as `(message_id, its final status, null, null)`. `moved_runs` also tells whether
/// it changed the run (`changed`, which [`RECORD_BATCH_FORWARDING`] queues messages for):
/// `changes::is_change` in SQL: the statement created the run (`previous_status_rank` stays
/// null), or raised its rank. The update keeps the rank it found in `previous_status_rank`
/// (migration 0006), because `on conflict do update ... returning` sees only the row it left,
/// and the row it found is the latest committed one, read under its row lock: exact even when
/// another writer moved the run between this statement's snapshot and its update. Rows are
/// written in key order, so that concurrent writers lock them in one order.
const RECORD_BATCH: &str = concat!(
    record_batch_writes!(),
    "    returning message_id, status,
              previous_status_rank is null or status_rank > previous_status_rank as changed),
",
    record_batch_answer!(""),
    "where (select sent from announced) >= 0"
);

/// [`RECORD_BATCH`] for a store with forwarding targets: the same writes and answer, and in the
/// same statement one `run.status_changed` message per changed run and target `$19`, of type
/// `$20`, committed, queued and due at `$21`, announced on channel `$22`
/// (`feed::FORWARD_CHANNEL`) at commit. One round trip, like a batch without targets, where
/// an explicit transaction took five (begin, the batch, the changed runs read, the messages,
/// commit): on two cores each took about half a millisecond under load, and with one writer
/// the rate is the batch over its latency (docs/performance.md).
///
/// The messages of a run are numbered in commit order, the order they are sent in: the row
/// lock this statement takes on each run it moves is held to the commit, so a later writer of
/// the same run (a batch, a triggered run, the stuck sweep) waits for it before it queues
/// anything.
///
/// The message is the run as `GET /v1/runs/{id}` shows it right after the change, rendered
/// here as `Run`'s serialization renders it, byte for byte (`run_json!`; the test
/// `forward_batch_json` compares the two). `moved_runs` returns the row as the update left
/// it, read under its row lock. `conflicting_terminals` is the read's rule (`run_columns!`)
/// over the stored events and this statement's new ones, which the statement's snapshot does
/// not show. No other writer can have added a conflicting terminal the snapshot misses: one
/// that committed a terminal status for the run would have made the run terminal, and then
/// this statement would not have moved it.
const RECORD_BATCH_FORWARDING: &str = concat!(
    record_batch_writes!(),
    "    returning message_id, status,
              previous_status_rank is null or status_rank > previous_status_rank as changed,
              workflow_id, status_rank, created_at, updated_at, completed_at, expires_at,
              result, assets_url, error, triggered_here, workflow_params),
offered as (
    select target.name as target, moved.message_id, target.position, target.owner, target.room,
           ",
    run_json!(),
    " as run,
           target.owner is not null and not exists (
               select 1 from forward_outbox as earlier
               where earlier.target = target.name and earlier.message_id = moved.message_id
                 and earlier.state = 'pending') as free
    from moved_runs as moved
    cross join unnest($19::text[], $23::text[], $24::int4[]) with ordinality
               as target (name, owner, room, position)
    where moved.changed),
forwarded as (
    insert into forward_outbox (target, message_id, event_type, run,
                                committed_at, queued_at, next_attempt_at, lease_owner, lease_until)
    select target, message_id, $20, run, $21, $21, $21,
           case when leased then owner::uuid end, case when leased then $25::timestamptz end
    from (select offered.*,
                 free and row_number() over (partition by target, free order by message_id)
                          <= room as leased
          from offered) as offer
    order by message_id, position
    returning id, target, message_id, run, lease_owner is not null as leased),
forward_announced as (
    select count(*) as sent
    from (select pg_notify($22, '')
          where exists (select 1 from forwarded where not leased)) as notification),
",
    record_batch_answer!(
        ", null::int8 as outbox_id, null::text as outbox_target, null::text as outbox_run"
    ),
    "where (select sent from announced) >= 0 and (select sent from forward_announced) >= 0
union all
select message_id, null, null, null, id, target, case when leased then run end
from forwarded"
);

/// The groups of a batch, column by column in key order, as [`RECORD_BATCH`] binds them.
struct GroupColumns<'a> {
    message_ids: Vec<&'a str>,
    statuses: Vec<&'a str>,
    /// The group's position in the batch: arrival order, which `key order` hides.
    arrivals: Vec<i32>,
    status_ranks: Vec<i16>,
    received_at: Vec<DateTime<Utc>>,
    last_received_at: Vec<DateTime<Utc>>,
    payloads: Vec<Cow<'a, str>>,
    body_sha256s: Vec<&'a [u8]>,
    key_ids: Vec<&'a str>,
    repeats: Vec<i64>,
    differing_repeats: Vec<i64>,
    /// Every copy's body hash (the first delivery's, then its repeats'), 32 bytes each.
    copy_hashes: Vec<Vec<u8>>,
    workflow_ids: Vec<Option<&'a str>>,
    expires_at: Vec<Option<DateTime<Utc>>>,
    results: Vec<Option<&'a str>>,
    assets_urls: Vec<Option<&'a str>>,
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
            columns.message_ids.push(&first.message_id);
            columns.statuses.push(&first.status);
            columns.arrivals.push(i32::try_from(g).unwrap_or(i32::MAX));
            columns.status_ranks.push(first.rank().as_i16());
            columns.received_at.push(first.received_at);
            columns.last_received_at.push(plan.last_received_at(group));
            columns.payloads.push(first.body_text());
            columns.body_sha256s.push(&first.body_sha256);
            columns.key_ids.push(&first.key_id);
            columns.repeats.push(group.repeats.len() as i64);
            columns
                .differing_repeats
                .push(plan.differing_repeats(group) as i64);
            columns.copy_hashes.push(
                plan.copies(group)
                    .flat_map(|copy| copy.body_sha256)
                    .collect(),
            );
            columns.workflow_ids.push(first.workflow_id.as_deref());
            columns.expires_at.push(first.expires_at);
            columns.results.push(first.result.as_deref());
            columns.assets_urls.push(first.assets_url.as_deref());
            columns.errors.push(first.error.as_deref());
        }
        columns
    }

    fn with_capacity(size: usize) -> Self {
        GroupColumns {
            message_ids: Vec::with_capacity(size),
            statuses: Vec::with_capacity(size),
            arrivals: Vec::with_capacity(size),
            status_ranks: Vec::with_capacity(size),
            received_at: Vec::with_capacity(size),
            last_received_at: Vec::with_capacity(size),
            payloads: Vec::with_capacity(size),
            body_sha256s: Vec::with_capacity(size),
            key_ids: Vec::with_capacity(size),
            repeats: Vec::with_capacity(size),
            differing_repeats: Vec::with_capacity(size),
            copy_hashes: Vec::with_capacity(size),
            workflow_ids: Vec::with_capacity(size),
            expires_at: Vec::with_capacity(size),
            results: Vec::with_capacity(size),
            assets_urls: Vec::with_capacity(size),
            errors: Vec::with_capacity(size),
        }
    }

    fn bind<'q, O>(
        &'q self,
        query: QueryAs<'q, Postgres, O, PgArguments>,
    ) -> QueryAs<'q, Postgres, O, PgArguments> {
        query
            .bind(&self.message_ids)
            .bind(&self.statuses)
            .bind(&self.arrivals)
            .bind(&self.status_ranks)
            .bind(&self.received_at)
            .bind(&self.last_received_at)
            .bind(&self.payloads)
            .bind(&self.body_sha256s)
            .bind(&self.key_ids)
            .bind(&self.repeats)
            .bind(&self.differing_repeats)
            .bind(&self.copy_hashes)
            .bind(&self.workflow_ids)
            .bind(&self.expires_at)
            .bind(&self.results)
            .bind(&self.assets_urls)
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

/// Records a run started here: `RunState::triggered` in SQL. A callback may have created the run
/// already; then it is only marked as ours, and its status never changes. Says whether it
/// created the run (`xmax = 0`): only then is it a change to forward.
const RECORD_TRIGGERED_RUN: &str = "\
insert into runs (message_id, workflow_id, status, status_rank, created_at, updated_at,
                  triggered_here, workflow_params)
values ($1, $2, 'submitted', 0, $3, $3, true, $4::jsonb)
on conflict (message_id) do update set
    triggered_here = true,
    workflow_id = coalesce(runs.workflow_id, excluded.workflow_id),
    workflow_params = coalesce(excluded.workflow_params, runs.workflow_params),
    created_at = least(runs.created_at, excluded.created_at)
returning xmax = 0 as created";

/// The columns of a [`RunRow`], selected from `runs`. `conflicting_terminals` follows
/// `forward_only::terminals_conflict`: the run is terminal, and one of its events has another
/// terminal status.
macro_rules! run_columns {
    () => {
        "message_id, workflow_id, status, created_at, updated_at, completed_at, expires_at,
         result::text as result, assets_url, error, triggered_here,
         (status_rank = 2 and exists (
             select 1 from events
             where events.message_id = runs.message_id
               and events.status <> runs.status
               and events.status not in ('submitted', 'processing'))) as conflicting_terminals,
         workflow_params::text as workflow_params, seq"
    };
}

const GET_RUN: &str = concat!(
    "select ",
    run_columns!(),
    " from runs where message_id = $1"
);

/// Queues one `$4` message per `($1 target, $2 message_id, $3 run)`, committed, queued and due
/// at `$5`, and notifies channel `$6` (`feed::FORWARD_CHANNEL`) at commit: a triggered run's
/// (`PostgresStore::queue_change`).
const QUEUE_CHANGES: &str = "\
with queued as (
    insert into forward_outbox (target, message_id, event_type, run,
                                committed_at, queued_at, next_attempt_at)
    select target, message_id, $4, run, $5, $5, $5
    from unnest($1::text[], $2::text[], $3::text[]) with ordinality
         as message (target, message_id, run, position)
    order by position
    returning id)
select pg_notify($6, '') where exists (select 1 from queued)";

// The listing statements, one per filter (see `listing`). Each walks an index backwards.
const LIST_RUNS: &str = concat!(
    "select ",
    run_columns!(),
    " from runs
      where seq < $1
      order by seq desc limit $2"
);
const LIST_RUNS_OF_WORKFLOW: &str = concat!(
    "select ",
    run_columns!(),
    " from runs
      where workflow_id = $1 and seq < $2
      order by seq desc limit $3"
);
const LIST_RUNS_WITH_STATUS: &str = concat!(
    "select ",
    run_columns!(),
    " from runs
      where status = $1 and seq < $2
      order by seq desc limit $3"
);
const LIST_RUNS_OF_WORKFLOW_WITH_STATUS: &str = concat!(
    "select ",
    run_columns!(),
    " from runs
      where workflow_id = $1 and status = $2 and seq < $3
      order by seq desc limit $4"
);

/// Stuck runs (`Store::list_stuck_runs`): unfinished, unchanged since `$1`, walked backwards
/// through `runs_unfinished` (migration 0003), whose predicate `status_rank < 2` this repeats
/// word for word so that the planner can use it. The optional filters only narrow that walk.
const LIST_STUCK_RUNS: &str = concat!(
    "select ",
    run_columns!(),
    " from runs
      where status_rank < 2 and updated_at < $1
        and ($2::text is null or workflow_id = $2)
        and ($3::text is null or status = $3)
        and seq < $4
      order by seq desc limit $5"
);

/// Stuck runs whose `run.stuck` is not queued since they last changed
/// (`Outbox::queue_stuck_runs`), found through `runs_unfinished`, marked as queued at `$3`, and
/// returned as `get_run` reads them, in one statement. The rows stay locked for the
/// transaction that queues their messages; another replica's sweep skips them rather than
/// queue them twice. Marked through the subquery's `seq`s, one primary-key probe each: a
/// separate `message_id = any($1)` update was planned, generically, as a scan of every run.
const MARK_STUCK_RUNS: &str = concat!(
    "update runs set stuck_queued_at = $3
      where seq in (
          select seq from runs
          where status_rank < 2 and updated_at < $1
            and (stuck_queued_at is null or stuck_queued_at < updated_at)
          order by seq
          limit $2
          for update skip locked)
      returning ",
    run_columns!()
);

/// Counts stuck runs through `runs_unfinished`, stopping at `$2`.
const COUNT_STUCK_RUNS: &str = "\
select count(*) from (
    select 1 from runs where status_rank < 2 and updated_at < $1 limit $2) as stuck";

/// A run's events in arrival order, which is `received_at`: ids follow insertion, and a batch
/// inserts its events in key order (to take locks in one order), not in the order they arrived.
/// `conflicting_terminal` follows `forward_only::terminals_conflict`: a terminal event whose run
/// settled on another terminal status.
const LIST_EVENTS: &str = "\
select status, received_at, duplicates, differing_duplicates,
       (status not in ('submitted', 'processing') and exists (
           select 1 from runs
           where runs.message_id = events.message_id
             and runs.status_rank = 2
             and runs.status <> events.status)) as conflicting_terminal,
       key_id, last_received_at, payload, payload_pruned
from events
where message_id = $1
order by received_at, id";

/// A pooled connection's options: `connect`'s, and one generic plan per prepared statement.
///
/// Under the default `plan_cache_mode`, PostgreSQL plans a prepared statement anew for each
/// execution while the generic plan looks costlier than the custom ones, and with the arrays
/// of a batch bound as parameters it always does: [`RECORD_BATCH_FORWARDING`] and the
/// worker's statements were planned at every execution, about 0.9 ms of a 3.2 ms batch
/// (docs/performance.md). The statements planned this way walk an index whatever their
/// parameters, and so do their generic plans: the test `statement_plans` checks each one's
/// plan, made on nearly empty tables. The few that choose by their values run in
/// [`begin_with_custom_plans`]. A sweep's connection (`connect` itself) keeps the default:
/// its deletes choose by how much is old.
fn pooled(connect: &PgConnectOptions) -> PgConnectOptions {
    connect
        .clone()
        .options([("plan_cache_mode", "force_generic_plan")])
}

/// A transaction in which statements are planned for their parameters again, as PostgreSQL
/// does by default, instead of generically (`pooled`): for the few whose best plan depends
/// on them (a replay window, a cutoff, a count that stops early), where a generic plan made
/// on a small table would scan it all for as long as the connection lives.
async fn begin_with_custom_plans(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("set local plan_cache_mode = auto")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
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
        let row: Option<RunRow<DateTime<Utc>>> = sqlx::query_as(GET_RUN)
            .bind(message_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| row.into_run(Ok)).transpose()
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
        let rows: Vec<RunRow<DateTime<Utc>>> = statement
            .bind(listing.before_seq)
            .bind(listing.fetch)
            .fetch_all(&self.pool)
            .await?;
        listing.page_of(rows, |row| row.into_run(Ok))
    }

    async fn list_events(&self, message_id: &str) -> Result<Vec<Event>, StoreError> {
        let rows: Vec<EventRow<DateTime<Utc>>> = sqlx::query_as(LIST_EVENTS)
            .bind(message_id)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|row| row.into_event(Ok)).collect()
    }

    async fn record_triggered_run(&self, run: &TriggeredRun) -> Result<(), StoreError> {
        if self.forward_targets.is_empty() {
            sqlx::query(RECORD_TRIGGERED_RUN)
                .bind(&run.message_id)
                .bind(&run.workflow_id)
                .bind(run.created_at)
                .bind(run.workflow_params.as_deref())
                .execute(&self.pool)
                .await?;
            return Ok(());
        }
        // A run the statement created is new; one a callback created first does not change.
        // Its row lock, held to the commit, orders this message after any other of the run.
        let mut tx = self.pool.begin().await?;
        let created: bool = sqlx::query_scalar(RECORD_TRIGGERED_RUN)
            .bind(&run.message_id)
            .bind(&run.workflow_id)
            .bind(run.created_at)
            .bind(run.workflow_params.as_deref())
            .fetch_one(&mut *tx)
            .await?;
        if created {
            self.queue_change(&mut tx, &run.message_id).await?;
        }
        tx.commit().await?;
        if created {
            // Written without a lease: the workers claim them.
            Handed::claimable(self.handoff.get(), &self.forward_targets).hand_over();
        }
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
        // one request across every replica inserts the key.
        let inserted = sqlx::query(
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
        let existing = if inserted {
            None
        } else {
            let (request_sha256, response_status, response_body): (
                Vec<u8>,
                Option<i16>,
                Option<String>,
            ) = sqlx::query_as(
                "select request_sha256, response_status, response_body \
                 from idempotency_keys where key = $1",
            )
            .bind(&claim.key)
            .fetch_one(&mut *tx)
            .await?;
            Some(ExistingClaim {
                request_sha256,
                response_status: response_status.map(i64::from),
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

    fn pool_usage(&self) -> Vec<PoolUsage> {
        vec![PoolUsage::of("main", &self.pool)]
    }

    async fn list_stuck_runs(
        &self,
        query: &RunQuery,
        changed_before: DateTime<Utc>,
    ) -> Result<RunPage, StoreError> {
        let listing = Listing::of(query);
        let rows: Vec<RunRow<DateTime<Utc>>> = sqlx::query_as(LIST_STUCK_RUNS)
            .bind(changed_before)
            .bind(query.workflow_id.as_deref())
            .bind(query.status.as_deref())
            .bind(listing.before_seq)
            .bind(listing.fetch)
            .fetch_all(&self.pool)
            .await?;
        listing.page_of(rows, |row| row.into_run(Ok))
    }

    async fn count_stuck_runs(
        &self,
        changed_before: DateTime<Utc>,
        cap: u32,
    ) -> Result<u64, StoreError> {
        let mut tx = begin_with_custom_plans(&self.pool).await?;
        let count: i64 = sqlx::query_scalar(COUNT_STUCK_RUNS)
            .bind(changed_before)
            .bind(i64::from(cap))
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn terminal_run_feed(&self) -> Result<Option<Box<dyn TerminalRunFeed>>, StoreError> {
        // A pool of its own, of one connection: listening never takes a connection from the
        // requests' pool, however long it lasts.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(self.listen.clone());
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(feed::CHANNEL).await?;
        if !self.forward_targets.is_empty() {
            listener.listen(feed::FORWARD_CHANNEL).await?;
        }
        Ok(Some(Box::new(PgRunFeed { listener })))
    }

    async fn begin_sweep(&self) -> Result<Option<Box<dyn SweepSession>>, StoreError> {
        let session = sweep::PostgresSweep::begin(&self.connect).await?;
        Ok(session.map(|session| Box::new(session) as Box<dyn SweepSession>))
    }

    fn outbox(&self) -> &dyn Outbox {
        self
    }
}

#[async_trait]
impl Outbox for PostgresStore {
    fn hand_off_to(&self, handoff: Arc<dyn Handoff>) -> bool {
        self.handoff.set(handoff).is_ok()
    }

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

/// `LISTEN nen_relay_terminal_runs` (and `nen_relay_forward` with forwarding targets) on a
/// connection of its own.
struct PgRunFeed {
    listener: PgListener,
}

#[async_trait]
impl TerminalRunFeed for PgRunFeed {
    async fn next(&mut self) -> Result<FeedEvent, StoreError> {
        match self.listener.try_recv().await {
            Ok(Some(notification)) if notification.channel() == feed::FORWARD_CHANNEL => {
                Ok(FeedEvent::ForwardQueued)
            }
            Ok(Some(notification)) => Ok(feed::read_payload(notification.payload())),
            // The connection was lost and has just been replaced (and listens again).
            Ok(None) => Ok(FeedEvent::Resumed),
            Err(error) => Err(StoreError::from(error)),
        }
    }
}
