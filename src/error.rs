//! `ApiError`: every error answer as `{"error": "<code>", "message": "<text>"}` with its status.
//!
//! 4xx answers carry a message meant for the caller. 5xx answers carry a fixed message; the
//! detail rides along in the response's extensions as a [`ServerErrorDetail`], which the
//! request middleware logs inside the request's span (route, request id) and then drops, so
//! nothing internal (or secret) reaches the body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::Value;

/// Seconds Nen (or any client) should wait before retrying a 503.
pub const RETRY_AFTER_SECONDS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the signature is missing or does not match")]
    InvalidSignature,
    #[error("{0}")]
    InvalidPayload(String),
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("this endpoint does not accept that method")]
    MethodNotAllowed,
    #[error("{0}")]
    InvalidRequest(String),
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyConflict,
    #[error("a request with this Idempotency-Key is still in progress")]
    IdempotencyInProgress,
    #[error("{0}")]
    NotConfigured(String),
    #[error("Nen rejected the request ({status})")]
    NenRejected {
        status: StatusCode,
        nen_error: Value,
    },
    #[error("Nen could not be reached or failed: {0}")]
    NenUnavailable(String),
    #[error("Nen did not answer in time")]
    NenTimeout,
    /// The store or the ingest queue cannot take the request now; the client should retry.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// The shutdown signal came: `/readyz` says so while serving goes on for a moment.
    #[error("the service is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

/// Every error answer's body. `nen_status` and `nen_error` come only with `nen_rejected`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody<'a> {
    /// The snake_case code, e.g. `not_found`, `invalid_request`, `nen_rejected`.
    #[schema(example = "not_found")]
    pub error: &'a str,
    /// What went wrong, for a person.
    pub message: String,
    /// `nen_rejected` only: the status Nen answered, which is also this answer's status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nen_status: Option<u16>,
    /// `nen_rejected` only: Nen's own body (withheld whole if it echoed a secure value).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub nen_error: Option<&'a Value>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InvalidSignature | ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::InvalidPayload(_) | ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::IdempotencyConflict | ApiError::IdempotencyInProgress => StatusCode::CONFLICT,
            ApiError::NotConfigured(_) | ApiError::Unavailable(_) | ApiError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::NenRejected { status, .. } => *status,
            ApiError::NenUnavailable(_) => StatusCode::BAD_GATEWAY,
            ApiError::NenTimeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::InvalidSignature => "invalid_signature",
            ApiError::InvalidPayload(_) => "invalid_payload",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::IdempotencyConflict => "idempotency_conflict",
            ApiError::IdempotencyInProgress => "idempotency_in_progress",
            ApiError::NotConfigured(_) => "not_configured",
            ApiError::NenRejected { .. } => "nen_rejected",
            ApiError::NenUnavailable(_) => "nen_unavailable",
            ApiError::NenTimeout => "nen_timeout",
            ApiError::Unavailable(_) | ApiError::ShuttingDown => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// What the caller reads. Server-side failures get a fixed text: their detail is logged.
    fn public_message(&self) -> String {
        match self {
            ApiError::Unavailable(_) => {
                "the service cannot take this request right now; retry shortly".to_owned()
            }
            ApiError::Internal(_) => "internal error; it has been logged".to_owned(),
            ApiError::NenUnavailable(_) => {
                "Nen could not be reached or failed; the run may not have started".to_owned()
            }
            other => other.to_string(),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        match error {
            crate::store::StoreError::Unavailable(detail) => ApiError::Unavailable(detail),
            crate::store::StoreError::Internal(detail) => ApiError::Internal(detail),
        }
    }
}

impl From<crate::runs::start::StartError> for ApiError {
    fn from(error: crate::runs::start::StartError) -> Self {
        use crate::runs::start::StartError;
        match error {
            StartError::InvalidRequest(message) => ApiError::InvalidRequest(message),
            StartError::NotConfigured(missing) => ApiError::NotConfigured(missing.to_string()),
            StartError::IdempotencyConflict => ApiError::IdempotencyConflict,
            StartError::IdempotencyInProgress => ApiError::IdempotencyInProgress,
            StartError::NenRejected { status, answer } => ApiError::NenRejected {
                status,
                nen_error: answer,
            },
            StartError::NenUnavailable(detail) => ApiError::NenUnavailable(detail),
            StartError::NenTimeout => ApiError::NenTimeout,
            StartError::Store(error) => ApiError::from(error),
            StartError::Internal(detail) => ApiError::Internal(detail),
        }
    }
}

impl From<crate::runs::query::QueryError> for ApiError {
    fn from(error: crate::runs::query::QueryError) -> Self {
        use crate::runs::query::QueryError;
        match error {
            QueryError::RunNotFound(_) => ApiError::NotFound(error.to_string()),
            QueryError::InvalidRequest(message) => ApiError::InvalidRequest(message),
            QueryError::TooManyWaiters(_) => ApiError::Unavailable(error.to_string()),
            QueryError::Store(error) => ApiError::from(error),
        }
    }
}

impl From<crate::forward::admin::AdminError> for ApiError {
    fn from(error: crate::forward::admin::AdminError) -> Self {
        use crate::forward::admin::AdminError;
        match error {
            AdminError::TargetNotFound(_) => ApiError::NotFound(error.to_string()),
            AdminError::InvalidRequest(message) => ApiError::InvalidRequest(message),
            AdminError::Store(error) => ApiError::from(error),
        }
    }
}

impl From<crate::callbacks::CallbackError> for ApiError {
    fn from(error: crate::callbacks::CallbackError) -> Self {
        use crate::callbacks::CallbackError;
        match error {
            CallbackError::PayloadTooLarge { limit } => ApiError::PayloadTooLarge { limit },
            CallbackError::RequestTimeout => ApiError::RequestTimeout,
            CallbackError::InvalidSignature => ApiError::InvalidSignature,
            CallbackError::InvalidPayload(message) => ApiError::InvalidPayload(message),
            CallbackError::Unavailable(detail) => ApiError::Unavailable(detail),
            CallbackError::Store(error) => ApiError::from(error),
        }
    }
}

/// Why a request got a 5xx answer, for the log only. The middleware in `http::middleware`
/// takes it out of the response and logs it; it never reaches the client.
#[derive(Debug, Clone)]
pub struct ServerErrorDetail {
    pub code: &'static str,
    pub detail: String,
    /// Answered so that the caller retries (an outage, a flood, a missing setting): logged as
    /// a warning rather than an error.
    pub expected: bool,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (nen_status, nen_error) = match &self {
            ApiError::NenRejected { status, nen_error } => (Some(status.as_u16()), Some(nen_error)),
            _ => (None, None),
        };
        // The body says only what the caller can act on; the detail stays for the log.
        let body = ErrorBody {
            error: self.code(),
            message: self.public_message(),
            nen_status,
            nen_error,
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Unavailable(_) | ApiError::NotConfigured(_) | ApiError::ShuttingDown => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECONDS),
                );
            }
            ApiError::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"nen-relay\""),
                );
            }
            // The body was refused unread: the connection cannot carry another request, and
            // saying so stops a keep-alive client from reusing it while it closes.
            ApiError::PayloadTooLarge { .. } => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        if status.is_server_error() {
            response.extensions_mut().insert(ServerErrorDetail {
                code: self.code(),
                detail: self.to_string(),
                expected: matches!(
                    self,
                    ApiError::Unavailable(_) | ApiError::NotConfigured(_) | ApiError::ShuttingDown
                ),
            });
        }
        response
    }
}
