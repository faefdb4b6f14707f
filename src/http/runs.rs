//! Reading runs: `GET /v1/runs/{message_id}`, `GET /v1/runs`, `GET /v1/runs/{message_id}/events`.
//!
//! Each handler extracts what the request carries, calls one function of `runs::query`, and maps
//! its one result to one answer.

use axum::extract::{Path, State};
use axum::Json;

use super::extract::AppQuery;
use super::AppState;
use crate::error::ApiError;
use crate::runs::query::{self, EventList, ListRequest, RunList};
use crate::store::Run;

pub async fn get_run(
    State(state): State<AppState>,
    Path(message_id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    query::get_run(state.store.as_ref(), &message_id)
        .await
        .map(Json)
        .map_err(ApiError::from)
}

pub async fn list_runs(
    State(state): State<AppState>,
    AppQuery(request): AppQuery<ListRequest>,
) -> Result<Json<RunList>, ApiError> {
    query::list_runs(state.store.as_ref(), request)
        .await
        .map(Json)
        .map_err(ApiError::from)
}

pub async fn list_events(
    State(state): State<AppState>,
    Path(message_id): Path<String>,
) -> Result<Json<EventList>, ApiError> {
    query::list_events(state.store.as_ref(), &message_id)
        .await
        .map(Json)
        .map_err(ApiError::from)
}
