//! `/v1/runs`: starting runs (`POST /v1/runs`) and reading them (`GET /v1/runs`,
//! `GET /v1/runs/{message_id}` with an optional `?wait=`, `GET /v1/runs/{message_id}/events`).
//!
//! Each handler extracts what the request carries, calls one domain function in `runs`, and maps
//! its one result to one answer.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::Deserialize;

use super::extract::AppQuery;
use super::AppState;
use crate::error::ApiError;
use crate::runs::idempotency;
use crate::runs::query::{self, EventList, ListRequest, RunList};
use crate::runs::start::{
    RunStarter, StartInput, StartPolicy, Started, UnreadableBody, MAX_REQUEST_BYTES,
};
use crate::runs::stuck::StuckRule;
use crate::runs::wait;
use crate::store::Run;

const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Starts a run on Nen. With an `Idempotency-Key`, a repeat of the same request returns the
/// first answer (marked `Idempotent-Replayed: true`) without calling Nen again.
#[utoipa::path(
    post,
    path = "/v1/runs",
    tag = "runs",
    security(("bearer" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]+$", min_length = 1, max_length = 255,
            description = "Makes a retry safe: the same key and body get the first answer. 1-255 visible ASCII characters"),
    ),
    request_body(content = crate::runs::start::StartRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Nen accepted the run", body = crate::runs::start::Submitted,
            headers(
                ("Location" = String, description = "`/v1/runs/<message_id>`"),
                ("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same key"),
            )),
        (status = 400, description = "Malformed body (the message names the field): `invalid_request`", body = crate::error::ErrorBody),
        (status = 409, description = "The key was used with a different body (`idempotency_conflict`), or its first request is still in progress (`idempotency_in_progress`)", body = crate::error::ErrorBody),
        (status = "4XX", description = "Nen refused the request, with Nen's status: `nen_rejected`, with `nen_status` and `nen_error`", body = crate::error::ErrorBody),
        (status = 502, description = "Nen could not be reached or failed; the run may not have started: `nen_unavailable`", body = crate::error::ErrorBody),
        (status = 503, description = "`NEN_API_KEY` (or, for secure parameters, `NEN_SIGNING_KEY`) is not set (`not_configured`), or the store cannot take the request (`unavailable`)", body = crate::error::ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait before retrying"))),
        (status = 504, description = "Nen did not answer in time; the run may have started: `nen_timeout`", body = crate::error::ErrorBody),
    )
)]
pub async fn start_run(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let input = StartInput {
        body: axum::body::to_bytes(body, MAX_REQUEST_BYTES)
            .await
            .map_err(|_| UnreadableBody),
        idempotency_key: headers
            .get(idempotency::HEADER)
            .map(|value| Bytes::copy_from_slice(value.as_bytes())),
    };
    let policy = StartPolicy::from_settings(&state.settings);
    RunStarter::new(state.store, state.nen, policy, state.forward_wake)
        .start(input)
        .await
        .map(started)
        .map_err(ApiError::from)
}

/// `GET /v1/runs/{message_id}`'s query. Other parameters are ignored, as they always were.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetRunRequest {
    /// Seconds (1 to 60) to hold the request until the run is terminal. Read as text, so that
    /// a bad value gets this service's own message.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 60)]
    pub wait: Option<String>,
}

/// One run; with `?wait=N`, held until it is terminal or N seconds pass.
#[utoipa::path(
    get,
    path = "/v1/runs/{message_id}",
    tag = "runs",
    security(("bearer" = [])),
    params(("message_id" = String, Path, description = "Nen's id of the run"), GetRunRequest),
    responses(
        (status = 200, description = "The run", body = Run),
        (status = 400, description = "`wait` is not a whole number from 1 to 60: `invalid_request`", body = crate::error::ErrorBody),
        (status = 404, description = "No such run (still unknown when the wait ended): `not_found`", body = crate::error::ErrorBody),
    )
)]
pub async fn get_run(
    State(state): State<AppState>,
    Path(message_id): Path<String>,
    AppQuery(request): AppQuery<GetRunRequest>,
) -> Result<Json<Run>, ApiError> {
    let stuck = StuckRule::new(state.settings.runs.stuck_after);
    let run = match wait::parse_wait(request.wait.as_deref())? {
        None => query::get_run(state.store.as_ref(), &stuck, &message_id).await?,
        Some(wait) => {
            let run = wait::wait_for_run(
                state.store.as_ref(),
                &state.waiters,
                &message_id,
                wait,
                &state.draining,
            )
            .await?;
            stuck.mark(run, Utc::now())
        }
    };
    Ok(Json(run))
}

/// Runs, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/runs",
    tag = "runs",
    security(("bearer" = [])),
    params(ListRequest),
    responses(
        (status = 200, description = "A page of runs; `next_cursor` is null on the last", body = RunList),
        (status = 400, description = "A malformed or unknown parameter: `invalid_request`", body = crate::error::ErrorBody),
    )
)]
pub async fn list_runs(
    State(state): State<AppState>,
    AppQuery(request): AppQuery<ListRequest>,
) -> Result<Json<RunList>, ApiError> {
    let stuck = StuckRule::new(state.settings.runs.stuck_after);
    query::list_runs(state.store.as_ref(), &stuck, request)
        .await
        .map(Json)
        .map_err(ApiError::from)
}

/// Every distinct delivery of a run, in arrival order.
#[utoipa::path(
    get,
    path = "/v1/runs/{message_id}/events",
    tag = "runs",
    security(("bearer" = [])),
    params(("message_id" = String, Path, description = "Nen's id of the run")),
    responses(
        (status = 200, description = "The run's events", body = EventList),
        (status = 404, description = "No such run: `not_found`", body = crate::error::ErrorBody),
    )
)]
pub async fn list_events(
    State(state): State<AppState>,
    Path(message_id): Path<String>,
) -> Result<Json<EventList>, ApiError> {
    query::list_events(state.store.as_ref(), &message_id)
        .await
        .map(Json)
        .map_err(ApiError::from)
}

/// 202 with the answer and `Location: /v1/runs/<message_id>`; a replay says so in a header.
fn started(started: Started) -> Response {
    let location = format!("/v1/runs/{}", encode_segment(&started.answer().message_id));
    let mut response = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(started.answer()),
    )
        .into_response();
    if started.is_replay() {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

/// Percent-encodes everything but RFC 3986 unreserved characters (a UUID passes unchanged).
fn encode_segment(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::start::Submitted;

    #[test]
    fn locations_are_encoded() {
        assert_eq!(encode_segment("550e8400-e29b"), "550e8400-e29b");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }

    #[tokio::test]
    async fn a_replay_is_the_first_answer_marked_as_replayed() {
        let answer = Submitted::new("m/1".into(), "w".into());
        for (result, replayed) in [
            (Started::New(answer.clone()), None),
            (Started::Replayed(answer.clone()), Some("true")),
        ] {
            let response = started(result);
            assert_eq!(response.status(), StatusCode::ACCEPTED);
            assert_eq!(response.headers()[header::LOCATION], "/v1/runs/m%2F1");
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            assert_eq!(
                response
                    .headers()
                    .get(&IDEMPOTENT_REPLAYED)
                    .map(|value| value.to_str().unwrap()),
                replayed
            );
            let body = axum::body::to_bytes(response.into_body(), 1024)
                .await
                .unwrap();
            assert_eq!(
                body,
                r#"{"message_id":"m/1","workflow_id":"w","status":"submitted"}"#
            );
        }
    }
}
