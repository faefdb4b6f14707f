//! The outbound client for Nen's `POST /runs`: base URL, `x-api-key`, optional request signing,
//! and a connect and a total timeout.
//!
//! A call has two steps. [`NenClient::prepare`] takes a typed [`RunRequest`], refuses it if a
//! key it needs is not configured, and serialises Nen's JSON once; [`PreparedRun::send`] signs
//! exactly those bytes when secure parameters are present, and sends them.
//!
//! It never retries: Nen documents no idempotency key, so a second `POST /runs` after an
//! ambiguous failure may start a second run. The caller decides what to tell its own client.

use std::fmt;

use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use url::Url;

use super::signing;
use crate::config::NenSettings;

/// Nen's answers are small; anything beyond this is cut off rather than buffered.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// `secure_workflow_params`: values Nen must receive but nobody else may see. Its `Debug` says
/// only how many there are, so a request can be logged whole without leaking them.
#[derive(Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct SecureParams(Map<String, Value>);

impl SecureParams {
    pub fn new(params: Map<String, Value>) -> Self {
        Self(params)
    }

    pub fn expose(&self) -> &Map<String, Value> {
        &self.0
    }
}

impl fmt::Debug for SecureParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecureParams({} redacted)", self.0.len())
    }
}

/// One `POST /runs`, exactly as Nen receives it (docs/nen.md, "Starting a run").
#[derive(Debug, Serialize)]
pub struct RunRequest<'a> {
    pub workflow_id: &'a str,
    pub workflow_params: &'a Map<String, Value>,
    /// Sent only when present; its presence makes the request signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secure_workflow_params: Option<&'a SecureParams>,
    /// Optional for Nen (without it, results are only available from Nen itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_callback: Option<&'a str>,
}

/// Nen took the run (a 2xx with a `messageId`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub message_id: String,
    /// The `workflowId` Nen echoed, if any.
    pub workflow_id: Option<String>,
}

/// Why a `POST /runs` did not start a run, or may not have.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NenError {
    /// Nen refused with a 4xx: no run was started. `body` is Nen's answer, or its text as a
    /// JSON string when it was not JSON.
    #[error("Nen rejected the run ({status})")]
    Rejected { status: StatusCode, body: Value },
    /// No connection, a 5xx, or an answer that cannot be understood. The detail is for logs.
    #[error("{0}")]
    Unavailable(String),
    /// No complete answer within the total timeout: the run may or may not have started.
    #[error("Nen did not answer in time")]
    Timeout,
}

/// A key this service needs to call Nen, and does not have. The message names the variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotConfigured {
    #[error("NEN_API_KEY is not set, so runs cannot be started on Nen")]
    ApiKey,
    #[error("secure_workflow_params must be sent signed, and NEN_SIGNING_KEY is not set")]
    SigningKey,
}

/// Calls Nen. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct NenClient {
    http: reqwest::Client,
    runs_url: Url,
    api_key: Option<SecretString>,
    signing_key: Option<SecretString>,
}

impl fmt::Debug for NenClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NenClient")
            .field("runs_url", &self.runs_url.as_str())
            .field("api_key", &self.api_key.is_some())
            .field("signing_key", &self.signing_key.is_some())
            .finish()
    }
}

/// The part of Nen's 202 this service needs; other fields are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Acceptance {
    message_id: Option<String>,
    workflow_id: Option<String>,
}

impl NenClient {
    pub fn new(settings: &NenSettings) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            // A redirected POST may be replayed as a GET or re-sent elsewhere: never follow.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("nen-relay/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            runs_url: runs_url(&settings.base_url),
            api_key: settings.api_key.clone(),
            signing_key: settings.signing_key.clone(),
        })
    }

    /// The signing key, for keyed hashes of secure parameters (idempotency fingerprints).
    pub fn signing_key(&self) -> Option<&SecretString> {
        self.signing_key.as_ref()
    }

    /// Checks that this request can be sent (the only place that decides "not configured"),
    /// and serialises it: the bytes that [`PreparedRun::send`] signs and sends are these.
    pub fn prepare(&self, request: &RunRequest<'_>) -> Result<PreparedRun, NotConfigured> {
        let api_key = self.api_key.as_ref().ok_or(NotConfigured::ApiKey)?;
        let signing_key = match request.secure_workflow_params {
            Some(_) => Some(self.signing_key.clone().ok_or(NotConfigured::SigningKey)?),
            None => None,
        };
        let body = serde_json::to_vec(request).expect("strings and JSON values always serialise");
        Ok(PreparedRun {
            http: self.http.clone(),
            runs_url: self.runs_url.clone(),
            api_key: sensitive(api_key.expose_secret()),
            signing_key,
            body: Bytes::from(body),
        })
    }
}

/// A `POST /runs` ready to go: the keys it needs are at hand and its body is serialised.
pub struct PreparedRun {
    http: reqwest::Client,
    runs_url: Url,
    api_key: HeaderValue,
    /// Present exactly when the request carries secure parameters.
    signing_key: Option<SecretString>,
    body: Bytes,
}

impl PreparedRun {
    pub fn is_signed(&self) -> bool {
        self.signing_key.is_some()
    }

    /// Sends the request exactly once. A signed request gets `x-timestamp` and `x-signature`,
    /// computed now over the very bytes sent.
    pub async fn send(self) -> Result<Accepted, NenError> {
        let mut request = self
            .http
            .post(self.runs_url)
            .header(CONTENT_TYPE, "application/json")
            .header("x-api-key", self.api_key);
        if let Some(signing_key) = &self.signing_key {
            let timestamp = chrono::Utc::now().timestamp().to_string();
            let signature = signing::signature(
                signing_key.expose_secret().as_bytes(),
                &timestamp,
                &self.body,
            );
            request = request
                .header("x-timestamp", timestamp)
                .header("x-signature", signature);
        }
        let response = request
            .body(self.body)
            .send()
            .await
            .map_err(|error| classify_error(&error))?;
        let status = response.status();
        let answer = read_limited(response)
            .await
            .map_err(|error| classify_error(&error))?;
        interpret(status, &answer)
    }
}

/// `<base>/runs`, keeping any path prefix the base URL has.
fn runs_url(base: &Url) -> Url {
    let mut url = base.clone();
    let path = format!("{}/runs", base.path().trim_end_matches('/'));
    url.set_path(&path);
    url
}

/// The settings refuse a key with control characters, the only ones a header cannot carry.
fn sensitive(value: &str) -> HeaderValue {
    let mut header = HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""));
    header.set_sensitive(true);
    header
}

fn classify_error(error: &reqwest::Error) -> NenError {
    // A connect failure (even a connect timeout) means nothing was sent: not ambiguous.
    if error.is_connect() {
        NenError::Unavailable(format!("cannot connect to Nen: {}", error_chain(error)))
    } else if error.is_timeout() {
        NenError::Timeout
    } else {
        NenError::Unavailable(format!("request to Nen failed: {}", error_chain(error)))
    }
}

/// The error and its causes on one line: the cause is what an operator needs.
fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut answer = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_ANSWER_BYTES.saturating_sub(answer.len());
        answer.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    Ok(answer)
}

fn interpret(status: StatusCode, answer: &[u8]) -> Result<Accepted, NenError> {
    if status.is_success() {
        return match serde_json::from_slice::<Acceptance>(answer) {
            Ok(Acceptance {
                message_id: Some(message_id),
                workflow_id,
            }) if !message_id.is_empty() => Ok(Accepted {
                message_id,
                workflow_id,
            }),
            _ => Err(NenError::Unavailable(format!(
                "Nen answered {status} without a messageId"
            ))),
        };
    }
    if status.is_client_error() {
        let body = serde_json::from_slice(answer)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(answer).into_owned()));
        return Err(NenError::Rejected { status, body });
    }
    Err(NenError::Unavailable(format!("Nen answered {status}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runs_url_keeps_a_base_path() {
        let url = |base: &str| runs_url(&Url::parse(base).unwrap()).to_string();
        assert_eq!(url("https://api.getnen.ai"), "https://api.getnen.ai/runs");
        assert_eq!(url("http://127.0.0.1:9/v2/"), "http://127.0.0.1:9/v2/runs");
    }

    #[test]
    fn answers_are_classified() {
        let accepted = interpret(
            StatusCode::ACCEPTED,
            br#"{"message":"Job accepted for processing.","messageId":"m-1","workflowId":"w","extra":1}"#,
        );
        assert_eq!(
            accepted,
            Ok(Accepted {
                message_id: "m-1".into(),
                workflow_id: Some("w".into())
            })
        );
        assert!(matches!(
            interpret(StatusCode::ACCEPTED, br#"{"message":"ok"}"#),
            Err(NenError::Unavailable(_))
        ));
        assert!(matches!(
            interpret(StatusCode::ACCEPTED, b"not json"),
            Err(NenError::Unavailable(_))
        ));
        assert_eq!(
            interpret(StatusCode::FORBIDDEN, br#"{"error":"x"}"#),
            Err(NenError::Rejected {
                status: StatusCode::FORBIDDEN,
                body: serde_json::json!({"error": "x"})
            })
        );
        assert_eq!(
            interpret(StatusCode::BAD_REQUEST, b"plain text"),
            Err(NenError::Rejected {
                status: StatusCode::BAD_REQUEST,
                body: Value::String("plain text".into())
            })
        );
        assert!(matches!(
            interpret(StatusCode::BAD_GATEWAY, b""),
            Err(NenError::Unavailable(_))
        ));
        assert!(matches!(
            interpret(StatusCode::MOVED_PERMANENTLY, b""),
            Err(NenError::Unavailable(_))
        ));
    }

    fn client(api_key: Option<&str>, signing_key: Option<&str>) -> NenClient {
        NenClient {
            http: reqwest::Client::new(),
            runs_url: Url::parse("http://127.0.0.1:9/runs").unwrap(),
            api_key: api_key.map(SecretString::from),
            signing_key: signing_key.map(SecretString::from),
        }
    }

    fn params(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn missing_keys_are_named_before_anything_is_sent() {
        let plain_params = params(serde_json::json!({"A": 1}));
        let secure = SecureParams::new(params(serde_json::json!({"password": "s3cret"})));
        let plain = RunRequest {
            workflow_id: "w",
            workflow_params: &plain_params,
            secure_workflow_params: None,
            webhook_callback: Some("https://relay.example/webhooks/nen"),
        };
        let signed = RunRequest {
            secure_workflow_params: Some(&secure),
            ..plain
        };
        let no_keys = client(None, None);
        assert_eq!(no_keys.prepare(&plain).err(), Some(NotConfigured::ApiKey));
        assert_eq!(no_keys.prepare(&signed).err(), Some(NotConfigured::ApiKey));
        let api_key_only = client(Some("k"), None);
        assert!(!api_key_only.prepare(&plain).unwrap().is_signed());
        assert_eq!(
            api_key_only.prepare(&signed).err(),
            Some(NotConfigured::SigningKey)
        );
        assert!(client(Some("k"), Some("s"))
            .prepare(&signed)
            .unwrap()
            .is_signed());
    }

    #[test]
    fn the_body_is_nens_documented_request() {
        let workflow_params = params(serde_json::json!({"PATIENT_NAME": "Jane Doe"}));
        let secure = SecureParams::new(params(serde_json::json!({"password": "s3cret"})));
        let client = client(Some("k"), Some("s"));
        let full = RunRequest {
            workflow_id: "w",
            workflow_params: &workflow_params,
            secure_workflow_params: Some(&secure),
            webhook_callback: Some("https://relay.example/webhooks/nen"),
        };
        let body: Value = serde_json::from_slice(&client.prepare(&full).unwrap().body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "workflow_id": "w",
                "workflow_params": {"PATIENT_NAME": "Jane Doe"},
                "secure_workflow_params": {"password": "s3cret"},
                "webhook_callback": "https://relay.example/webhooks/nen",
            })
        );
        let bare = RunRequest {
            secure_workflow_params: None,
            webhook_callback: None,
            ..full
        };
        let body: Value = serde_json::from_slice(&client.prepare(&bare).unwrap().body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"workflow_id": "w", "workflow_params": {"PATIENT_NAME": "Jane Doe"}}),
            "absent optional fields are left out, not sent as null"
        );
    }

    #[test]
    fn secure_params_never_print() {
        let secure = SecureParams::new(params(serde_json::json!({"password": "s3cret"})));
        let workflow_params = Map::new();
        let request = RunRequest {
            workflow_id: "w",
            workflow_params: &workflow_params,
            secure_workflow_params: Some(&secure),
            webhook_callback: None,
        };
        for printed in [
            format!("{secure:?}"),
            format!("{request:?}"),
            format!("{request:#?}"),
        ] {
            assert!(!printed.contains("s3cret"), "{printed}");
            assert!(!printed.contains("password"), "{printed}");
        }
        assert!(format!("{request:?}").contains("SecureParams(1 redacted)"));
    }
}
