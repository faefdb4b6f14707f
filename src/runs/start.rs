//! Starting a run on Nen, at most once per `Idempotency-Key`.
//!
//! 1. Validate the request: every error names the field.
//! 2. Check that Nen can be called with it (`not_configured`), and decide the callback URL.
//! 3. Claim the `Idempotency-Key`, if one is given: replay the kept answer, or refuse (409).
//! 4. Call Nen exactly once. Never retried: Nen documents no idempotency key, so a second
//!    `POST /runs` after an ambiguous failure may start a second run.
//! 5. Record the run, then settle the key: keep the answer, or release the key on failure.
//!
//! All of it runs in a task of its own, so that a client that hangs up cannot cancel it half way:
//! a claimed key is always settled, and a run Nen accepted is always recorded. Its outcome is
//! counted there, once.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use chrono::Utc;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::Instrument;
use url::Url;

use super::idempotency::{self, FingerprintKey, IdempotencyKey};
use crate::config::Settings;
use crate::forward::ForwardWake;
use crate::metrics::{self, TriggerOutcome};
use crate::nen::{NenClient, NenError, NotConfigured, PreparedRun, RunRequest, SecureParams};
use crate::store::{ClaimOutcome, Store, StoreError, TriggeredRun};

/// Requests to start a run are small; this bounds what an authenticated client can make the
/// service buffer.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

const FIELDS: [&str; 4] = [
    "workflow_id",
    "workflow_params",
    "secure_workflow_params",
    "webhook_callback",
];

/// A request as the HTTP edge received it; nothing in it is checked yet. (No `Debug`: the body
/// may hold secure values.)
pub struct StartInput {
    /// The body, or `Err` when it was larger than [`MAX_REQUEST_BYTES`] or could not be read.
    pub body: Result<Bytes, UnreadableBody>,
    /// The `Idempotency-Key` header's value, if one was sent.
    pub idempotency_key: Option<Bytes>,
}

/// The body was larger than [`MAX_REQUEST_BYTES`], or the connection failed while it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnreadableBody;

/// A valid request to start a run. `Debug` shows no secure value (see [`SecureParams`]).
/// Read by [`StartRequest::parse`]; the derive only describes it in the OpenAPI document
/// (unknown fields are refused, hence `deny_unknown_fields`).
#[derive(Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    #[schema(format = Uuid)]
    pub workflow_id: String,
    /// The workflow's parameters; `{}` if it has none.
    #[schema(value_type = Object)]
    pub workflow_params: Map<String, Value>,
    /// Encrypted for Nen with `NEN_SIGNING_KEY`; never stored or logged.
    #[schema(value_type = Option<Object>)]
    pub secure_workflow_params: Option<SecureParams>,
    /// The caller's own callback URL; without it, [`StartPolicy::default_callback`] is used.
    #[schema(value_type = Option<String>, format = Uri, pattern = "^https?://")]
    pub webhook_callback: Option<Url>,
}

/// The operator's choices that shape every start.
#[derive(Debug, Clone)]
pub struct StartPolicy {
    /// The callback for requests that name none: `<NEN_RELAY_PUBLIC_URL>/webhooks/nen`.
    pub default_callback: Option<String>,
    /// Keep `workflow_params` with the run (personal data: off unless configured).
    pub store_workflow_params: bool,
    /// How long a key and its answer are kept.
    pub idempotency_ttl: Duration,
    /// The key of the idempotency fingerprint HMAC; `None` only without an API key.
    pub fingerprint_key: Option<FingerprintKey>,
}

/// The answer to a started run: what the caller gets, and what is kept for its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Submitted {
    pub message_id: String,
    pub workflow_id: String,
    /// Always `submitted`: a run's status until its first callback.
    #[schema(example = "submitted")]
    pub status: String,
}

/// A run Nen accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// Nen accepted it just now.
    New(Submitted),
    /// An earlier request with the same `Idempotency-Key` started it; this is its answer.
    Replayed(Submitted),
}

/// Why no run was started, or why it is unknown whether one was.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The request is malformed. The message names the field, and never quotes a value.
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    NotConfigured(#[from] NotConfigured),
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyConflict,
    #[error("a request with this Idempotency-Key is still in progress")]
    IdempotencyInProgress,
    /// Nen refused: no run was started. `answer` is Nen's body, withheld whole if it echoed a
    /// secure value.
    #[error("Nen rejected the request ({status})")]
    NenRejected { status: StatusCode, answer: Value },
    /// Nen could not be reached, failed, or answered nonsense. The detail is for logs.
    #[error("Nen could not be reached or failed: {0}")]
    NenUnavailable(String),
    /// Nen did not answer in time: the run may have started.
    #[error("Nen did not answer in time")]
    NenTimeout,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Starts runs on Nen.
#[derive(Clone)]
pub struct RunStarter {
    store: Arc<dyn Store>,
    nen: NenClient,
    policy: StartPolicy,
    /// Woken once a run is recorded: a new run queues forwarding messages.
    forward_wake: ForwardWake,
}

impl Submitted {
    pub fn new(message_id: String, workflow_id: String) -> Self {
        Self {
            message_id,
            workflow_id,
            status: "submitted".to_owned(),
        }
    }
}

impl Started {
    pub fn answer(&self) -> &Submitted {
        match self {
            Started::New(answer) | Started::Replayed(answer) => answer,
        }
    }

    pub fn is_replay(&self) -> bool {
        matches!(self, Started::Replayed(_))
    }
}

impl StartPolicy {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            default_callback: settings
                .public_url
                .as_ref()
                .map(|public| format!("{}/webhooks/nen", public.as_str().trim_end_matches('/'))),
            store_workflow_params: settings.trigger.store_workflow_params,
            idempotency_ttl: settings.trigger.idempotency_ttl,
            fingerprint_key: FingerprintKey::from_settings(
                settings.trigger.fingerprint_key.as_ref(),
                settings.nen.api_key.as_ref(),
            ),
        }
    }
}

impl StartRequest {
    /// Reads and validates a request body. Unknown fields are refused, so that a misspelt
    /// optional field is not silently ignored.
    pub fn parse(raw: &[u8]) -> Result<Self, StartError> {
        let invalid = |message: &str| StartError::InvalidRequest(message.to_owned());
        // serde_json's messages give a position, never the content.
        let value: Value = serde_json::from_slice(raw).map_err(|error| {
            StartError::InvalidRequest(format!("the body is not valid JSON: {error}"))
        })?;
        let Value::Object(mut fields) = value else {
            return Err(invalid("the body must be a JSON object"));
        };
        if let Some(unknown) = fields.keys().find(|name| !FIELDS.contains(&name.as_str())) {
            // Names are the caller's own text, but never values: quote at most a short name.
            let name: String = unknown.chars().take(64).collect();
            return Err(StartError::InvalidRequest(format!(
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
            Some(Value::Object(params)) => Some(SecureParams::new(params)),
            Some(_) => return Err(invalid("secure_workflow_params must be a JSON object")),
        };
        let webhook_callback = match fields.remove("webhook_callback") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(
                Url::parse(&text)
                    .ok()
                    .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
                    .ok_or_else(|| {
                        invalid("webhook_callback must be an http:// or https:// URL")
                    })?,
            ),
            Some(_) => {
                return Err(invalid(
                    "webhook_callback must be an http:// or https:// URL",
                ))
            }
        };
        Ok(StartRequest {
            workflow_id,
            workflow_params,
            secure_workflow_params,
            webhook_callback,
        })
    }
}

impl RunStarter {
    pub fn new(
        store: Arc<dyn Store>,
        nen: NenClient,
        policy: StartPolicy,
        forward_wake: ForwardWake,
    ) -> Self {
        Self {
            store,
            nen,
            policy,
            forward_wake,
        }
    }

    /// Starts the run `input` asks for, or replays the answer kept for its `Idempotency-Key`.
    pub async fn start(self, input: StartInput) -> Result<Started, StartError> {
        let task = async move {
            let result = self.run(input).await;
            if let Some(outcome) = outcome(&result) {
                metrics::record_trigger(outcome);
            }
            result
        };
        tokio::spawn(task.instrument(tracing::Span::current()))
            .await
            .unwrap_or_else(|error| {
                Err(StartError::Internal(format!(
                    "starting the run failed: {error}"
                )))
            })
    }

    async fn run(&self, input: StartInput) -> Result<Started, StartError> {
        let raw = input.body.map_err(|UnreadableBody| {
            StartError::InvalidRequest(format!(
                "the body must be JSON of at most {MAX_REQUEST_BYTES} bytes"
            ))
        })?;
        let request = StartRequest::parse(&raw)?;
        let key = input
            .idempotency_key
            .as_deref()
            .map(IdempotencyKey::parse)
            .transpose()
            .map_err(|error| StartError::InvalidRequest(error.to_string()))?;

        let webhook_callback = request
            .webhook_callback
            .as_ref()
            .map(Url::as_str)
            .or(self.policy.default_callback.as_deref());
        let call = self.nen.prepare(&RunRequest {
            workflow_id: &request.workflow_id,
            workflow_params: &request.workflow_params,
            secure_workflow_params: request.secure_workflow_params.as_ref(),
            webhook_callback,
        })?;
        // Checked after the configuration: a missing key is the operator's to fix first.
        if webhook_callback.is_none() {
            return Err(StartError::InvalidRequest(
                "webhook_callback is required while NEN_RELAY_PUBLIC_URL is not set \
                 (give webhook_callback, or set NEN_RELAY_PUBLIC_URL)"
                    .into(),
            ));
        }

        if let Some(key) = &key {
            let signing_key = self.nen.signing_key().map(|k| k.expose_secret().as_bytes());
            // Present whenever Nen is configured, which `prepare` has checked.
            let fingerprint_key = self
                .policy
                .fingerprint_key
                .as_ref()
                .ok_or(NotConfigured::ApiKey)?;
            let claim = idempotency::claim(
                key,
                &request,
                signing_key,
                fingerprint_key,
                self.policy.idempotency_ttl,
            );
            match self.store.claim_idempotency_key(&claim).await? {
                ClaimOutcome::Claimed => {}
                ClaimOutcome::Completed(stored) => {
                    // Not a read endpoint: a kept answer this service did not write cannot be
                    // replayed, and calling Nen again could start the run twice, so this stays
                    // an error (500) rather than a guess.
                    return idempotency::replay(&stored)
                        .map(Started::Replayed)
                        .map_err(|error| {
                            StartError::Internal(format!(
                                "cannot replay the answer kept for an Idempotency-Key: {error}"
                            ))
                        });
                }
                ClaimOutcome::InProgress => return Err(StartError::IdempotencyInProgress),
                ClaimOutcome::Conflict => return Err(StartError::IdempotencyConflict),
            }
        }

        let result = self.call_nen(&request, call).await;
        if let Some(key) = &key {
            self.settle(key, &result).await;
        }
        result.map(Started::New)
    }

    /// Sends the one `POST /runs`, and records the run if Nen accepted it.
    async fn call_nen(
        &self,
        request: &StartRequest,
        call: PreparedRun,
    ) -> Result<Submitted, StartError> {
        let workflow_id = request.workflow_id.as_str();
        let signed = call.is_signed();
        let accepted = call.send().await.map_err(|error| refusal(error, request))?;
        let message_id = accepted.message_id;
        if accepted
            .workflow_id
            .as_deref()
            .is_some_and(|id| id != workflow_id)
        {
            tracing::warn!(%message_id, %workflow_id, nen_workflow_id = ?accepted.workflow_id, "Nen answered with a different workflowId");
        }
        tracing::info!(%message_id, %workflow_id, signed, "Nen accepted the run");

        let run = TriggeredRun {
            message_id: message_id.clone(),
            workflow_id: workflow_id.to_owned(),
            workflow_params: self
                .policy
                .store_workflow_params
                .then(|| Value::Object(request.workflow_params.clone()).to_string()),
            created_at: Utc::now(),
        };
        match self.store.record_triggered_run(&run).await {
            Ok(()) => self.forward_wake.after_commit(),
            // The run exists on Nen whatever happens here: its callbacks will create the record.
            Err(error) => {
                tracing::error!(%message_id, %error, "Nen accepted the run, but recording it failed");
            }
        }
        Ok(Submitted::new(message_id, workflow_id.to_owned()))
    }

    /// Keeps the answer for the key, or frees the key after a failure.
    async fn settle(&self, key: &IdempotencyKey, result: &Result<Submitted, StartError>) {
        match result {
            Ok(answer) => {
                let kept = idempotency::keep(answer);
                if let Err(error) = self
                    .store
                    .complete_idempotency_key(key.as_str(), &kept)
                    .await
                {
                    tracing::error!(message_id = %answer.message_id, %error, "cannot store the answer for an Idempotency-Key; repeats get 409 until it expires");
                }
            }
            // Nen refused (no run was started) or the outcome is unknown. Either way the key is
            // freed: a refusal may be fixable (a key, a rate limit), and after an ambiguous
            // failure the client decides, knowingly, whether to try again.
            Err(_) => {
                if let Err(error) = self.store.release_idempotency_key(key.as_str()).await {
                    tracing::error!(%error, "cannot release an Idempotency-Key; it stays taken until it expires");
                }
            }
        }
    }
}

/// What the caller learns of a failed `POST /runs`.
fn refusal(error: NenError, request: &StartRequest) -> StartError {
    let workflow_id = request.workflow_id.as_str();
    match error {
        NenError::Rejected { status, body } => {
            let code = body.get("error").and_then(Value::as_str).unwrap_or("");
            tracing::warn!(%workflow_id, nen_status = status.as_u16(), nen_error = code, "Nen rejected the run");
            StartError::NenRejected {
                status,
                answer: withhold_secrets(body, request.secure_workflow_params.as_ref()),
            }
        }
        NenError::Timeout => {
            tracing::warn!(%workflow_id, "Nen did not answer in time; the run may have started");
            StartError::NenTimeout
        }
        NenError::Unavailable(detail) => StartError::NenUnavailable(detail),
    }
}

/// Nen's error answer is passed on to the caller, unless it echoes a secure value: then it is
/// replaced as a whole (better to lose a diagnostic than to leak a secret).
fn withhold_secrets(answer: Value, secure: Option<&SecureParams>) -> Value {
    let Some(secure) = secure else {
        return answer;
    };
    let text = answer.to_string();
    let echoes = secret_texts(secure.expose()).iter().any(|secret| {
        // Compared in the escaped form the value takes inside JSON text.
        let escaped = Value::String(secret.clone()).to_string();
        text.contains(escaped.trim_matches('"'))
    });
    if echoes {
        Value::String("(withheld: Nen's answer contained a secure parameter value)".into())
    } else {
        answer
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

/// How a start is counted; `None` for failures that are this service's own (its configuration
/// or its store), which other signals report.
fn outcome(result: &Result<Started, StartError>) -> Option<TriggerOutcome> {
    Some(match result {
        Ok(Started::New(_)) => TriggerOutcome::Accepted,
        Ok(Started::Replayed(_)) => TriggerOutcome::Replayed,
        Err(StartError::InvalidRequest(_)) => TriggerOutcome::Invalid,
        Err(StartError::IdempotencyConflict | StartError::IdempotencyInProgress) => {
            TriggerOutcome::Conflict
        }
        Err(StartError::NenRejected { .. }) => TriggerOutcome::NenRejected,
        Err(StartError::NenUnavailable(_)) => TriggerOutcome::NenUnavailable,
        Err(StartError::NenTimeout) => TriggerOutcome::NenTimeout,
        Err(StartError::NotConfigured(_) | StartError::Store(_) | StartError::Internal(_)) => {
            return None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKFLOW: &str = "12345678-1234-1234-1234-123456789abc";

    fn request(body: Value) -> Result<StartRequest, String> {
        StartRequest::parse(body.to_string().as_bytes()).map_err(|error| error.to_string())
    }

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
    fn a_request_prints_without_its_secure_values() {
        let parsed = request(serde_json::json!({
            "workflow_id": WORKFLOW,
            "workflow_params": {"PATIENT": "Jane"},
            "secure_workflow_params": {"password": "s3cret", "pin": 4321},
        }))
        .unwrap();
        let printed = format!("{parsed:?}");
        assert!(printed.contains(WORKFLOW), "{printed}");
        for secret in ["s3cret", "4321", "password"] {
            assert!(!printed.contains(secret), "{printed}");
        }
    }

    #[test]
    fn nen_answers_echoing_a_secure_value_are_withheld() {
        let secure = |value: Value| match value {
            Value::Object(map) => SecureParams::new(map),
            other => panic!("not an object: {other}"),
        };
        let password = secure(serde_json::json!({"password": "s3cret"}));
        let echoed = withhold_secrets(
            serde_json::json!({"message": "bad password s3cret"}),
            Some(&password),
        );
        assert!(!echoed.to_string().contains("s3cret"));
        let as_text = withhold_secrets(
            Value::String("password s3cret refused".into()),
            Some(&password),
        );
        assert!(!as_text.to_string().contains("s3cret"));
        let quoted = secure(serde_json::json!({"p": r#"a"b"#}));
        let echoed = withhold_secrets(serde_json::json!({"message": r#"x a"b y"#}), Some(&quoted));
        assert!(!echoed.to_string().contains(r#"a\"b"#));
        let nested = secure(serde_json::json!({"list": [{"pin": 98765}]}));
        let echoed = withhold_secrets(serde_json::json!({"message": "pin 98765"}), Some(&nested));
        assert!(!echoed.to_string().contains("98765"));
        let clean = serde_json::json!({"error": "Invalid request"});
        assert_eq!(withhold_secrets(clean.clone(), Some(&password)), clean);
        assert_eq!(withhold_secrets(clean.clone(), None), clean);
    }

    #[test]
    fn each_outcome_is_counted_under_its_label() {
        let submitted = || Submitted::new("m".into(), WORKFLOW.into());
        let label =
            |result: Result<Started, StartError>| outcome(&result).map(TriggerOutcome::as_str);
        assert_eq!(label(Ok(Started::New(submitted()))), Some("accepted"));
        assert_eq!(label(Ok(Started::Replayed(submitted()))), Some("replayed"));
        assert_eq!(
            label(Err(StartError::InvalidRequest("x".into()))),
            Some("invalid")
        );
        assert_eq!(
            label(Err(StartError::IdempotencyConflict)),
            Some("conflict")
        );
        assert_eq!(
            label(Err(StartError::IdempotencyInProgress)),
            Some("conflict")
        );
        assert_eq!(
            label(Err(StartError::NenRejected {
                status: StatusCode::BAD_REQUEST,
                answer: Value::Null
            })),
            Some("nen_rejected")
        );
        assert_eq!(
            label(Err(StartError::NenUnavailable("x".into()))),
            Some("nen_unavailable")
        );
        assert_eq!(label(Err(StartError::NenTimeout)), Some("nen_timeout"));
        assert_eq!(label(Err(NotConfigured::ApiKey.into())), None);
        assert_eq!(label(Err(StoreError::Unavailable("x".into()).into())), None);
    }
}
