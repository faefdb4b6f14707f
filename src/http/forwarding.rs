//! `/v1/forwarding`: each target's queue (`GET /v1/forwarding`), its failed messages
//! (`GET /v1/forwarding/{name}/failed`), and sending messages again (`POST .../retry-failed`,
//! `POST .../replay`).
//!
//! An unknown target is 404 whatever else the request holds, so its query and body are
//! extracted as results and looked at only once the target is known.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;

use super::extract::{AppJson, AppQuery};
use super::AppState;
use crate::error::ApiError;
use crate::forward::admin::{
    Enqueued, FailedList, FailedRequest, ForwardAdmin, ReplayRequest, TargetList,
};

fn admin(state: &AppState) -> ForwardAdmin<'_> {
    ForwardAdmin::new(
        &state.settings.forward.targets,
        state.store.outbox(),
        &state.forward_wake,
    )
}

/// Every configured target and its queue, in name order; `{"targets": []}` when none is.
#[utoipa::path(
    get,
    path = "/v1/forwarding",
    tag = "forwarding",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every target's queue. `url` is shown without any user name or password", body = TargetList),
    )
)]
pub async fn list_targets(State(state): State<AppState>) -> Result<Json<TargetList>, ApiError> {
    Ok(Json(admin(&state).status(Utc::now()).await?))
}

/// A target's failed messages, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/forwarding/{name}/failed",
    tag = "forwarding",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The target's name"), FailedRequest),
    responses(
        (status = 200, description = "A page of failed messages; `next_cursor` is null on the last", body = FailedList),
        (status = 400, description = "A malformed or unknown parameter: `invalid_request`", body = crate::error::ErrorBody),
        (status = 404, description = "No such target: `not_found`", body = crate::error::ErrorBody),
    )
)]
pub async fn list_failed(
    State(state): State<AppState>,
    Path(name): Path<String>,
    request: Result<AppQuery<FailedRequest>, ApiError>,
) -> Result<Json<FailedList>, ApiError> {
    let admin = admin(&state);
    let target = admin.target(&name)?;
    let AppQuery(request) = request?;
    Ok(Json(admin.failed(target, request).await?))
}

/// Sends every failed message of a target again (attempts from zero, `forward.max_age` from now).
#[utoipa::path(
    post,
    path = "/v1/forwarding/{name}/retry-failed",
    tag = "forwarding",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The target's name")),
    responses(
        (status = 202, description = "The failed messages are queued again, with their `webhook-id`", body = Enqueued),
        (status = 404, description = "No such target: `not_found`", body = crate::error::ErrorBody),
    )
)]
pub async fn retry_failed(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Enqueued>), ApiError> {
    let admin = admin(&state);
    let target = admin.target(&name)?;
    let enqueued = admin.retry_failed(target, Utc::now()).await?;
    Ok((StatusCode::ACCEPTED, Json(enqueued)))
}

/// Sends again every change committed in a window (delivered or failed; pending ones are left as
/// they are), with the same `webhook-id`: receivers that deduplicate on it see no double.
#[utoipa::path(
    post,
    path = "/v1/forwarding/{name}/replay",
    tag = "forwarding",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The target's name")),
    request_body(content = ReplayRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "The window's messages are queued again (0 when none, e.g. a window in the future)", body = Enqueued),
        (status = 400, description = "Malformed body, a time that is not RFC 3339, or `until` not later than `since`: `invalid_request`", body = crate::error::ErrorBody),
        (status = 404, description = "No such target: `not_found`", body = crate::error::ErrorBody),
    )
)]
pub async fn replay(
    State(state): State<AppState>,
    Path(name): Path<String>,
    request: Result<AppJson<ReplayRequest>, ApiError>,
) -> Result<(StatusCode, Json<Enqueued>), ApiError> {
    let admin = admin(&state);
    let target = admin.target(&name)?;
    let AppJson(request) = request?;
    let enqueued = admin.replay(target, &request, Utc::now()).await?;
    Ok((StatusCode::ACCEPTED, Json(enqueued)))
}
