//! `POST /webhooks/nen`: Nen's signed callbacks.
//!
//! The handler reads the body (refusing an oversized one before reading it when its length is
//! declared) within the body timeout, picks the signature header, and hands both to
//! `callbacks::Receiver`, which answers in the order the README's HTTP API section fixes:
//! 413, 401, 400, 503, then 200 after the commit.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use axum::Json;

use super::AppState;
use crate::callbacks::signature::SIGNATURE_HEADER;
use crate::callbacks::{Acknowledgement, BodyError, Receiver};
use crate::error::ApiError;

/// A callback from Nen, verified by its `X-Hmac-Signature` and stored before it is acknowledged.
///
/// Checked in this order: size (413), signature (401), payload (400), store (503). A repeat of a
/// stored `(message_id, status)` is acknowledged with `"duplicate": true` and stores nothing new.
/// `Content-Type` is not checked; the body must be JSON.
#[utoipa::path(
    post,
    path = "/webhooks/nen",
    operation_id = "receive_callback",
    tag = "callbacks",
    params(
        ("X-Hmac-Signature" = String, Header, description = "HMAC-SHA256 of the raw body with a webhook secret (see Nen's API)"),
    ),
    request_body(content = super::openapi::CallbackBody, content_type = "application/json", description = "Nen's callback, as Nen signed it"),
    responses(
        (status = 200, description = "Stored (or already stored): Nen may stop retrying", body = Acknowledgement),
        (status = 400, description = "Signed, but not a JSON object with string `message_id` and `status`: `invalid_payload`; the body is kept for inspection", body = crate::error::ErrorBody),
        (status = 401, description = "Signature missing, malformed or matching no secret: `invalid_signature`; nothing is stored", body = crate::error::ErrorBody),
        (status = 408, description = "The body did not arrive in time: `request_timeout`", body = crate::error::ErrorBody),
        (status = 413, description = "The body is larger than the limit: `payload_too_large`", body = crate::error::ErrorBody),
        (status = 503, description = "The store cannot take it now (or too many bodies are held): `unavailable`; Nen retries", body = crate::error::ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Acknowledgement>, ApiError> {
    let limits = &state.settings.webhook;
    let body = read_body(&headers, body, limits.max_body_bytes, limits.body_timeout).await;
    let receiver = Receiver {
        keys: &state.webhook_keys,
        ingest: &state.ingest,
        store: state.store.as_ref(),
        ack_timeout: limits.ack_timeout,
    };
    receiver
        .receive(single_value(&headers, SIGNATURE_HEADER), body)
        .await
        .map(Json)
        .map_err(ApiError::from)
}

/// The value of a header sent exactly once; `None` when it is absent or repeated.
fn single_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => Some(value.as_bytes()),
        _ => None,
    }
}

/// Reads the whole body, refusing more than `limit` bytes before reading them when the length
/// is declared, and while reading otherwise (chunked bodies).
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(BodyError::TimedOut),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            if too_large {
                Err(BodyError::TooLarge { limit })
            } else {
                Err(BodyError::Broken)
            }
        }
    }
}
