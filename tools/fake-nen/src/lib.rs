//! fake-nen: a stand-in for Nen's `POST /runs` that calls back like Nen does.
//!
//! It checks `x-api-key`, insists on a signed request when `secure_workflow_params` are sent
//! (as Nen does), answers 202 with a fresh `messageId`, then POSTs signed callbacks to
//! the run's `webhook_callback`: `processing`, then `success` or `failed`. Options make it
//! misbehave the ways Nen may: repeated callbacks, callbacks out of order, and callbacks that
//! arrive before the 202 does. [`FakeNen`] runs it inside a test process; the `fake-nen` binary
//! runs it on its own. It shares no code with nen-relay, so that it checks the service against
//! Nen's documented behaviour rather than against the service's own reading of it.

mod signing;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use signing::{callback_signature, request_signature};

/// How the stand-in behaves.
#[derive(Debug, Clone, Default)]
pub struct FakeNenOptions {
    pub api_key: Option<String>,
    pub signing_key: Option<String>,
    pub webhook_secret: Option<String>,
    pub processing_delay: Duration,
    pub result_delay: Duration,
    pub fail_ratio: f64,
    pub duplicate: bool,
    pub reorder: bool,
    pub callback_first: bool,
}

/// One `POST /runs` the stand-in received, and its answer.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    /// Header names in lowercase.
    pub headers: BTreeMap<String, String>,
    pub body: Bytes,
    pub status: u16,
    pub message_id: Option<String>,
}

/// One callback the stand-in sent, and how the receiver answered (0: no answer).
#[derive(Debug, Clone)]
pub struct SentCallback {
    pub message_id: String,
    pub status: String,
    pub answered: u16,
}

#[derive(Default)]
struct Journal {
    requests: Vec<ReceivedRequest>,
    callbacks: Vec<SentCallback>,
}

struct Shared {
    options: FakeNenOptions,
    address: SocketAddr,
    journal: Mutex<Journal>,
    http: reqwest::Client,
}

/// A running stand-in. Stops when dropped.
pub struct FakeNen {
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Drop for FakeNen {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeNen {
    /// Listens on `bind` (port 0 picks a free one) and serves in the background.
    pub async fn start(bind: SocketAddr, options: FakeNenOptions) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(bind)
            .await
            .with_context(|| format!("cannot listen on {bind}"))?;
        let shared = Arc::new(Shared {
            options,
            address: listener.local_addr()?,
            journal: Mutex::new(Journal::default()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        });
        let router = Router::new()
            .route("/runs", post(start_run))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::error!(%error, "the fake Nen stopped");
            }
        });
        Ok(Self { shared, server })
    }

    pub fn address(&self) -> SocketAddr {
        self.shared.address
    }

    /// The base URL to give nen-relay as `NEN_API_BASE_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.address)
    }

    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.shared.journal.lock().unwrap().requests.clone()
    }

    pub fn callbacks(&self) -> Vec<SentCallback> {
        self.shared.journal.lock().unwrap().callbacks.clone()
    }
}

fn nen_error(status: StatusCode, error: &str, message: &str) -> Response {
    (status, Json(json!({"error": error, "message": message}))).into_response()
}

async fn start_run(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let (response, message_id, plan) = decide(&shared, &header, &body);
    let status = response.status().as_u16();
    shared
        .journal
        .lock()
        .unwrap()
        .requests
        .push(ReceivedRequest {
            headers: headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body,
            status,
            message_id: message_id.clone(),
        });
    if let Some(plan) = plan {
        if shared.options.callback_first {
            plan.send(&shared, false).await;
        } else {
            let shared = shared.clone();
            tokio::spawn(async move { plan.send(&shared, true).await });
        }
    }
    response
}

/// The callbacks one accepted run will get.
struct CallbackPlan {
    target: String,
    bodies: Vec<(String, String)>,
}

impl CallbackPlan {
    async fn send(self, shared: &Shared, with_delays: bool) {
        let options = &shared.options;
        for (index, (status, body)) in self.bodies.iter().enumerate() {
            if with_delays {
                let delay = if index == 0 {
                    options.processing_delay
                } else {
                    options.result_delay
                };
                tokio::time::sleep(delay).await;
            }
            let copies = if options.duplicate { 2 } else { 1 };
            for _ in 0..copies {
                let answered = deliver(shared, &self.target, body).await;
                let message_id = serde_json::from_str::<Value>(body)
                    .ok()
                    .and_then(|v| v["message_id"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                tracing::info!(%message_id, %status, answered, "fake Nen called back");
                shared.journal.lock().unwrap().callbacks.push(SentCallback {
                    message_id,
                    status: status.clone(),
                    answered,
                });
            }
        }
    }
}

/// POSTs one callback, retrying a few times when the receiver fails (as a provider would).
async fn deliver(shared: &Shared, target: &str, body: &str) -> u16 {
    let mut answered = 0;
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut request = shared
            .http
            .post(target)
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(secret) = &shared.options.webhook_secret {
            request = request.header(
                "X-Hmac-Signature",
                callback_signature(secret.as_bytes(), body.as_bytes()),
            );
        }
        match request.send().await {
            Ok(response) => {
                answered = response.status().as_u16();
                if !response.status().is_server_error() {
                    break;
                }
            }
            Err(error) => tracing::warn!(%error, "fake Nen could not deliver a callback"),
        }
    }
    answered
}

/// Nen's 400 for a request it cannot read; nothing is started.
fn invalid_request(detail: &str) -> (Response, Option<String>, Option<CallbackPlan>) {
    (
        nen_error(StatusCode::BAD_REQUEST, "Invalid request", detail),
        None,
        None,
    )
}

/// What Nen would answer, and the callbacks that follow an acceptance.
fn decide(
    shared: &Shared,
    header: &dyn Fn(&str) -> Option<String>,
    body: &[u8],
) -> (Response, Option<String>, Option<CallbackPlan>) {
    let options = &shared.options;
    let key_ok = match (header("x-api-key"), &options.api_key) {
        (Some(given), Some(expected)) => bool::from(given.as_bytes().ct_eq(expected.as_bytes())),
        (Some(given), None) => !given.is_empty(),
        (None, _) => false,
    };
    if !key_ok {
        return (
            nen_error(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Invalid or missing API key.",
            ),
            None,
            None,
        );
    }
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(body) else {
        return invalid_request("The body must be a JSON object.");
    };
    let Some(workflow_id) = request.get("workflow_id").and_then(Value::as_str) else {
        return invalid_request("Missing required field: workflow_id");
    };
    let Some(params) = request.get("workflow_params").and_then(Value::as_object) else {
        return invalid_request("Missing required field: workflow_params");
    };
    if request.contains_key("secure_workflow_params") {
        if let Some(refusal) = check_signature(options, header, body) {
            return (refusal, None, None);
        }
    }
    let message_id = uuid::Uuid::new_v4().to_string();
    let plan = request
        .get("webhook_callback")
        .and_then(Value::as_str)
        .map(|target| CallbackPlan {
            target: target.to_owned(),
            bodies: callbacks(shared, workflow_id, &message_id, params),
        });
    let accepted = (
        StatusCode::ACCEPTED,
        Json(json!({
            "message": "Job accepted for processing.",
            "messageId": message_id,
            "workflowId": workflow_id,
        })),
    )
        .into_response();
    (accepted, Some(message_id), plan)
}

fn check_signature(
    options: &FakeNenOptions,
    header: &dyn Fn(&str) -> Option<String>,
    body: &[u8],
) -> Option<Response> {
    let (Some(timestamp), Some(signature)) = (header("x-timestamp"), header("x-signature")) else {
        return Some(nen_error(
            StatusCode::FORBIDDEN,
            "hmac_required_for_secure_params",
            "The secure_workflow_params field requires HMAC authentication.",
        ));
    };
    let Some(signing_key) = &options.signing_key else {
        return None;
    };
    let fresh = timestamp
        .parse::<i64>()
        .is_ok_and(|seconds| (unix_now() - seconds).abs() <= 300);
    if !fresh {
        return Some(nen_error(
            StatusCode::UNAUTHORIZED,
            "invalid_timestamp",
            "x-timestamp is missing or outside the 5-minute tolerance.",
        ));
    }
    let expected = request_signature(signing_key.as_bytes(), &timestamp, body);
    if !bool::from(expected.as_bytes().ct_eq(signature.as_bytes())) {
        return Some(nen_error(
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
            "The request signature does not match.",
        ));
    }
    None
}

/// The callback bodies of one run, in the order they will be sent.
fn callbacks(
    shared: &Shared,
    workflow_id: &str,
    message_id: &str,
    params: &serde_json::Map<String, Value>,
) -> Vec<(String, String)> {
    let options = &shared.options;
    let expires_at = unix_now() + 3600;
    let fails = match params.get("FAKE_NEN_OUTCOME").and_then(Value::as_str) {
        Some("failed") => true,
        Some("success") => false,
        _ => rand::random::<f64>() < options.fail_ratio,
    };
    let base = json!({
        "workflow_id": workflow_id,
        "message_id": message_id,
        "expires_at": expires_at,
    });
    let with = |extra: Value| {
        let mut body = base.clone();
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        body.to_string()
    };
    let processing = (
        "processing".to_owned(),
        with(json!({"status": "processing"})),
    );
    let terminal = if fails {
        (
            "failed".to_owned(),
            with(
                json!({"status": "failed", "success": false, "error": "the fake Nen was told to fail this run"}),
            ),
        )
    } else {
        let names: Vec<&String> = params.keys().collect();
        (
            "success".to_owned(),
            with(json!({
                "status": "success",
                "success": true,
                "result": {"fake_nen": true, "parameters_received": names},
                "assets": format!("http://{}/assets/{message_id}.zip?expires={expires_at}", shared.address),
            })),
        )
    };
    if options.reorder {
        vec![terminal, processing]
    } else {
        vec![processing, terminal]
    }
}

/// Seconds since the Unix epoch, as Nen writes timestamps.
fn unix_now() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970");
    i64::try_from(elapsed.as_secs()).expect("seconds since 1970 fit in i64")
}
