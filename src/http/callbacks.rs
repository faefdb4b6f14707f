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
