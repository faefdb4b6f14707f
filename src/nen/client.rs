//! The outbound client for Nen's `POST /runs`: base URL, `x-api-key`, optional request signing,
//! and a connect and a total timeout.
//!
//! It never retries: Nen documents no idempotency key, so a second `POST /runs` after an
//! ambiguous failure may start a second run. The caller decides what to tell its own client.

use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use url::Url;

use super::signing;
use crate::config::NenSettings;

/// Nen's answers are small; anything beyond this is cut off rather than buffered.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What became of one `POST /runs`.
#[derive(Debug, Clone, PartialEq)]
pub enum StartRunOutcome {
    /// Nen accepted the run (2xx with a `messageId`).
    Accepted {
        message_id: String,
        workflow_id: Option<String>,
    },
    /// Nen refused it with a 4xx: no run was started. `body` is Nen's answer, or its text as a
    /// JSON string when it was not JSON.
    Rejected { status: StatusCode, body: Value },
    /// No connection, a 5xx, or an answer that cannot be understood. The detail is for logs.
    Unavailable(String),
    /// No complete answer within the total timeout: the run may or may not have started.
    Timeout,
}

/// Calls Nen. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct NenClient {
    http: reqwest::Client,
    runs_url: Url,
    api_key: Option<SecretString>,
    signing_key: Option<SecretString>,
}

impl std::fmt::Debug for NenClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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

    pub fn has_api_key(&self) -> bool {
        self.api_key.is_some()
    }

    pub fn can_sign(&self) -> bool {
        self.signing_key.is_some()
    }

    /// The signing key, for keyed hashes of secure parameters (idempotency fingerprints).
    pub fn signing_key(&self) -> Option<&SecretString> {
        self.signing_key.as_ref()
    }

    /// Sends `body` (already serialised JSON) exactly once. With `signed`, adds `x-timestamp`
    /// and `x-signature` computed over these very bytes.
    pub async fn start_run(&self, body: Bytes, signed: bool) -> StartRunOutcome {
        let Some(api_key) = &self.api_key else {
            return StartRunOutcome::Unavailable("NEN_API_KEY is not set".into());
        };
        let mut request = self
            .http
            .post(self.runs_url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("x-api-key", sensitive(api_key.expose_secret()));
        if signed {
            let Some(signing_key) = &self.signing_key else {
                return StartRunOutcome::Unavailable("NEN_SIGNING_KEY is not set".into());
            };
            let timestamp = chrono::Utc::now().timestamp().to_string();
            let signature = signing::signature(
                signing_key.expose_secret().as_bytes(),
                &timestamp,
                &body,
            );
            request = request
                .header("x-timestamp", timestamp)
                .header("x-signature", signature);
        }
        let response = match request.body(body).send().await {
            Ok(response) => response,
            Err(error) => return classify_error(&error),
        };
        let status = response.status();
        let answer = match read_limited(response).await {
            Ok(answer) => answer,
            Err(error) => return classify_error(&error),
        };
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

fn sensitive(value: &str) -> HeaderValue {
    let mut header = HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""));
    header.set_sensitive(true);
    header
}

fn classify_error(error: &reqwest::Error) -> StartRunOutcome {
    // A connect failure (even a connect timeout) means nothing was sent: not ambiguous.
    if error.is_connect() {
        StartRunOutcome::Unavailable(format!("cannot connect to Nen: {}", error_chain(error)))
    } else if error.is_timeout() {
        StartRunOutcome::Timeout
    } else {
        StartRunOutcome::Unavailable(format!("request to Nen failed: {}", error_chain(error)))
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

fn interpret(status: StatusCode, answer: &[u8]) -> StartRunOutcome {
    if status.is_success() {
        return match serde_json::from_slice::<Acceptance>(answer) {
            Ok(Acceptance {
                message_id: Some(message_id),
                workflow_id,
            }) if !message_id.is_empty() => StartRunOutcome::Accepted {
                message_id,
                workflow_id,
            },
            _ => StartRunOutcome::Unavailable(format!("Nen answered {status} without a messageId")),
        };
    }
    if status.is_client_error() {
        let body = serde_json::from_slice(answer)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(answer).into_owned()));
        return StartRunOutcome::Rejected { status, body };
    }
    StartRunOutcome::Unavailable(format!("Nen answered {status}"))
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
            StartRunOutcome::Accepted {
                message_id: "m-1".into(),
                workflow_id: Some("w".into())
            }
        );
        assert!(matches!(
            interpret(StatusCode::ACCEPTED, br#"{"message":"ok"}"#),
            StartRunOutcome::Unavailable(_)
        ));
        assert!(matches!(
            interpret(StatusCode::ACCEPTED, b"not json"),
            StartRunOutcome::Unavailable(_)
        ));
        assert_eq!(
            interpret(StatusCode::FORBIDDEN, br#"{"error":"x"}"#),
            StartRunOutcome::Rejected {
                status: StatusCode::FORBIDDEN,
                body: serde_json::json!({"error": "x"})
            }
        );
        assert_eq!(
            interpret(StatusCode::BAD_REQUEST, b"plain text"),
            StartRunOutcome::Rejected {
                status: StatusCode::BAD_REQUEST,
                body: Value::String("plain text".into())
            }
        );
        assert!(matches!(
            interpret(StatusCode::BAD_GATEWAY, b""),
            StartRunOutcome::Unavailable(_)
        ));
        assert!(matches!(
            interpret(StatusCode::MOVED_PERMANENTLY, b""),
            StartRunOutcome::Unavailable(_)
        ));
    }
}
