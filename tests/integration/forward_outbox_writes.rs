//! Forwarding's write path, on both stores: every change of a run (a new run, or a status
//! that moved forward) queues one `run.status_changed` message per target, in the transaction
//! that commits the change, holding the run as `get_run` reads it right after; nothing else
//! queues one. The outbox is read with plain SQL here.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use chrono::{DateTime, Utc};
use nen_relay::callbacks::ingest::Ingest;
use nen_relay::callbacks::payload::parse_callback;
use nen_relay::config::IngestSettings;
use nen_relay::forward::ForwardWake;
use nen_relay::runs::status::StatusRank;
use nen_relay::runs::waiters::Waiters;
use nen_relay::store::{
    Delivery, FeedEvent, HandedMessage, Handoff, Lease, OutboxMessage, Reservation, Store,
    StoreOptions, TriggeredRun,
};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use tokio::sync::{Barrier, Semaphore};
use uuid::Uuid;

use crate::on_both_backends;
use crate::support::app::callback;
use crate::support::backends::fresh_database;
use crate::support::store_fixtures::{at, delivery, open, open_forwarding, open_with};
use crate::support::stored::{self, forward_rows, ForwardRow};
use crate::support::{Backend, TestDatabase};

const TARGETS: [&str; 2] = ["alpha", "beta"];

/// Generous: every condition here holds within milliseconds when the store is right.
const GUARD: Duration = Duration::from_secs(60);

/// The run as `get_run` answers now, as the API serializes it.
async fn run_json(store: &Arc<dyn Store>, message_id: &str) -> String {
    let run = store
        .get_run(message_id)
        .await
        .expect("the store answers")
        .unwrap_or_else(|| panic!("run {message_id} exists"));
    serde_json::to_string(&run).unwrap()
}

fn status_of(row: &ForwardRow) -> String {
    let run: Value = serde_json::from_str(&row.run).expect("a message holds JSON");
    run["status"]
        .as_str()
        .expect("a run has a status")
        .to_owned()
}

/// Records `(message_id, status)` callbacks as one batch, received at `millis` onwards.
async fn record(store: &Arc<dyn Store>, callbacks: &[(&str, &str)], millis: i64) {
    let batch: Vec<Delivery> = callbacks
        .iter()
        .zip(millis..)
        .map(|(&(message_id, status), at)| delivery(&callback(message_id, status, json!({})), at))
        .collect();
    store.record_deliveries(&batch).await.expect("recorded");
}

fn triggered(message_id: &str, millis: i64) -> TriggeredRun {
    TriggeredRun {
        message_id: message_id.into(),
        workflow_id: "wf-forwarded".into(),
        workflow_params: None,
        created_at: at(millis),
    }
}

/// Each message of `message_id` for `target`, in id order.
fn messages_of<'a>(rows: &'a [ForwardRow], target: &str, message_id: &str) -> Vec<&'a ForwardRow> {
    rows.iter()
        .filter(|row| row.target == target && row.message_id == message_id)
        .collect()
}

async fn a_batch_queues_one_message_per_changed_run_and_target(db: TestDatabase) {
    let store = open_forwarding(&db, &TARGETS).await;
    record(
        &store,
        &[
            ("m-a", "processing"),
            ("m-b", "success"),
            ("m-c", "submitted"),
        ],
        0,
    )
    .await;
    let rows = forward_rows(&db).await;
    assert_eq!(rows.len(), 3 * TARGETS.len(), "{rows:#?}");
    for message_id in ["m-a", "m-b", "m-c"] {
        let expected = run_json(&store, message_id).await;
        for target in TARGETS {
            let messages = messages_of(&rows, target, message_id);
            assert_eq!(messages.len(), 1, "{target} {message_id}: {rows:#?}");
            let message = messages[0];
            assert_eq!(message.event_type, "run.status_changed");
            assert_eq!(message.run, expected, "the run as get_run reads it");
            assert_eq!((message.state.as_str(), message.attempts), ("pending", 0));
            assert!(message.times_agree, "committed, queued and due at once");
        }
    }
    let stuck: Value = serde_json::from_str(&rows[0].run).unwrap();
    assert_eq!(stuck["stuck"], json!(false));
}

async fn duplicates_and_events_that_do_not_move_a_run_queue_nothing(db: TestDatabase) {
    let store = open_forwarding(&db, &TARGETS).await;
    record(&store, &[("m-done", "success")], 0).await;
    assert_eq!(forward_rows(&db).await.len(), TARGETS.len());
    // A duplicate, a conflicting second terminal, and statuses that are not further.
    record(&store, &[("m-done", "success")], 10).await;
    record(&store, &[("m-done", "failed")], 20).await;
    record(&store, &[("m-done", "processing")], 30).await;
    record(
        &store,
        &[("m-done", "submitted"), ("m-done", "timeout")],
        40,
    )
    .await;
    let rows = forward_rows(&db).await;
    assert_eq!(rows.len(), TARGETS.len(), "{rows:#?}");
    let run = store.get_run("m-done").await.unwrap().unwrap();
    assert_eq!(run.status, "success");
    assert!(
        run.conflicting_terminals,
        "the events were stored all the same"
    );
    assert_eq!(store.list_events("m-done").await.unwrap().len(), 5);
}

async fn several_statuses_of_a_run_in_one_batch_are_one_change(db: TestDatabase) {
    let store = open_forwarding(&db, &TARGETS).await;
    record(
        &store,
        &[
            ("m-all", "submitted"),
            ("m-all", "processing"),
            ("m-all", "success"),
            ("m-all", "processing"),
        ],
        0,
    )
    .await;
    let rows = forward_rows(&db).await;
    assert_eq!(rows.len(), TARGETS.len(), "{rows:#?}");
    let expected = run_json(&store, "m-all").await;
    for row in &rows {
        assert_eq!(status_of(row), "success");
        assert_eq!(row.run, expected);
    }
}

async fn a_run_s_messages_are_numbered_in_commit_order(db: TestDatabase) {
    let store = open_forwarding(&db, &TARGETS).await;
    let mut expected = Vec::new();
    for (step, status) in ["submitted", "processing", "success"]
        .into_iter()
        .enumerate()
    {
        // Another run in between, so that the ids of one run are not simply consecutive.
        let other = format!("m-other-{step}");
        record(
            &store,
            &[(other.as_str(), "processing"), ("m-ordered", status)],
            step as i64 * 10,
        )
        .await;
        expected.push(run_json(&store, "m-ordered").await);
    }
    let rows = forward_rows(&db).await;
    for target in TARGETS {
        let messages = messages_of(&rows, target, "m-ordered");
        let runs: Vec<&str> = messages.iter().map(|row| row.run.as_str()).collect();
        assert_eq!(runs, expected, "{target}");
        assert!(messages.windows(2).all(|pair| pair[0].id < pair[1].id));
    }
}

async fn a_triggered_run_is_a_change_unless_a_callback_created_it(db: TestDatabase) {
    let store = open_forwarding(&db, &TARGETS).await;
    store
        .record_triggered_run(&triggered("m-started", 0))
        .await
        .unwrap();
    let rows = forward_rows(&db).await;
    assert_eq!(rows.len(), TARGETS.len(), "{rows:#?}");
    let started = run_json(&store, "m-started").await;
    assert!(rows.iter().all(|row| row.run == started));
    let run: Value = serde_json::from_str(&started).unwrap();
    assert_eq!(
        (run["status"].clone(), run["triggered_here"].clone()),
        (json!("submitted"), json!(true))
    );

    // Its own `submitted` callback does not move it; `processing` does.
    record(&store, &[("m-started", "submitted")], 10).await;
    assert_eq!(forward_rows(&db).await.len(), TARGETS.len());
    record(&store, &[("m-started", "processing")], 20).await;
    assert_eq!(forward_rows(&db).await.len(), 2 * TARGETS.len());

    // A callback got there first: recording the start changes nothing.
    record(&store, &[("m-early", "processing")], 30).await;
    let before = forward_rows(&db).await;
    store
        .record_triggered_run(&triggered("m-early", 25))
        .await
        .unwrap();
    assert_eq!(forward_rows(&db).await, before);
    assert!(
        store
            .get_run("m-early")
            .await
            .unwrap()
            .unwrap()
            .triggered_here
    );
}

/// A callback received at `at(0)` plus `micros` microseconds.
fn delivery_at_micros(body: &str, micros: i64) -> Delivery {
    let raw = Bytes::from(body.to_owned());
    let parsed = parse_callback(&raw).expect("a valid callback body");
    let received_at = at(0) + chrono::Duration::microseconds(micros);
    Delivery::verified(raw, parsed, "key-1", received_at)
}

/// The message holds the run exactly as the API serializes it, whatever the text in its
/// fields and the precision of its times: PostgreSQL renders it inside the batch statement
/// (`RECORD_BATCH_FORWARDING`), so this compares that rendering with `Run`'s, byte for byte.
async fn a_message_is_the_run_byte_for_byte_whatever_its_text_and_times(db: TestDatabase) {
    let store = open_forwarding(&db, &TARGETS).await;
    let awkward = "quote \" backslash \\ slash / tab \t newline \n bell \u{7} del \u{7f} \
                   é 😀 \u{2028} <&>";
    let body = |message_id: &str, status: &str| {
        callback(
            message_id,
            status,
            json!({
                "workflow_id": awkward,
                "error": awkward,
                "assets": format!("https://example.test/{awkward}"),
                "result": {"ü": [1, 2.50, -0.0, 1e300, "x\u{1}"], "nested": {"a": null, "b": awkward}},
                "expires_at": "2026-10-30T20:20:00.123456Z",
            }),
        )
    };
    // Fractions of a second as chrono writes them: none, three digits, six digits.
    let batch = vec![
        delivery_at_micros(&body("m-whole", "failed"), 0),
        delivery_at_micros(&body("m-millis", "processing"), 123_000),
        delivery_at_micros(&body("m-micros", "success"), 123_456),
        // Two terminals of a new run in one batch: the run shows the conflict at once.
        delivery_at_micros(&body("m-torn", "success"), 200_001),
        delivery_at_micros(&body("m-torn", "failed"), 200_002),
    ];
    store.record_deliveries(&batch).await.expect("recorded");
    // A run started here, with its parameters kept, then moved by a callback.
    store
        .record_triggered_run(&TriggeredRun {
            workflow_params: Some(json!({"k": awkward, "n": [1, 2]}).to_string()),
            ..triggered("m-params", 1)
        })
        .await
        .unwrap();
    store
        .record_deliveries(&[delivery_at_micros(&body("m-params", "processing"), 300_007)])
        .await
        .unwrap();

    let rows = forward_rows(&db).await;
    for message_id in ["m-whole", "m-millis", "m-micros", "m-torn"] {
        let expected = run_json(&store, message_id).await;
        for target in TARGETS {
            let messages = messages_of(&rows, target, message_id);
            assert_eq!(messages.len(), 1, "{target} {message_id}: {rows:#?}");
            assert_eq!(messages[0].run, expected, "{target} {message_id}");
        }
    }
    let torn: Value = serde_json::from_str(&run_json(&store, "m-torn").await).unwrap();
    assert_eq!(torn["conflicting_terminals"], json!(true));
    let moved = run_json(&store, "m-params").await;
    for target in TARGETS {
        let messages = messages_of(&rows, target, "m-params");
        assert_eq!(messages.len(), 2, "started, then moved: {rows:#?}");
        assert_eq!(messages[1].run, moved, "{target}");
    }
    let moved: Value = serde_json::from_str(&moved).unwrap();
    assert_eq!(moved["workflow_params"]["k"], json!(awkward));
    assert_eq!(moved["triggered_here"], json!(true));
}

async fn without_targets_nothing_is_queued(db: TestDatabase) {
    let store = open(&db).await;
    record(
        &store,
        &[("m-quiet", "processing"), ("m-quiet", "success")],
        0,
    )
    .await;
    store
        .record_triggered_run(&triggered("m-quiet-started", 0))
        .await
        .unwrap();
    assert_eq!(stored::count(&db, "runs").await, 2);
    assert_eq!(stored::count(&db, "forward_outbox").await, 0);
}

async fn execute(db: &TestDatabase, sql: &str) {
    match db.backend {
        Backend::Postgres => {
            let mut connection = PgConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut connection).await.unwrap();
        }
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut connection).await.unwrap();
        }
    }
}

/// The messages are part of the change's transaction: when they cannot be written, neither is
/// the change.
async fn a_change_whose_messages_cannot_be_written_is_not_written(db: TestDatabase) {
    let store = open_forwarding(&db, &TARGETS).await;
    match db.backend {
        Backend::Postgres => {
            execute(
                &db,
                "create function refuse_forwarding() returns trigger language plpgsql as
                     $$ begin raise exception 'forwarding refused'; end $$;
                 create trigger refuse_forwarding before insert on forward_outbox
                     for each row execute function refuse_forwarding();",
            )
            .await
        }
        Backend::Sqlite => {
            execute(
                &db,
                "create trigger refuse_forwarding before insert on forward_outbox
                 begin select raise(abort, 'forwarding refused'); end;",
            )
            .await
        }
    }
    let body = callback("m-refused", "success", json!({}));
    let failed = store.record_deliveries(&[delivery(&body, 0)]).await;
    assert!(failed.is_err(), "{failed:?}");
    let failed = store
        .record_triggered_run(&triggered("m-refused-started", 0))
        .await;
    assert!(failed.is_err(), "{failed:?}");
    for table in ["runs", "events", "forward_outbox"] {
        assert_eq!(stored::count(&db, table).await, 0, "{table}");
    }

    let drop_trigger = match db.backend {
        Backend::Postgres => "drop trigger refuse_forwarding on forward_outbox",
        Backend::Sqlite => "drop trigger refuse_forwarding",
    };
    execute(&db, drop_trigger).await;
    let outcomes = store
        .record_deliveries(&[delivery(&body, 1)])
        .await
        .unwrap();
    assert!(
        !outcomes[0].duplicate,
        "the failed batch left nothing behind"
    );
    assert_eq!(forward_rows(&db).await.len(), TARGETS.len());
}

/// A small deterministic generator (xorshift), so that the history below is the same on every
/// run and on both stores.
struct Sequence(u64);

impl Sequence {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// Random histories of batches and starts: after every step, each run whose status was seen to
/// change (or that appeared) must have exactly one new message per target, holding the run as
/// read then, and nothing else may be queued.
async fn messages_follow_the_changes_seen_in_random_histories(db: TestDatabase) {
    const RUNS: u64 = 4;
    const STEPS: i64 = 60;
    const STATUSES: [&str; 5] = ["submitted", "processing", "success", "failed", "timeout"];
    let store = open_forwarding(&db, &TARGETS).await;
    for seed in [0x9e37_79b9_7f4a_7c15_u64, 42, 7_777] {
        let mut sequence = Sequence(seed);
        let ids: Vec<String> = (0..RUNS).map(|n| format!("m-{seed}-{n}")).collect();
        let mut seen: HashMap<&str, String> = HashMap::new();
        let mut expected: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for step in 0..STEPS {
            let millis = step * 10;
            if sequence.below(6) == 0 {
                let id = &ids[sequence.below(RUNS) as usize];
                store
                    .record_triggered_run(&triggered(id, millis))
                    .await
                    .unwrap();
            } else {
                let size = 1 + sequence.below(4) as i64;
                let batch: Vec<Delivery> = (0..size)
                    .map(|i| {
                        let id = &ids[sequence.below(RUNS) as usize];
                        let status = STATUSES[sequence.below(5) as usize];
                        let note = json!({ "note": sequence.below(2) });
                        delivery(&callback(id, status, note), millis + i)
                    })
                    .collect();
                store.record_deliveries(&batch).await.unwrap();
            }
            for id in &ids {
                let Some(run) = store.get_run(id).await.unwrap() else {
                    continue;
                };
                if seen.get(id.as_str()) != Some(&run.status) {
                    seen.insert(id, run.status.clone());
                    expected
                        .entry(id)
                        .or_default()
                        .push(serde_json::to_string(&run).unwrap());
                }
            }
        }
        let rows = forward_rows(&db).await;
        for target in TARGETS {
            for id in &ids {
                let queued: Vec<&str> = messages_of(&rows, target, id)
                    .iter()
                    .map(|row| row.run.as_str())
                    .collect();
                let changes = expected.get(id.as_str()).cloned().unwrap_or_default();
                assert_eq!(queued, changes, "seed {seed}, {target}, {id}");
            }
        }
    }
    // More changes than runs: runs were created, and moved again afterwards.
    let changes = forward_rows(&db).await.len() / TARGETS.len();
    assert!(
        changes > 3 * RUNS as usize,
        "the histories moved runs: {changes}"
    );
}

/// Concurrent writers that deliver the same runs' statuses in different orders: whatever the
/// interleaving, a run's messages move strictly forward, end at its final status, and every
/// target gets the same ones.
async fn concurrent_writers_queue_each_change_once(db: TestDatabase) {
    const WRITERS: usize = 6;
    const RUNS: usize = 8;
    let store = open_forwarding(&db, &TARGETS).await;
    let statuses = ["submitted", "processing", "success", "failed"];
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        // Each writer sends a different part of every run's history, rotated, so that the
        // writers meet on the same runs in different orders, new runs included.
        let mut batch: Vec<Delivery> = (0..RUNS)
            .flat_map(|n| {
                let id = format!("m-busy-{n}");
                let status = statuses[(writer + n) % statuses.len()];
                let later = statuses[(writer + n + 1) % statuses.len()];
                [
                    callback(&id, status, json!({})),
                    callback(&id, later, json!({})),
                ]
            })
            .enumerate()
            .map(|(i, body)| delivery(&body, (writer * 100 + i) as i64))
            .collect();
        let size = batch.len();
        batch.rotate_left(writer * 3 % size);
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store.record_deliveries(&batch).await.expect("recorded");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let rows = forward_rows(&db).await;
    for n in 0..RUNS {
        let id = format!("m-busy-{n}");
        let status = store.get_run(&id).await.unwrap().unwrap().status;
        let per_target: Vec<Vec<String>> = TARGETS
            .iter()
            .map(|target| {
                messages_of(&rows, target, &id)
                    .into_iter()
                    .map(status_of)
                    .collect()
            })
            .collect();
        let queued = &per_target[0];
        assert!(
            per_target.iter().all(|other| other == queued),
            "{per_target:?}"
        );
        assert_eq!(queued.last(), Some(&status), "{id}: {queued:?}");
        assert!(
            queued
                .windows(2)
                .all(|pair| StatusRank::of(&pair[0]) < StatusRank::of(&pair[1])),
            "{id}: each message moves the run forward: {queued:?}"
        );
    }
}

/// The ingest wakes the forwarding workers after a commit with a new delivery, before it
/// answers; a duplicate wakes nothing.
async fn the_ingest_wakes_the_forwarding_workers_after_a_new_delivery(db: TestDatabase) {
    let store = open_forwarding(&db, &TARGETS).await;
    let wake = ForwardWake::new(TARGETS, 8, Duration::from_secs(60));
    let settings = IngestSettings {
        writers: 1,
        max_batch: 8,
        queue_capacity: 8,
    };
    let (ingest, writers) = Ingest::start(
        store,
        &settings,
        GUARD,
        Waiters::new(1, Duration::from_secs(5)),
        wake.clone(),
    );
    let woken = |target: &str| {
        let notify = wake.notified(target).expect("a configured target");
        async move { futures::poll!(Box::pin(notify.notified())).is_ready() }
    };
    assert!(!woken("alpha").await, "nothing was committed yet");
    let body = callback("m-woken", "processing", json!({}));
    let outcome = ingest.record(delivery(&body, 0)).await.unwrap();
    assert!(!outcome.duplicate);
    assert!(woken("alpha").await && woken("beta").await);
    assert!(!woken("alpha").await, "one wake per commit");
    let outcome = ingest.record(delivery(&body, 1)).await.unwrap();
    assert!(outcome.duplicate);
    assert!(!woken("alpha").await && !woken("beta").await);
    drop(ingest);
    writers.drain(GUARD).await;
}

on_both_backends!(
    a_batch_queues_one_message_per_changed_run_and_target,
    duplicates_and_events_that_do_not_move_a_run_queue_nothing,
    several_statuses_of_a_run_in_one_batch_are_one_change,
    a_run_s_messages_are_numbered_in_commit_order,
    a_triggered_run_is_a_change_unless_a_callback_created_it,
    a_message_is_the_run_byte_for_byte_whatever_its_text_and_times,
    without_targets_nothing_is_queued,
    a_change_whose_messages_cannot_be_written_is_not_written,
    messages_follow_the_changes_seen_in_random_histories,
    concurrent_writers_queue_each_change_once,
    the_ingest_wakes_the_forwarding_workers_after_a_new_delivery,
);

/// A `Handoff` with `room` slots and one lease owner. It keeps what it is given, slots
/// included, as a worker would hold them while it sends.
struct RecordingHandoff {
    owner: Uuid,
    slots: Arc<Semaphore>,
    committed: Mutex<Vec<(String, Vec<HandedMessage>, bool)>>,
}

impl RecordingHandoff {
    fn new(room: usize) -> Arc<Self> {
        Arc::new(RecordingHandoff {
            owner: Uuid::new_v4(),
            slots: Arc::new(Semaphore::new(room)),
            committed: Mutex::new(Vec::new()),
        })
    }

    /// Every commit reported so far: its target, the messages handed over, and whether others
    /// wait for a claim.
    fn reported(&self) -> Vec<(String, Vec<OutboxMessage>, bool)> {
        self.committed
            .lock()
            .unwrap()
            .iter()
            .map(|(target, handed, claimable)| {
                let messages = handed.iter().map(|handed| handed.message.clone()).collect();
                (target.clone(), messages, *claimable)
            })
            .collect()
    }
}

impl Handoff for RecordingHandoff {
    fn reserve(&self, _target: &str, wanted: usize) -> Option<Reservation> {
        let lease = Lease {
            owner: self.owner,
            until: Utc::now() + chrono::Duration::seconds(60),
        };
        Reservation::of_free_slots(&self.slots, wanted, lease)
    }

    fn committed(&self, target: &str, handed: Vec<HandedMessage>, claimable: bool) {
        self.committed
            .lock()
            .unwrap()
            .push((target.to_owned(), handed, claimable));
    }
}

/// Each message as stored: `(id, message_id, run, committed_at, lease owner)`.
type StoredMessage = (i64, String, String, DateTime<Utc>, Option<String>);

async fn stored_messages(db: &TestDatabase) -> Vec<StoredMessage> {
    let mut connection = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query_as(
        "select id, message_id, run, committed_at, lease_owner::text from forward_outbox
         order by id",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap()
}

/// PostgreSQL writes a batch's messages leased to this replica's workers while they have room,
/// and hands them over at commit, exactly as stored; a run whose earlier message is still
/// pending gets its next one unleased, for a claim, so that order per run holds.
#[tokio::test]
async fn postgres_a_batch_hands_its_messages_to_the_workers_with_room() {
    let db = fresh_database(Backend::Postgres).await;
    let store = open_forwarding(&db, &["alpha"]).await;
    let handoff = RecordingHandoff::new(2);
    assert!(store.outbox().hand_off_to(handoff.clone()));
    assert!(
        !store.outbox().hand_off_to(RecordingHandoff::new(1)),
        "the first hand-off counts"
    );

    // Three new runs, room for two: two are handed over, the third waits for a claim.
    record(
        &store,
        &[
            ("m-a", "processing"),
            ("m-b", "processing"),
            ("m-c", "processing"),
        ],
        0,
    )
    .await;
    let reported = handoff.reported();
    assert_eq!(reported.len(), 1, "one report per commit and target");
    let (target, handed, claimable) = &reported[0];
    assert_eq!(
        (target.as_str(), handed.len(), *claimable),
        ("alpha", 2, true)
    );
    let owner = Some(handoff.owner.to_string());
    let stored = stored_messages(&db).await;
    for message in handed {
        // Exactly as stored, to the byte and the microsecond, and leased to the worker.
        let row = (
            message.id,
            message.message_id.clone(),
            message.run.clone(),
            message.committed_at,
            owner.clone(),
        );
        assert!(stored.contains(&row), "{row:?} in {stored:?}");
        assert_eq!(
            (message.attempts, message.queued_at),
            (0, message.committed_at)
        );
        assert_eq!(message.run, run_json(&store, &message.message_id).await);
    }
    assert_eq!(stored.iter().filter(|row| row.4.is_none()).count(), 1);

    // The two slots are still held (the sends are under way): nothing more is leased.
    record(&store, &[("m-d", "processing")], 10).await;
    let reported = handoff.reported();
    assert_eq!((reported[1].1.len(), reported[1].2), (0, true));

    // Room again (another replica's workers), but m-a's first message is still pending: its
    // next one waits for a claim, while a new run's is handed over.
    let other = RecordingHandoff::new(8);
    let other_store = open_forwarding(&db, &["alpha"]).await;
    assert!(other_store.outbox().hand_off_to(other.clone()));
    record(
        &other_store,
        &[("m-a", "success"), ("m-e", "processing")],
        20,
    )
    .await;
    let reported = other.reported();
    let handed: Vec<&str> = reported[0]
        .1
        .iter()
        .map(|m| m.message_id.as_str())
        .collect();
    assert_eq!((handed, reported[0].2), (vec!["m-e"], true));
    let m_a: Vec<bool> = stored_messages(&db)
        .await
        .into_iter()
        .filter(|row| row.1 == "m-a")
        .map(|row| row.4.is_some())
        .collect();
    assert_eq!(m_a, [true, false]);
}

/// PostgreSQL: waits until a session of the store waits for a lock, as the server sees it.
/// Polled with a deadline: an "eventually" check, on the server's own account of the wait.
async fn until_the_store_waits_for_a_lock(db: &TestDatabase) {
    let mut monitor = PgConnection::connect(&db.url).await.unwrap();
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where datname = current_database()
               and application_name = 'nen-relay'
               and wait_event_type = 'Lock'",
        )
        .fetch_one(&mut monitor)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never waited for the other writer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A run that another writer (plain SQL here, in a transaction the test holds open) creates or
/// moves while a batch is written, after the batch's snapshot: the batch's update waits for
/// that commit, then decides from the row it finds under its lock, not from its snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_run_changed_meanwhile_by_another_writer_is_decided_on_from_its_commit() {
    let db = fresh_database(Backend::Postgres).await;
    let options = StoreOptions {
        forward_targets: vec!["alpha".into()],
        // The batch waits for the other writer's commit, held by the test.
        statement_timeout: GUARD,
        ..StoreOptions::default()
    };
    let store = open_with(&db, &options).await;
    // (the run, its committed status before (none: absent), the status the other writer
    // gives it, the batch's status, messages expected)
    let cases = [
        ("m-meanwhile-done", None, "success", "processing", 0),
        ("m-meanwhile-moved", None, "submitted", "processing", 1),
        (
            "m-meanwhile-overtaken",
            Some("submitted"),
            "success",
            "processing",
            0,
        ),
        (
            "m-meanwhile-advanced",
            Some("submitted"),
            "processing",
            "success",
            1,
        ),
    ];
    for (message_id, before, theirs, ours, messages) in cases {
        let upsert = "insert into runs (message_id, status, status_rank, created_at, updated_at)
                      values ($1, $2, $3, now(), now())
                      on conflict (message_id) do update
                      set status = excluded.status, status_rank = excluded.status_rank";
        let mut other = PgConnection::connect(&db.url).await.unwrap();
        if let Some(status) = before {
            sqlx::query(upsert)
                .bind(message_id)
                .bind(status)
                .bind(StatusRank::of(status).as_i16())
                .execute(&mut other)
                .await
                .unwrap();
        }
        let mut transaction = other.begin().await.unwrap();
        sqlx::query(upsert)
            .bind(message_id)
            .bind(theirs)
            .bind(StatusRank::of(theirs).as_i16())
            .execute(&mut *transaction)
            .await
            .unwrap();
        let writing = tokio::spawn({
            let store = store.clone();
            let batch = [delivery(&callback(message_id, ours, json!({})), 0)];
            async move { store.record_deliveries(&batch).await }
        });
        until_the_store_waits_for_a_lock(&db).await;
        transaction.commit().await.unwrap();
        let outcomes = writing.await.unwrap().expect("recorded");
        assert!(!outcomes[0].duplicate);
        let rows = forward_rows(&db).await;
        let queued = messages_of(&rows, "alpha", message_id);
        assert_eq!(queued.len(), messages, "{message_id}: {rows:#?}");
        for row in queued {
            assert_eq!(row.run, run_json(&store, message_id).await);
        }
    }
}

/// A commit that queued messages is heard on every replica's feed, so that their workers wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_commit_that_queues_messages_is_heard_by_other_replicas() {
    let db = fresh_database(Backend::Postgres).await;
    let listening = open_forwarding(&db, &TARGETS).await;
    let writing = open_forwarding(&db, &TARGETS).await;
    let mut feed = listening
        .terminal_run_feed()
        .await
        .unwrap()
        .expect("PostgreSQL has a feed");
    record(&writing, &[("m-heard", "processing")], 0).await;
    let heard = tokio::time::timeout(GUARD, feed.next())
        .await
        .expect("heard in time")
        .unwrap();
    assert_eq!(heard, FeedEvent::ForwardQueued);
}
