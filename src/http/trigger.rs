//! `POST /v1/runs`: starts a run on Nen, at most once per `Idempotency-Key`.
//!
//! 1. Read and validate the body (400 naming the field).
//! 2. Check that Nen can be called (503 `not_configured`).
//! 3. Claim the `Idempotency-Key` if one is given (replay the stored answer, or 409).
//! 4. Call Nen exactly once.
//! 5. Record the run and answer 202, or pass on Nen's refusal.
//!
//! Steps 3 to 5 run in a task of their own, so that a client that hangs up mid-call cannot
//! cancel them: a claimed key is always settled, and a run Nen accepted is always recorded.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tracing::Instrument;
use url::Url;

use super::AppState;
use crate::error::ApiError;
use crate::metrics;
use crate::nen::StartRunOutcome;
use crate::store::{ClaimOutcome, IdempotencyClaim, StoredResponse, TriggeredRun};

/// Trigger bodies are small; this bounds what an authenticated client can make us buffer.
const MAX_BODY_BYTES: usize = 1024 * 1024;
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const MAX_IDEMPOTENCY_KEY_LENGTH: usize = 255;
const FIELDS: [&str; 4] = [
    "workflow_id",
    "workflow_params",
    "secure_workflow_params",
    "webhook_callback",
];

/// A validated trigger request.
#[derive(Debug)]
struct TriggerRequest {
    workflow_id: String,
    workflow_params: Map<String, Value>,
    secure_workflow_params: Option<Map<String, Value>>,
    webhook_callback: Option<Url>,
}

/// Exactly what Nen receives (nen-api.md section 1).
#[derive(Serialize)]
struct NenRunRequest<'a> {
    workflow_id: &'a str,
    workflow_params: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secure_workflow_params: Option<&'a Map<String, Value>>,
    webhook_callback: &'a str,
}

#[derive(Serialize)]
struct Submitted<'a> {
    message_id: &'a str,
    workflow_id: &'a str,
    status: &'static str,
}

pub async fn start_run(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    match handle(state, &headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn handle(state: AppState, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let raw = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::InvalidRequest(format!(
                "the body must be JSON of at most {MAX_BODY_BYTES} bytes"
            ))
        })
        .inspect_err(|_| metrics::record_trigger("invalid"))?;
    let request = parse_request(&raw).inspect_err(|_| metrics::record_trigger("invalid"))?;
    let idempotency_key =
        idempotency_key(headers).inspect_err(|_| metrics::record_trigger("invalid"))?;

    if !state.nen.has_api_key() {
        return Err(ApiError::NotConfigured(
            "NEN_API_KEY is not set, so runs cannot be started on Nen".into(),
        ));
    }
    let signed = request.secure_workflow_params.is_some();
    if signed && !state.nen.can_sign() {
        return Err(ApiError::NotConfigured(
            "secure_workflow_params must be sent signed, and NEN_SIGNING_KEY is not set".into(),
        ));
    }
    let webhook_callback = match (&request.webhook_callback, &state.settings.public_url) {
        (Some(url), _) => url.to_string(),
        (None, Some(public)) => format!("{}/webhooks/nen", public.as_str().trim_end_matches('/')),
        (None, None) => {
            metrics::record_trigger("invalid");
            return Err(ApiError::InvalidRequest(
                "webhook_callback is required while NEN_RELAY_PUBLIC_URL is not set \
                 (give webhook_callback, or set NEN_RELAY_PUBLIC_URL)"
                    .into(),
            ));
        }
    };

    // Built here, claimed in the detached part: a claim whose request is cancelled half way
    // would keep the key "in progress" until it expires.
    let claim = idempotency_key.as_ref().map(|key| {
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(state.settings.trigger.idempotency_ttl)
            .unwrap_or(chrono::Duration::hours(24));
        IdempotencyClaim {
            key: key.clone(),
            request_sha256: fingerprint(
                &request,
                state
                    .nen
                    .signing_key()
                    .map(|k| k.expose_secret().as_bytes()),
            ),
            now,
            expires_at: now + ttl,
        }
    });

    let outgoing = NenRunRequest {
        workflow_id: &request.workflow_id,
        workflow_params: &request.workflow_params,
        secure_workflow_params: request.secure_workflow_params.as_ref(),
        webhook_callback: &webhook_callback,
    };
    // Serialised once: these exact bytes are signed and sent.
    let body = Bytes::from(serde_json::to_vec(&outgoing).map_err(|error| {
        ApiError::Internal(format!("cannot serialise the request to Nen: {error}"))
    })?);
    let call = NenCall {
        workflow_id: request.workflow_id.clone(),
        stored_params: state
            .settings
            .trigger
            .store_workflow_params
            .then(|| Value::Object(request.workflow_params.clone()).to_string()),
        secure_values: request
            .secure_workflow_params
            .as_ref()
            .map(secret_texts)
            .unwrap_or_default(),
        claim,
        body,
        signed,
    };
    tokio::spawn(call_nen(state, call).instrument(tracing::Span::current()))
        .await
        .map_err(|error| ApiError::Internal(format!("the call to Nen failed: {error}")))?
}

/// Everything the detached part needs.
struct NenCall {
    workflow_id: String,
    stored_params: Option<String>,
    /// Secure parameter values, only to scrub them from Nen's error answers.
    secure_values: Vec<String>,
    claim: Option<IdempotencyClaim>,
    body: Bytes,
    signed: bool,
}

async fn call_nen(state: AppState, call: NenCall) -> Result<Response, ApiError> {
    if let Some(claim) = &call.claim {
        match state.store.claim_idempotency_key(claim).await? {
            ClaimOutcome::Claimed => {}
            ClaimOutcome::Completed(stored) => {
                metrics::record_trigger("replayed");
                return Ok(replay(stored));
            }
            ClaimOutcome::InProgress => {
                metrics::record_trigger("conflict");
                return Err(ApiError::IdempotencyInProgress);
            }
            ClaimOutcome::Conflict => {
                metrics::record_trigger("conflict");
                return Err(ApiError::IdempotencyConflict);
            }
        }
    }
    let idempotency_key = call.claim.map(|claim| claim.key);
    let workflow_id = call.workflow_id.as_str();
    let outcome = state.nen.start_run(call.body, call.signed).await;
    let (message_id, nen_workflow_id) = match outcome {
        StartRunOutcome::Accepted {
            message_id,
            workflow_id,
        } => (message_id, workflow_id),
        failure => {
            // Nen refused (no run was started) or the outcome is unknown. Either way the key is
            // freed: a refusal may be fixable (a key, a rate limit), and after an ambiguous
            // failure the client decides, knowingly, whether to try again.
            if let Some(key) = &idempotency_key {
                if let Err(error) = state.store.release_idempotency_key(key).await {
                    tracing::error!(%error, "cannot release an Idempotency-Key; it stays taken until it expires");
                }
            }
            return Err(failure_error(failure, workflow_id, &call.secure_values));
        }
    };
    metrics::record_trigger("accepted");
    if nen_workflow_id
        .as_deref()
        .is_some_and(|id| id != workflow_id)
    {
        tracing::warn!(%message_id, %workflow_id, nen_workflow_id = ?nen_workflow_id, "Nen answered with a different workflowId");
    }
    tracing::info!(%message_id, %workflow_id, signed = call.signed, "Nen accepted the run");

    let run = TriggeredRun {
        message_id: message_id.clone(),
        workflow_id: workflow_id.to_owned(),
        workflow_params: call.stored_params,
        created_at: Utc::now(),
    };
    if let Err(error) = state.store.record_triggered_run(&run).await {
        // The run exists on Nen whatever happens here: its callbacks will create the record.
        tracing::error!(%message_id, %error, "Nen accepted the run, but recording it failed");
    }
    let body = serde_json::to_string(&Submitted {
        message_id: &message_id,
        workflow_id,
        status: "submitted",
    })
    .expect("plain strings serialise");
    if let Some(key) = &idempotency_key {
        let stored = StoredResponse {
            status: StatusCode::ACCEPTED.as_u16(),
            body: body.clone(),
        };
        if let Err(error) = state.store.complete_idempotency_key(key, &stored).await {
            tracing::error!(%message_id, %error, "cannot store the answer for an Idempotency-Key; repeats get 409 until it expires");
        }
    }
    Ok(json_response(StatusCode::ACCEPTED, body, Some(&message_id)))
}

fn failure_error(
    outcome: StartRunOutcome,
    workflow_id: &str,
    secure_values: &[String],
) -> ApiError {
    match outcome {
        StartRunOutcome::Rejected { status, body } => {
            metrics::record_trigger("nen_rejected");
            let code = body.get("error").and_then(Value::as_str).unwrap_or("");
            tracing::warn!(%workflow_id, nen_status = status.as_u16(), nen_error = code, "Nen rejected the run");
            ApiError::NenRejected {
                status,
                nen_error: scrub(body, secure_values),
            }
        }
        StartRunOutcome::Timeout => {
            metrics::record_trigger("nen_timeout");
            tracing::warn!(%workflow_id, "Nen did not answer in time; the run may have started");
            ApiError::NenTimeout
        }
        StartRunOutcome::Unavailable(detail) => {
            metrics::record_trigger("nen_unavailable");
            ApiError::NenUnavailable(detail)
        }
        StartRunOutcome::Accepted { .. } => unreachable!("an acceptance is not a failure"),
    }
}

fn parse_request(raw: &[u8]) -> Result<TriggerRequest, ApiError> {
    let invalid = |message: &str| ApiError::InvalidRequest(message.to_owned());
    // serde_json's messages give a position, never the content.
    let value: Value = serde_json::from_slice(raw).map_err(|error| {
        ApiError::InvalidRequest(format!("the body is not valid JSON: {error}"))
    })?;
    let Value::Object(mut fields) = value else {
        return Err(invalid("the body must be a JSON object"));
    };
    if let Some(unknown) = fields.keys().find(|name| !FIELDS.contains(&name.as_str())) {
        // Names are the caller's own text, but never values: quote at most a short name.
        let name: String = unknown.chars().take(64).collect();
        return Err(ApiError::InvalidRequest(format!(
            "unknown field {name:?}; expected {}",
            FIELDS.join(", ")
        )));
    }
    let workflow_id = match fields.remove("workflow_id") {
        Some(Value::String(text)) if uuid::Uuid::try_parse(&text).is_ok() => text,
        Some(_) => return Err(invalid("workflow_id must be a UUID string")),
        None => return Err(invalid("workflow_id is required")),
    };
    let workflow_params = match fields.remove("workflow_params") {
        Some(Value::Object(params)) => params,
        Some(_) => return Err(invalid("workflow_params must be a JSON object")),
        None => {
            return Err(invalid(
                "workflow_params is required (an object, {} if the workflow has none)",
            ))
        }
    };
    let secure_workflow_params = match fields.remove("secure_workflow_params") {
        None | Some(Value::Null) => None,
        Some(Value::Object(params)) => Some(params),
        Some(_) => return Err(invalid("secure_workflow_params must be a JSON object")),
    };
    let webhook_callback = match fields.remove("webhook_callback") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(
            Url::parse(&text)
                .ok()
                .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
                .ok_or_else(|| invalid("webhook_callback must be an http:// or https:// URL"))?,
        ),
        Some(_) => {
            return Err(invalid(
                "webhook_callback must be an http:// or https:// URL",
            ))
        }
    };
    Ok(TriggerRequest {
        workflow_id,
        workflow_params,
        secure_workflow_params,
        webhook_callback,
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|key| {
            (1..=MAX_IDEMPOTENCY_KEY_LENGTH).contains(&key.len())
                && key.bytes().all(|byte| byte.is_ascii_graphic())
        })
        .map(|key| Some(key.to_owned()))
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII characters"
            ))
        })
}

/// SHA-256 of a canonical form of the request, to tell a repeat from a different request.
///
/// Secure parameters enter only as an HMAC keyed with the signing key (they cannot be sent
/// without it), so the stored hash cannot be used to guess them: a plain hash of a short
/// password is easily brute-forced. Key order and whitespace do not matter.
fn fingerprint(request: &TriggerRequest, signing_key: Option<&[u8]>) -> [u8; 32] {
    let secure = match (&request.secure_workflow_params, signing_key) {
        (Some(params), Some(key)) => {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
            mac.update(b"nen-relay idempotency: secure_workflow_params\n");
            mac.update(canonical_json(&Value::Object(params.clone())).as_bytes());
            Value::String(hex::encode(mac.finalize().into_bytes()))
        }
        // Never reached (secure parameters need the signing key); never hash them in the clear.
        (Some(_), None) => Value::String("unsigned".into()),
        (None, _) => Value::Null,
    };
    let canonical = serde_json::json!({
        "workflow_id": request.workflow_id,
        "workflow_params": request.workflow_params,
        "secure_workflow_params_hmac": secure,
        "webhook_callback": request.webhook_callback.as_ref().map(Url::as_str),
    });
    Sha256::digest(canonical_json(&canonical).as_bytes()).into()
}

/// JSON with object keys sorted at every level and no whitespace.
fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = entries
                .into_iter()
                .map(|(key, value)| {
                    format!("{}:{}", Value::String(key.clone()), canonical_json(value))
                })
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", inner.join(","))
        }
        scalar => scalar.to_string(),
    }
}

/// Every scalar inside the secure parameters, as text.
fn secret_texts(params: &Map<String, Value>) -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::String(text) if !text.is_empty() => out.push(text.clone()),
            Value::Number(number) => out.push(number.to_string()),
            Value::Array(items) => items.iter().for_each(|item| walk(item, out)),
            Value::Object(map) => map.values().for_each(|item| walk(item, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    params.values().for_each(|value| walk(value, &mut out));
    out
}

/// Nen's error answer is passed on to the caller, unless it echoes a secure value: then it is
/// replaced as a whole (better to lose a diagnostic than to leak a secret).
fn scrub(body: Value, secure_values: &[String]) -> Value {
    let text = body.to_string();
    let echoes = secure_values.iter().any(|secret| {
        // Compared in the escaped form the value takes inside JSON text.
        let escaped = Value::String(secret.clone()).to_string();
        text.contains(escaped.trim_matches('"'))
    });
    if echoes {
        Value::String("(withheld: Nen's answer contained a secure parameter value)".into())
    } else {
        body
    }
}

fn replay(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::ACCEPTED);
    let message_id = serde_json::from_str::<Value>(&stored.body)
        .ok()
        .and_then(|body| {
            body.get("message_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
    let mut response = json_response(
        status,
        stored.body,
        message_id
            .as_deref()
            .filter(|_| status == StatusCode::ACCEPTED),
    );
    response.headers_mut().insert(
        HeaderName::from_static("idempotent-replayed"),
        HeaderValue::from_static("true"),
    );
    response
}

fn json_response(status: StatusCode, body: String, message_id: Option<&str>) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(location) = message_id
        .and_then(|id| HeaderValue::from_str(&format!("/v1/runs/{}", encode_segment(id))).ok())
    {
        headers.insert(header::LOCATION, location);
    }
    response
}

/// Percent-encodes everything but RFC 3986 unreserved characters (a UUID passes unchanged).
fn encode_segment(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> Result<TriggerRequest, String> {
        parse_request(body.to_string().as_bytes()).map_err(|error| error.to_string())
    }

    const WORKFLOW: &str = "12345678-1234-1234-1234-123456789abc";

    #[test]
    fn each_invalid_field_is_named() {
        let cases = [
            (serde_json::json!({"workflow_params": {}}), "workflow_id"),
            (
                serde_json::json!({"workflow_id": "nope", "workflow_params": {}}),
                "workflow_id",
            ),
            (
                serde_json::json!({"workflow_id": WORKFLOW}),
                "workflow_params",
            ),
            (
                serde_json::json!({"workflow_id": WORKFLOW, "workflow_params": []}),
                "workflow_params",
            ),
            (
                serde_json::json!({"workflow_id": WORKFLOW, "workflow_params": {}, "secure_workflow_params": "x"}),
                "secure_workflow_params",
            ),
            (
                serde_json::json!({"workflow_id": WORKFLOW, "workflow_params": {}, "webhook_callback": "ftp://x/y"}),
                "webhook_callback",
            ),
            (
                serde_json::json!({"workflow_id": WORKFLOW, "workflow_params": {}, "webhook_callback": 5}),
                "webhook_callback",
            ),
            (
                serde_json::json!({"workflow_id": WORKFLOW, "workflow_params": {}, "webhook_calback": "https://x"}),
                "webhook_calback",
            ),
        ];
        for (body, field) in cases {
            let message = request(body.clone()).unwrap_err();
            assert!(message.contains(field), "{body} -> {message}");
        }
        assert!(
            request(serde_json::json!({"workflow_id": WORKFLOW, "workflow_params": {}})).is_ok()
        );
    }

    #[test]
    fn the_fingerprint_ignores_key_order_and_hides_secure_values() {
        let a = parse_request(
            format!(r#"{{"workflow_id":"{WORKFLOW}","workflow_params":{{"a":1,"b":2}},"secure_workflow_params":{{"p":"x"}}}}"#).as_bytes(),
        )
        .unwrap();
        let b = parse_request(
            format!(r#"{{ "secure_workflow_params":{{"p":"x"}}, "workflow_params":{{"b":2,"a":1}},"workflow_id":"{WORKFLOW}"}}"#).as_bytes(),
        )
        .unwrap();
        let c = parse_request(
            format!(r#"{{"workflow_id":"{WORKFLOW}","workflow_params":{{"a":1,"b":2}},"secure_workflow_params":{{"p":"y"}}}}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(fingerprint(&a, Some(b"k")), fingerprint(&b, Some(b"k")));
        assert_ne!(fingerprint(&a, Some(b"k")), fingerprint(&c, Some(b"k")));
        // Without the key, the hash does not reveal the secure value (it is keyed).
        assert_ne!(fingerprint(&a, Some(b"k")), fingerprint(&a, Some(b"other")));
    }

    #[test]
    fn nen_answers_echoing_a_secure_value_are_withheld() {
        let secrets = vec!["s3cret".to_owned()];
        let echoed = scrub(
            serde_json::json!({"message": "bad password s3cret"}),
            &secrets,
        );
        assert!(!echoed.to_string().contains("s3cret"));
        let as_text = scrub(Value::String("password s3cret refused".into()), &secrets);
        assert!(!as_text.to_string().contains("s3cret"));
        let quoted = vec![r#"a"b"#.to_owned()];
        let echoed = scrub(serde_json::json!({"message": r#"x a"b y"#}), &quoted);
        assert!(!echoed.to_string().contains(r#"a\"b"#));
        let clean = serde_json::json!({"error": "Invalid request"});
        assert_eq!(scrub(clean.clone(), &secrets), clean);
    }

    #[test]
    fn locations_are_encoded() {
        assert_eq!(encode_segment("550e8400-e29b"), "550e8400-e29b");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }
}
