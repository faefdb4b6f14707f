//! Hostile input on `POST /webhooks/nen`: every request of a corpus gets the status the README (or
//! docs/failure-modes.md, where the README leaves it open) fixes, nothing unsigned is stored, the
//! server keeps answering, and memory stays bounded.
//!
//! Each test runs the real binary as a child process, so that the memory measured is that of
//! the one server that took the load.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::on_both_backends;
use crate::support::app::callback;
use crate::support::metrics::sample;
use crate::support::process::RelayProcess;
use crate::support::{stored, TestDatabase};

const LIMIT: usize = 1024 * 1024;
/// How far the server's peak resident memory may rise above its resident memory before a test's
/// load. The corpus sends a few MiB in all; a leak or a per-request blow-up would pass this.
const PEAK_MEMORY_GROWTH_BOUND_KIB: u64 = 64 * 1024;

enum Signature {
    Unsigned,
    /// Signed with the app's first secret.
    Valid,
    Raw(Vec<u8>),
    /// The valid signature, sent twice.
    Twice,
    /// A valid one, then a wrong one.
    ValidThenWrong,
}

struct Case {
    name: &'static str,
    body: Vec<u8>,
    signature: Signature,
    content_type: Option<&'static [u8]>,
    expect: StatusCode,
}

fn case(name: &'static str, body: impl Into<Vec<u8>>, signature: Signature, expect: u16) -> Case {
    Case {
        name,
        body: body.into(),
        signature,
        content_type: Some(b"application/json"),
        expect: StatusCode::from_u16(expect).unwrap(),
    }
}

fn with_content_type(mut case: Case, content_type: Option<&'static [u8]>) -> Case {
    case.content_type = content_type;
    case
}

fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        413 => "payload_too_large",
        401 => "invalid_signature",
        400 => "invalid_payload",
        408 => "request_timeout",
        _ => "",
    }
}

fn body_with(message_id: &str, extra: &str) -> String {
    format!(r#"{{"workflow_id":"w","message_id":"{message_id}","status":"processing"{extra}}}"#)
}

fn deep(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn corpus() -> Vec<Case> {
    use Signature::*;
    let good = callback("hostile-unsigned", "processing", json!({}));
    let hex64 = "ab".repeat(32);
    let mut cases = vec![
        // 1. Size comes first, signed or not.
        case(
            "unsigned, over the limit",
            vec![b' '; LIMIT + 1],
            Unsigned,
            413,
        ),
        case("signed, over the limit", vec![b' '; LIMIT + 1], Valid, 413),
        case(
            "unsigned, 2 bytes over",
            vec![b' '; LIMIT + 2],
            Unsigned,
            413,
        ),
        case(
            "message_id of 1 MiB",
            body_with(&"m".repeat(LIMIT), ""),
            Valid,
            413,
        ),
        // 2. Signature.
        case("no signature header", good.clone(), Unsigned, 401),
        case("empty signature", good.clone(), Raw(b"".to_vec()), 401),
        case("label only", good.clone(), Raw(b"sha256=".to_vec()), 401),
        case(
            "sha1 label",
            good.clone(),
            Raw(format!("sha1={hex64}").into()),
            401,
        ),
        case(
            "upper-case label",
            good.clone(),
            Raw(format!("SHA256={hex64}").into()),
            401,
        ),
        case(
            "63 hex digits",
            good.clone(),
            Raw(format!("sha256={}", &hex64[..63]).into()),
            401,
        ),
        case(
            "65 hex digits",
            good.clone(),
            Raw(format!("sha256={hex64}0").into()),
            401,
        ),
        case(
            "not hex",
            good.clone(),
            Raw(format!("sha256={}", "zz".repeat(32)).into()),
            401,
        ),
        case(
            "wrong digest",
            good.clone(),
            Raw(format!("sha256={hex64}").into()),
            401,
        ),
        case(
            "10 KB signature",
            good.clone(),
            Raw(vec![b'a'; 10_000]),
            401,
        ),
        case(
            "non-ASCII signature bytes",
            good.clone(),
            Raw(vec![0xff; 71]),
            401,
        ),
        case("two valid signature headers", good.clone(), Twice, 401),
        case(
            "valid then wrong signature header",
            good.clone(),
            ValidThenWrong,
            401,
        ),
        case(
            "unsigned non-UTF-8 body",
            vec![0xff, 0xfe, 0x00, 0x80],
            Unsigned,
            401,
        ),
        case("unsigned empty body", "", Unsigned, 401),
        case("unsigned 10,000-deep nesting", deep(10_000), Unsigned, 401),
        case("unsigned NUL bytes", vec![0u8; 64], Unsigned, 401),
        // 3. Signed, but not a callback: 400, body kept.
        case("signed empty body", "", Valid, 400),
        case("signed non-UTF-8 body", vec![0xff, 0xfe, 0xfd], Valid, 400),
        case(
            "invalid UTF-8 inside a string",
            b"{\"message_id\":\"\xc3\x28\",\"status\":\"s\"}".to_vec(),
            Valid,
            400,
        ),
        // serde_json skips unknown fields without checking their bytes: these once were 200
        // and stored with an empty payload, after which the run's events answered 500.
        case(
            "invalid UTF-8 in an unknown field",
            [
                &br#"{"message_id":"hostile-utf8-unknown","status":"s","x":""#[..],
                &[0xff, 0xfe],
                br#""}"#,
            ]
            .concat(),
            Valid,
            400,
        ),
        case(
            "Latin-1 body",
            [
                &br#"{"message_id":"hostile-latin1","status":"failed","error":"caf"#[..],
                &[0xe9],
                br#" cr"#,
                &[0xe8],
                br#"me"}"#,
            ]
            .concat(),
            Valid,
            400,
        ),
        case(
            "overlong UTF-8 in result",
            [
                &br#"{"message_id":"hostile-overlong","status":"s","result":{"a":""#[..],
                &[0xc0, 0xaf],
                br#""}}"#,
            ]
            .concat(),
            Valid,
            400,
        ),
        case(
            "raw NUL byte in the body",
            b"{\"message_id\":\"a\0b\",\"status\":\"s\"}".to_vec(),
            Valid,
            400,
        ),
        case("only NUL bytes", vec![0u8; 64], Valid, 400),
        case(
            "escaped NUL in message_id",
            body_with("a\\u0000b", ""),
            Valid,
            400,
        ),
        case(
            "escaped NUL in status",
            r#"{"message_id":"hostile-nul-status","status":"s\u0000"}"#,
            Valid,
            400,
        ),
        case(
            "lone surrogate in message_id",
            body_with("\\ud800", ""),
            Valid,
            400,
        ),
        case("JSON array", "[1,2,3]", Valid, 400),
        case("JSON string", "\"message_id\"", Valid, 400),
        case("JSON null", "null", Valid, 400),
        case(
            "enormous number as message_id",
            r#"{"message_id":1e999999,"status":"s"}"#,
            Valid,
            400,
        ),
        case(
            "huge integer as status",
            format!(r#"{{"message_id":"m","status":{}}}"#, "9".repeat(5000)),
            Valid,
            400,
        ),
        case("empty message_id", body_with("", ""), Valid, 400),
        case(
            "201-character message_id",
            body_with(&"x".repeat(201), ""),
            Valid,
            400,
        ),
        case(
            "missing status",
            r#"{"message_id":"hostile-no-status"}"#,
            Valid,
            400,
        ),
        case(
            "duplicated message_id key",
            r#"{"message_id":"a","message_id":"b","status":"s"}"#,
            Valid,
            400,
        ),
        case("10,000-deep array", deep(10_000), Valid, 400),
        case(
            "10,000-deep object",
            format!("{}{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000)),
            Valid,
            400,
        ),
        case(
            "truncated JSON",
            r#"{"message_id":"m","status":"#,
            Valid,
            400,
        ),
        case(
            "trailing garbage",
            format!("{}xyz", body_with("hostile-trailing", "")),
            Valid,
            400,
        ),
        case(
            "byte-order mark",
            [
                &[0xef, 0xbb, 0xbf][..],
                body_with("hostile-bom", "").as_bytes(),
            ]
            .concat(),
            Valid,
            400,
        ),
        case("unterminated string", "{\"message_id\":\"m", Valid, 400),
        // 5. Signed and a callback: 200, whatever else is odd about it.
        with_content_type(
            case(
                "text/plain content type",
                body_with("hostile-text-plain", ""),
                Valid,
                200,
            ),
            Some(b"text/plain"),
        ),
        with_content_type(
            case(
                "no content type",
                body_with("hostile-no-ct", ""),
                Valid,
                200,
            ),
            None,
        ),
        with_content_type(
            case(
                "form content type",
                body_with("hostile-form", ""),
                Valid,
                200,
            ),
            Some(b"application/x-www-form-urlencoded"),
        ),
        with_content_type(
            case(
                "garbage content type",
                body_with("hostile-garbage-ct", ""),
                Valid,
                200,
            ),
            Some(b"\xff;;;/"),
        ),
        case(
            "10,000-deep nesting in an unknown field",
            body_with("hostile-deep-field", &format!(r#","x":{}"#, deep(10_000))),
            Valid,
            200,
        ),
        case(
            "10,000-deep result",
            body_with(
                "hostile-deep-result",
                &format!(r#","result":{}"#, deep(10_000)),
            ),
            Valid,
            200,
        ),
        case(
            "escaped NUL in result",
            body_with("hostile-nul-result", r#","result":{"a":"\u0000"}"#),
            Valid,
            200,
        ),
        case(
            "escaped NUL in workflow_id and error",
            r#"{"message_id":"hostile-nul-fields","status":"failed","workflow_id":"\u0000","error":"\u0000"}"#,
            Valid,
            200,
        ),
        case(
            "lone surrogate in result",
            body_with("hostile-surrogate-result", r#","result":["\udc00"]"#),
            Valid,
            200,
        ),
        case(
            "enormous float in result",
            body_with("hostile-big-float", r#","result":{"n":1e999999}"#),
            Valid,
            200,
        ),
        case(
            "enormous integer in result",
            body_with(
                "hostile-big-int",
                &format!(r#","result":{{"n":{}}}"#, "9".repeat(10_000)),
            ),
            Valid,
            200,
        ),
        case(
            "enormous expires_at",
            body_with("hostile-expires", r#","expires_at":1e308"#),
            Valid,
            200,
        ),
        case(
            "negative expires_at",
            body_with("hostile-expires-neg", r#","expires_at":-1e20"#),
            Valid,
            200,
        ),
        case(
            "unicode message_id",
            body_with("hostile-ünï-😀", ""),
            Valid,
            200,
        ),
        case(
            "200-character message_id",
            body_with(&"y".repeat(200), ""),
            Valid,
            200,
        ),
        case(
            "whitespace around the object",
            format!("\n\t {} \r\n", body_with("hostile-ws", "")),
            Valid,
            200,
        ),
        case(
            "many unknown fields",
            body_with(
                "hostile-many-fields",
                &(0..5_000)
                    .map(|i| format!(r#","k{i}":{i}"#))
                    .collect::<String>(),
            ),
            Valid,
            200,
        ),
    ];
    cases.push(case(
        "exactly at the limit",
        {
            let mut body = body_with("hostile-at-limit", "").into_bytes();
            body.resize(LIMIT, b' ');
            body
        },
        Valid,
        200,
    ));
    cases
}

/// Sends each case on a connection of its own. After a 413 that comes before the body was read,
/// the server closes the connection without saying `Connection: close`, so a pooled connection
/// can be reused just as it closes and the next case would get no answer at all.
async fn send(app: &RelayProcess, case: &Case) -> reqwest::Response {
    let mut headers = HeaderMap::new();
    if let Some(content_type) = case.content_type {
        headers.insert(CONTENT_TYPE, HeaderValue::from_bytes(content_type).unwrap());
    }
    let name = HeaderName::from_static("x-hmac-signature");
    let valid = HeaderValue::from_str(&app.signature(&case.body)).unwrap();
    match &case.signature {
        Signature::Unsigned => {}
        Signature::Valid => {
            headers.insert(name, valid);
        }
        Signature::Raw(value) => {
            headers.insert(name, HeaderValue::from_bytes(value).unwrap());
        }
        Signature::Twice => {
            headers.append(name.clone(), valid.clone());
            headers.append(name, valid);
        }
        Signature::ValidThenWrong => {
            headers.append(name.clone(), valid);
            let wrong = format!("sha256={}", "00".repeat(32));
            headers.append(name, HeaderValue::from_str(&wrong).unwrap());
        }
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    client
        .post(app.url("/webhooks/nen"))
        .headers(headers)
        .body(case.body.clone())
        .send()
        .await
        .unwrap_or_else(|error| panic!("{}: no answer: {error}", case.name))
}

async fn assert_alive(app: &RelayProcess, after: &str) {
    // A fresh connection each time: the header read timeout also closes idle keep-alive
    // connections, and a pooled one could be closed just as it is reused.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let response = client
        .get(app.url("/healthz"))
        .send()
        .await
        .unwrap_or_else(|error| panic!("no /healthz answer after {after}: {error}"));
    assert_eq!(response.status(), StatusCode::OK, "/healthz after {after}");
}

/// Every stored body (events and rejected payloads) must be one the test signed.
async fn assert_only_signed_bodies_stored(app: &RelayProcess, signed: &HashSet<Vec<u8>>) -> usize {
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK, "the store still answers");
    let events = stored::event_payloads(&app.db).await;
    let rejected = stored::rejected_bodies(&app.db).await;
    for payload in &events {
        assert!(
            signed.contains(payload.as_bytes()),
            "an unsigned event was stored: {:.200}",
            payload
        );
    }
    for body in &rejected {
        assert!(
            signed.contains(body),
            "an unsigned body was kept: {:.200?}",
            String::from_utf8_lossy(body)
        );
    }
    events.len() + rejected.len()
}

/// Fails when the server's peak resident memory rose too far above `before` (in KiB).
fn assert_memory_bounded(app: &RelayProcess, before: u64, load: &str) {
    let growth = app.peak_memory_kib().saturating_sub(before);
    assert!(
        growth < PEAK_MEMORY_GROWTH_BOUND_KIB,
        "peak resident memory rose by {growth} KiB over {load}"
    );
}

async fn every_hostile_request_gets_its_documented_answer(db: TestDatabase) {
    let app = RelayProcess::start(db, &[]).await;
    let before = app.reset_peak_memory();
    let corpus = corpus();
    let mut signed = HashSet::new();
    let mut accepted = 0;
    let mut rejected = 0;
    for case in &corpus {
        if matches!(case.signature, Signature::Valid) && case.body.len() <= LIMIT {
            signed.insert(case.body.clone());
        }
        let response = send(&app, case).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, case.expect, "{}: answered {body}", case.name);
        if status == StatusCode::OK {
            assert_eq!(body["received"], true, "{}", case.name);
            accepted += 1;
        } else {
            assert_eq!(body["error"], code_for(status), "{}: {body}", case.name);
            assert!(body["message"].is_string(), "{}: {body}", case.name);
            rejected += usize::from(status == StatusCode::BAD_REQUEST);
        }
        assert_alive(&app, case.name).await;
    }
    let stored = assert_only_signed_bodies_stored(&app, &signed).await;
    assert_eq!(
        stored,
        accepted + rejected,
        "one stored row per 200 and per 400"
    );
    // The runs listing holds exactly the accepted callbacks, none of the unsigned ones.
    let listing = app.get_json("/v1/runs?limit=500").await;
    let runs = listing["runs"].as_array().unwrap();
    assert_eq!(runs.len(), accepted);
    assert!(runs
        .iter()
        .all(|run| run["message_id"] != "hostile-unsigned"));
    assert_memory_bounded(&app, before, "the corpus");
    // Hostile requests are logged, and without the secrets they were checked against.
    let logs = app.output();
    assert!(
        logs.contains("signed callback is not a valid payload"),
        "the signed 400s are logged: {logs:.2000}"
    );
    for secret in [&app.secret, &app.token] {
        assert!(!logs.contains(secret.as_str()), "a secret reached the logs");
    }
    // And the server still shuts down cleanly after all of it.
    let exit = app.stop().await;
    assert!(exit.success(), "nen-relay exited with {exit}");
}

async fn with_a_raised_limit_huge_fields_are_refused_or_taken_by_shape(db: TestDatabase) {
    let raised = (8 * LIMIT).to_string();
    let app = RelayProcess::start(db, &[("NEN_RELAY_WEBHOOK__MAX_BODY_BYTES", raised)]).await;
    let before = app.reset_peak_memory();
    let huge_id = body_with(&"m".repeat(LIMIT), "");
    let response = app.deliver(&huge_id).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_alive(&app, "a 1 MiB message_id").await;

    let keys: String = (0..100_000).map(|i| format!(r#","{i:x}":0"#)).collect();
    let many_keys = body_with("hostile-100k-keys", &keys);
    let response = app.deliver(&many_keys).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_alive(&app, "an object with 100k keys").await;
    let events = app.get_json("/v1/runs/hostile-100k-keys/events").await;
    assert_eq!(events["events"].as_array().map(Vec::len), Some(1));

    let signed = HashSet::from([huge_id.into_bytes(), many_keys.into_bytes()]);
    assert_eq!(assert_only_signed_bodies_stored(&app, &signed).await, 2);
    assert_memory_bounded(&app, before, "huge fields");
}

/// Reads what the server sends until it closes (or `limit` passes), while `trickle` bytes are
/// written one per second. The connection stays open from this side until then. Returns the bytes
/// read, having insisted that the server closed the connection.
async fn exchange(address: &str, head: &[u8], trickle: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(address.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(head).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = trickle.to_vec();
    let writing = tokio::spawn(async move {
        for byte in trickle {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if writer.write_all(&[byte]).await.is_err() {
                break;
            }
        }
        writer
    });
    let answer = read_until_closed(&mut reader, head).await;
    writing.abort();
    answer
}

/// Reads what the server sends until it closes the connection (by FIN or reset), and fails if
/// it never does. The bound is far beyond any timeout a test configures; a server that has none
/// would keep the connection open past it.
async fn read_until_closed(reader: &mut (impl AsyncReadExt + Unpin), request: &[u8]) -> Vec<u8> {
    let mut answer = Vec::new();
    let reading = reader.read_to_end(&mut answer);
    let closed = tokio::time::timeout(Duration::from_secs(30), reading).await;
    assert!(
        closed.is_ok(),
        "the server kept the connection open; it answered {:?} to {:.80?}",
        status_line(&answer),
        String::from_utf8_lossy(request)
    );
    answer
}

fn status_line(answer: &[u8]) -> String {
    String::from_utf8_lossy(answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

async fn slow_and_malformed_http_is_cut_off(db: TestDatabase) {
    let app = RelayProcess::start(
        db,
        &[
            ("NEN_RELAY_WEBHOOK__BODY_TIMEOUT_MS", "500".into()),
            ("NEN_RELAY_HTTP__HEADER_READ_TIMEOUT_MS", "500".into()),
        ],
    )
    .await;
    let before = app.reset_peak_memory();
    let body = callback("hostile-slow", "processing", json!({}));
    let signature = app.signature(body.as_bytes());

    // A body sent one byte per second: 408 request_timeout, nothing stored.
    let head = format!(
        "POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nX-Hmac-Signature: {signature}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let answer = exchange(&app.address, head.as_bytes(), body.as_bytes()).await;
    assert!(
        status_line(&answer).starts_with("HTTP/1.1 408"),
        "slow body: {:?}",
        status_line(&answer)
    );
    assert!(String::from_utf8_lossy(&answer).contains("request_timeout"));
    assert_alive(&app, "a slow body").await;

    // Headers sent slowly (never finished): the server closes the connection, without a 2xx.
    let answer = exchange(
        &app.address,
        b"POST /webhooks/nen HTTP/1.1\r\nHost: x\r\n",
        b"X-Slow: 1",
    )
    .await;
    assert!(
        !status_line(&answer).starts_with("HTTP/1.1 2"),
        "slow headers: {:?}",
        status_line(&answer)
    );
    assert_alive(&app, "slow headers").await;

    // Malformed HTTP: hyper answers 4xx or closes, and in any case closes in the end (an idle
    // connection too, by the header read timeout); never 2xx, never a panic.
    let huge_header = format!(
        "POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\n{{}}",
        "a".repeat(512 * 1024)
    );
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("oversized header", huge_header.into_bytes()),
        ("garbage request line", b"GARBAGE\r\n\r\n".to_vec()),
        ("binary junk", vec![0u8, 0xff, 0x13, 0x37, b'\r', b'\n', b'\r', b'\n']),
        (
            "Content-Length and chunked together",
            format!(
                "POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
                 Transfer-Encoding: chunked\r\nX-Hmac-Signature: {signature}\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "two different Content-Lengths",
            b"POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x"
                .to_vec(),
        ),
        (
            "non-numeric Content-Length",
            b"POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec(),
        ),
        (
            "invalid chunk size",
            format!(
                "POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
                 X-Hmac-Signature: {signature}\r\n\r\nzz\r\n{body}\r\n0\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "body shorter than Content-Length, then closed",
            format!(
                "POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nX-Hmac-Signature: {signature}\r\n\
                 Content-Length: {}\r\n\r\n{}",
                body.len() + 10,
                body
            )
            .into_bytes(),
        ),
    ];
    for (name, request) in &malformed {
        let mut stream = TcpStream::connect(app.address.trim_start_matches("http://"))
            .await
            .unwrap();
        let _ = stream.write_all(request).await;
        if name.starts_with("body shorter") {
            let _ = stream.shutdown().await;
        }
        let answer = read_until_closed(&mut stream, request).await;
        let line = status_line(&answer);
        assert!(
            answer.is_empty() || line.starts_with("HTTP/1.1 4"),
            "{name}: {line:?}"
        );
        assert_alive(&app, name).await;
    }

    // A declared length over the limit is refused before a byte of the body is read.
    let head = format!(
        "POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nX-Hmac-Signature: {signature}\r\n\
         Content-Length: {}\r\n\r\n",
        4 * LIMIT
    );
    let answer = exchange(&app.address, head.as_bytes(), b"").await;
    assert!(
        status_line(&answer).starts_with("HTTP/1.1 413"),
        "declared 4 MiB: {:?}",
        status_line(&answer)
    );
    assert_alive(&app, "a declared 4 MiB body").await;

    // A chunked body over the limit: no Content-Length to refuse early, so 413 while reading.
    let chunk = vec![b' '; 64 * 1024];
    let mut chunked = format!(
        "POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
         X-Hmac-Signature: {signature}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..(LIMIT / chunk.len() + 1) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let mut stream = TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.split();
    let (_, answer) = tokio::join!(writer.write_all(&chunked), async {
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut answer)).await;
        answer
    });
    assert!(
        status_line(&answer).starts_with("HTTP/1.1 413"),
        "chunked: {:?}",
        status_line(&answer)
    );
    assert!(String::from_utf8_lossy(&answer).contains("payload_too_large"));
    assert_alive(&app, "a chunked body over the limit").await;

    // A chunked body within the limit is read and accepted like any other.
    let within = callback("hostile-chunked", "processing", json!({}));
    let request = format!(
        "POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
         X-Hmac-Signature: {}\r\nConnection: close\r\n\r\n{:x}\r\n{within}\r\n0\r\n\r\n",
        app.signature(within.as_bytes()),
        within.len()
    );
    let answer = exchange(&app.address, request.as_bytes(), b"").await;
    assert!(
        status_line(&answer).starts_with("HTTP/1.1 200"),
        "chunked within: {:?}",
        status_line(&answer)
    );

    // Nothing but the one complete, signed callback was stored.
    let signed = HashSet::from([within.into_bytes()]);
    assert_eq!(assert_only_signed_bodies_stored(&app, &signed).await, 1);
    assert_memory_bounded(&app, before, "slow and malformed requests");
}

/// Sends `head` and nothing more (the body it announces never comes), and returns all the server
/// sent until it closed the connection. `read_until_closed` fails if it never does.
async fn head_only(address: &str, head: &str) -> String {
    let mut stream = TcpStream::connect(address.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    String::from_utf8_lossy(&read_until_closed(&mut stream, head.as_bytes()).await).into_owned()
}

fn has_header(answer: &str, name: &str, value: &str) -> bool {
    let head = answer.split("\r\n\r\n").next().unwrap_or("");
    head.lines().any(|line| {
        line.split_once(':').is_some_and(|(found, found_value)| {
            found.eq_ignore_ascii_case(name) && found_value.trim().eq_ignore_ascii_case(value)
        })
    })
}

/// A head with no, or a malformed, `X-Hmac-Signature` is answered 401 without a byte of its body
/// being read; a declared length over the limit is still 413 first; a well-formed signature
/// needs the body (here it never comes: 408 after the body timeout).
async fn a_bad_signature_header_is_refused_before_the_body_is_read(db: TestDatabase) {
    // A body timeout far beyond the 30 s `read_until_closed` allows: a server that waited for
    // the body before its 401 would fail this test instead of answering 408.
    let app = RelayProcess::start(
        db,
        &[("NEN_RELAY_WEBHOOK__BODY_TIMEOUT_MS", "600000".into())],
    )
    .await;
    let post = |extra: &str, length: usize| {
        format!(
            "POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             {extra}Content-Length: {length}\r\n\r\n"
        )
    };
    let hex64 = "ab".repeat(32);
    for (name, signature) in [
        ("no signature header", String::new()),
        ("empty signature", "X-Hmac-Signature: \r\n".to_owned()),
        ("sha1 label", format!("X-Hmac-Signature: sha1={hex64}\r\n")),
        (
            "63 hex digits",
            format!("X-Hmac-Signature: sha256={}\r\n", &hex64[..63]),
        ),
        (
            "not hex",
            format!("X-Hmac-Signature: sha256={}\r\n", "zz".repeat(32)),
        ),
        (
            "two headers",
            format!("X-Hmac-Signature: sha256={hex64}\r\nX-Hmac-Signature: sha256={hex64}\r\n"),
        ),
    ] {
        // A whole 1 MiB announced, under the limit, and never sent.
        let answer = head_only(&app.address, &post(&signature, LIMIT)).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{name}: {answer:.300}");
        assert!(
            answer.contains("invalid_signature"),
            "{name}: {answer:.300}"
        );
        assert!(
            has_header(&answer, "connection", "close"),
            "{name}: {answer:.300}"
        );
    }

    // Oversize and unsigned: the size is still judged first.
    let answer = head_only(&app.address, &post("", 4 * LIMIT)).await;
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "oversize: {answer:.300}"
    );
    assert!(
        answer.contains("payload_too_large"),
        "oversize: {answer:.300}"
    );

    // The early refusals are counted like any other.
    let metrics = app.metrics().await;
    let counted = sample(
        &metrics,
        "nen_relay_callbacks_total",
        &[("outcome", "invalid_signature")],
    );
    assert_eq!(counted, Some(6.0), "{metrics:.2000}");
    // Nothing was held for them.
    assert_eq!(
        sample(&metrics, "nen_relay_webhook_inflight_body_bytes", &[]).unwrap_or(0.0),
        0.0
    );
    assert_alive(&app, "early refusals").await;

    // A well-formed signature needs the body: the server reserves its declared length and waits
    // for it; a wrong one is then refused once the body is there, and nothing stays reserved.
    let mut waiting = TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = post(
        &format!("X-Hmac-Signature: sha256={hex64}\r\nConnection: close\r\n"),
        1000,
    );
    waiting.write_all(head.as_bytes()).await.unwrap();
    wait_for_held_bytes(&app, 1000.0).await;
    waiting.write_all(&[b' '; 1000]).await.unwrap();
    let answer = read_until_closed(&mut waiting, head.as_bytes()).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "well-formed: {answer:.300}"
    );
    wait_for_held_bytes(&app, 0.0).await;
}

/// Bodies held open unverified spend the byte budget: a signed callback then gets 503
/// `unavailable` with `Retry-After` at once (an unsigned one still its 401), and once the held
/// bodies go, callbacks are taken again.
async fn the_body_budget_refuses_with_503_and_recovers(db: TestDatabase) {
    const BODY: usize = 64 * 1024;
    let app = RelayProcess::start(
        db,
        &[
            ("NEN_RELAY_WEBHOOK__MAX_BODY_BYTES", BODY.to_string()),
            (
                "NEN_RELAY_WEBHOOK__MAX_INFLIGHT_BODY_BYTES",
                (2 * BODY).to_string(),
            ),
            ("NEN_RELAY_WEBHOOK__BODY_TIMEOUT_MS", "600000".into()),
        ],
    )
    .await;
    let wrong = format!("sha256={}", "00".repeat(32));
    // One body declared at the limit, one chunked (which reserves the whole limit): each sends
    // a few bytes and then holds on.
    let holders = [
        format!(
            "POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nX-Hmac-Signature: {wrong}\r\n\
             Content-Length: {BODY}\r\n\r\n{{\"message_id\":"
        ),
        format!(
            "POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nX-Hmac-Signature: {wrong}\r\n\
             Transfer-Encoding: chunked\r\n\r\n4\r\n{{\"m\"\r\n"
        ),
    ];
    let mut held = Vec::new();
    for (count, head) in holders.iter().enumerate() {
        let mut stream = TcpStream::connect(app.address.trim_start_matches("http://"))
            .await
            .unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        held.push(stream);
        wait_for_held_bytes(&app, ((count + 1) * BODY) as f64).await;
    }

    // Spent: a correctly signed callback is refused at once, to be retried.
    let body = callback("hostile-budget", "processing", json!({}));
    let response = app.deliver(&body).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(
        response.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "unavailable", "{answer}");
    let again = app.deliver(&body).await;
    assert_eq!(again.status(), StatusCode::SERVICE_UNAVAILABLE);
    // An unsigned one needs no budget: still its 401.
    let client = reqwest::Client::new();
    let unsigned = client
        .post(app.url("/webhooks/nen"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);
    let metrics = app.metrics().await;
    assert_eq!(
        sample(&metrics, "nen_relay_webhook_budget_exhausted_total", &[]),
        Some(2.0),
        "{metrics:.2000}"
    );
    assert_eq!(
        sample(
            &metrics,
            "nen_relay_callbacks_total",
            &[("outcome", "unavailable")]
        ),
        Some(2.0)
    );
    // Anyone can cause these refusals: one warning, not a line per request.
    let logs = app.output();
    let warnings = logs
        .matches("unverified callback bodies hold the whole budget")
        .count();
    assert_eq!(warnings, 1, "{logs:.3000}");
    assert!(!logs.contains("request not served"), "{logs:.3000}");

    // The holders hang up: their bytes come back, and the same callback is taken.
    drop(held);
    wait_for_held_bytes(&app, 0.0).await;
    let response = app.deliver(&body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        app.get_json("/v1/runs/hostile-budget").await["status"],
        "processing"
    );
    let signed = HashSet::from([body.into_bytes()]);
    assert_eq!(assert_only_signed_bodies_stored(&app, &signed).await, 1);
}

/// Waits until the gauge of bytes reserved for unverified bodies reads `bytes`.
async fn wait_for_held_bytes(app: &RelayProcess, bytes: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = app.metrics().await;
        let held = sample(&metrics, "nen_relay_webhook_inflight_body_bytes", &[]).unwrap_or(0.0);
        if held == bytes {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server holds {held} bytes for unverified bodies, not {bytes}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

on_both_backends!(
    every_hostile_request_gets_its_documented_answer,
    with_a_raised_limit_huge_fields_are_refused_or_taken_by_shape,
    slow_and_malformed_http_is_cut_off,
    a_bad_signature_header_is_refused_before_the_body_is_read,
    the_body_budget_refuses_with_503_and_recovers,
);
