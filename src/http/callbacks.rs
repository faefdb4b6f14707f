//! `POST /webhooks/nen`: Nen's signed callbacks, checked in the order SPEC.md fixes.
//!
//! 1. size (413), 2. signature over the raw bytes (401), 3. shape (400, body kept),
//! 4. durable, deduplicated write (503 if the store cannot take it), 5. 200 after the commit.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use axum::Json;
use chrono::Utc;
use serde::Serialize;

use super::AppState;
use crate::error::ApiError;
use crate::callbacks::ingest::IngestError;
use crate::metrics::{self, CallbackOutcome};
use crate::callbacks::payload::parse_callback;
use crate::callbacks::signature::{SignatureHeader, SIGNATURE_HEADER};
use crate::store::{Delivery, RejectedPayload};

/// The acknowledgement Nen gets once the delivery is committed.
#[derive(Debug, Serialize)]
pub struct Acknowledgement {
    pub received: bool,
    pub duplicate: bool,
    pub message_id: String,
    pub status: String,
}

pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Acknowledgement>, ApiError> {
    let result = handle(&state, &headers, body).await;
    metrics::record_callback(match &result {
        Ok(ack) if ack.duplicate => CallbackOutcome::Duplicate,
        Ok(_) => CallbackOutcome::Accepted,
        Err(ApiError::PayloadTooLarge { .. }) => CallbackOutcome::PayloadTooLarge,
        Err(ApiError::InvalidSignature) => CallbackOutcome::InvalidSignature,
        Err(ApiError::InvalidPayload(_)) => CallbackOutcome::InvalidPayload,
        Err(ApiError::RequestTimeout) => CallbackOutcome::RequestTimeout,
        Err(_) => CallbackOutcome::Unavailable,
    });
    result.map(Json)
}

async fn handle(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Acknowledgement, ApiError> {
    let settings = &state.settings.webhook;
    let raw = read_body(
        headers,
        body,
        settings.max_body_bytes,
        settings.body_timeout,
    )
    .await?;

    let key_id = verify_signature(state, headers, &raw)?;
    let received_at = Utc::now();

    let parsed = match parse_callback(&raw) {
        Ok(parsed) => parsed,
        Err(problem) => {
            tracing::warn!(%key_id, reason = %problem, "signed callback is not a valid payload");
            // Authentic Nen data: keep it. If it cannot be kept, say 503 so Nen sends it again.
            let rejected = RejectedPayload {
                raw_body: raw,
                key_id: key_id.to_owned(),
                reason: problem.to_string(),
                received_at,
            };
            tokio::time::timeout(
                settings.ack_timeout,
                state.store.record_rejected_payload(&rejected),
            )
            .await
            .map_err(|_| ApiError::Unavailable("the store did not commit in time".into()))??;
            return Err(ApiError::InvalidPayload(problem.to_string()));
        }
    };
    metrics::record_callback_key(key_id);

    let delivery = Delivery::verified(raw, parsed, key_id, received_at);
    let message_id = delivery.message_id.clone();
    let status = delivery.status.clone();

    let outcome = tokio::time::timeout(settings.ack_timeout, state.ingest.record(delivery))
        .await
        .map_err(|_| ApiError::Unavailable("the store did not commit in time".into()))?
        .map_err(|error| match error {
            IngestError::Store(store) => ApiError::from(store),
            other => ApiError::Unavailable(other.to_string()),
        })?;

    if outcome.body_differs {
        metrics::record_callback_anomaly("differing_duplicate");
        tracing::warn!(%message_id, %status, "a repeated callback's body differs from the stored one");
    }
    if outcome.conflicting_terminal {
        metrics::record_callback_anomaly("conflicting_terminal");
        tracing::warn!(%message_id, %status, "a terminal status conflicts with the run's earlier one");
    }
    tracing::debug!(%message_id, %status, duplicate = outcome.duplicate, "callback recorded");
    Ok(Acknowledgement {
        received: true,
        duplicate: outcome.duplicate,
        message_id,
        status,
    })
}

/// Reads the whole body, refusing more than `limit` bytes before reading them when the length
/// is declared, and while reading otherwise (chunked bodies).
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::RequestTimeout),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            if too_large {
                Err(ApiError::PayloadTooLarge { limit })
            } else {
                Err(ApiError::InvalidPayload(
                    "the request body could not be read".into(),
                ))
            }
        }
    }
}

/// Returns the id of the secret that signed the body. Exactly one well-formed header is
/// required: two headers are ambiguous and refused, whichever of them would verify.
fn verify_signature<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<&'a str, ApiError> {
    let mut values = headers.get_all(SIGNATURE_HEADER).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(ApiError::InvalidSignature);
    };
    let header =
        SignatureHeader::parse(value.as_bytes()).map_err(|_| ApiError::InvalidSignature)?;
    state
        .webhook_keys
        .verify(&header, body)
        .ok_or(ApiError::InvalidSignature)
}
