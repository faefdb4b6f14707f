//! Connection limits at the transport level: the header and idle clocks, the connection cap,
//! the ops listener.
//!
//! These behaviours live below the handlers and never touch the store, so they run on one
//! store only (SQLite); the store-facing tests run on both.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::app::callback;
use crate::support::backends::{fresh_database, Backend};
use crate::support::metrics::sample;
use crate::support::process::RelayProcess;
use crate::support::TestApp;

/// Far longer than any clock under test: reaching it means the server did not close.
const CLOSE_GUARD: Duration = Duration::from_secs(30);

/// Short clocks, so that the tests wait little; each test widens the one it does not test.
fn clocks(
    header_read: &str,
    idle: &str,
) -> impl FnOnce(&mut std::collections::BTreeMap<String, String>) {
    let (header_read, idle) = (header_read.to_owned(), idle.to_owned());
    move |variables| {
        variables.insert("NEN_RELAY_HTTP__HEADER_READ_TIMEOUT".into(), header_read);
        variables.insert("NEN_RELAY_HTTP__IDLE_TIMEOUT".into(), idle);
    }
}

fn host_port(address: &str) -> String {
    address.trim_start_matches("http://").to_owned()
}

/// What the server sent before closing the connection.
struct Closed {
    bytes: Vec<u8>,
}

impl Closed {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Reads until the server closes (EOF or reset); fails if it has not within `CLOSE_GUARD`.
async fn read_until_closed(stream: &mut TcpStream) -> Closed {
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(CLOSE_GUARD, async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open; it sent {:?}",
        String::from_utf8_lossy(&bytes)
    );
    Closed { bytes }
}

/// Opens a connection and sends `bytes` (possibly nothing).
async fn connect_and_send(address: &str, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(host_port(address)).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// One keep-alive request on `stream`, answered in full; returns the status line.
async fn request_on(stream: &mut TcpStream, path: &str) -> String {
    let head = format!("GET {path} HTTP/1.1\r\nhost: relay\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = stream.read(&mut buffer).await.expect("an answer");
        assert!(n > 0, "closed before a whole answer: {answer:?}");
        answer.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .and_then(|value| value.trim().parse().ok())
                .expect("a content-length");
            if body.len() >= length {
                return head.lines().next().unwrap_or_default().to_owned();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_complete_head_is_closed() {
    let db = fresh_database(Backend::Sqlite).await;
    let app = TestApp::spawn_with(db, clocks("300ms", "60s")).await;
    let partial_heads: [&[u8]; 4] = [
        b"",
        b"PRI * HTT",
        b"POST /webhooks/nen HTTP/1.1\r\nhost: relay\r\ncontent-type: app",
        b"GET /healthz HTTP/1.1\r\nhost: relay\r\n",
    ];
    for sent in partial_heads {
        let mut stream = connect_and_send(&app.address, sent).await;
        let closed = read_until_closed(&mut stream).await;
        assert!(
            closed.bytes.is_empty(),
            "{:?} got an answer: {}",
            String::from_utf8_lossy(sent),
            closed.text()
        );
    }
    // The service still answers.
    let response = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// Only HTTP/1.1 is served: an HTTP/2 preface is refused as soon as its first line is in,
/// whole or not; one cut shorter is closed by the header clock (above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_preface_is_answered_and_closed() {
    let db = fresh_database(Backend::Sqlite).await;
    // A header clock far longer than the guard: only the protocol check can close these.
    let app = TestApp::spawn_with(db, clocks("120s", "120s")).await;
    let prefaces: [&[u8]; 3] = [
        b"PRI * HTTP/2.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        // The preface and a SETTINGS frame, as an h2c client with prior knowledge sends them.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    ];
    for sent in prefaces {
        let mut stream = connect_and_send(&app.address, sent).await;
        let closed = read_until_closed(&mut stream).await;
        let text = closed.text();
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 400 "),
            "{:?} got {text}",
            String::from_utf8_lossy(sent)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    let db = fresh_database(Backend::Sqlite).await;
    // A header clock far longer than the guard: only the idle clock can close it.
    let app = TestApp::spawn_with(db, clocks("120s", "300ms")).await;
    let mut stream = connect_and_send(&app.address, b"").await;
    assert_eq!(request_on(&mut stream, "/healthz").await, "HTTP/1.1 200 OK");
    assert_eq!(request_on(&mut stream, "/healthz").await, "HTTP/1.1 200 OK");
    let closed = read_until_closed(&mut stream).await;
    assert!(closed.bytes.is_empty(), "{}", closed.text());
    // Counted as closed by the idle clock (process-wide: at least this one).
    let page = nen_relay::telemetry::prometheus().render();
    assert!(
        sample(
            &page,
            "nen_relay_connection_timeouts_total",
            &[("phase", "idle")]
        ) >= Some(1.0),
        "{page}"
    );
}

/// With `max_connections = 3`, a fourth is refused at once while the three are served, and
/// once one closes a new one is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_connections_are_refused_and_the_rest_served() {
    let db = fresh_database(Backend::Sqlite).await;
    let app = TestApp::spawn_with(db, |variables| {
        variables.insert("NEN_RELAY_HTTP__MAX_CONNECTIONS".into(), "3".into());
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = connect_and_send(&app.address, b"").await;
        // Answered: the server holds this connection (and its place) now.
        assert_eq!(request_on(&mut stream, "/healthz").await, "HTTP/1.1 200 OK");
        held.push(stream);
    }
    let mut refused = connect_and_send(
        &app.address,
        b"GET /healthz HTTP/1.1\r\nhost: relay\r\n\r\n",
    )
    .await;
    let closed = read_until_closed(&mut refused).await;
    let text = closed.text();
    // The 503 is best-effort: the close may reach the client first as a reset.
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 503 "),
        "past the cap: {text}"
    );
    if !text.is_empty() {
        assert!(text.contains("retry-after: 1"), "{text}");
        assert!(text.contains(r#""error":"unavailable""#), "{text}");
    }
    for stream in &mut held {
        assert_eq!(request_on(stream, "/healthz").await, "HTTP/1.1 200 OK");
    }
    drop(held.pop());
    // The server frees the place once it sees the close; until then a new one is refused.
    let deadline = tokio::time::Instant::now() + CLOSE_GUARD;
    loop {
        let mut stream = connect_and_send(&app.address, b"").await;
        let head = b"GET /healthz HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n";
        let _ = stream.write_all(head).await;
        let answer = read_until_closed(&mut stream).await.text();
        if answer.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection served after one closed: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With `NEN_RELAY_OPS_BIND`, `/metrics` is served there and not on the public listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ops_listener_takes_metrics_off_the_public_one() {
    let db = fresh_database(Backend::Sqlite).await;
    let app = TestApp::spawn_with(db, |variables| {
        variables.insert("NEN_RELAY_OPS_BIND".into(), "127.0.0.1:0".into());
    })
    .await;
    let ops = app.ops_address.clone().expect("an ops listener");
    for path in ["/metrics", "/healthz", "/readyz"] {
        let response = app.client.get(format!("{ops}{path}")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "ops {path}");
    }
    let public_metrics = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(public_metrics.status(), StatusCode::NOT_FOUND);
    for path in ["/healthz", "/readyz"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "public {path}");
    }
    // The ops listener serves nothing else.
    let body = callback("m-ops", "processing", json!({}));
    let response = app
        .client
        .post(format!("{ops}/webhooks/nen"))
        .header("X-Hmac-Signature", app.signature(body.as_bytes()))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = app
        .client
        .get(format!("{ops}/v1/runs"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    app.deliver_ok(&body).await;
}

/// On a process of its own, for its metrics alone: what was closed, refused and held open is
/// counted, and the ops listener answers while the public one is full. (The idle clock's count
/// is checked in `an_idle_keep_alive_connection_is_closed`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_and_refused_connections_are_counted() {
    let db = fresh_database(Backend::Sqlite).await;
    let app = RelayProcess::start(
        db,
        &[
            ("NEN_RELAY_OPS_BIND", "127.0.0.1:0".into()),
            ("NEN_RELAY_HTTP__HEADER_READ_TIMEOUT", "300ms".into()),
            ("NEN_RELAY_HTTP__MAX_CONNECTIONS", "2".into()),
        ],
    )
    .await;
    let ops = app.ops_address().await;
    // One closed by the header clock.
    let mut silent = connect_and_send(&app.address, b"").await;
    read_until_closed(&mut silent).await;
    // Two held (each answered once, so each holds a place, idle for a minute), a third refused.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = connect_and_send(&app.address, b"").await;
        assert_eq!(request_on(&mut stream, "/healthz").await, "HTTP/1.1 200 OK");
        held.push(stream);
    }
    let mut refused = connect_and_send(&app.address, b"").await;
    read_until_closed(&mut refused).await;
    let page = app
        .client
        .get(format!("{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let timeouts = "nen_relay_connection_timeouts_total";
    assert_eq!(
        sample(&page, timeouts, &[("phase", "head")]),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, timeouts, &[("phase", "idle")]),
        None,
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            "nen_relay_connections_refused_total",
            &[("listener", "public"), ("reason", "max_connections")]
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            "nen_relay_connections_open",
            &[("listener", "public")]
        ),
        Some(2.0),
        "{page}"
    );
    // The scrape itself is a connection of the ops listener.
    assert!(
        sample(&page, "nen_relay_connections_open", &[("listener", "ops")]) >= Some(1.0),
        "{page}"
    );
}
