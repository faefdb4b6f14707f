//! What every request passes through: its span, its metrics, the log line for a 5xx, and the
//! answers for unknown routes, refused methods, shed load and panics.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::BoxError;

use crate::error::{ApiError, ServerErrorDetail};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// One span per request, named by the matched route (low cardinality), with the request id.
pub fn make_span(request: &Request) -> tracing::Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
        .unwrap_or("unmatched");
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    tracing::info_span!("request", method = %request.method(), route, request_id)
}

/// Counts every answer by method, route and status, shed requests included.
pub async fn record_request_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    crate::metrics::record_request(
        method.as_str(),
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Logs why a request got a 5xx, inside the request's span, and keeps the detail off the wire.
/// Answers meant to be retried (an outage, a flood, a missing setting) are warnings.
pub async fn log_server_errors(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if let Some(failure) = response.extensions_mut().remove::<ServerErrorDetail>() {
        let status = response.status().as_u16();
        if failure.expected {
            tracing::warn!(status, error.code = failure.code, error.detail = %failure.detail, "request not served");
        } else {
            tracing::error!(status, error.code = failure.code, error.detail = %failure.detail, "request failed");
        }
    }
    response
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// The answer for a request refused by the in-flight limit (or failed by another layer).
pub async fn overloaded(error: BoxError) -> ApiError {
    if error.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Unavailable("too many requests in flight".into())
    } else {
        ApiError::Internal(error.to_string())
    }
}

pub fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("a request handler panicked".into()).into_response()
}
