//! `POST /webhooks/nen`: Nen's signed callbacks.
//!
//! The handler answers in the order the README's HTTP API section fixes: 413, 401, 400, 503,
//! then 200 after the commit. What the head alone decides (a declared length over the limit, a
//! missing or malformed signature header) is answered without reading the body, and so is a
//! callback that finds the budget for unverified bodies spent (503). Otherwise the body is read
//! within the body timeout, its bytes held in the budget, and handed to `callbacks::Receiver`.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{CONNECTION, CONTENT_LENGTH};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::AppState;
use crate::callbacks::signature::SIGNATURE_HEADER;
use crate::callbacks::{self, BodyError, CallbackError, Receiver};
use crate::error::{ApiError, ServerErrorDetail};

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
        (status = 200, description = "Stored (or already stored): Nen may stop retrying", body = crate::callbacks::Acknowledgement),
        (status = 400, description = "Signed, but not a JSON object with string `message_id` and `status`: `invalid_payload`; the body is kept for inspection", body = crate::error::ErrorBody),
        (status = 401, description = "Signature missing, malformed or matching no secret: `invalid_signature`; nothing is stored", body = crate::error::ErrorBody),
        (status = 408, description = "The body did not arrive in time: `request_timeout`", body = crate::error::ErrorBody),
        (status = 413, description = "The body is larger than the limit: `payload_too_large`", body = crate::error::ErrorBody),
        (status = 503, description = "The store cannot take it now (or too many bodies are held): `unavailable`; Nen retries", body = crate::error::ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn receive(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let limits = &state.settings.webhook;
    let declared = declared_length(&headers);
    let head = callbacks::check_head(
        declared,
        limits.max_body_bytes,
        single_value(&headers, SIGNATURE_HEADER),
    );
    let signature = match head {
        Ok(signature) => signature,
        Err(error) => return refused_unread(error),
    };
    // A body without a declared length (chunked) may grow to the limit: reserve all of it, so
    // that what is reserved always covers what is read.
    let reserve = declared.map_or(limits.max_body_bytes, |length| length as usize);
    let reservation = match state.body_budget.reserve(reserve) {
        Ok(reservation) => reservation,
        Err(spent) => {
            let mut response = refused_unread(spent.into());
            // Anyone can cause these: the budget logs them now and then, not one line each.
            response.extensions_mut().remove::<ServerErrorDetail>();
            return response;
        }
    };
    let body = read_body(body, limits.max_body_bytes, limits.body_timeout).await;
    let receiver = Receiver {
        keys: &state.webhook_keys,
        ingest: &state.ingest,
        store: state.store.as_ref(),
        ack_timeout: limits.ack_timeout,
    };
    match receiver.receive(&signature, body, reservation).await {
        Ok(acknowledgement) => Json(acknowledgement).into_response(),
        Err(error) => ApiError::from(error).into_response(),
    }
}

/// The answer to a callback refused before its body was read. The unread body still sits on the
/// connection, so the connection cannot carry another request: `Connection: close` says so and
/// has hyper close it after the answer, instead of reading (or waiting for) what the client
/// still sends.
fn refused_unread(error: CallbackError) -> Response {
    let mut response = ApiError::from(callbacks::refused(error)).into_response();
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The `Content-Length` the client declared, if it is one number.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
}

/// The value of a header sent exactly once; `None` when it is absent or repeated.
fn single_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => Some(value.as_bytes()),
        _ => None,
    }
}

/// Reads the whole body, refusing it as soon as it grows past `limit` (a chunked body; a declared
/// length over the limit never gets here).
async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, BodyError> {
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
