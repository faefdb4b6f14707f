//! Several replicas act as one: two real `nen-relay` processes on one PostgreSQL database.
//! Each guarantee README.md lists under "Several replicas" is proven here.
//!
//! PostgreSQL only: SQLite is one process's file. The slow re-read behind `?wait=` is set to an
//! hour, so that only the cross-replica wake can answer a waiter within the test's deadline.

use std::collections::HashSet;
use std::time::Duration;

use fake_nen::{FakeNen, FakeNenOptions};
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::support::app::callback;
use crate::support::backends::fresh_database;
use crate::support::metrics::sample;
use crate::support::process::RelayProcess;
use crate::support::Backend;

/// Generous: every condition here holds within milliseconds when the service is right.
const GUARD: Duration = Duration::from_secs(30);

/// Two replicas of one service on one fresh PostgreSQL database.
async fn two_replicas(variables: &[(&str, String)]) -> (RelayProcess, RelayProcess) {
    let mut variables = variables.to_vec();
    variables.push(("NEN_RELAY_QUERY__WAIT_RECHECK", "1h".to_owned()));
    let db = fresh_database(Backend::Postgres).await;
    let first = RelayProcess::start(db, &variables).await;
    let second = RelayProcess::start_replica_of(&first, &variables).await;
    (first, second)
}

fn start_waiting(replica: &RelayProcess, message_id: &str) -> JoinHandle<Response> {
    let request = replica
        .client
        .get(replica.url(&format!("/v1/runs/{message_id}?wait=60")))
        .bearer_auth(&replica.token);
    tokio::spawn(async move { request.send().await.expect("the replica answers") })
}

/// Returns once `replica` reports `count` requests waiting (its own `/metrics`).
async fn until_waiting(replica: &RelayProcess, count: f64) {
    let deadline = Instant::now() + GUARD;
    loop {
        let page = replica.metrics().await;
        if sample(&page, "nen_relay_run_waiters", &[]) == Some(count) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{count} waiters never registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn delivered(replica: &RelayProcess, body: String) -> Value {
    let response = replica.deliver(&body).await;
    assert_eq!(response.status(), StatusCode::OK, "{body}");
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_one_replica_is_woken_by_a_callback_on_the_other() {
    let (a, b) = two_replicas(&[]).await;
    for (waits_on, delivers_to, id) in [(&a, &b, "m-cross-1"), (&b, &a, "m-cross-2")] {
        delivered(waits_on, callback(id, "processing", json!({}))).await;
        let waiter = start_waiting(waits_on, id);
        until_waiting(waits_on, 1.0).await;
        let delivering = Instant::now();
        delivered(delivers_to, callback(id, "success", json!({}))).await;
        let response = tokio::time::timeout(GUARD, waiter)
            .await
            .expect("woken by the other replica's commit, not by the end of the wait")
            .unwrap();
        // A figure for the record (run with --nocapture), not a condition of the test.
        println!(
            "{id}: answered {:?} after the callback was sent to the other replica",
            delivering.elapsed()
        );
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.json::<Value>().await.unwrap()["status"], "success");
        until_waiting(waits_on, 0.0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_deliveries_spread_over_both_replicas_are_stored_once() {
    let (a, b) = two_replicas(&[]).await;
    let body = callback("m-same", "success", json!({"result": {"ok": true}}));
    let answers = futures::future::join_all((0..40).map(|i| {
        let replica = if i % 2 == 0 { &a } else { &b };
        delivered(replica, body.clone())
    }))
    .await;
    let first_copies = answers
        .iter()
        .filter(|answer| answer["duplicate"] == false)
        .count();
    assert_eq!(first_copies, 1, "exactly one copy is new: {answers:?}");
    for replica in [&a, &b] {
        let events = replica.get_json("/v1/runs/m-same/events").await;
        let events = events["events"].as_array().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["duplicates"], 39);
        assert_eq!(
            replica.get_json("/v1/runs/m-same").await["status"],
            "success"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_whose_callbacks_are_split_across_replicas_end_at_the_right_status() {
    let (a, b) = two_replicas(&[]).await;
    let runs: Vec<(String, &str)> = (0..40)
        .map(|i| {
            let terminal = if i % 3 == 0 { "failed" } else { "success" };
            (format!("m-split-{i}"), terminal)
        })
        .collect();
    // Both callbacks of a run at once, each to another replica: either may commit first.
    let deliveries = runs.iter().enumerate().flat_map(|(i, (id, terminal))| {
        let (early, late) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        [
            delivered(early, callback(id, "processing", json!({}))),
            delivered(late, callback(id, terminal, json!({}))),
        ]
    });
    futures::future::join_all(deliveries).await;
    for (id, terminal) in &runs {
        for replica in [&a, &b] {
            let run = replica.get_json(&format!("/v1/runs/{id}")).await;
            assert_eq!(run["status"], *terminal, "{id}: {run}");
            assert_eq!(run["conflicting_terminals"], false);
            let events = replica.get_json(&format!("/v1/runs/{id}/events")).await;
            assert_eq!(events["events"].as_array().unwrap().len(), 2, "{id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_sent_to_both_at_once_reaches_nen_once() {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let api_key = format!("nen-api-key-{unique}");
    let db = fresh_database(Backend::Postgres).await;
    // The fake calls back with the replicas' secret, which `RelayProcess` makes up: start the
    // first replica, then the fake, then point the second at it too.
    let nen_variables = |base_url: &str| {
        vec![
            ("NEN_API_KEY", api_key.clone()),
            ("NEN_API_BASE_URL", base_url.to_owned()),
            ("NEN_RELAY_QUERY__WAIT_RECHECK", "1h".to_owned()),
        ]
    };
    let fake_address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let a = RelayProcess::start(db, &nen_variables(&format!("http://{fake_address}"))).await;
    let b =
        RelayProcess::start_replica_of(&a, &nen_variables(&format!("http://{fake_address}"))).await;
    let fake = FakeNen::start(
        fake_address,
        FakeNenOptions {
            api_key: Some(api_key.clone()),
            webhook_secret: Some(a.secret.clone()),
            ..FakeNenOptions::default()
        },
    )
    .await
    .unwrap();

    let key = format!("key-{unique}");
    // Its callbacks go to the second replica; the first is asked to wait for the run.
    let body = json!({
        "workflow_id": uuid::Uuid::new_v4().to_string(),
        "workflow_params": {"A": 1},
        "webhook_callback": b.url("/webhooks/nen"),
    });
    let answers = futures::future::join_all((0..10).map(|i| {
        let replica = if i % 2 == 0 { &a } else { &b };
        let request = replica
            .client
            .post(replica.url("/v1/runs"))
            .bearer_auth(&replica.token)
            .header("Idempotency-Key", &key)
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    }))
    .await;
    assert_eq!(fake.requests().len(), 1, "Nen is called once: {answers:?}");
    let mut message_ids = HashSet::new();
    for (status, answer) in &answers {
        match *status {
            StatusCode::ACCEPTED => {
                message_ids.insert(answer["message_id"].as_str().unwrap().to_owned());
            }
            StatusCode::CONFLICT => assert_eq!(answer["error"], "idempotency_in_progress"),
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert_eq!(
        message_ids.len(),
        1,
        "one run, whoever answered: {answers:?}"
    );
    let message_id = message_ids.into_iter().next().unwrap();

    // `nen-relay wait` on the first replica; the callbacks land on the second.
    let waited = tokio::time::timeout(
        GUARD,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_nen-relay"))
            .args(["wait", &message_id, "--timeout", "60s", "--url", &a.address])
            .env_clear()
            .env("NEN_RELAY_TOKEN", &a.token)
            .output(),
    )
    .await
    .expect("the run finishes")
    .unwrap();
    assert_eq!(
        waited.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&waited.stderr)
    );
    let run: Value = serde_json::from_slice(&waited.stdout).unwrap();
    assert_eq!(run["status"], "success");
    assert_eq!(run["triggered_here"], true);
}
