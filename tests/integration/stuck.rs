//! Stuck runs: not terminal and unchanged for longer than `runs.stuck_after`. Shown on each run,
//! listed with `?stuck=true` (keyset-paged), counted for the gauge.
//!
//! A run is made old by setting its `updated_at` in the database: no waiting for the clock.

use std::time::Duration;

use chrono::Utc;
use nen_relay::store::{self, Delivery};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::on_both_backends;
use crate::support::app::callback;
use crate::support::metrics::sample;
use crate::support::process::RelayProcess;
use crate::support::stored::set_updated_at;
use crate::support::{TestApp, TestDatabase};

/// Older than the default `stuck_after` (1h).
fn two_hours_ago() -> chrono::DateTime<Utc> {
    Utc::now() - chrono::Duration::hours(2)
}

fn ids(page: &Value) -> Vec<String> {
    page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["message_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn a_run_unchanged_past_stuck_after_is_stuck(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    for (id, status) in [
        ("m-quiet", "processing"),
        ("m-waiting", "submitted"),
        ("m-recent", "processing"),
        ("m-finished", "success"),
    ] {
        app.deliver_ok(&callback(id, status, json!({}))).await;
    }
    for id in ["m-quiet", "m-waiting", "m-finished"] {
        set_updated_at(&app.db, id, two_hours_ago()).await;
    }
    for (id, stuck) in [
        ("m-quiet", true),
        ("m-waiting", true),
        ("m-recent", false),
        ("m-finished", false),
    ] {
        assert_eq!(app.run(id).await["stuck"], stuck, "{id}");
    }
    // The same in listings and in a wait's answer.
    let listed = app.get_json("/v1/runs").await;
    for run in listed["runs"].as_array().unwrap() {
        let stuck = matches!(run["message_id"].as_str(), Some("m-quiet" | "m-waiting"));
        assert_eq!(run["stuck"], stuck, "{run}");
    }
    let waited = app.get_json("/v1/runs/m-quiet?wait=1").await;
    assert_eq!(waited["stuck"], true);
    // A callback un-sticks it.
    app.deliver_ok(&callback("m-quiet", "success", json!({})))
        .await;
    assert_eq!(app.run("m-quiet").await["stuck"], false);
}

async fn stuck_true_lists_only_stuck_runs_newest_first_in_pages(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let mut stuck = Vec::new();
    for i in 0..7 {
        let id = format!("m-stuck-{i}");
        let workflow = if i % 2 == 0 { "wf-even" } else { "wf-odd" };
        app.deliver_ok(&callback(
            &id,
            "processing",
            json!({"workflow_id": workflow}),
        ))
        .await;
        set_updated_at(&app.db, &id, two_hours_ago()).await;
        stuck.push((id, workflow));
        // Runs that are not stuck, in between.
        app.deliver_ok(&callback(&format!("m-fresh-{i}"), "processing", json!({})))
            .await;
        let done = format!("m-done-{i}");
        app.deliver_ok(&callback(&done, "failed", json!({}))).await;
        set_updated_at(&app.db, &done, two_hours_ago()).await;
    }
    let (mut listed, mut cursor, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/v1/runs?stuck=true&limit=3&cursor={cursor}"),
            None => "/v1/runs?stuck=true&limit=3".to_owned(),
        };
        let page = app.get_json(&path).await;
        pages += 1;
        assert!(page["runs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|run| run["stuck"] == true));
        listed.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(pages < 10, "the listing ends");
    }
    let newest_first: Vec<String> = stuck.iter().rev().map(|(id, _)| id.clone()).collect();
    assert_eq!(listed, newest_first);
    assert_eq!(pages, 3);

    let even = app
        .get_json("/v1/runs?stuck=true&workflow_id=wf-even")
        .await;
    let expected: Vec<String> = stuck
        .iter()
        .rev()
        .filter(|(_, workflow)| *workflow == "wf-even")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(ids(&even), expected);
    let terminal = app.get_json("/v1/runs?stuck=true&status=failed").await;
    assert_eq!(
        ids(&terminal),
        Vec::<String>::new(),
        "a terminal run is never stuck"
    );

    for bad in ["false", "yes", "1"] {
        let response = app.get(&format!("/v1/runs?stuck={bad}")).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "stuck={bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request");
        assert!(
            body["message"].as_str().unwrap().contains("stuck"),
            "{body}"
        );
    }
}

fn delivery(message_id: &str, status: &str) -> Delivery {
    let body = callback(message_id, status, json!({}));
    let parsed = nen_relay::callbacks::payload::parse_callback(body.as_bytes()).unwrap();
    Delivery::verified(body.into(), parsed, "k-test", Utc::now())
}

async fn stuck_runs_are_counted_up_to_the_cap(db: TestDatabase) {
    let url = secrecy::SecretString::from(db.url.clone());
    let store = store::connect(&url, &store::StoreOptions::default(), true)
        .await
        .unwrap();
    let deliveries: Vec<Delivery> = (0..5)
        .map(|i| delivery(&format!("m-count-{i}"), "processing"))
        .chain([delivery("m-count-done", "success")])
        .collect();
    store.record_deliveries(&deliveries).await.unwrap();
    for i in 0..4 {
        set_updated_at(&db, &format!("m-count-{i}"), two_hours_ago()).await;
    }
    set_updated_at(&db, "m-count-done", two_hours_ago()).await;
    let cutoff = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(store.count_stuck_runs(cutoff, 100).await.unwrap(), 4);
    assert_eq!(
        store.count_stuck_runs(cutoff, 3).await.unwrap(),
        3,
        "capped"
    );
    let long_ago = Utc::now() - chrono::Duration::days(1);
    assert_eq!(store.count_stuck_runs(long_ago, 100).await.unwrap(), 0);
    drop(store);

    // A process of its own, so that the gauge is its figure alone. It counts at start.
    let app = RelayProcess::start(db, &[]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = app.metrics().await;
        if let Some(value) = sample(&page, "nen_relay_runs_stuck", &[]) {
            assert_eq!(value, 4.0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gauge appears:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

on_both_backends!(
    a_run_unchanged_past_stuck_after_is_stuck,
    stuck_true_lists_only_stuck_runs_newest_first_in_pages,
    stuck_runs_are_counted_up_to_the_cap,
);
