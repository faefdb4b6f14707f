//! The `Store` contract, checked the same way on every backend: deduplication, forward-only
//! status, conflict flags, triggered runs, idempotency keys, pagination, rejected payloads.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{Duration, TimeZone, Utc};
use nen_relay::store::{
    ClaimOutcome, Delivery, DeliveryOutcome, IdempotencyClaim, RejectedPayload, Run, RunCursor,
    RunPage, RunQuery, Store, StoredResponse, TriggeredRun,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::Connection;
use tokio::sync::Barrier;

use crate::on_both_backends;
use crate::support::app::callback;
use crate::support::store_fixtures::{at, delivery, open};
use crate::support::{Backend, TestDatabase};

const NEW: DeliveryOutcome = DeliveryOutcome {
    duplicate: false,
    body_differs: false,
    conflicting_terminal: false,
};
const REPEAT: DeliveryOutcome = DeliveryOutcome {
    duplicate: true,
    body_differs: false,
    conflicting_terminal: false,
};
const DIFFERING_REPEAT: DeliveryOutcome = DeliveryOutcome {
    duplicate: true,
    body_differs: true,
    conflicting_terminal: false,
};
const CONFLICTING: DeliveryOutcome = DeliveryOutcome {
    duplicate: false,
    body_differs: false,
    conflicting_terminal: true,
};

async fn run(store: &Arc<dyn Store>, message_id: &str) -> Run {
    store
        .get_run(message_id)
        .await
        .expect("the store answers")
        .unwrap_or_else(|| panic!("run {message_id} exists"))
}

fn result_of(run: &Run) -> Option<Value> {
    run.result
        .as_ref()
        .map(|raw| serde_json::from_str(raw.get()).expect("stored result is JSON"))
}

async fn identical_deliveries_in_one_batch_make_one_event(db: TestDatabase) {
    let store = open(&db).await;
    let body = callback("m-twins", "processing", json!({}));
    let outcomes = store
        .record_deliveries(&[delivery(&body, 0), delivery(&body, 7)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![NEW, REPEAT]);
    let events = store.list_events("m-twins").await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].duplicates, 1);
    assert_eq!(events[0].differing_duplicates, 0);
    assert_eq!(events[0].received_at, at(0));
    assert_eq!(events[0].last_received_at, at(7));
    assert_eq!(events[0].key_id, "key-1");
    assert_eq!(
        events[0].payload.get(),
        body,
        "the body is kept byte for byte"
    );
    // Again in a later batch: nothing new, only the counters move.
    let outcomes = store
        .record_deliveries(&[delivery(&body, 9)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![REPEAT]);
    let events = store.list_events("m-twins").await.unwrap();
    assert_eq!((events.len(), events[0].duplicates), (1, 2));
    assert_eq!(events[0].last_received_at, at(9));
    assert!(store.record_deliveries(&[]).await.unwrap().is_empty());
}

async fn processing_and_success_in_one_batch_end_at_success(db: TestDatabase) {
    let store = open(&db).await;
    let processing = callback("m-both", "processing", json!({"expires_at": 1_900_000_000}));
    let success = callback(
        "m-both",
        "success",
        json!({"success": true, "result": {"pages": [1, 2]}, "assets": "https://b/a.zip"}),
    );
    let outcomes = store
        .record_deliveries(&[delivery(&processing, 0), delivery(&success, 5)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![NEW, NEW]);
    let run = run(&store, "m-both").await;
    assert_eq!(run.status, "success");
    assert_eq!(run.created_at, at(0));
    assert_eq!(run.updated_at, at(5));
    assert_eq!(run.completed_at, Some(at(5)));
    assert_eq!(run.expires_at, Utc.timestamp_opt(1_900_000_000, 0).single());
    assert_eq!(result_of(&run), Some(json!({"pages": [1, 2]})));
    assert_eq!(run.assets_url.as_deref(), Some("https://b/a.zip"));
    assert!(!run.conflicting_terminals && !run.triggered_here);
    let statuses: HashSet<String> = store
        .list_events("m-both")
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.status)
        .collect();
    assert_eq!(
        statuses,
        HashSet::from(["processing".into(), "success".into()])
    );

    // The same two in the opposite order within a batch end the same way.
    let late_first = [
        delivery(&success.replace("m-both", "m-both-2"), 0),
        delivery(&processing.replace("m-both", "m-both-2"), 5),
    ];
    assert_eq!(
        store.record_deliveries(&late_first).await.unwrap(),
        vec![NEW, NEW]
    );
    let run = store.get_run("m-both-2").await.unwrap().unwrap();
    assert_eq!(run.status, "success");
    assert_eq!(run.completed_at, Some(at(0)));
    assert_eq!(run.updated_at, at(5));
    assert_eq!(run.expires_at, Utc.timestamp_opt(1_900_000_000, 0).single());
    let statuses: Vec<String> = store
        .list_events("m-both-2")
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.status)
        .collect();
    assert_eq!(statuses, vec!["success", "processing"], "arrival order");
}

async fn a_conflicting_terminal_is_flagged_and_never_wins(db: TestDatabase) {
    let store = open(&db).await;
    // In one batch: the first terminal wins.
    let success = callback("m-same-batch", "success", json!({"result": {"ok": 1}}));
    let failed = callback("m-same-batch", "failed", json!({"error": "boom"}));
    let outcomes = store
        .record_deliveries(&[delivery(&success, 0), delivery(&failed, 1)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![NEW, CONFLICTING]);
    let first = run(&store, "m-same-batch").await;
    assert_eq!(first.status, "success");
    assert_eq!(result_of(&first), Some(json!({"ok": 1})));
    assert_eq!(first.error, None);
    assert!(first.conflicting_terminals);
    let flags: HashMap<String, bool> = store
        .list_events("m-same-batch")
        .await
        .unwrap()
        .into_iter()
        .map(|event| (event.status, event.conflicting_terminal))
        .collect();
    assert_eq!(
        flags,
        HashMap::from([("success".into(), false), ("failed".into(), true)])
    );

    // Across batches: the stored terminal stays.
    let failed = callback("m-later", "failed", json!({"error": "boom"}));
    let timeout = callback("m-later", "timeout", json!({}));
    assert_eq!(
        store
            .record_deliveries(&[delivery(&failed, 0)])
            .await
            .unwrap(),
        vec![NEW]
    );
    assert!(!run(&store, "m-later").await.conflicting_terminals);
    assert_eq!(
        store
            .record_deliveries(&[delivery(&timeout, 1)])
            .await
            .unwrap(),
        vec![CONFLICTING]
    );
    // A repeat of the conflicting one is only a repeat; a repeat of the winner is not a conflict.
    assert_eq!(
        store
            .record_deliveries(&[delivery(&timeout, 2), delivery(&failed, 3)])
            .await
            .unwrap(),
        vec![REPEAT, REPEAT]
    );
    let later = run(&store, "m-later").await;
    assert_eq!(later.status, "failed");
    assert_eq!(later.error.as_deref(), Some("boom"));
    assert_eq!(later.completed_at, Some(at(0)));
    assert!(later.conflicting_terminals);
    let events = store.list_events("m-later").await.unwrap();
    let flags: Vec<(&str, bool)> = events
        .iter()
        .map(|event| (event.status.as_str(), event.conflicting_terminal))
        .collect();
    assert_eq!(flags, vec![("failed", false), ("timeout", true)]);
}

async fn a_differing_duplicate_is_flagged_and_counted(db: TestDatabase) {
    let store = open(&db).await;
    let original = callback(
        "m-differ",
        "processing",
        json!({"expires_at": 1_900_000_000}),
    );
    let altered = callback(
        "m-differ",
        "processing",
        json!({"expires_at": 1_900_000_001}),
    );
    // In one batch: the first body is the one kept.
    let outcomes = store
        .record_deliveries(&[delivery(&original, 0), delivery(&altered, 1)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![NEW, DIFFERING_REPEAT]);
    // Across batches: compared with the stored body, not with each other.
    let outcomes = store
        .record_deliveries(&[delivery(&altered, 2), delivery(&original, 3)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![DIFFERING_REPEAT, REPEAT]);
    let events = store.list_events("m-differ").await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].duplicates, 3);
    assert_eq!(events[0].differing_duplicates, 2);
    assert_eq!(events[0].payload.get(), original);
    assert_eq!(
        run(&store, "m-differ").await.expires_at,
        Utc.timestamp_opt(1_900_000_000, 0).single()
    );
}

async fn only_new_events_move_a_run_when_a_batch_mixes_in_repeats(db: TestDatabase) {
    let store = open(&db).await;
    let bare = json!({"message_id": "m-mixed", "status": "processing"}).to_string();
    assert_eq!(
        store
            .record_deliveries(&[delivery(&bare, 0)])
            .await
            .unwrap(),
        vec![NEW]
    );
    // One batch: a differing copy of the stored processing (it carries an expiry and a
    // workflow_id), the first terminal, and a second terminal that arrives after it.
    let altered = json!({
        "message_id": "m-mixed", "status": "processing",
        "workflow_id": "w-from-a-copy", "expires_at": 1_900_000_000
    })
    .to_string();
    let success =
        json!({"message_id": "m-mixed", "status": "success", "result": {"n": 1}}).to_string();
    let failed =
        json!({"message_id": "m-mixed", "status": "failed", "workflow_id": "w-new"}).to_string();
    let outcomes = store
        .record_deliveries(&[
            delivery(&altered, 1),
            delivery(&success, 2),
            delivery(&failed, 3),
            delivery(&bare, 4),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![DIFFERING_REPEAT, NEW, CONFLICTING, REPEAT]);
    let run = run(&store, "m-mixed").await;
    assert_eq!(run.status, "success");
    assert_eq!(result_of(&run), Some(json!({"n": 1})));
    // Fields a new event lacks come from the other new events, never from a repeat's body.
    assert_eq!(run.workflow_id.as_deref(), Some("w-new"));
    assert_eq!(run.expires_at, None);
    assert_eq!((run.created_at, run.updated_at), (at(0), at(3)));
    assert_eq!(run.completed_at, Some(at(2)));
    assert!(run.conflicting_terminals);
    let events = store.list_events("m-mixed").await.unwrap();
    let counts: Vec<(&str, i64, i64, bool)> = events
        .iter()
        .map(|e| {
            let flags = (e.duplicates, e.differing_duplicates, e.conflicting_terminal);
            (e.status.as_str(), flags.0, flags.1, flags.2)
        })
        .collect();
    assert_eq!(
        counts,
        vec![
            ("processing", 2, 1, false),
            ("success", 0, 0, false),
            ("failed", 0, 0, true)
        ]
    );
    assert_eq!(events[0].last_received_at, at(4));
}

/// More keys than one multi-row statement carries (SQLite writes 256 rows per statement): every
/// part of a wide batch is written, new events and repeats of stored ones alike.
async fn a_batch_wider_than_one_statement_is_recorded_whole(db: TestDatabase) {
    let store = open(&db).await;
    const RUNS: usize = 300;
    let processing: Vec<String> = (0..RUNS)
        .map(|i| callback(&format!("m-wide-{i}"), "processing", json!({})))
        .collect();
    let first: Vec<_> = processing
        .iter()
        .enumerate()
        .map(|(i, body)| delivery(body, i as i64))
        .collect();
    assert_eq!(
        store.record_deliveries(&first).await.unwrap(),
        vec![NEW; RUNS]
    );

    // Each run again: its processing (every odd one with a differing body), then its success.
    let mut second = Vec::new();
    let mut expected = Vec::new();
    for (i, body) in processing.iter().enumerate() {
        let millis = (RUNS + 2 * i) as i64;
        if i % 2 == 1 {
            let altered = callback(
                &format!("m-wide-{i}"),
                "processing",
                json!({"expires_at": 1_900_000_000}),
            );
            second.push(delivery(&altered, millis));
            expected.push(DIFFERING_REPEAT);
        } else {
            second.push(delivery(body, millis));
            expected.push(REPEAT);
        }
        let success = callback(&format!("m-wide-{i}"), "success", json!({"result": [i]}));
        second.push(delivery(&success, millis + 1));
        expected.push(NEW);
    }
    assert_eq!(store.record_deliveries(&second).await.unwrap(), expected);

    for i in 0..RUNS {
        let message_id = format!("m-wide-{i}");
        let run = run(&store, &message_id).await;
        assert_eq!(run.status, "success", "{message_id}");
        assert_eq!(result_of(&run), Some(json!([i])), "{message_id}");
        assert_eq!(run.created_at, at(i as i64), "{message_id}");
        let events = store.list_events(&message_id).await.unwrap();
        let counts: Vec<(&str, i64, i64)> = events
            .iter()
            .map(|e| (e.status.as_str(), e.duplicates, e.differing_duplicates))
            .collect();
        let differing = i64::from(i % 2 == 1);
        assert_eq!(
            counts,
            vec![("processing", 1, differing), ("success", 0, 0)],
            "{message_id}"
        );
        assert_eq!(events[0].last_received_at, at((RUNS + 2 * i) as i64));
    }
}

async fn fields_the_winner_lacks_come_from_the_first_new_event_in_its_batch(db: TestDatabase) {
    let store = open(&db).await;
    // Three new statuses in one batch, each further than the last; the winner carries neither
    // workflow_id nor expiry, the two before it carry different ones.
    let submitted = json!({
        "message_id": "m-ranks", "status": "submitted",
        "workflow_id": "w-first", "expires_at": 1_900_000_000
    });
    let processing = json!({
        "message_id": "m-ranks", "status": "processing",
        "workflow_id": "w-second", "expires_at": 1_900_000_001
    });
    let success = json!({"message_id": "m-ranks", "status": "success", "result": 1});
    let outcomes = store
        .record_deliveries(&[
            delivery(&submitted.to_string(), 0),
            delivery(&processing.to_string(), 1),
            delivery(&success.to_string(), 2),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![NEW, NEW, NEW]);
    let run = run(&store, "m-ranks").await;
    assert_eq!(run.status, "success");
    assert_eq!(run.workflow_id.as_deref(), Some("w-first"));
    assert_eq!(run.expires_at, Utc.timestamp_opt(1_900_000_000, 0).single());
    assert_eq!((run.created_at, run.updated_at), (at(0), at(2)));
    assert_eq!(run.completed_at, Some(at(2)));
}

async fn a_late_processing_never_regresses_but_fills_gaps(db: TestDatabase) {
    let store = open(&db).await;
    // The terminal callback carries neither workflow_id nor expiry; the late processing does.
    let success = json!({"message_id": "m-late", "status": "success", "result": [1]}).to_string();
    let processing = callback("m-late", "processing", json!({"expires_at": 1_900_000_000}));
    store
        .record_deliveries(&[delivery(&success, 0)])
        .await
        .unwrap();
    let before = run(&store, "m-late").await;
    assert_eq!(before.workflow_id, None);
    assert_eq!(
        store
            .record_deliveries(&[delivery(&processing, 10)])
            .await
            .unwrap(),
        vec![NEW]
    );
    let after = run(&store, "m-late").await;
    assert_eq!(after.status, "success");
    assert_eq!(after.completed_at, Some(at(0)));
    assert_eq!(result_of(&after), Some(json!([1])));
    assert_eq!(
        after.expires_at,
        Utc.timestamp_opt(1_900_000_000, 0).single()
    );
    assert_eq!(
        after.workflow_id.as_deref(),
        Some("12345678-1234-1234-1234-123456789abc")
    );
    assert_eq!(after.created_at, at(0));
    assert_eq!(after.updated_at, at(10));
    assert!(!after.conflicting_terminals);
    let statuses: Vec<String> = store
        .list_events("m-late")
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.status)
        .collect();
    assert_eq!(statuses, vec!["success", "processing"], "arrival order");
}

async fn concurrent_batches_with_overlapping_keys_store_each_key_once(db: TestDatabase) {
    const WRITERS: usize = 6;
    const RUNS: usize = 12;
    let store = open(&db).await;
    let mut bodies = Vec::new();
    for n in 0..RUNS {
        for status in ["processing", "success"] {
            bodies.push(callback(&format!("m-race-{n:02}"), status, json!({})));
        }
    }
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        // Each writer sends every key, starting at a different place, so that their
        // transactions meet on the same rows in different orders.
        let mut batch: Vec<Delivery> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| delivery(body, (writer * 100 + i) as i64))
            .collect();
        batch.rotate_left(writer * 5 % bodies.len());
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let outcomes = store.record_deliveries(&batch).await.expect("recorded");
            batch
                .iter()
                .zip(outcomes)
                .map(|(d, outcome)| ((d.message_id.clone(), d.status.clone()), outcome))
                .collect::<Vec<_>>()
        }));
    }
    let mut firsts: HashMap<(String, String), usize> = HashMap::new();
    for task in tasks {
        for (key, outcome) in task.await.unwrap() {
            assert!(!outcome.body_differs && !outcome.conflicting_terminal);
            *firsts.entry(key).or_default() += usize::from(!outcome.duplicate);
        }
    }
    assert_eq!(firsts.len(), RUNS * 2);
    assert!(
        firsts.values().all(|&count| count == 1),
        "exactly one writer stored each key: {firsts:?}"
    );
    for n in 0..RUNS {
        let message_id = format!("m-race-{n:02}");
        let events = store.list_events(&message_id).await.unwrap();
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.duplicates == (WRITERS - 1) as i64));
        assert_eq!(run(&store, &message_id).await.status, "success");
    }
}

async fn an_absurd_expiry_does_not_fail_its_batch(db: TestDatabase) {
    let store = open(&db).await;
    // Signed, so authentic, but far outside what a database's time type holds.
    let absurd = callback(
        "m-absurd",
        "processing",
        json!({"expires_at": -8_100_000_000_000_000_i64}),
    );
    let ordinary = callback("m-ordinary", "processing", json!({}));
    let outcomes = store
        .record_deliveries(&[delivery(&absurd, 0), delivery(&ordinary, 1)])
        .await
        .expect("one odd callback must not fail the others");
    assert_eq!(outcomes, vec![NEW, NEW]);
    assert_eq!(run(&store, "m-absurd").await.expires_at, None);
    let events = store.list_events("m-absurd").await.unwrap();
    assert_eq!(events[0].payload.get(), absurd, "the raw body still has it");
}

fn triggered(message_id: &str, millis: i64, params: Option<&str>) -> TriggeredRun {
    TriggeredRun {
        message_id: message_id.into(),
        workflow_id: "wf-triggered".into(),
        workflow_params: params.map(str::to_owned),
        created_at: at(millis),
    }
}

async fn a_triggered_run_and_its_callbacks_meet_in_either_order(db: TestDatabase) {
    let store = open(&db).await;
    // Trigger first, then its callbacks.
    store
        .record_triggered_run(&triggered("m-trig", 0, Some(r#"{"year": 2024}"#)))
        .await
        .unwrap();
    let submitted = run(&store, "m-trig").await;
    assert_eq!(submitted.status, "submitted");
    assert!(submitted.triggered_here);
    assert_eq!(submitted.workflow_id.as_deref(), Some("wf-triggered"));
    assert_eq!(submitted.completed_at, None);
    let params: Value = serde_json::from_str(submitted.workflow_params.unwrap().get()).unwrap();
    assert_eq!(params, json!({"year": 2024}));
    let processing = callback("m-trig", "processing", json!({}));
    let success = callback("m-trig", "success", json!({"result": {}}));
    store
        .record_deliveries(&[delivery(&processing, 10)])
        .await
        .unwrap();
    store
        .record_deliveries(&[delivery(&success, 20)])
        .await
        .unwrap();
    let done = run(&store, "m-trig").await;
    assert_eq!(done.status, "success");
    assert!(done.triggered_here);
    assert_eq!(done.created_at, at(0));
    assert_eq!(done.completed_at, Some(at(20)));
    assert_eq!(done.workflow_id.as_deref(), Some("wf-triggered"));

    // The race: Nen's callbacks land before the 202 that started the run is recorded.
    let processing = callback("m-race", "processing", json!({}));
    let success = callback("m-race", "success", json!({"result": {}}));
    store
        .record_deliveries(&[delivery(&processing, 10), delivery(&success, 20)])
        .await
        .unwrap();
    store
        .record_triggered_run(&triggered("m-race", 5, None))
        .await
        .unwrap();
    let raced = run(&store, "m-race").await;
    assert_eq!(raced.status, "success", "triggering never moves a run back");
    assert!(raced.triggered_here);
    assert_eq!(raced.created_at, at(5), "the earliest moment wins");
    assert_eq!(raced.completed_at, Some(at(20)));
    assert_eq!(raced.updated_at, at(20));
    assert_eq!(
        raced.workflow_id.as_deref(),
        Some("12345678-1234-1234-1234-123456789abc"),
        "a workflow_id already known is kept"
    );
    assert!(raced.workflow_params.is_none());
    // A run recorded after its first callback keeps the callback's created_at.
    store
        .record_deliveries(&[delivery(&callback("m-slow", "processing", json!({})), 0)])
        .await
        .unwrap();
    store
        .record_triggered_run(&triggered("m-slow", 50, None))
        .await
        .unwrap();
    let slow = run(&store, "m-slow").await;
    assert_eq!(
        (slow.status.as_str(), slow.created_at),
        ("processing", at(0))
    );
    assert!(slow.triggered_here);
}

fn claim(key: &str, request: &str, now: i64) -> IdempotencyClaim {
    IdempotencyClaim {
        key: key.into(),
        request_sha256: Sha256::digest(request.as_bytes()).into(),
        now: at(now),
        expires_at: at(now) + Duration::hours(24),
    }
}

async fn idempotency_keys_claim_replay_conflict_release_and_expire(db: TestDatabase) {
    let store = open(&db).await;
    let answer = StoredResponse {
        status: 202,
        body: r#"{"message_id":"m-1"}"#.into(),
    };
    assert_eq!(
        store
            .claim_idempotency_key(&claim("k1", "a", 0))
            .await
            .unwrap(),
        ClaimOutcome::Claimed
    );
    assert_eq!(
        store
            .claim_idempotency_key(&claim("k1", "a", 1))
            .await
            .unwrap(),
        ClaimOutcome::InProgress
    );
    assert_eq!(
        store
            .claim_idempotency_key(&claim("k1", "b", 1))
            .await
            .unwrap(),
        ClaimOutcome::Conflict
    );
    store.complete_idempotency_key("k1", &answer).await.unwrap();
    assert_eq!(
        store
            .claim_idempotency_key(&claim("k1", "a", 2))
            .await
            .unwrap(),
        ClaimOutcome::Completed(answer.clone())
    );
    assert_eq!(
        store
            .claim_idempotency_key(&claim("k1", "b", 2))
            .await
            .unwrap(),
        ClaimOutcome::Conflict
    );
    // A completed key is not released by a late failure.
    store.release_idempotency_key("k1").await.unwrap();
    assert_eq!(
        store
            .claim_idempotency_key(&claim("k1", "a", 3))
            .await
            .unwrap(),
        ClaimOutcome::Completed(answer.clone())
    );
    // A released claim may be tried again, even with another request.
    assert_eq!(
        store
            .claim_idempotency_key(&claim("k2", "a", 0))
            .await
            .unwrap(),
        ClaimOutcome::Claimed
    );
    store.release_idempotency_key("k2").await.unwrap();
    assert_eq!(
        store
            .claim_idempotency_key(&claim("k2", "b", 1))
            .await
            .unwrap(),
        ClaimOutcome::Claimed
    );
    // After expiry the key is free for anything.
    let after_expiry = 24 * 3600 * 1000 + 1;
    assert_eq!(
        store
            .claim_idempotency_key(&claim("k1", "b", after_expiry))
            .await
            .unwrap(),
        ClaimOutcome::Claimed
    );
    assert_eq!(
        store
            .claim_idempotency_key(&claim("k1", "a", after_expiry + 1))
            .await
            .unwrap(),
        ClaimOutcome::Conflict
    );
}

async fn concurrent_claims_of_one_key_give_exactly_one_claimed(db: TestDatabase) {
    const CLAIMS: usize = 16;
    let store = open(&db).await;
    let barrier = Arc::new(Barrier::new(CLAIMS));
    let mut tasks = Vec::new();
    for _ in 0..CLAIMS {
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store
                .claim_idempotency_key(&claim("k-race", "same request", 0))
                .await
                .expect("the store answers")
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    let claimed = outcomes
        .iter()
        .filter(|o| **o == ClaimOutcome::Claimed)
        .count();
    assert_eq!(claimed, 1, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, ClaimOutcome::Claimed | ClaimOutcome::InProgress)));
}

/// Walks every page of a listing; returns the message ids in the order they came.
async fn walk(store: &Arc<dyn Store>, mut query: RunQuery) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let page = store.list_runs(&query).await.unwrap();
        assert!(page.runs.len() <= query.limit as usize);
        seen.extend(page.runs.into_iter().map(|run| run.message_id));
        match page.next {
            Some(next) => query.after = Some(next),
            None => return seen,
        }
    }
}

async fn pagination_walks_every_run_once_newest_first(db: TestDatabase) {
    const RUNS: usize = 137;
    let store = open(&db).await;
    let workflow = |n: usize| if n.is_multiple_of(3) { "wf-a" } else { "wf-b" };
    let status = |n: usize| {
        if n.is_multiple_of(2) {
            "success"
        } else {
            "processing"
        }
    };
    let name = |n: usize| format!("m-page-{n:03}");
    let all: Vec<usize> = (0..RUNS).collect();
    // Several batches, oldest first.
    for chunk in all.chunks(25) {
        let batch: Vec<Delivery> = chunk
            .iter()
            .map(|&n| {
                let body =
                    json!({"message_id": name(n), "status": status(n), "workflow_id": workflow(n)});
                delivery(&body.to_string(), n as i64)
            })
            .collect();
        store.record_deliveries(&batch).await.unwrap();
    }
    let newest_first = |keep: &dyn Fn(usize) -> bool| -> Vec<String> {
        all.iter()
            .rev()
            .copied()
            .filter(|&n| keep(n))
            .map(name)
            .collect()
    };
    let query = |workflow_id: Option<&str>, status: Option<&str>| RunQuery {
        workflow_id: workflow_id.map(str::to_owned),
        status: status.map(str::to_owned),
        limit: 10,
        after: None,
    };
    assert_eq!(
        walk(&store, query(None, None)).await,
        newest_first(&|_| true)
    );
    assert_eq!(
        walk(&store, query(Some("wf-a"), None)).await,
        newest_first(&|n| workflow(n) == "wf-a")
    );
    assert_eq!(
        walk(&store, query(None, Some("processing"))).await,
        newest_first(&|n| status(n) == "processing")
    );
    assert_eq!(
        walk(&store, query(Some("wf-b"), Some("success"))).await,
        newest_first(&|n| workflow(n) == "wf-b" && status(n) == "success")
    );
    assert!(walk(&store, query(Some("wf-none"), None)).await.is_empty());

    // Runs that arrive during a walk neither shift nor repeat the rest of it.
    let first = store.list_runs(&query(None, None)).await.unwrap();
    let mut seen: Vec<String> = first
        .runs
        .iter()
        .map(|run| run.message_id.clone())
        .collect();
    let late = delivery(&callback("m-page-late", "processing", json!({})), 1000);
    store.record_deliveries(&[late]).await.unwrap();
    let mut rest = query(None, None);
    rest.after = first.next;
    seen.extend(walk(&store, rest).await);
    assert_eq!(seen, newest_first(&|_| true));
    let fresh = store.list_runs(&query(None, None)).await.unwrap();
    assert_eq!(fresh.runs[0].message_id, "m-page-late");
    // A page that ends exactly at the last run says so.
    let exact = store
        .list_runs(&RunQuery {
            limit: (RUNS + 1) as u32,
            ..query(None, None)
        })
        .await
        .unwrap();
    assert_eq!(
        (exact.runs.len(), exact.next),
        (RUNS + 1, None::<RunCursor>)
    );
}

/// What `rejected_payloads` holds, read straight from the database.
async fn rejected_rows(db: &TestDatabase) -> Vec<(String, String, Vec<u8>)> {
    let sql = "select key_id, reason, body from rejected_payloads order by id";
    match db.backend {
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_as(sql)
                .fetch_all(&mut connection)
                .await
                .unwrap()
        }
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_as(sql)
                .fetch_all(&mut connection)
                .await
                .unwrap()
        }
    }
}

async fn rejected_payloads_are_kept_byte_for_byte(db: TestDatabase) {
    let store = open(&db).await;
    let bodies: [&[u8]; 2] = [b"not json", b"\xff\xfe{\"binary\": true}"];
    for body in bodies {
        store
            .record_rejected_payload(&RejectedPayload {
                raw_body: Bytes::copy_from_slice(body),
                key_id: "key-1".into(),
                reason: "the body is not valid JSON".into(),
                received_at: at(0),
            })
            .await
            .unwrap();
    }
    let rows = rejected_rows(&db).await;
    let stored: Vec<&[u8]> = rows.iter().map(|(_, _, body)| body.as_slice()).collect();
    assert_eq!(stored, bodies.to_vec());
    assert!(rows
        .iter()
        .all(|(key, reason, _)| key == "key-1" && reason == "the body is not valid JSON"));
}

/// Runs the first migration only, as a database created before the later ones would be.
async fn apply_first_migration_and(db: &TestDatabase, sql: &str) {
    match db.backend {
        Backend::Postgres => {
            let mut first = sqlx::migrate!("migrations/postgres");
            first.migrations = first.migrations[..1].to_vec().into();
            let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
            first.run(&mut connection).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut connection).await.unwrap();
        }
        Backend::Sqlite => {
            let mut first = sqlx::migrate!("migrations/sqlite");
            first.migrations = first.migrations[..1].to_vec().into();
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(&db.url)
                .unwrap()
                .create_if_missing(true);
            let mut connection = sqlx::SqliteConnection::connect_with(&options)
                .await
                .unwrap();
            first.run(&mut connection).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut connection).await.unwrap();
        }
    }
}

async fn a_database_from_the_first_schema_upgrades_with_its_data(db: TestDatabase) {
    // A run with a stored conflict, written the way the first schema kept it.
    let (yes, no, time) = match db.backend {
        Backend::Postgres => ("true", "false", "'2025-10-09T08:53:20Z'"),
        Backend::Sqlite => ("1", "0", "'2025-10-09T08:53:20.000000000Z'"),
    };
    let hash = |byte: &str| match db.backend {
        Backend::Postgres => format!("decode('{}', 'hex')", byte.repeat(32)),
        Backend::Sqlite => format!("x'{}'", byte.repeat(32)),
    };
    let (first, second) = (hash("00"), hash("01"));
    let old_rows = format!(
        "insert into runs (message_id, workflow_id, status, status_rank, created_at, \
                           updated_at, completed_at, conflicting_terminals) \
         values ('m-old', 'w', 'success', 2, {time}, {time}, {time}, {yes}); \
         insert into events (message_id, status, received_at, last_received_at, payload, \
                             body_sha256, key_id, conflicting_terminal) \
         values ('m-old', 'success', {time}, {time}, '{{\"status\":\"success\"}}', \
                 {first}, 'key-1', {no}), \
                ('m-old', 'failed', {time}, {time}, '{{\"status\":\"failed\"}}', \
                 {second}, 'key-1', {yes});"
    );
    apply_first_migration_and(&db, &old_rows).await;

    let store = open(&db).await;
    let run = run(&store, "m-old").await;
    assert_eq!(
        (run.status.as_str(), run.conflicting_terminals),
        ("success", true)
    );
    let events = store.list_events("m-old").await.unwrap();
    let flags: HashMap<&str, (bool, &str)> = events
        .iter()
        .map(|e| (e.status.as_str(), (e.conflicting_terminal, e.payload.get())))
        .collect();
    assert_eq!(
        flags,
        HashMap::from([
            ("success", (false, r#"{"status":"success"}"#)),
            ("failed", (true, r#"{"status":"failed"}"#)),
        ])
    );
    // A stored event is still found by deduplication (its stored hash is not this body's).
    let copy = callback("m-old", "success", json!({}));
    assert_eq!(
        store
            .record_deliveries(&[delivery(&copy, 0)])
            .await
            .unwrap(),
        vec![DIFFERING_REPEAT]
    );
    // And the upgraded store keeps writing.
    let processing = callback("m-new", "processing", json!({}));
    assert_eq!(
        store
            .record_deliveries(&[delivery(&processing, 0)])
            .await
            .unwrap(),
        vec![NEW]
    );
}

/// Runs `sql` on the test database directly, as an operator or another program might.
async fn execute(db: &TestDatabase, sql: &str) {
    match db.backend {
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut connection).await.unwrap();
        }
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut connection).await.unwrap();
        }
    }
}

/// This service only stores payloads that parsed as JSON, but a row written some other way
/// must not make the read endpoints fail: such text is served as a JSON string.
async fn a_stored_payload_that_is_not_json_is_still_readable(db: TestDatabase) {
    let app = crate::support::TestApp::spawn(db).await;
    for (id, status) in [
        ("m-a", "processing"),
        ("m-b", "processing"),
        ("m-c", "success"),
    ] {
        app.deliver_ok(&callback(id, status, json!({"result": {"ok": true}})))
            .await;
    }
    let odd = [
        "",
        "{\"message_id\":\"m-b\",\"status\":",
        "caf\u{e9} \u{fffd}",
    ];
    execute(
        &app.db,
        &format!(
            "update events set payload = '{}' where message_id = 'm-a'; \
             update events set payload = '{}' where message_id = 'm-b'; \
             update events set payload = '{}' where message_id = 'm-c';",
            odd[0], odd[1], odd[2]
        ),
    )
    .await;
    for (id, text) in ["m-a", "m-b", "m-c"].into_iter().zip(odd) {
        let response = app.get(&format!("/v1/runs/{id}/events")).await;
        assert_eq!(response.status(), reqwest::StatusCode::OK, "{id}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["events"][0]["payload"], json!(text), "{id}");
    }
    // The run's own JSON columns need no such test: jsonb on PostgreSQL, and a json_valid
    // CHECK on SQLite, refuse anything else.
    assert_eq!(app.run("m-c").await["result"], json!({"ok": true}));
}

/// An SQLite text column holds whatever bytes another program wrote into it; one that is not
/// UTF-8 must not make a read endpoint fail: it is read with U+FFFD in place of the bad bytes.
/// PostgreSQL refuses such text on the way in, so there the odd row is Latin-1 text converted.
async fn stored_text_that_is_not_utf8_is_still_readable(db: TestDatabase) {
    let app = crate::support::TestApp::spawn(db).await;
    for id in ["m-latin1", "m-other"] {
        app.deliver_ok(&callback(id, "failed", json!({"error": "boom"})))
            .await;
    }
    // `caf\xe9` and `\xff\xfe`: Latin-1 and bytes no UTF-8 text holds.
    let (odd, expected) = match app.db.backend {
        Backend::Sqlite => (
            ["cast(x'636166e9' as text)", "cast(x'fffe' as text)"],
            ["caf\u{fffd}", "\u{fffd}\u{fffd}"],
        ),
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
            let refused =
                sqlx::query("update runs set error = convert_from('\\xfffe'::bytea, 'UTF8')")
                    .execute(&mut connection)
                    .await;
            assert!(refused.is_err(), "PostgreSQL stored text that is not UTF-8");
            (
                [
                    "convert_from('\\x636166e9'::bytea, 'LATIN1')",
                    "convert_from('\\xfffe'::bytea, 'LATIN1')",
                ],
                ["caf\u{e9}", "\u{ff}\u{fe}"],
            )
        }
    };
    execute(
        &app.db,
        &format!(
            "update runs set error = {0}, assets_url = {1}, workflow_id = {0} \
               where message_id = 'm-latin1'; \
             update runs set message_id = {1} where message_id = 'm-other'; \
             {2} \
             update events set payload = {0}, key_id = {1} where message_id = 'm-latin1';",
            odd[0],
            odd[1],
            // SQLite keeps times as text: one no program should have written is still read.
            if app.db.backend == Backend::Sqlite {
                "update runs set updated_at = 'yesterday' where message_id = 'm-latin1';"
            } else {
                ""
            }
        ),
    )
    .await;
    let run = app.run("m-latin1").await;
    assert_eq!(run["error"], json!(expected[0]));
    assert_eq!(run["assets_url"], json!(expected[1]));
    assert_eq!(run["workflow_id"], json!(expected[0]));
    let events = app.events("m-latin1").await;
    assert_eq!(events[0]["payload"], json!(expected[0]));
    let listing = app.get_json("/v1/runs?limit=10").await;
    let ids: Vec<&str> = listing["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["message_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&expected[1]), "{ids:?}");
    assert!(ids.contains(&"m-latin1"), "{ids:?}");
}

async fn unknown_runs_are_absent_and_the_store_answers(db: TestDatabase) {
    let store = open(&db).await;
    store.ping().await.unwrap();
    assert!(store.get_run("m-unknown").await.unwrap().is_none());
    assert!(store.list_events("m-unknown").await.unwrap().is_empty());
    let page = store
        .list_runs(&RunQuery {
            limit: 10,
            ..RunQuery::default()
        })
        .await
        .unwrap();
    assert!(page.runs.is_empty() && page.next.is_none());
    // Opening an already migrated database again is harmless.
    drop(store);
    let again = open(&db).await;
    again.ping().await.unwrap();
}

/// The steps of a random history, applied alike to both stores.
mod random_history {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::support::backends::fresh_database;

    /// Runs per history: few, so that statuses of one run meet often.
    const RUNS: usize = 3;
    const STATUSES: [&str; 5] = ["submitted", "processing", "success", "failed", "timeout"];
    /// Arrival times are drawn from this many seconds, so that they come in any order.
    const SLOTS: i64 = 50;

    #[derive(Debug, Clone)]
    struct RandomCallback {
        run: usize,
        status: &'static str,
        /// Which body: 0 bare, 1 and 2 with different workflow_id, expiry, result, assets, error.
        variant: u8,
        slot: i64,
    }

    #[derive(Debug, Clone)]
    enum Step {
        Deliver(Vec<RandomCallback>),
        Trigger {
            run: usize,
            with_params: bool,
            slot: i64,
        },
        Claim {
            key: u8,
            request: u8,
            slot: i64,
        },
        Complete {
            key: u8,
        },
        Release {
            key: u8,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        let callback = (
            0..RUNS,
            prop::sample::select(STATUSES.to_vec()),
            0..3u8,
            0..SLOTS,
        )
            .prop_map(|(run, status, variant, slot)| RandomCallback {
                run,
                status,
                variant,
                slot,
            });
        prop_oneof![
            8 => prop::collection::vec(callback, 1..8).prop_map(Step::Deliver),
            1 => (0..RUNS, any::<bool>(), 0..SLOTS)
                .prop_map(|(run, with_params, slot)| Step::Trigger { run, with_params, slot }),
            1 => (0..2u8, 0..2u8, 0..SLOTS)
                .prop_map(|(key, request, slot)| Step::Claim { key, request, slot }),
            1 => (0..2u8).prop_map(|key| Step::Complete { key }),
            1 => (0..2u8).prop_map(|key| Step::Release { key }),
        ]
    }

    /// One history's names, apart from every other history's in the same databases.
    struct Names(String);

    impl Names {
        fn run(&self, run: usize) -> String {
            format!("{}-run-{run}", self.0)
        }
        fn workflow(&self, which: &str) -> String {
            format!("{}-wf-{which}", self.0)
        }
        fn key(&self, key: u8) -> String {
            format!("{}-key-{key}", self.0)
        }

        fn body(&self, callback: &RandomCallback) -> String {
            let mut body = json!({"message_id": self.run(callback.run), "status": callback.status});
            let extra = match callback.variant {
                0 => json!({}),
                1 => json!({
                    "workflow_id": self.workflow("a"), "expires_at": 1_900_000_000,
                    "result": {"variant": 1}, "assets": "https://assets.example/1.zip"
                }),
                _ => json!({
                    "workflow_id": self.workflow("b"), "expires_at": 1_900_000_100,
                    "result": [2], "error": "boom"
                }),
            };
            if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
                body.extend(extra.clone());
            }
            body.to_string()
        }
    }

    fn failed(error: impl std::fmt::Display) -> TestCaseError {
        TestCaseError::fail(error.to_string())
    }

    /// A run as JSON (stored JSON parsed, so that jsonb's spacing does not count), without its
    /// listing position, which each backend numbers its own way.
    async fn run_as_json(store: &Arc<dyn Store>, message_id: &str) -> Result<Value, TestCaseError> {
        let run = store.get_run(message_id).await.map_err(failed)?;
        serde_json::to_value(run).map_err(failed)
    }

    /// A run's events, payloads byte for byte.
    async fn events_of(
        store: &Arc<dyn Store>,
        message_id: &str,
    ) -> Result<Vec<(String, String, i64, i64, bool, String, String)>, TestCaseError> {
        let events = store.list_events(message_id).await.map_err(failed)?;
        Ok(events
            .into_iter()
            .map(|e| {
                let times = format!("{} {}", e.received_at, e.last_received_at);
                let counts = (e.duplicates, e.differing_duplicates, e.conflicting_terminal);
                let payload = e.payload.get().to_owned();
                (
                    e.status, times, counts.0, counts.1, counts.2, e.key_id, payload,
                )
            })
            .collect())
    }

    /// Every page of a listing, as message ids.
    async fn listing(
        store: &Arc<dyn Store>,
        mut query: RunQuery,
    ) -> Result<Vec<String>, TestCaseError> {
        let mut seen = Vec::new();
        loop {
            let page = store.list_runs(&query).await.map_err(failed)?;
            seen.extend(page.runs.into_iter().map(|run| run.message_id));
            match page.next {
                Some(next) => query.after = Some(next),
                None => return Ok(seen),
            }
        }
    }

    async fn apply_to_both(
        stores: [&Arc<dyn Store>; 2],
        names: &Names,
        steps: &[Step],
    ) -> Result<(), TestCaseError> {
        // Arrival instants are unique within a history: a slot's second plus a sequence number.
        let mut sequence = 0;
        for step in steps {
            match step {
                Step::Deliver(callbacks) => {
                    let batch: Vec<Delivery> = callbacks
                        .iter()
                        .map(|callback| {
                            sequence += 1;
                            delivery(&names.body(callback), callback.slot * 1000 + sequence)
                        })
                        .collect();
                    let postgres = stores[0].record_deliveries(&batch).await.map_err(failed)?;
                    let sqlite = stores[1].record_deliveries(&batch).await.map_err(failed)?;
                    prop_assert_eq!(postgres, sqlite, "outcomes of {:?}", callbacks);
                }
                Step::Trigger {
                    run,
                    with_params,
                    slot,
                } => {
                    let triggered = TriggeredRun {
                        message_id: names.run(*run),
                        workflow_id: names.workflow("started"),
                        workflow_params: with_params.then(|| r#"{"year": 2024}"#.to_owned()),
                        created_at: at(slot * 1000),
                    };
                    for store in stores {
                        store
                            .record_triggered_run(&triggered)
                            .await
                            .map_err(failed)?;
                    }
                }
                Step::Claim { key, request, slot } => {
                    let claim = IdempotencyClaim {
                        key: names.key(*key),
                        request_sha256: Sha256::digest([*request]).into(),
                        now: at(slot * 1000),
                        // Short-lived, so that later claims find some keys expired.
                        expires_at: at(slot * 1000 + 10_000),
                    };
                    let postgres = stores[0]
                        .claim_idempotency_key(&claim)
                        .await
                        .map_err(failed)?;
                    let sqlite = stores[1]
                        .claim_idempotency_key(&claim)
                        .await
                        .map_err(failed)?;
                    prop_assert_eq!(postgres, sqlite, "claim of {:?}", step);
                }
                Step::Complete { key } => {
                    let answer = StoredResponse {
                        status: 202,
                        body: format!(r#"{{"key":{key}}}"#),
                    };
                    for store in stores {
                        let key = names.key(*key);
                        store
                            .complete_idempotency_key(&key, &answer)
                            .await
                            .map_err(failed)?;
                    }
                }
                Step::Release { key } => {
                    for store in stores {
                        store
                            .release_idempotency_key(&names.key(*key))
                            .await
                            .map_err(failed)?;
                    }
                }
            }
        }
        for run in 0..RUNS {
            let message_id = names.run(run);
            let postgres = run_as_json(stores[0], &message_id).await?;
            let sqlite = run_as_json(stores[1], &message_id).await?;
            prop_assert_eq!(postgres, sqlite, "run {}", message_id);
            let postgres = events_of(stores[0], &message_id).await?;
            let sqlite = events_of(stores[1], &message_id).await?;
            prop_assert_eq!(postgres, sqlite, "events of {}", message_id);
        }
        // Every filter combination, in short pages; the status filter spans every history so far.
        let mut queries = Vec::new();
        for workflow in ["a", "b", "started"] {
            for status in [None, Some("success"), Some("processing")] {
                queries.push(RunQuery {
                    workflow_id: Some(names.workflow(workflow)),
                    status: status.map(str::to_owned),
                    limit: 2,
                    after: None,
                });
            }
        }
        for status in STATUSES {
            queries.push(RunQuery {
                status: Some(status.to_owned()),
                limit: 25,
                ..RunQuery::default()
            });
        }
        for query in queries {
            let postgres = listing(stores[0], query.clone()).await?;
            let sqlite = listing(stores[1], query.clone()).await?;
            prop_assert_eq!(postgres, sqlite, "listing {:?}", query);
        }
        let newest = RunQuery {
            limit: 20,
            ..RunQuery::default()
        };
        let postgres = stores[0].list_runs(&newest).await.map_err(failed)?;
        let sqlite = stores[1].list_runs(&newest).await.map_err(failed)?;
        let ids = |page: RunPage| -> Vec<String> {
            page.runs.into_iter().map(|run| run.message_id).collect()
        };
        prop_assert_eq!(ids(postgres), ids(sqlite), "newest runs");
        Ok(())
    }

    /// The PostgreSQL store implements two of the batch rules in SQL, the SQLite store runs them
    /// in Rust: the same random histories (repeats, statuses out of order, conflicting
    /// terminals, differing bodies, triggers, idempotency keys) must leave both with the same
    /// answers, runs, events and listings. `PROPTEST_CASES` sets how many histories (default 32).
    #[test]
    fn postgres_and_sqlite_agree_on_random_histories() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        // Named with `postgres` so that `cargo test -- --skip postgres` leaves it out too.
        let (postgres_db, sqlite_db) = runtime.block_on(async {
            (
                fresh_database(Backend::Postgres).await,
                fresh_database(Backend::Sqlite).await,
            )
        });
        let (postgres, sqlite) =
            runtime.block_on(async { (open(&postgres_db).await, open(&sqlite_db).await) });
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(32);
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let history = AtomicUsize::new(0);
        let steps = prop::collection::vec(step(), 1..7);
        let result = runner.run(&steps, |steps| {
            let names = Names(format!("h{}", history.fetch_add(1, Ordering::Relaxed)));
            runtime.block_on(apply_to_both([&postgres, &sqlite], &names, &steps))
        });
        if let Err(failure) = result {
            panic!("the stores disagree: {failure}");
        }
    }
}

on_both_backends!(
    identical_deliveries_in_one_batch_make_one_event,
    processing_and_success_in_one_batch_end_at_success,
    a_conflicting_terminal_is_flagged_and_never_wins,
    a_differing_duplicate_is_flagged_and_counted,
    only_new_events_move_a_run_when_a_batch_mixes_in_repeats,
    a_batch_wider_than_one_statement_is_recorded_whole,
    fields_the_winner_lacks_come_from_the_first_new_event_in_its_batch,
    a_late_processing_never_regresses_but_fills_gaps,
    concurrent_batches_with_overlapping_keys_store_each_key_once,
    an_absurd_expiry_does_not_fail_its_batch,
    a_triggered_run_and_its_callbacks_meet_in_either_order,
    idempotency_keys_claim_replay_conflict_release_and_expire,
    concurrent_claims_of_one_key_give_exactly_one_claimed,
    pagination_walks_every_run_once_newest_first,
    rejected_payloads_are_kept_byte_for_byte,
    unknown_runs_are_absent_and_the_store_answers,
    a_database_from_the_first_schema_upgrades_with_its_data,
    a_stored_payload_that_is_not_json_is_still_readable,
    stored_text_that_is_not_utf8_is_still_readable,
);
