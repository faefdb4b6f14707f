//! `POST /v1/runs`: what reaches Nen, how each Nen answer is passed on, no blind retry,
//! idempotency, the callback-before-202 race, and secure parameters never kept anywhere.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fake_nen::{FakeNen, FakeNenOptions};
use nen_relay::app::Application;
use nen_relay::config::{Environment, Settings};
use nen_relay::nen::signing;
use nen_relay::store::{
    self, ClaimOutcome, Delivery, DeliveryOutcome, Event, IdempotencyClaim, RejectedPayload, Run,
    RunPage, RunQuery, Store, StoreError, StoredResponse, SweepSession, TerminalRunFeed,
    TriggeredRun,
};
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use sqlx::{Connection, Row};
use tokio::sync::{Notify, Semaphore};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::on_both_backends;
use crate::support::app::error_code;
use crate::support::metrics::sample;
use crate::support::process::RelayProcess;
use crate::support::{logs, Backend, TestApp, TestDatabase};

const PUBLIC_URL: &str = "http://relay.example.test";

/// Keys unique to one test, so that leak checks cannot be fooled by another test's logs.
struct NenKeys {
    api_key: String,
    signing_key: String,
    webhook_secret: String,
}

impl NenKeys {
    fn new() -> Self {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        Self {
            api_key: format!("nen-api-key-{unique}"),
            signing_key: format!("nen-signing-key-{unique}"),
            webhook_secret: format!("whsec-fake-{unique}"),
        }
    }
}

fn workflow_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn nen_variables(vars: &mut BTreeMap<String, String>, base_url: &str, keys: &NenKeys) {
    vars.insert("NEN_API_BASE_URL".into(), base_url.into());
    vars.insert("NEN_API_KEY".into(), keys.api_key.clone());
    vars.insert("NEN_SIGNING_KEY".into(), keys.signing_key.clone());
    vars.insert("NEN_RELAY_PUBLIC_URL".into(), PUBLIC_URL.into());
}

async fn spawn_against(db: TestDatabase, base_url: &str, keys: &NenKeys) -> TestApp {
    TestApp::spawn_with(db, |vars| nen_variables(vars, base_url, keys)).await
}

async fn trigger(app: &TestApp, body: &Value, idempotency_key: Option<&str>) -> Response {
    let mut request = app
        .client
        .post(app.url("/v1/runs"))
        .bearer_auth(&app.tokens[0])
        .json(body);
    if let Some(key) = idempotency_key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.expect("the app answers")
}

fn accepted_by_nen(message_id: &str, workflow_id: &str) -> ResponseTemplate {
    ResponseTemplate::new(202).set_body_json(json!({
        "message": "Job accepted for processing.",
        "messageId": message_id,
        "workflowId": workflow_id,
        "someFieldNenMayAdd": [1, 2],
    }))
}

async fn requests_for(server: &MockServer, workflow_id: &str) -> Vec<wiremock::Request> {
    server
        .received_requests()
        .await
        .expect("request recording is on")
        .into_iter()
        .filter(|request| {
            request
                .body_json::<Value>()
                .is_ok_and(|body| body["workflow_id"] == workflow_id)
        })
        .collect()
}

async fn listed_runs(app: &TestApp) -> Vec<Value> {
    app.get_json("/v1/runs").await["runs"]
        .as_array()
        .unwrap()
        .clone()
}

async fn an_accepted_run_is_recorded_and_nen_gets_the_documented_request(db: TestDatabase) {
    let keys = NenKeys::new();
    let nen = MockServer::start().await;
    let app = spawn_against(db, &nen.uri(), &keys).await;
    let workflow = workflow_id();
    let message_id = uuid::Uuid::new_v4().to_string();
    Mock::given(method("POST"))
        .and(path("/runs"))
        .and(header("x-api-key", keys.api_key.as_str()))
        .respond_with(accepted_by_nen(&message_id, &workflow))
        .expect(1)
        .mount(&nen)
        .await;

    let params = json!({"PATIENT_NAME": "Jane Doe", "DATE_OF_BIRTH": "1990-01-15"});
    let response = trigger(
        &app,
        &json!({"workflow_id": workflow, "workflow_params": params}),
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(
        response.headers()["location"].to_str().unwrap(),
        format!("/v1/runs/{message_id}")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"message_id": message_id, "workflow_id": workflow, "status": "submitted"})
    );

    let sent = requests_for(&nen, &workflow).await;
    assert_eq!(sent.len(), 1, "exactly one request reaches Nen");
    let sent = &sent[0];
    assert_eq!(sent.headers["content-type"], "application/json");
    assert!(
        sent.headers.get("x-signature").is_none(),
        "no secure params: unsigned"
    );
    assert_eq!(
        sent.body_json::<Value>().unwrap(),
        json!({
            "workflow_id": workflow,
            "workflow_params": params,
            "webhook_callback": format!("{PUBLIC_URL}/webhooks/nen"),
        })
    );

    let run = app.run(&message_id).await;
    assert_eq!(run["status"], "submitted");
    assert_eq!(run["workflow_id"], workflow.as_str());
    assert_eq!(run["triggered_here"], true);
    assert!(
        run.get("workflow_params").is_none(),
        "not stored by default"
    );
    assert!(
        !dump_every_table(&app.db).await.contains("Jane Doe"),
        "workflow_params are personal data: not stored unless configured"
    );
}

async fn workflow_params_are_stored_when_configured(db: TestDatabase) {
    let keys = NenKeys::new();
    let nen = MockServer::start().await;
    let app = TestApp::spawn_with(db, |vars| {
        nen_variables(vars, &nen.uri(), &keys);
        vars.insert(
            "NEN_RELAY_TRIGGER__STORE_WORKFLOW_PARAMS".into(),
            "true".into(),
        );
    })
    .await;
    let workflow = workflow_id();
    Mock::given(method("POST"))
        .respond_with(accepted_by_nen("m-stored-params", &workflow))
        .mount(&nen)
        .await;
    let response = trigger(
        &app,
        &json!({"workflow_id": workflow, "workflow_params": {"A": 1}, "webhook_callback": "https://elsewhere.example/hook"}),
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let run = app.run("m-stored-params").await;
    assert_eq!(run["workflow_params"], json!({"A": 1}));
    let sent = requests_for(&nen, &workflow).await;
    assert_eq!(
        sent[0].body_json::<Value>().unwrap()["webhook_callback"],
        "https://elsewhere.example/hook",
        "an explicit webhook_callback wins over the default"
    );
}

async fn nen_refusals_are_passed_on_with_nens_answer(db: TestDatabase) {
    let keys = NenKeys::new();
    let nen = MockServer::start().await;
    let app = spawn_against(db, &nen.uri(), &keys).await;
    let cases = [
        (
            400,
            ResponseTemplate::new(400).set_body_json(
                json!({"error": "Invalid request", "message": "Missing required field: X"}),
            ),
            json!({"error": "Invalid request", "message": "Missing required field: X"}),
        ),
        (
            403,
            ResponseTemplate::new(403).set_body_json(json!({"error": "forbidden"})),
            json!({"error": "forbidden"}),
        ),
        (
            422,
            ResponseTemplate::new(422).set_body_string("not json at all"),
            json!("not json at all"),
        ),
    ];
    for (status, template, nen_error) in cases {
        let workflow = workflow_id();
        Mock::given(method("POST"))
            .and(body_partial_json(json!({"workflow_id": workflow})))
            .respond_with(template)
            .expect(1)
            .mount(&nen)
            .await;
        let response = trigger(
            &app,
            &json!({"workflow_id": workflow, "workflow_params": {}}),
            None,
        )
        .await;
        assert_eq!(response.status().as_u16(), status);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "nen_rejected");
        assert!(body["message"].is_string());
        assert_eq!(body["nen_status"], status);
        assert_eq!(body["nen_error"], nen_error);
        assert_eq!(requests_for(&nen, &workflow).await.len(), 1, "no retry");
    }
    assert_eq!(
        listed_runs(&app).await,
        Vec::<Value>::new(),
        "failures are not runs"
    );
}

/// On a process of its own, so that the counts of failed attempts are this test's alone.
async fn nen_failures_are_502_and_504_and_never_retried(db: TestDatabase) {
    let keys = NenKeys::new();
    let nen = MockServer::start().await;
    let mut variables = BTreeMap::new();
    nen_variables(&mut variables, &nen.uri(), &keys);
    variables.insert("NEN_RELAY_NEN__TIMEOUT_MS".into(), "300".into());
    let variables: Vec<(&str, String)> = variables
        .iter()
        .map(|(name, value)| (name.as_str(), value.clone()))
        .collect();
    let app = RelayProcess::start(db, &variables).await;

    let (failing, slow, no_message_id) = (workflow_id(), workflow_id(), workflow_id());
    let cases = [
        (
            &failing,
            ResponseTemplate::new(500).set_body_json(json!({"error": "boom"})),
            StatusCode::BAD_GATEWAY,
            "nen_unavailable",
        ),
        (
            &slow,
            accepted_by_nen("m-too-late", &slow).set_delay(Duration::from_secs(5)),
            StatusCode::GATEWAY_TIMEOUT,
            "nen_timeout",
        ),
        (
            &no_message_id,
            ResponseTemplate::new(202).set_body_json(json!({"message": "ok"})),
            StatusCode::BAD_GATEWAY,
            "nen_unavailable",
        ),
    ];
    for (workflow, answer, status, code) in cases {
        Mock::given(method("POST"))
            .and(body_partial_json(json!({"workflow_id": workflow})))
            .respond_with(answer)
            .expect(1)
            .mount(&nen)
            .await;
        let response = app
            .client
            .post(app.url("/v1/runs"))
            .bearer_auth(&app.token)
            .json(&json!({"workflow_id": workflow, "workflow_params": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{code}");
        assert_eq!(error_code(response).await, code);
        assert_eq!(requests_for(&nen, workflow).await.len(), 1, "never retried");
    }
    assert_eq!(app.get_json("/v1/runs").await["runs"], json!([]));
    let page = app.metrics().await;
    for (outcome, count) in [("nen_unavailable", 2.0), ("nen_timeout", 1.0)] {
        assert_eq!(
            sample(&page, "nen_relay_triggers_total", &[("outcome", outcome)]),
            Some(count),
            "failed attempts are counted: {outcome}"
        );
    }
    let accepted = sample(
        &page,
        "nen_relay_triggers_total",
        &[("outcome", "accepted")],
    );
    assert_eq!(accepted, None, "no attempt was accepted");
}

async fn a_refused_connection_is_502(db: TestDatabase) {
    let keys = NenKeys::new();
    let closed: SocketAddr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let app = spawn_against(db, &format!("http://{closed}"), &keys).await;
    let response = trigger(
        &app,
        &json!({"workflow_id": workflow_id(), "workflow_params": {}}),
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_code(response).await, "nen_unavailable");
}

async fn invalid_requests_name_the_field_and_never_reach_nen(db: TestDatabase) {
    let keys = NenKeys::new();
    let nen = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&nen)
        .await;
    let app = spawn_against(db, &nen.uri(), &keys).await;
    let workflow = workflow_id();
    let cases = [
        (json!({"workflow_params": {}}), "workflow_id"),
        (
            json!({"workflow_id": "not-a-uuid", "workflow_params": {}}),
            "workflow_id",
        ),
        (
            json!({"workflow_id": 42, "workflow_params": {}}),
            "workflow_id",
        ),
        (json!({"workflow_id": workflow}), "workflow_params"),
        (
            json!({"workflow_id": workflow, "workflow_params": "x"}),
            "workflow_params",
        ),
        (
            json!({"workflow_id": workflow, "workflow_params": {}, "secure_workflow_params": [1]}),
            "secure_workflow_params",
        ),
        (
            json!({"workflow_id": workflow, "workflow_params": {}, "webhook_callback": "not a url"}),
            "webhook_callback",
        ),
        (
            json!({"workflow_id": workflow, "workflow_params": {}, "webhook_callback": "file:///etc/passwd"}),
            "webhook_callback",
        ),
        (json!([1, 2]), "object"),
    ];
    for (body, field) in cases {
        let response = trigger(&app, &body, None).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"], "invalid_request");
        assert!(
            answer["message"].as_str().unwrap().contains(field),
            "{body} -> {answer}"
        );
    }
    let response = app
        .client
        .post(app.url("/v1/runs"))
        .bearer_auth(&app.tokens[0])
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response).await, "invalid_request");
    let response = trigger(
        &app,
        &json!({"workflow_id": workflow, "workflow_params": {}}),
        Some(&"k".repeat(300)),
    )
    .await;
    let answer: Value = response.json().await.unwrap();
    assert!(answer["message"]
        .as_str()
        .unwrap()
        .contains("Idempotency-Key"));
    let unauthenticated = app
        .client
        .post(app.url("/v1/runs"))
        .json(&json!({"workflow_id": workflow, "workflow_params": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);
}

async fn missing_configuration_is_named(db: TestDatabase) {
    let backend = db.backend;
    let nen = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&nen)
        .await;
    let mut app = TestApp::spawn_with(db, |vars| {
        vars.insert("NEN_API_BASE_URL".into(), nen.uri());
    })
    .await;
    let plain = json!({"workflow_id": workflow_id(), "workflow_params": {}, "webhook_callback": "https://x.example/h"});
    let response = trigger(&app, &plain, None).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "not_configured");
    assert!(body["message"].as_str().unwrap().contains("NEN_API_KEY"));
    app.shutdown().await;

    let db = crate::support::backends::fresh_database(backend).await;
    let app = TestApp::spawn_with(db, |vars| {
        vars.insert("NEN_API_BASE_URL".into(), nen.uri());
        vars.insert("NEN_API_KEY".into(), "key".into());
    })
    .await;
    let secure = json!({"workflow_id": workflow_id(), "workflow_params": {}, "secure_workflow_params": {"p": "v"}, "webhook_callback": "https://x.example/h"});
    let response = trigger(&app, &secure, None).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "not_configured");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("NEN_SIGNING_KEY"));

    let no_callback = json!({"workflow_id": workflow_id(), "workflow_params": {}});
    let response = trigger(&app, &no_callback, None).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let message = response.json::<Value>().await.unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("webhook_callback") && message.contains("NEN_RELAY_PUBLIC_URL"));
}

async fn callbacks_that_beat_the_202_still_make_one_successful_run(db: TestDatabase) {
    let keys = NenKeys::new();
    let fake = FakeNen::start(
        "127.0.0.1:0".parse().unwrap(),
        FakeNenOptions {
            api_key: Some(keys.api_key.clone()),
            signing_key: Some(keys.signing_key.clone()),
            webhook_secret: Some(keys.webhook_secret.clone()),
            callback_first: true,
            ..FakeNenOptions::default()
        },
    )
    .await
    .unwrap();
    let app = TestApp::spawn_with(db, |vars| {
        nen_variables(vars, &fake.url(), &keys);
        vars.insert("NEN_WEBHOOK_SECRETS".into(), keys.webhook_secret.clone());
    })
    .await;
    let workflow = workflow_id();
    let response = trigger(
        &app,
        &json!({"workflow_id": workflow, "workflow_params": {"A": "b"}, "webhook_callback": app.url("/webhooks/nen")}),
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    let message_id = body["message_id"].as_str().unwrap();
    let sent = fake.callbacks();
    assert_eq!(
        sent.iter()
            .map(|c| (c.status.as_str(), c.answered))
            .collect::<Vec<_>>(),
        [("processing", 200), ("success", 200)],
        "both callbacks were stored before the 202"
    );
    let stored = app
        .store
        .get_run(message_id)
        .await
        .unwrap()
        .expect("the run is stored");
    assert!(stored.triggered_here);
    let run = app.run(message_id).await;
    assert_eq!(
        run["status"], "success",
        "the 202 must not move the run back"
    );
    assert_eq!(run["triggered_here"], true);
    assert_eq!(run["workflow_id"], workflow.as_str());
    assert!(run["assets_url"].as_str().unwrap().contains(message_id));
    assert_eq!(app.events(message_id).await.len(), 2);
    assert_eq!(fake.requests().len(), 1);
}

async fn a_repeated_idempotency_key_replays_the_first_answer(db: TestDatabase) {
    let keys = NenKeys::new();
    let nen = MockServer::start().await;
    let app = spawn_against(db, &nen.uri(), &keys).await;
    let workflow = workflow_id();
    Mock::given(method("POST"))
        .and(body_partial_json(json!({"workflow_id": workflow})))
        .respond_with(accepted_by_nen("m-idem-1", &workflow))
        .expect(1)
        .mount(&nen)
        .await;
    let body = json!({"workflow_id": workflow, "workflow_params": {"A": 1, "B": 2}});
    let key = format!("key-{}", uuid::Uuid::new_v4());
    let first = trigger(&app, &body, Some(&key)).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first_location = first.headers()["location"].clone();
    let first_body: Value = first.json().await.unwrap();

    // The same request with keys in another order is the same request.
    let reordered: Value = serde_json::from_str(&format!(
        r#"{{"workflow_params":{{"B":2,"A":1}},"workflow_id":"{workflow}"}}"#
    ))
    .unwrap();
    for repeat in [&body, &reordered] {
        let again = trigger(&app, repeat, Some(&key)).await;
        assert_eq!(again.status(), StatusCode::ACCEPTED);
        assert_eq!(again.headers()["location"], first_location);
        assert_eq!(again.json::<Value>().await.unwrap(), first_body);
    }
    assert_eq!(
        requests_for(&nen, &workflow).await.len(),
        1,
        "Nen called once"
    );

    let different = json!({"workflow_id": workflow, "workflow_params": {"A": 2}});
    let conflict = trigger(&app, &different, Some(&key)).await;
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    assert_eq!(error_code(conflict).await, "idempotency_conflict");
    assert_eq!(requests_for(&nen, &workflow).await.len(), 1);

    // An ambiguous failure frees the key: a deliberate retry reaches Nen again.
    let flaky = workflow_id();
    Mock::given(method("POST"))
        .and(body_partial_json(json!({"workflow_id": flaky})))
        .respond_with(ResponseTemplate::new(503))
        .expect(2)
        .mount(&nen)
        .await;
    let flaky_body = json!({"workflow_id": flaky, "workflow_params": {}});
    let flaky_key = format!("key-{}", uuid::Uuid::new_v4());
    for _ in 0..2 {
        let response = trigger(&app, &flaky_body, Some(&flaky_key)).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    }
    assert_eq!(requests_for(&nen, &flaky).await.len(), 2);
}

async fn ten_simultaneous_requests_with_one_key_call_nen_once(db: TestDatabase) {
    let keys = NenKeys::new();
    let nen = MockServer::start().await;
    let app = spawn_against(db, &nen.uri(), &keys).await;
    let workflow = workflow_id();
    Mock::given(method("POST"))
        .respond_with(
            accepted_by_nen("m-concurrent", &workflow).set_delay(Duration::from_millis(300)),
        )
        .mount(&nen)
        .await;
    let body = json!({"workflow_id": workflow, "workflow_params": {}});
    let key = format!("key-{}", uuid::Uuid::new_v4());
    let answers = futures::future::join_all((0..10).map(|_| async {
        let response = trigger(&app, &body, Some(&key)).await;
        let status = response.status();
        (status, response.json::<Value>().await.unwrap())
    }))
    .await;
    assert_eq!(
        requests_for(&nen, &workflow).await.len(),
        1,
        "Nen called once"
    );
    let mut accepted = 0;
    for (status, answer) in &answers {
        match *status {
            StatusCode::ACCEPTED => {
                accepted += 1;
                assert_eq!(answer["message_id"], "m-concurrent");
            }
            StatusCode::CONFLICT => assert_eq!(answer["error"], "idempotency_in_progress"),
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert!(accepted >= 1, "{answers:?}");
    let later = trigger(&app, &body, Some(&key)).await;
    assert_eq!(
        later.status(),
        StatusCode::ACCEPTED,
        "the stored answer is replayed"
    );
}

async fn secure_params_are_signed_and_kept_nowhere(db: TestDatabase) {
    let keys = NenKeys::new();
    let secret_value = format!("s3cret-{}", uuid::Uuid::new_v4().simple());
    let fake = FakeNen::start(
        "127.0.0.1:0".parse().unwrap(),
        FakeNenOptions {
            api_key: Some(keys.api_key.clone()),
            signing_key: Some(keys.signing_key.clone()),
            webhook_secret: Some(keys.webhook_secret.clone()),
            callback_first: true,
            ..FakeNenOptions::default()
        },
    )
    .await
    .unwrap();
    let app = TestApp::spawn_with(db, |vars| {
        nen_variables(vars, &fake.url(), &keys);
        vars.insert("NEN_WEBHOOK_SECRETS".into(), keys.webhook_secret.clone());
        vars.insert(
            "NEN_RELAY_TRIGGER__STORE_WORKFLOW_PARAMS".into(),
            "true".into(),
        );
    })
    .await;
    let workflow = workflow_id();
    let body = json!({
        "workflow_id": workflow,
        "workflow_params": {"PATIENT_NAME": "Jane Doe"},
        "secure_workflow_params": {"password": secret_value},
        "webhook_callback": app.url("/webhooks/nen"),
    });
    let key = format!("key-{}", uuid::Uuid::new_v4());
    let response = trigger(&app, &body, Some(&key)).await;
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "the fake verified the signature"
    );
    let replay = trigger(&app, &body, Some(&key)).await;
    assert_eq!(replay.status(), StatusCode::ACCEPTED);

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    let timestamp = &sent.headers["x-timestamp"];
    assert_eq!(
        sent.headers["x-signature"],
        signing::signature(keys.signing_key.as_bytes(), timestamp, &sent.body),
        "the signature covers exactly the bytes sent"
    );
    let sent_json: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(
        sent_json["secure_workflow_params"]["password"],
        secret_value.as_str()
    );

    // Nen refuses and echoes the secret back: the caller never sees it.
    let nen = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": "Invalid request", "message": format!("bad password {secret_value}")}),
        ))
        .mount(&nen)
        .await;
    let echo_app = TestApp::spawn_with(
        crate::support::backends::fresh_database(app.db.backend).await,
        |vars| nen_variables(vars, &nen.uri(), &keys),
    )
    .await;
    let refused = trigger(&echo_app, &body, Some("echo-key")).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let refused_text = refused.text().await.unwrap();
    assert!(refused_text.contains("nen_rejected"), "{refused_text}");

    let mut places = vec![
        ("the database", dump_every_table(&app.db).await),
        ("the second database", dump_every_table(&echo_app.db).await),
        ("the logs", logs::captured()),
        ("an error body", refused_text),
    ];
    for app in [&app, &echo_app] {
        let metrics = app.client.get(app.url("/metrics")).send().await.unwrap();
        places.push(("the metrics", metrics.text().await.unwrap()));
    }
    assert!(
        places[0].1.contains("Jane Doe"),
        "the dump covers the runs table"
    );
    for (place, text) in &places {
        let mut secrets = vec![
            secret_value.clone(),
            keys.api_key.clone(),
            keys.signing_key.clone(),
        ];
        secrets.extend(app.all_secrets());
        secrets.extend(echo_app.all_secrets());
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "a secret reached {place}");
            assert!(
                !text.contains(&hex::encode(secret.as_bytes())),
                "a secret reached {place} (hex)"
            );
        }
    }
}

/// The fake alone, no relay: one run, under no backend's name.
#[tokio::test]
async fn the_fake_refuses_unsigned_secure_params_like_nen() {
    let fake = FakeNen::start("127.0.0.1:0".parse().unwrap(), FakeNenOptions::default())
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/runs", fake.url()))
        .header("x-api-key", "any")
        .json(&json!({"workflow_id": workflow_id(), "workflow_params": {}, "secure_workflow_params": {"p": "v"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "hmac_required_for_secure_params"
    );
    let response = client
        .post(format!("{}/runs", fake.url()))
        .json(&json!({"workflow_id": workflow_id(), "workflow_params": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "x-api-key is required"
    );
}

/// Passes every call through, except that each `claim_idempotency_key` is held, once it has
/// committed, until `let_claims_return` is called: the window in which a caller may hang up.
struct HeldClaims {
    inner: Arc<dyn Store>,
    claimed: Notify,
    gate: Semaphore,
}

impl HeldClaims {
    fn let_claims_return(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

#[async_trait]
impl Store for HeldClaims {
    async fn record_deliveries(
        &self,
        deliveries: &[Delivery],
    ) -> Result<Vec<DeliveryOutcome>, StoreError> {
        self.inner.record_deliveries(deliveries).await
    }
    async fn record_rejected_payload(&self, rejected: &RejectedPayload) -> Result<(), StoreError> {
        self.inner.record_rejected_payload(rejected).await
    }
    async fn get_run(&self, message_id: &str) -> Result<Option<Run>, StoreError> {
        self.inner.get_run(message_id).await
    }
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        self.inner.list_runs(query).await
    }
    async fn list_events(&self, message_id: &str) -> Result<Vec<Event>, StoreError> {
        self.inner.list_events(message_id).await
    }
    async fn record_triggered_run(&self, run: &TriggeredRun) -> Result<(), StoreError> {
        self.inner.record_triggered_run(run).await
    }
    async fn claim_idempotency_key(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<ClaimOutcome, StoreError> {
        let outcome = self.inner.claim_idempotency_key(claim).await;
        self.claimed.notify_one();
        let _permit = self.gate.acquire().await.expect("never closed");
        outcome
    }
    async fn complete_idempotency_key(
        &self,
        key: &str,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        self.inner.complete_idempotency_key(key, response).await
    }
    async fn release_idempotency_key(&self, key: &str) -> Result<(), StoreError> {
        self.inner.release_idempotency_key(key).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    fn pool_usage(&self) -> Vec<nen_relay::store::PoolUsage> {
        self.inner.pool_usage()
    }

    async fn list_stuck_runs(
        &self,
        query: &RunQuery,
        changed_before: DateTime<Utc>,
    ) -> Result<RunPage, StoreError> {
        self.inner.list_stuck_runs(query, changed_before).await
    }
    async fn count_stuck_runs(
        &self,
        changed_before: DateTime<Utc>,
        cap: u32,
    ) -> Result<u64, StoreError> {
        self.inner.count_stuck_runs(changed_before, cap).await
    }
    async fn terminal_run_feed(&self) -> Result<Option<Box<dyn TerminalRunFeed>>, StoreError> {
        self.inner.terminal_run_feed().await
    }
    async fn begin_sweep(&self) -> Result<Option<Box<dyn SweepSession>>, StoreError> {
        self.inner.begin_sweep().await
    }
    fn outbox(&self) -> &dyn nen_relay::store::Outbox {
        self.inner.outbox()
    }
}

async fn a_client_that_hangs_up_after_the_claim_still_gets_its_run_and_its_key_settled(
    db: TestDatabase,
) {
    let keys = NenKeys::new();
    let nen = MockServer::start().await;
    let workflow = workflow_id();
    Mock::given(method("POST"))
        .and(body_partial_json(json!({"workflow_id": workflow})))
        .respond_with(accepted_by_nen("m-hung-up", &workflow))
        .expect(1)
        .mount(&nen)
        .await;
    let token = format!("token-{}", uuid::Uuid::new_v4().simple());
    let mut variables = BTreeMap::from([
        ("NEN_RELAY_BIND".into(), "127.0.0.1:0".into()),
        ("DATABASE_URL".into(), db.url.clone()),
        ("NEN_WEBHOOK_SECRETS".into(), keys.webhook_secret.clone()),
        ("NEN_RELAY_API_TOKENS".into(), token.clone()),
    ]);
    nen_variables(&mut variables, &nen.uri(), &keys);
    let settings = Settings::from_sources(
        Environment::Local,
        Path::new("/nonexistent-nen-relay-config"),
        &variables,
    )
    .expect("valid test settings");
    let inner = store::connect(&settings.database_url, &settings.store.options(), true)
        .await
        .expect("the test database opens and migrates");
    let held = Arc::new(HeldClaims {
        inner,
        claimed: Notify::new(),
        gate: Semaphore::new(0),
    });
    let application = Application::build_with_store(settings, held.clone())
        .await
        .expect("the app builds");
    let url = format!("http://127.0.0.1:{}/v1/runs", application.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(application.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let body = json!({"workflow_id": workflow, "workflow_params": {}});
    let key = format!("key-{}", uuid::Uuid::new_v4());
    let send = || {
        client
            .post(&url)
            .bearer_auth(&token)
            .header("Idempotency-Key", &key)
            .json(&body)
            .send()
    };

    // The client gives up while its key is claimed and Nen not yet called: dropping the
    // request closes its connection.
    tokio::select! {
        answer = send() => panic!("answered while the claim was held: {answer:?}"),
        () = held.claimed.notified() => {}
    }
    held.let_claims_return();

    // The run is started and the key settled all the same: a repeat gets the kept answer.
    let mut repeat = send().await.unwrap();
    for _ in 0..100 {
        if repeat.status() != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        repeat = send().await.unwrap();
    }
    assert_eq!(repeat.status(), StatusCode::ACCEPTED);
    assert_eq!(repeat.headers()["idempotent-replayed"], "true");
    assert_eq!(repeat.headers()["location"], "/v1/runs/m-hung-up");
    assert_eq!(
        repeat.json::<Value>().await.unwrap()["message_id"],
        "m-hung-up"
    );
    assert_eq!(
        requests_for(&nen, &workflow).await.len(),
        1,
        "Nen called once"
    );
    let run = held
        .get_run("m-hung-up")
        .await
        .unwrap()
        .expect("the run is recorded");
    assert!(run.triggered_here);

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// Every row of every table, as text.
async fn dump_every_table(db: &TestDatabase) -> String {
    let mut dump = String::new();
    match db.backend {
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
            let tables: Vec<String> = sqlx::query_scalar(
                "select table_name::text from information_schema.tables \
                 where table_schema = 'public' and table_type = 'BASE TABLE'",
            )
            .fetch_all(&mut connection)
            .await
            .unwrap();
            assert!(tables.len() >= 4, "{tables:?}");
            for table in tables {
                let rows: Vec<String> =
                    sqlx::query_scalar(&format!("select t::text from \"{table}\" t"))
                        .fetch_all(&mut connection)
                        .await
                        .unwrap();
                dump.push_str(&format!("{table}: {}\n", rows.join("\n")));
            }
        }
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            let tables: Vec<String> =
                sqlx::query_scalar("select name from sqlite_master where type = 'table'")
                    .fetch_all(&mut connection)
                    .await
                    .unwrap();
            for table in tables {
                let rows = sqlx::query(&format!("select * from \"{table}\""))
                    .fetch_all(&mut connection)
                    .await
                    .unwrap();
                for row in rows {
                    for index in 0..row.len() {
                        let cell = row
                            .try_get::<Option<String>, _>(index)
                            .ok()
                            .flatten()
                            .or_else(|| {
                                row.try_get::<Option<Vec<u8>>, _>(index)
                                    .ok()
                                    .flatten()
                                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                            })
                            .unwrap_or_default();
                        dump.push_str(&cell);
                        dump.push('|');
                    }
                    dump.push('\n');
                }
            }
        }
    }
    dump
}

on_both_backends!(
    an_accepted_run_is_recorded_and_nen_gets_the_documented_request,
    workflow_params_are_stored_when_configured,
    nen_refusals_are_passed_on_with_nens_answer,
    nen_failures_are_502_and_504_and_never_retried,
    a_refused_connection_is_502,
    invalid_requests_name_the_field_and_never_reach_nen,
    missing_configuration_is_named,
    callbacks_that_beat_the_202_still_make_one_successful_run,
    a_repeated_idempotency_key_replays_the_first_answer,
    ten_simultaneous_requests_with_one_key_call_nen_once,
    secure_params_are_signed_and_kept_nowhere,
    a_client_that_hangs_up_after_the_claim_still_gets_its_run_and_its_key_settled,
);
