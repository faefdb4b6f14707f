//! `GET /openapi.json`: the OpenAPI 3.1 description of the whole HTTP surface, built from the
//! handlers' `#[utoipa::path]` attributes and the `ToSchema` derives on the types they answer
//! with, so that the document cannot drift from the code. A copy is committed at
//! `docs/openapi.json`; the test below fails when it is stale and says how to refresh it.
//!
//! Answers every route shares are added here once, by [`SharedAnswers`], rather than on each
//! handler: a new route gets them by being listed in [`ApiDoc`].

use std::sync::OnceLock;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Header, OpenApi as Document, RefOr, Response};
use utoipa::{Modify, OpenApi, PartialSchema};

use crate::error::ErrorBody;

/// The security scheme's name in the document, used by every `/v1/*` handler.
pub const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "nen-relay",
        description = "Verified, deduplicated, durable receiver for Nen workflow callbacks, with \
a run query API and a safe trigger endpoint.\n\n\
Every error body is `{\"error\": \"<snake_case code>\", \"message\": \"<text>\"}`. \
An unknown path is 404 `not_found` (under `/v1/` only with a valid token: without one it is 401); \
a method a route does not accept is 405 `method_not_allowed`. \
Every answer carries `x-request-id`, kept from the request when it is 1-128 characters of \
`[A-Za-z0-9._:-]`. Times are RFC 3339 UTC strings."
    ),
    paths(
        super::callbacks::receive,
        super::runs::start_run,
        super::runs::list_runs,
        super::runs::get_run,
        super::runs::list_events,
        super::forwarding::list_targets,
        super::forwarding::list_failed,
        super::forwarding::retry_failed,
        super::forwarding::replay,
        super::ops::healthz,
        super::ops::readyz,
        super::ops::metrics,
        serve,
    ),
    modifiers(&SharedAnswers),
    tags(
        (name = "callbacks", description = "Nen's signed callbacks"),
        (name = "runs", description = "Starting and reading runs (bearer token)"),
        (name = "forwarding", description = "Forwarding run changes to your systems: queues, failed messages, retry and replay (bearer token)"),
        (name = "operations", description = "Health, readiness, metrics and this document (no auth)"),
    )
)]
pub struct ApiDoc;

/// The document as served and committed: pretty-printed JSON.
pub fn document_json() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("an OpenAPI document always serialises");
    text.push('\n');
    text
}

/// Nen's callback body, as `callbacks::payload` reads it. Only for this document: the handler
/// verifies the raw bytes before anything is parsed, so no Rust type has this shape.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct CallbackBody {
    /// Nen's id of the run.
    #[schema(min_length = 1, max_length = 200, pattern = "^[^\\u0000]+$")]
    message_id: String,
    /// The run's status, e.g. `processing`, `success`, `failed`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[^\\u0000]+$")]
    status: String,
    workflow_id: Option<String>,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The workflow's output.
    #[schema(value_type = Option<serde_json::Value>)]
    result: Option<()>,
    assets_url: Option<String>,
    error: Option<String>,
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this service", content_type = "application/json", body = Object))
)]
pub async fn serve() -> impl IntoResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    (
        [(CONTENT_TYPE, "application/json")],
        DOCUMENT.get_or_init(document_json).as_str(),
    )
}

/// Adds what every route can answer, so that no handler has to repeat it:
/// - `x-request-id` on every answer;
/// - 503 `unavailable` with `Retry-After` (the in-flight limit sheds load on every route), and
///   500 `internal` (a handler that failed or panicked);
/// - on routes that need the bearer token: the security scheme, and 401 `unauthorized` with
///   `WWW-Authenticate`.
struct SharedAnswers;

impl Modify for SharedAnswers {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for operation in operations.into_iter().flatten() {
                let needs_token = operation
                    .security
                    .as_ref()
                    .is_some_and(|requirements| !requirements.is_empty());
                let responses = &mut operation.responses.responses;
                if needs_token {
                    responses.entry("401".into()).or_insert_with(|| {
                        error_response(
                            "No valid bearer token: `unauthorized`",
                            &[("WWW-Authenticate", "`Bearer realm=\"nen-relay\"`")],
                        )
                    });
                }
                responses.entry("503".into()).or_insert_with(|| {
                    error_response(
                        "Too many requests in flight, or the store cannot take the request now: \
                         `unavailable`; retry after `Retry-After` seconds",
                        &[("Retry-After", "Seconds to wait before retrying")],
                    )
                });
                responses.entry("500".into()).or_insert_with(|| {
                    error_response("An unexpected failure, logged: `internal`", &[])
                });
                for response in responses.values_mut() {
                    if let RefOr::T(response) = response {
                        response
                            .headers
                            .entry("x-request-id".into())
                            .or_insert_with(|| {
                                described_header(
                                    "The request's id: the caller's own when it was valid, else a new one",
                                )
                            });
                    }
                }
            }
        }
    }
}

fn described_header(description: &str) -> Header {
    let mut header = Header::new(String::schema());
    header.description = Some(description.to_owned());
    header
}

fn error_response(description: &str, headers: &[(&str, &str)]) -> RefOr<Response> {
    let mut response = utoipa::openapi::ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            utoipa::openapi::ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    <ErrorBody as utoipa::ToSchema>::name(),
                ))))
                .build(),
        )
        .build();
    for (name, description) in headers {
        response
            .headers
            .insert((*name).to_owned(), described_header(description));
    }
    RefOr::T(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COPY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    const REFRESH: &str = "NEN_RELAY_WRITE_OPENAPI=1 cargo test -p nen-relay --lib openapi";

    /// The committed copy is the document the code serves. Run with NEN_RELAY_WRITE_OPENAPI=1 to
    /// write it instead.
    #[test]
    fn the_committed_openapi_copy_is_current() {
        let current = document_json();
        if std::env::var_os("NEN_RELAY_WRITE_OPENAPI").is_some() {
            std::fs::write(COPY, &current).expect("write docs/openapi.json");
            return;
        }
        let committed = std::fs::read_to_string(COPY).unwrap_or_default();
        assert!(
            committed == current,
            "docs/openapi.json is not the document the code serves; refresh it with:\n    {REFRESH}"
        );
    }

    /// The callback's documented lengths are the ones `callbacks::payload` enforces.
    #[test]
    fn callback_lengths_are_the_enforced_ones() {
        use crate::callbacks::payload::{MAX_MESSAGE_ID_LEN, MAX_STATUS_LEN};
        let document: serde_json::Value = serde_json::from_str(&document_json()).unwrap();
        let fields = &document["components"]["schemas"]["CallbackBody"]["properties"];
        assert_eq!(fields["message_id"]["maxLength"], MAX_MESSAGE_ID_LEN);
        assert_eq!(fields["status"]["maxLength"], MAX_STATUS_LEN);
    }

    #[test]
    fn every_route_is_described() {
        let document = ApiDoc::openapi();
        let paths: Vec<&str> = document.paths.paths.keys().map(String::as_str).collect();
        for path in [
            "/webhooks/nen",
            "/v1/runs",
            "/v1/runs/{message_id}",
            "/v1/runs/{message_id}/events",
            "/v1/forwarding",
            "/v1/forwarding/{name}/failed",
            "/v1/forwarding/{name}/retry-failed",
            "/v1/forwarding/{name}/replay",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(paths.contains(&path), "{path} is missing from {paths:?}");
        }
    }

    /// What [`SharedAnswers`] adds is there: the bearer routes are exactly `/v1/*` and answer
    /// 401 with `WWW-Authenticate`; every answer carries `x-request-id`; every route may shed
    /// load with 503.
    #[test]
    fn shared_answers_are_on_every_route() {
        let document: serde_json::Value =
            serde_json::from_str(&document_json()).expect("the document is JSON");
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let responses = operation["responses"].as_object().unwrap();
                let bearer = operation["security"][0].get(BEARER).is_some();
                assert_eq!(bearer, path.starts_with("/v1/"), "{method} {path}");
                if bearer {
                    assert!(
                        responses["401"]["headers"]
                            .get("WWW-Authenticate")
                            .is_some(),
                        "{method} {path}"
                    );
                }
                assert!(responses["503"]["headers"].get("Retry-After").is_some());
                for (status, response) in responses {
                    assert!(
                        response["headers"].get("x-request-id").is_some(),
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
}
