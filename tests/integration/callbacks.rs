//! `POST /webhooks/nen`: the documented order of checks, deduplication, forward-only status.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::on_both_backends;
use crate::support::app::{callback, error_code};
use crate::support::{stored, TestApp, TestDatabase};

fn fixture() -> Value {
    let text = include_str!("../fixtures/callback-signatures.json");
    serde_json::from_str(text).expect("the fixture is JSON")
}

async fn every_fixture_case_verifies(db: TestDatabase) {
    let fixture = fixture();
    let secret = fixture["secret"].as_str().unwrap();
    let app = TestApp::spawn_with(db, |vars| {
        vars.insert(
            "NEN_WEBHOOK_SECRETS".into(),
            format!("some-other-secret,{secret}"),
        );
    })
    .await;
    for case in fixture["cases"].as_array().unwrap() {
        let body = case["body"].as_str().unwrap();
        let signature = case["x_hmac_signature"].as_str().unwrap();
        let response = app.deliver_with(body.as_bytes(), Some(signature)).await;
        assert_eq!(response.status(), StatusCode::OK, "valid case {body}");
        let ack: Value = response.json().await.unwrap();
        let sent: Value = serde_json::from_str(body).unwrap();
        assert_eq!(ack["received"], true);
        assert_eq!(ack["message_id"], sent["message_id"]);
        assert_eq!(ack["status"], sent["status"]);
    }
    // Byte for byte: the unicode case's payload comes back exactly as sent.
    let unicode = &fixture["cases"][3];
    let sent: Value = serde_json::from_str(unicode["body"].as_str().unwrap()).unwrap();
    let events = app.events(sent["message_id"].as_str().unwrap()).await;
    assert_eq!(events[0]["payload"], sent);
}

async fn every_invalid_fixture_case_is_refused_alike_and_stores_nothing(db: TestDatabase) {
    let fixture = fixture();
    let secret = fixture["secret"].as_str().unwrap();
    let app = TestApp::spawn_with(db, |vars| {
        vars.insert("NEN_WEBHOOK_SECRETS".into(), secret.into());
    })
    .await;
    let mut messages = HashSet::new();
    let mut cases: Vec<(String, Option<String>)> = fixture["invalid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            (
                case["body"].as_str().unwrap().to_owned(),
                Some(case["x_hmac_signature"].as_str().unwrap().to_owned()),
            )
        })
        .collect();
    cases.push((cases[0].0.clone(), None));
    for (body, signature) in &cases {
        let response = app
            .deliver_with(body.as_bytes(), signature.as_deref())
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{signature:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_signature");
        messages.insert(body["message"].as_str().unwrap().to_owned());
    }
    assert_eq!(messages.len(), 1, "the 401 must not say which part failed");
    let listing = app.get_json("/v1/runs").await;
    assert_eq!(listing["runs"], json!([]));
}

async fn checks_run_in_spec_order(db: TestDatabase) {
    let app = TestApp::spawn_with(db, |vars| {
        vars.insert("NEN_RELAY_WEBHOOK__MAX_BODY_BYTES".into(), "1024".into());
    })
    .await;
    // 1. Too large wins over a bad signature, and over a good one.
    let big = format!(
        r#"{{"message_id":"m","status":"processing","pad":"{}"}}"#,
        "x".repeat(2000)
    );
    let response = app.deliver_with(big.as_bytes(), Some("sha256=00")).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The body was refused unread, so the connection is not reused for another request.
    assert_eq!(
        response.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    assert_eq!(error_code(response).await, "payload_too_large");
    let response = app.deliver(&big).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // 2. A bad signature wins over a bad payload.
    let response = app
        .deliver_with(b"not json", Some(&app.signature(b"other")))
        .await;
    assert_eq!(error_code(response).await, "invalid_signature");
    // 3. Signed but not a callback: 400, and the body is kept for inspection (none of the
    // refused ones above is).
    let not_callbacks = [
        "not json",
        "[1,2]",
        r#"{"message_id":5,"status":"x"}"#,
        r#"{"message_id":"m"}"#,
    ];
    for body in not_callbacks {
        let response = app.deliver(body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_code(response).await, "invalid_payload");
    }
    let kept: Vec<Vec<u8>> = not_callbacks
        .iter()
        .map(|body| body.as_bytes().to_vec())
        .collect();
    assert_eq!(stored::rejected_bodies(&app.db).await, kept);
    // 5. A valid one.
    let ack = app
        .deliver_ok(&callback("m-order", "processing", json!({})))
        .await;
    assert_eq!(
        ack,
        json!({"received": true, "duplicate": false, "message_id": "m-order", "status": "processing"})
    );
}

async fn a_second_secret_is_accepted_for_rotation(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let body = callback("m-rotated", "processing", json!({}));
    let signature =
        nen_relay::callbacks::signature::sign(app.secrets[1].as_bytes(), body.as_bytes());
    let response = app.deliver_with(body.as_bytes(), Some(&signature)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let events = app.events("m-rotated").await;
    let expected = nen_relay::callbacks::signature::key_id(app.secrets[1].as_bytes());
    assert_eq!(events[0]["key_id"], json!(expected));
}

async fn duplicates_are_acknowledged_counted_and_flagged_when_different(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let body = callback("m-dup", "processing", json!({"expires_at": 1730319600}));
    assert_eq!(app.deliver_ok(&body).await["duplicate"], false);
    assert_eq!(app.deliver_ok(&body).await["duplicate"], true);
    let altered = callback("m-dup", "processing", json!({"expires_at": 1730319601}));
    assert_eq!(app.deliver_ok(&altered).await["duplicate"], true);
    let events = app.events("m-dup").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["duplicates"], 2);
    assert_eq!(events[0]["differing_duplicates"], 1);
    // The first body is the one kept.
    assert_eq!(events[0]["payload"]["expires_at"], 1730319600);
}

async fn status_only_moves_forward(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let result = json!({"documents_downloaded": 3});
    app.deliver_ok(&callback(
        "m-order2",
        "success",
        json!({"success": true, "result": result, "assets": "https://bucket/a.zip"}),
    ))
    .await;
    // A late processing does not regress the run, but may fill in what it alone carries.
    app.deliver_ok(&callback(
        "m-order2",
        "processing",
        json!({"expires_at": 1730319600}),
    ))
    .await;
    let run = app.run("m-order2").await;
    assert_eq!(run["status"], "success");
    assert_eq!(run["result"], result);
    assert_eq!(run["assets_url"], "https://bucket/a.zip");
    assert_eq!(run["expires_at"], "2024-10-30T20:20:00Z");
    assert!(run["completed_at"].is_string());
    let statuses: Vec<Value> = app
        .events("m-order2")
        .await
        .iter()
        .map(|e| e["status"].clone())
        .collect();
    assert_eq!(statuses, vec![json!("success"), json!("processing")]);
}

async fn a_conflicting_terminal_is_kept_and_flagged_but_never_wins(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    app.deliver_ok(&callback("m-conflict", "failed", json!({"error": "boom"})))
        .await;
    let ack = app
        .deliver_ok(&callback("m-conflict", "success", json!({"result": {}})))
        .await;
    assert_eq!(ack["duplicate"], false);
    let run = app.run("m-conflict").await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["error"], "boom");
    assert_eq!(run["result"], Value::Null);
    assert_eq!(run["conflicting_terminals"], true);
    let events = app.events("m-conflict").await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["conflicting_terminal"], false);
    assert_eq!(events[1]["conflicting_terminal"], true);
}

async fn fifty_identical_deliveries_at_once_make_one_event(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let body = callback("m-burst", "success", json!({"result": {"n": 1}}));
    let signature = app.signature(body.as_bytes());
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (client, url, body, signature, barrier) = (
            app.client.clone(),
            app.url("/webhooks/nen"),
            body.clone(),
            signature.clone(),
            barrier.clone(),
        );
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let response = client
                .post(url)
                .header("X-Hmac-Signature", signature)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.json::<Value>().await.unwrap()["duplicate"]
                .as_bool()
                .unwrap()
        }));
    }
    let mut firsts = 0;
    for task in tasks {
        if !task.await.unwrap() {
            firsts += 1;
        }
    }
    assert_eq!(firsts, 1, "exactly one delivery is the new one");
    let events = app.events("m-burst").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["duplicates"], 49);
    assert_eq!(app.run("m-burst").await["status"], "success");
}

/// A signed body that is not UTF-8 (bytes in an unknown field, or a Latin-1 body) is refused
/// and kept byte for byte; it never reaches the run, whose events stay readable.
async fn a_signed_body_that_is_not_utf8_is_refused_and_kept(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    app.deliver_ok(&callback("m-utf8", "processing", json!({})))
        .await;
    let bodies: [&[u8]; 3] = [
        b"{\"message_id\":\"m-utf8\",\"status\":\"success\",\"x\":\"\xff\xfe\"}",
        // Latin-1: "caf\u{e9}" written as the single byte 0xE9.
        b"{\"message_id\":\"m-utf8\",\"status\":\"failed\",\"error\":\"caf\xe9\"}",
        b"{\"message_id\":\"m-utf8\xe9\",\"status\":\"success\"}",
    ];
    for body in bodies {
        let response = app.deliver_with(body, Some(&app.signature(body))).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body:?}");
        assert_eq!(error_code(response).await, "invalid_payload");
    }
    let kept: Vec<Vec<u8>> = bodies.iter().map(|body| body.to_vec()).collect();
    assert_eq!(stored::rejected_bodies(&app.db).await, kept);
    assert_eq!(app.run("m-utf8").await["status"], "processing");
    let events = app.events("m-utf8").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["status"], "processing");
}

on_both_backends!(
    every_fixture_case_verifies,
    every_invalid_fixture_case_is_refused_alike_and_stores_nothing,
    checks_run_in_spec_order,
    a_second_secret_is_accepted_for_rotation,
    duplicates_are_acknowledged_counted_and_flagged_when_different,
    status_only_moves_forward,
    a_conflicting_terminal_is_kept_and_flagged_but_never_wins,
    fifty_identical_deliveries_at_once_make_one_event,
    a_signed_body_that_is_not_utf8_is_refused_and_kept,
);
