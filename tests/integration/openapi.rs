//! `GET /openapi.json`: served without a token, the same as the committed copy, and naming only
//! routes the router has.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::on_both_backends;
use crate::support::app::error_code;
use crate::support::{TestApp, TestDatabase};

const COMMITTED: &str = include_str!("../../docs/openapi.json");

async fn the_document_is_served_without_a_token_and_is_the_committed_copy(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("the app answers");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert!(response.headers().contains_key("x-request-id"));
    let served: Value = response.json().await.expect("JSON");
    let committed: Value = serde_json::from_str(COMMITTED).expect("docs/openapi.json is JSON");
    assert_eq!(served, committed);
    assert_eq!(served["openapi"], "3.1.0");
}

/// Each documented operation reaches a handler: neither the unknown-route 404 nor a 405.
async fn every_documented_operation_is_routed(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let document: Value = serde_json::from_str(COMMITTED).unwrap();
    let paths = document["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (path, item) in paths {
        let concrete = path.replace("{message_id}", "no-such-run");
        for method in item.as_object().unwrap().keys() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = app
                .client
                .request(method.clone(), app.url(&concrete))
                .bearer_auth(&app.tokens[0])
                .send()
                .await
                .expect("the app answers");
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(
                !(status == StatusCode::NOT_FOUND && body["message"] == "no such endpoint"),
                "{method} {path} is documented but not routed"
            );
            checked += 1;
        }
    }
    assert!(checked >= 9, "only {checked} operations documented");
}

/// Found by Schemathesis (.ci/schemathesis.sh): a NUL character in a run lookup was a 500 on
/// PostgreSQL, which refuses it as a parameter. No stored id or status has one.
async fn nul_characters_in_run_lookups_are_client_errors(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    for path in ["/v1/runs/a%00b", "/v1/runs/a%00b/events"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(error_code(response).await, "not_found", "{path}");
    }
    for path in ["/v1/runs?status=a%00b", "/v1/runs?workflow_id=%00"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(error_code(response).await, "invalid_request", "{path}");
    }
}

on_both_backends!(
    the_document_is_served_without_a_token_and_is_the_committed_copy,
    every_documented_operation_is_routed,
    nul_characters_in_run_lookups_are_client_errors,
);
