//! Health, readiness, metrics, request ids, an unreachable store, shutdown, and secrets in logs.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use nen_relay::app::Application;
use nen_relay::config::{Environment, Settings};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::on_both_backends;
use crate::support::app::{callback, error_code};
use crate::support::metrics::sample;
use crate::support::process::RelayProcess;
use crate::support::{logs, Backend, TestApp, TestDatabase};

const CALLBACKS: &str = "nen_relay_callbacks_total";
/// A sample's name, its labels, and its value.
type Expected<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);
const REQUEST_DURATIONS: &str = "nen_relay_http_request_duration_seconds_count";

/// Every family an operator scrapes says what it is, and the build, the queue, the pools and the
/// process are there without any traffic having made them.
async fn every_metric_family_has_help_and_the_basics_are_there(db: TestDatabase) {
    let backend = db.backend;
    let app = RelayProcess::start(db, &[]).await;
    // One callback, so that request, callback and batch families exist too.
    let body = callback("m-help", "processing", json!({}));
    assert_eq!(app.deliver(&body).await.status(), StatusCode::OK);
    let page = app.metrics().await;

    let described: HashSet<&str> = page
        .lines()
        .filter_map(|line| line.strip_prefix("# HELP "))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    let families: std::collections::BTreeSet<&str> = page
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap())
        .map(|series| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| series.strip_suffix(suffix))
                .filter(|base| described.contains(base))
                .unwrap_or(series)
        })
        .collect();
    assert!(families.len() > 10, "too few families in\n{page}");
    let undescribed: Vec<&&str> = families
        .iter()
        .filter(|f| !described.contains(**f))
        .collect();
    assert!(
        undescribed.is_empty(),
        "no # HELP for {undescribed:?} in\n{page}"
    );

    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sample(&page, "nen_relay_build_info", &[("version", version)]),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "nen_relay_ingest_queue_depth", &[]),
        Some(0.0),
        "{page}"
    );
    let pools: &[&str] = match backend {
        Backend::Postgres => &["main"],
        Backend::Sqlite => &["writer", "readers"],
    };
    for pool in pools {
        let max = sample(
            &page,
            "nen_relay_store_pool_max_connections",
            &[("pool", pool)],
        );
        assert!(max.is_some_and(|max| max >= 1.0), "{pool}: {page}");
        let open = sample(&page, "nen_relay_store_pool_connections", &[("pool", pool)]);
        let idle = sample(
            &page,
            "nen_relay_store_pool_idle_connections",
            &[("pool", pool)],
        );
        assert!(
            matches!((open, idle, max), (Some(open), Some(idle), Some(max)) if idle <= open && open <= max),
            "{pool}: open {open:?}, idle {idle:?}, max {max:?}"
        );
    }
    // From the process collector: resident memory, as every Prometheus exporter names it.
    let resident = sample(&page, "process_resident_memory_bytes", &[]);
    assert!(resident.is_some_and(|bytes| bytes > 0.0), "{page}");
}

/// On a process of its own: metrics are process-wide, and an in-process app would count every
/// other test's requests too.
async fn health_readiness_and_metrics_need_no_token(db: TestDatabase) {
    let app = RelayProcess::start(db, &[]).await;
    let body = callback("m-metrics", "processing", json!({}));
    for _ in 0..2 {
        assert_eq!(app.deliver(&body).await.status(), StatusCode::OK);
    }
    let refused = app
        .client
        .post(app.url("/webhooks/nen"))
        .header("X-Hmac-Signature", "sha256=00")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    for path in ["/healthz", "/readyz"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let page = app.metrics().await;
    let key_id = nen_relay::callbacks::signature::key_id(app.secret.as_bytes());
    let webhook = |status| {
        vec![
            ("method", "POST"),
            ("route", "/webhooks/nen"),
            ("status", status),
        ]
    };
    let expected: [Expected; 8] = [
        (CALLBACKS, vec![("outcome", "accepted")], 1.0),
        (CALLBACKS, vec![("outcome", "duplicate")], 1.0),
        (CALLBACKS, vec![("outcome", "invalid_signature")], 1.0),
        (
            "nen_relay_callbacks_by_key_total",
            vec![("key_id", &key_id)],
            2.0,
        ),
        (REQUEST_DURATIONS, webhook("200"), 2.0),
        (REQUEST_DURATIONS, webhook("401"), 1.0),
        // Both verified deliveries went to the store, duplicate or not.
        ("nen_relay_ingest_batch_size_sum", vec![], 2.0),
        (
            REQUEST_DURATIONS,
            vec![("method", "GET"), ("route", "/readyz"), ("status", "200")],
            1.0,
        ),
    ];
    for (name, labels, value) in expected {
        assert_eq!(
            sample(&page, name, &labels),
            Some(value),
            "{name} {labels:?} in\n{page}"
        );
    }
    for secret in [&app.secret, &app.token] {
        assert!(!page.contains(secret.as_str()), "a secret reached /metrics");
    }
}

async fn every_response_carries_a_request_id(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    // Made up when the request has none: one per request, so that it tells requests apart.
    let mut generated = HashSet::new();
    for _ in 0..2 {
        let response = app.client.get(app.url("/healthz")).send().await.unwrap();
        let id = response.headers()["x-request-id"].to_str().unwrap();
        assert!(!id.is_empty());
        generated.insert(id.to_owned());
    }
    assert_eq!(generated.len(), 2, "{generated:?}");
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
    let longest = format!("A.b_c:d-{}", "9".repeat(120));
    assert_eq!(longest.len(), 128);
    let kept = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", &longest)
        .send()
        .await
        .unwrap();
    assert_eq!(kept.headers()["x-request-id"], longest.as_str());
}

/// An incoming id that is too long or holds anything but `[A-Za-z0-9._:-]` is replaced, not
/// echoed.
async fn odd_request_ids_are_replaced(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let too_long = "x".repeat(129);
    let odd: [&[u8]; 6] = [
        too_long.as_bytes(),
        b"has space",
        b"tab\there",
        "caf\u{e9}-non-ascii".as_bytes(),
        b"\xff\xfe",
        b"slash/and\"quote",
    ];
    for sent in odd {
        let value = reqwest::header::HeaderValue::from_bytes(sent).unwrap();
        let response = app
            .client
            .get(app.url("/healthz"))
            .header("x-request-id", value)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let echoed = response.headers()["x-request-id"].as_bytes();
        assert_ne!(
            echoed,
            sent,
            "{:?} was echoed",
            String::from_utf8_lossy(sent)
        );
        assert!(
            nen_relay::http::middleware::is_valid_request_id(echoed),
            "{echoed:?}"
        );
    }
}

/// Made-up methods all count as `method="other"`: one series, however many there are.
async fn made_up_methods_share_one_metric_series(db: TestDatabase) {
    let app = RelayProcess::start(db, &[]).await;
    for n in 0..50 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{n}X").as_bytes()).unwrap();
        let response = app
            .client
            .request(method, app.url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
    let page = app.metrics().await;
    assert!(
        !page.contains("MADEUP"),
        "a made-up method became a label:\n{page}"
    );
    let other: Vec<&str> = page
        .lines()
        .filter(|line| line.starts_with(REQUEST_DURATIONS) && line.contains(r#"method="other""#))
        .collect();
    assert_eq!(other.len(), 1, "{other:?}");
    assert_eq!(
        sample(
            &page,
            REQUEST_DURATIONS,
            &[
                ("method", "other"),
                ("route", "/healthz"),
                ("status", "405")
            ]
        ),
        Some(50.0),
        "{page}"
    );
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
    // This app's own warning, named by the key id of its secret, which no other app has.
    let key_id = nen_relay::callbacks::signature::key_id(app.secrets[0].as_bytes());
    assert!(
        captured.lines().any(
            |line| line.contains("signed callback is not a valid payload")
                && line.contains(&key_id)
        ),
        "this app's logs were captured"
    );
    for secret in app.all_secrets() {
        assert!(!captured.contains(&secret), "a secret reached the logs");
    }
}

async fn refused_methods_and_unknown_paths_get_the_error_shape(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let response = app
        .client
        .get(app.url("/webhooks/nen"))
        .send()
        .await
        .expect("the app answers");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(response).await, "method_not_allowed");
    let response = app
        .client
        .get(app.url("/nowhere"))
        .send()
        .await
        .expect("the app answers");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(response).await, "not_found");
}

on_both_backends!(
    every_metric_family_has_help_and_the_basics_are_there,
    health_readiness_and_metrics_need_no_token,
    refused_methods_and_unknown_paths_get_the_error_shape,
    every_response_carries_a_request_id,
    odd_request_ids_are_replaced,
    made_up_methods_share_one_metric_series,
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
    let store = nen_relay::store::connect(&settings.database_url, &settings.store_options(), false)
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
