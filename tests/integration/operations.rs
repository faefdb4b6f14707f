//! Health, readiness, metrics, request ids, an unreachable store, shutdown, and secrets in logs.

use std::collections::BTreeMap;
use std::path::Path;

use nen_relay::app::Application;
use nen_relay::config::{Environment, Settings};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::on_both_backends;
use crate::support::app::{callback, error_code};
use crate::support::{logs, TestApp, TestDatabase};

async fn health_readiness_and_metrics_need_no_token(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    app.deliver_ok(&callback("m-metrics", "processing", json!({})))
        .await;
    app.deliver_ok(&callback("m-metrics", "processing", json!({})))
        .await;
    let refused = app.deliver_with(b"{}", Some("sha256=00")).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    for path in ["/healthz", "/readyz"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "nen_relay_callbacks_total{outcome=\"accepted\"}",
        "nen_relay_callbacks_total{outcome=\"duplicate\"}",
        "nen_relay_callbacks_total{outcome=\"invalid_signature\"}",
        "nen_relay_http_request_duration_seconds_bucket",
        "route=\"/webhooks/nen\"",
        "nen_relay_ingest_batch_size",
    ] {
        assert!(metrics.contains(needle), "metrics lack {needle}");
    }
    let key_id = nen_relay::callbacks::signature::key_id(app.secrets[0].as_bytes());
    assert!(metrics.contains(&format!("key_id=\"{key_id}\"")));
    for secret in app.all_secrets() {
        assert!(!metrics.contains(&secret), "a secret reached /metrics");
    }
}

async fn every_response_carries_a_request_id(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let generated = app.client.get(app.url("/healthz")).send().await.unwrap();
    let id = generated.headers()["x-request-id"].to_str().unwrap();
    assert!(!id.is_empty());
    let propagated = app
        .client
        .get(app.url("/nowhere"))
        .header("x-request-id", "caller-chosen-id")
        .send()
        .await
        .unwrap();
    assert_eq!(propagated.headers()["x-request-id"], "caller-chosen-id");
    assert_eq!(propagated.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(propagated).await, "not_found");
}

async fn shutdown_lets_an_in_flight_callback_finish(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let body = callback("m-shutdown", "processing", json!({}));
    let signature = app.signature(body.as_bytes());
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /webhooks/nen HTTP/1.1\r\nhost: {address}\r\nx-hmac-signature: {signature}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let (first_half, second_half) = body.as_bytes().split_at(body.len() / 2);
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first_half).await.unwrap();
    // A round trip on another connection: by then the server has read the pending headers.
    app.client.get(app.url("/healthz")).send().await.unwrap();

    let finish_request = async {
        stream.write_all(second_half).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    };
    let mut app = app;
    let ((), answer) = tokio::join!(app.shutdown(), finish_request);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let store = app.store.clone();
    let run = store.get_run("m-shutdown").await.unwrap();
    assert_eq!(run.map(|run| run.status).as_deref(), Some("processing"));
}

async fn no_secret_reaches_the_logs(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let body = callback("m-logs", "processing", json!({}));
    app.deliver_ok(&body).await;
    app.deliver_with(b"not json", Some(&app.signature(b"not json")))
        .await;
    app.deliver_with(body.as_bytes(), Some("sha256=0000")).await;
    let _ = app.get("/v1/runs/m-logs").await;
    let _ = app
        .client
        .get(app.url("/v1/runs"))
        .bearer_auth(format!("{}-wrong", app.tokens[0]))
        .send()
        .await;
    let captured = logs::captured();
    assert!(
        captured.contains("m-logs") || captured.contains("request"),
        "logs were captured"
    );
    for secret in app.all_secrets() {
        assert!(!captured.contains(&secret), "a secret reached the logs");
    }
}

on_both_backends!(
    health_readiness_and_metrics_need_no_token,
    every_response_carries_a_request_id,
    shutdown_lets_an_in_flight_callback_finish,
    no_secret_reaches_the_logs,
);

/// With the database unreachable: readiness fails, and callbacks get 503 + Retry-After (so Nen
/// retries), never a 4xx and never a hang.
#[tokio::test]
async fn an_unreachable_store_gives_503_with_retry_after() {
    logs::capture();
    let variables: BTreeMap<String, String> = BTreeMap::from([
        ("NEN_RELAY_BIND".into(), "127.0.0.1:0".into()),
        // Port 1 on loopback: nothing listens there, so connecting fails at once.
        (
            "DATABASE_URL".into(),
            "postgres://postgres@127.0.0.1:1/none".into(),
        ),
        ("NEN_WEBHOOK_SECRETS".into(), "whsec-unreachable".into()),
        ("NEN_RELAY_API_TOKENS".into(), "token-unreachable".into()),
        ("NEN_RELAY_STORE__MIGRATE_ON_START".into(), "false".into()),
    ]);
    let settings = Settings::from_sources(
        Environment::Local,
        Path::new("/nonexistent-nen-relay-config"),
        &variables,
    )
    .unwrap();
    let store = nen_relay::store::connect(&settings.database_url, &settings.store.options(), false)
        .await
        .unwrap();
    let application = Application::build_with_store(settings, store)
        .await
        .unwrap();
    let base = format!("http://127.0.0.1:{}", application.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(application.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();

    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(ready).await, "unavailable");

    let body = callback("m-down", "processing", json!({}));
    let signature = nen_relay::callbacks::signature::sign(b"whsec-unreachable", body.as_bytes());
    let response = client
        .post(format!("{base}/webhooks/nen"))
        .header("X-Hmac-Signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(error_code(response).await, "unavailable");

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
