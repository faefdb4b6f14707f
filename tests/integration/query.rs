//! The query API: runs, listing with keyset pagination, events, and bearer-token auth.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::on_both_backends;
use crate::support::app::{callback, error_code};
use crate::support::{TestApp, TestDatabase};

/// Every page of a listing, following `next_cursor`.
async fn all_pages(app: &TestApp, query: &str) -> (Vec<String>, usize) {
    let (mut ids, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/v1/runs?{query}&cursor={cursor}"),
            None => format!("/v1/runs?{query}"),
        };
        let page = app.get_json(&path).await;
        pages += 1;
        for run in page["runs"].as_array().unwrap() {
            ids.push(run["message_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (ids, pages),
        }
        assert!(pages < 100, "the listing does not end");
    }
}

async fn listing_pages_without_gaps_or_repeats_newest_first(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let mut sent = Vec::new();
    for i in 0..23 {
        let id = format!("m-page-{i:02}");
        let workflow = if i % 3 == 0 { "wf-a" } else { "wf-b" };
        let status = if i % 2 == 0 { "processing" } else { "success" };
        app.deliver_ok(&callback(&id, status, json!({"workflow_id": workflow})))
            .await;
        sent.push((id, workflow, status));
    }
    let (ids, pages) = all_pages(&app, "limit=5").await;
    assert_eq!(pages, 5);
    let newest_first: Vec<String> = sent.iter().rev().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(ids, newest_first);

    // A run arriving mid-walk appears on no page of the walk already under way: keyset pages
    // do not shift.
    let first = app.get_json("/v1/runs?limit=10").await;
    app.deliver_ok(&callback("m-page-late", "processing", json!({})))
        .await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = app
        .get_json(&format!("/v1/runs?limit=10&cursor={cursor}"))
        .await;
    let seen: HashSet<&str> = first["runs"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["runs"].as_array().unwrap())
        .map(|run| run["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(seen.len(), 20, "no repeats across pages");
    assert!(!seen.contains("m-page-late"));

    let (filtered, _) = all_pages(&app, "workflow_id=wf-a&status=processing&limit=2").await;
    let expected: Vec<String> = sent
        .iter()
        .rev()
        .filter(|(_, workflow, status)| *workflow == "wf-a" && *status == "processing")
        .map(|(id, _, _)| id.clone())
        .collect();
    assert_eq!(filtered, expected);
}

async fn bad_listing_parameters_are_named(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    for (query, word) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("cursor=garbage", "cursor"),
        ("colour=blue", "colour"),
    ] {
        let response = app.get(&format!("/v1/runs?{query}")).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request");
        assert!(
            body["message"].as_str().unwrap().contains(word),
            "{query}: {body}"
        );
    }
    assert_eq!(app.get_json("/v1/runs?limit=500").await["runs"], json!([]));
}

async fn a_run_has_every_spec_field(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    app.deliver_ok(&callback(
        "m-fields",
        "processing",
        json!({"expires_at": 1730319600}),
    ))
    .await;
    let run = app.run("m-fields").await;
    for key in [
        "message_id",
        "workflow_id",
        "status",
        "created_at",
        "updated_at",
        "completed_at",
        "expires_at",
        "result",
        "assets_url",
        "error",
        "triggered_here",
    ] {
        assert!(run.get(key).is_some(), "run lacks {key}: {run}");
    }
    assert_eq!(run["triggered_here"], false);
    assert!(run["created_at"].as_str().unwrap().ends_with('Z'));
    let response = app.get("/v1/runs/m-unknown").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(response).await, "not_found");
    let response = app.get("/v1/runs/m-unknown/events").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

async fn every_v1_route_requires_a_valid_bearer_token(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    app.deliver_ok(&callback("m-auth", "processing", json!({})))
        .await;
    let token = app.tokens[1].clone();
    // Each route with what a valid token gets there.
    let routes = [
        ("/v1/runs", StatusCode::OK),
        ("/v1/runs/m-auth", StatusCode::OK),
        ("/v1/runs/m-auth/events", StatusCode::OK),
        ("/v1/anything", StatusCode::NOT_FOUND),
    ];
    let refused = [
        None,
        Some("Bearer wrong".to_owned()),
        Some(format!("Basic {token}")),
        Some(format!("Bearer {token}x")),
        Some(format!("Bearer {}", &token[..token.len() - 1])),
        Some("Bearer ".to_owned()),
        Some(token.clone()),
    ];
    for (route, authorized) in routes {
        for authorization in &refused {
            let mut request = app.client.get(app.url(route));
            if let Some(value) = authorization {
                request = request.header("Authorization", value);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{route} {authorization:?}"
            );
            let challenge = response.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(challenge.starts_with("Bearer"));
            assert_eq!(error_code(response).await, "unauthorized");
        }
        // Either configured token works; the scheme is case-insensitive.
        let response = app
            .client
            .get(app.url(route))
            .header("Authorization", format!("bearer {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), authorized, "{route}");
    }
}

on_both_backends!(
    listing_pages_without_gaps_or_repeats_newest_first,
    bad_listing_parameters_are_named,
    a_run_has_every_spec_field,
    every_v1_route_requires_a_valid_bearer_token,
);
