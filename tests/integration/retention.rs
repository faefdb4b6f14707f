//! Retention: sweeps prune payloads of old terminal runs (deduplication unchanged), delete old
//! terminal runs, rejected payloads and expired idempotency keys, in batches, and never touch a
//! run that is not terminal. Sweeps take "now" as a parameter, so nothing here waits for time
//! to pass.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nen_relay::retention::{RetentionPolicy, SweepReport, Sweeper};
use nen_relay::store::{DeliveryOutcome, IdempotencyClaim, RejectedPayload, Store};
use serde_json::{json, Value};

use crate::on_both_backends;
use crate::support::app::callback;
use crate::support::metrics::sample;
use crate::support::store_fixtures::{at, delivery, open};
use crate::support::stored::{count, rejected_bodies};
use crate::support::{Backend, TestApp, TestDatabase};

const DAY: i64 = 86_400_000;

fn days(n: u64) -> Option<Duration> {
    Some(Duration::from_secs(n * 86_400))
}

/// Records `bodies`, each received at its time, one batch each.
async fn record(store: &Arc<dyn Store>, bodies: &[(&str, i64)]) -> Vec<DeliveryOutcome> {
    let mut outcomes = Vec::new();
    for (body, millis) in bodies {
        outcomes.extend(
            store
                .record_deliveries(&[delivery(body, *millis)])
                .await
                .expect("the store records"),
        );
    }
    outcomes
}

/// `(status, payload_pruned, payload)` of each event of a run.
async fn events(store: &Arc<dyn Store>, message_id: &str) -> Vec<(String, bool, Value)> {
    store
        .list_events(message_id)
        .await
        .expect("the store answers")
        .into_iter()
        .map(|event| {
            let payload = serde_json::from_str(event.payload.get()).expect("payload is JSON");
            (event.status, event.payload_pruned, payload)
        })
        .collect()
}

async fn payloads_of_old_terminal_runs_are_pruned_and_redeliveries_stay_duplicates(
    db: TestDatabase,
) {
    let store = open(&db).await;
    let old_processing = callback("m-old", "processing", json!({}));
    let old_success = callback("m-old", "success", json!({"result": {"pages": 3}}));
    let stuck = callback("m-stuck", "processing", json!({}));
    let recent_success = callback("m-recent", "success", json!({}));
    record(
        &store,
        &[
            (&old_processing, 0),
            (&old_success, 1_000),
            (&stuck, 0),
            (&recent_success, 80 * DAY),
        ],
    )
    .await;
    let policy = RetentionPolicy {
        payloads: days(30),
        ..RetentionPolicy::default()
    };
    let report = Sweeper::new(store.clone(), policy)
        .sweep(at(31 * DAY))
        .await
        .unwrap();
    assert_eq!(report.payloads_pruned, 2);
    assert!(!report.skipped);

    assert_eq!(
        events(&store, "m-old").await,
        vec![
            ("processing".into(), true, Value::Null),
            ("success".into(), true, Value::Null),
        ]
    );
    let untouched = |body: &str, status: &str| {
        vec![(
            status.to_owned(),
            false,
            serde_json::from_str::<Value>(body).unwrap(),
        )]
    };
    assert_eq!(
        events(&store, "m-stuck").await,
        untouched(&stuck, "processing"),
        "a run that is not terminal keeps its payloads, however old"
    );
    assert_eq!(
        events(&store, "m-recent").await,
        untouched(&recent_success, "success")
    );
    let run = store
        .get_run("m-old")
        .await
        .unwrap()
        .expect("the run stays");
    assert_eq!(run.status, "success");
    assert!(run.result.is_some(), "the run keeps its result");

    // The body hash stayed: a redelivery is a duplicate, one with another body a differing one.
    let outcomes = record(
        &store,
        &[
            (&old_success, 40 * DAY),
            (
                &callback("m-old", "success", json!({"result": {"pages": 4}})),
                40 * DAY,
            ),
        ],
    )
    .await;
    assert_eq!(
        outcomes
            .iter()
            .map(|o| (o.duplicate, o.body_differs))
            .collect::<Vec<_>>(),
        vec![(true, false), (true, true)]
    );
    let pruned = store.list_events("m-old").await.unwrap();
    assert_eq!(
        (pruned[1].duplicates, pruned[1].differing_duplicates),
        (2, 1)
    );

    // Nothing left to do at the same instant.
    let again = Sweeper::new(store.clone(), policy)
        .sweep(at(31 * DAY))
        .await
        .unwrap();
    assert_eq!(again.payloads_pruned, 0);
}

async fn old_terminal_runs_are_deleted_with_their_events(db: TestDatabase) {
    let store = open(&db).await;
    let old_success = callback("m-done", "success", json!({}));
    let old_failed = callback("m-failed", "failed", json!({"error": "boom"}));
    let stuck = callback("m-stuck", "submitted", json!({}));
    let recent = callback("m-recent", "success", json!({}));
    record(
        &store,
        &[
            (&callback("m-done", "processing", json!({})), 0),
            (&old_success, 10),
            (&old_failed, 20),
            (&stuck, 0),
            (&callback("m-stuck", "processing", json!({})), 5),
            (&recent, 50 * DAY),
        ],
    )
    .await;
    let policy = RetentionPolicy {
        runs: days(30),
        payloads: days(30),
        ..RetentionPolicy::default()
    };
    let report = Sweeper::new(store.clone(), policy)
        .sweep(at(60 * DAY))
        .await
        .unwrap();
    assert_eq!(report.runs_deleted, 2);
    assert_eq!(report.payloads_pruned, 0, "their events went with the runs");
    for gone in ["m-done", "m-failed"] {
        assert!(store.get_run(gone).await.unwrap().is_none(), "{gone}");
        assert!(store.list_events(gone).await.unwrap().is_empty(), "{gone}");
    }
    assert_eq!(store.list_events("m-stuck").await.unwrap().len(), 2);
    assert_eq!(
        store.get_run("m-stuck").await.unwrap().unwrap().status,
        "processing"
    );
    assert_eq!(store.list_events("m-recent").await.unwrap().len(), 1);
    assert_eq!(count(&db, "events").await, 3);
    assert_eq!(count(&db, "runs").await, 2);

    // A redelivery after the run is gone is new again: nothing of it was kept.
    let outcomes = record(&store, &[(&old_success, 61 * DAY)]).await;
    assert!(!outcomes[0].duplicate);
}

async fn old_rejected_payloads_are_deleted(db: TestDatabase) {
    let store = open(&db).await;
    for (body, millis) in [(&b"old"[..], 0), (b"recent", 20 * DAY)] {
        store
            .record_rejected_payload(&RejectedPayload {
                raw_body: Bytes::from_static(body),
                key_id: "key-1".into(),
                reason: "not a callback".into(),
                received_at: at(millis),
            })
            .await
            .unwrap();
    }
    let off = Sweeper::new(store.clone(), RetentionPolicy::default())
        .sweep(at(100 * DAY))
        .await
        .unwrap();
    assert_eq!(off.rejected_deleted, 0, "off keeps them forever");
    let policy = RetentionPolicy {
        rejected: days(30),
        ..RetentionPolicy::default()
    };
    let report = Sweeper::new(store.clone(), policy)
        .sweep(at(31 * DAY))
        .await
        .unwrap();
    assert_eq!(report.rejected_deleted, 1);
    assert_eq!(rejected_bodies(&db).await, vec![b"recent".to_vec()]);
}

async fn expired_idempotency_keys_are_always_deleted(db: TestDatabase) {
    let store = open(&db).await;
    for (key, expires) in [("k-expired", 1_000), ("k-now", 2_000), ("k-live", 3_000)] {
        store
            .claim_idempotency_key(&IdempotencyClaim {
                key: key.into(),
                request_sha256: [7; 32],
                now: at(0),
                expires_at: at(expires),
            })
            .await
            .unwrap();
    }
    // Every retention period off: expired keys go all the same.
    let report = Sweeper::new(store.clone(), RetentionPolicy::default())
        .sweep(at(2_000))
        .await
        .unwrap();
    assert_eq!(report.idempotency_keys_deleted, 2);
    assert_eq!(count(&db, "idempotency_keys").await, 1);
}

/// More rows than a batch holds, with rows the payload sweep must step over in between.
async fn sweeps_go_batch_by_batch_until_nothing_is_left(db: TestDatabase) {
    let store = open(&db).await;
    let mut bodies = Vec::new();
    for n in 0..7 {
        bodies.push((
            callback(&format!("m-done-{n}"), "success", json!({})),
            n * 10,
        ));
        bodies.push((
            callback(&format!("m-open-{n}"), "processing", json!({})),
            n * 10 + 5,
        ));
    }
    let bodies: Vec<(&str, i64)> = bodies.iter().map(|(b, t)| (b.as_str(), *t)).collect();
    record(&store, &bodies).await;
    let payloads = RetentionPolicy {
        payloads: days(1),
        ..RetentionPolicy::default()
    };
    let report = Sweeper::new(store.clone(), payloads)
        .with_batch_size(3)
        .sweep(at(2 * DAY))
        .await
        .unwrap();
    assert_eq!(report.payloads_pruned, 7);
    // 3 + 3 + 1 payloads, then one (empty) batch of expired keys.
    assert_eq!(report.batches, 4);
    for n in 0..7 {
        assert!(events(&store, &format!("m-done-{n}")).await[0].1);
        assert!(!events(&store, &format!("m-open-{n}")).await[0].1);
    }

    let runs = RetentionPolicy {
        runs: days(1),
        ..RetentionPolicy::default()
    };
    let report = Sweeper::new(store.clone(), runs)
        .with_batch_size(3)
        .sweep(at(2 * DAY))
        .await
        .unwrap();
    assert_eq!(
        report,
        SweepReport {
            runs_deleted: 7,
            batches: 4,
            ..SweepReport::default()
        }
    );
    assert_eq!(count(&db, "runs").await, 7, "the open runs stay");
}

/// PostgreSQL: a second sweep, from another replica, waits its turn by skipping. SQLite has one
/// process, so nothing to exclude.
async fn one_sweep_at_a_time(db: TestDatabase) {
    let store = open(&db).await;
    let replica = open(&db).await;
    let first = store.begin_sweep().await.unwrap();
    assert!(first.is_some());
    let second = replica.begin_sweep().await.unwrap();
    match db.backend {
        Backend::Postgres => {
            assert!(second.is_none(), "another replica's sweep is under way");
            let report = Sweeper::new(replica.clone(), RetentionPolicy::default())
                .sweep(at(0))
                .await
                .unwrap();
            assert!(report.skipped);
        }
        Backend::Sqlite => assert!(second.is_some()),
    }
    drop(second);
    drop(first);
    // The lock goes with the first sweep's connection, which the server notices closing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if replica.begin_sweep().await.unwrap().is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lock is never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Through HTTP: the events endpoint shows a pruned payload as null, and a redelivery is still
/// answered as a duplicate. The app's own sweeper runs on its interval with the default
/// settings (90 days), against the clock: the delivery it prunes is years old.
async fn the_service_sweeps_on_its_interval_and_shows_pruned_payloads(db: TestDatabase) {
    let app = TestApp::spawn_with(db, |variables| {
        variables.insert("NEN_RELAY_RETENTION__SWEEP_INTERVAL".into(), "50ms".into());
    })
    .await;
    let success = callback("m-swept", "success", json!({"result": {"ok": true}}));
    let fresh = callback("m-fresh", "success", json!({}));
    app.store
        .record_deliveries(&[delivery(&success, -5 * 365 * DAY)])
        .await
        .unwrap();
    app.deliver_ok(&fresh).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let events = loop {
        let events = app.events("m-swept").await;
        if events[0]["payload_pruned"] == json!(true) {
            break events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never swept: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(events[0]["payload"], Value::Null);
    assert_eq!(events[0]["status"], "success");
    let fresh_events = app.events("m-fresh").await;
    assert_eq!(fresh_events[0]["payload_pruned"], json!(false));
    assert_eq!(
        fresh_events[0]["payload"],
        serde_json::from_str::<Value>(&fresh).unwrap()
    );
    let answer = app.deliver_ok(&success).await;
    assert_eq!(answer["duplicate"], json!(true));
    let page = app.get("/metrics").await.text().await.unwrap();
    let swept = sample(
        &page,
        "nen_relay_retention_swept_total",
        &[("kind", "payloads")],
    );
    assert!(swept.unwrap_or(0.0) >= 1.0, "{page}");
}

on_both_backends!(
    payloads_of_old_terminal_runs_are_pruned_and_redeliveries_stay_duplicates,
    old_terminal_runs_are_deleted_with_their_events,
    old_rejected_payloads_are_deleted,
    expired_idempotency_keys_are_always_deleted,
    sweeps_go_batch_by_batch_until_nothing_is_left,
    one_sweep_at_a_time,
    the_service_sweeps_on_its_interval_and_shows_pruned_payloads,
);
