//! What every request passes through: its span, its metrics, the log line for a 5xx, and the
//! answers for unknown routes, refused methods, shed load and panics.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::BoxError;

use crate::error::{ApiError, ServerErrorDetail};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest incoming `x-request-id` that is kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a caller's `x-request-id` may be kept: 1–128 characters of `[A-Za-z0-9._:-]`.
/// Anything else (too long, spaces, control characters, non-ASCII) is replaced by a fresh id,
/// so that a client cannot put what it likes into our answers and logs.
pub fn is_valid_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'-'))
}

/// Drops an incoming `x-request-id` that [`is_valid_request_id`] refuses (and every one if the
/// header is repeated), so that the request-id layer after it makes a new one.
pub fn drop_invalid_request_id(mut request: Request) -> Request {
    let headers = request.headers_mut();
    let mut values = headers.get_all(REQUEST_ID).iter();
    let keep = match (values.next(), values.next()) {
        (Some(value), None) => is_valid_request_id(value.as_bytes()),
        (None, _) => true,
        (Some(_), Some(_)) => false,
    };
    if !keep {
        headers.remove(REQUEST_ID);
    }
    request
}

/// The `method` label: a standard method, or `other`, so that made-up methods cannot grow the
/// number of series.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

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
    let method = method_label(request.method());
    tracing::info_span!("request", method, route, request_id)
}

/// Counts every answer by method, route and status, shed requests included. Every label comes
/// from a fixed set: [`method_label`], a matched route template or `unmatched`, a status code.
pub async fn record_request_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    crate::metrics::record_request(
        method,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_only_when_short_and_plain() {
        for kept in ["a", "caller-chosen-id", "A.b_c:d-9", &"x".repeat(128)] {
            assert!(is_valid_request_id(kept.as_bytes()), "{kept:?}");
        }
        for refused in [
            "",
            &"x".repeat(129),
            "has space",
            "tab\there",
            "nul\0",
            "new\nline",
            "caf\u{e9}",
            "slash/",
            "quote\"",
        ] {
            assert!(!is_valid_request_id(refused.as_bytes()), "{refused:?}");
        }
    }

    #[test]
    fn invalid_or_repeated_request_ids_are_dropped() {
        let with = |values: &[&str]| {
            let mut request = Request::new(axum::body::Body::empty());
            for value in values {
                request
                    .headers_mut()
                    .append(REQUEST_ID, value.parse().unwrap());
            }
            let request = drop_invalid_request_id(request);
            request
                .headers()
                .get_all(REQUEST_ID)
                .iter()
                .map(|value| value.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(with(&["ok-id"]), ["ok-id"]);
        assert!(with(&["not ok"]).is_empty());
        assert!(with(&["a", "b"]).is_empty());
        assert!(with(&[]).is_empty());
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(method_label(&Method::GET), "GET");
        for made_up in ["FOO", "get", "PROPFIND"] {
            let method = Method::from_bytes(made_up.as_bytes()).unwrap();
            assert_eq!(method_label(&method), "other", "{made_up}");
        }
    }
}
