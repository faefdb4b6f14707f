//! The hand-off at SIGTERM: not ready at once, serving on during the delay, then the listener
//! closes, in-flight requests finish, queued callbacks are committed, and the process exits 0.
//!
//! Transport-level behaviour: one store is enough (SQLite). The drain of the ingest writers on
//! both stores is covered by `operations::*::shutdown_lets_an_in_flight_callback_finish`.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::app::{callback, error_code};
use crate::support::backends::{fresh_database, Backend};
use crate::support::process::RelayProcess;
use crate::support::TestApp;

/// Bounds every "eventually": far longer than any step takes.
const GUARD: Duration = Duration::from_secs(60);

/// Polls `/readyz` at `url` until it answers 503; returns that answer.
async fn until_not_ready(client: &reqwest::Client, url: &str) -> reqwest::Response {
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let response = client.get(url).send().await.expect("still serving");
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            return response;
        }
        assert_eq!(response.status(), StatusCode::OK);
        assert!(tokio::time::Instant::now() < deadline, "/readyz stayed 200");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_off_before_it_stops() {
    let db = fresh_database(Backend::Sqlite).await;
    let mut app = TestApp::spawn_with(db, |variables| {
        // Long enough for the steps below to happen inside it on a busy machine.
        variables.insert("NEN_RELAY_HTTP__SHUTDOWN_DELAY".into(), "5s".into());
        variables.insert("NEN_RELAY_WEBHOOK__BODY_TIMEOUT".into(), "120s".into());
    })
    .await;
    let address = app.address.trim_start_matches("http://").to_owned();
    // A callback in flight across the whole shutdown: head and half its body now.
    let in_flight = callback("m-in-flight", "processing", json!({}));
    let signature = app.signature(in_flight.as_bytes());
    let mut stream = TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /webhooks/nen HTTP/1.1\r\nhost: {address}\r\nx-hmac-signature: {signature}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        in_flight.len()
    );
    let (first_half, second_half) = in_flight.as_bytes().split_at(in_flight.len() / 2);
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first_half).await.unwrap();
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    app.begin_shutdown();
    let not_ready = until_not_ready(&app.client, &app.url("/readyz")).await;
    assert_eq!(not_ready.headers()["retry-after"], "1");
    assert_eq!(error_code(not_ready).await, "unavailable");
    // Still serving: a callback sent during the delay is acknowledged.
    let during = callback("m-during-delay", "processing", json!({}));
    app.deliver_ok(&during).await;

    // Then the listener closes.
    let deadline = tokio::time::Instant::now() + GUARD;
    while TcpStream::connect(&address).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepting after the delay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The request in flight finishes, and is committed before the server stops.
    stream.write_all(second_half).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    app.wait_stopped().await;
    for message_id in ["m-in-flight", "m-during-delay"] {
        let run = app.store.get_run(message_id).await.unwrap();
        assert_eq!(
            run.map(|run| run.status).as_deref(),
            Some("processing"),
            "{message_id}"
        );
    }
}

/// The real binary and a real SIGTERM: the ops listener says "not ready" at once, the public
/// one still takes callbacks during the delay, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_makes_readyz_fail_first_and_exits_zero() {
    let db = fresh_database(Backend::Sqlite).await;
    let app = RelayProcess::start(
        db,
        &[
            ("NEN_RELAY_OPS_BIND", "127.0.0.1:0".into()),
            ("NEN_RELAY_HTTP__SHUTDOWN_DELAY", "5s".into()),
        ],
    )
    .await;
    let ops = app.ops_address().await;
    app.terminate();
    let not_ready = until_not_ready(&app.client, &format!("{ops}/readyz")).await;
    let body: serde_json::Value = not_ready.json().await.unwrap();
    assert_eq!(body["error"], "unavailable", "{body}");
    assert_eq!(body["message"], "the service is shutting down", "{body}");
    let during = callback("m-sigterm", "processing", json!({}));
    assert_eq!(app.deliver(&during).await.status(), StatusCode::OK);
    let (exit, output) = tokio::time::timeout(GUARD, app.wait())
        .await
        .expect("the process exits after the delay and the drain");
    assert!(exit.success(), "exit {exit:?}:\n{output}");
}
