//! Reading runs: `GET /v1/runs/{message_id}`, `GET /v1/runs`, `GET /v1/runs/{message_id}/events`.

use axum::extract::{Path, State};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::extract::AppQuery;
use super::AppState;
use crate::error::ApiError;
use crate::store::{Event, Run, RunCursor, RunQuery};

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 500;

pub async fn get_run(
    State(state): State<AppState>,
    Path(message_id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    state
        .store
        .get_run(&message_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no run with message_id {message_id:?}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    workflow_id: Option<String>,
    status: Option<String>,
    // Read as text, so that a bad value gets this service's own message.
    limit: Option<String>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RunList {
    runs: Vec<Run>,
    next_cursor: Option<String>,
}

pub async fn list_runs(
    State(state): State<AppState>,
    AppQuery(params): AppQuery<ListParams>,
) -> Result<Json<RunList>, ApiError> {
    let limit = match params.limit.as_deref() {
        None | Some("") => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|limit| (1..=MAX_LIMIT).contains(limit))
            .ok_or_else(|| {
                ApiError::InvalidRequest(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}"
                ))
            })?,
    };
    let after = match params.cursor.as_deref() {
        None | Some("") => None,
        Some(text) => Some(decode_cursor(text).ok_or_else(|| {
            ApiError::InvalidRequest("cursor is not one this service returned".into())
        })?),
    };
    let query = RunQuery {
        workflow_id: params.workflow_id.filter(|v| !v.is_empty()),
        status: params.status.filter(|v| !v.is_empty()),
        limit,
        after,
    };
    let page = state.store.list_runs(&query).await?;
    Ok(Json(RunList {
        runs: page.runs,
        next_cursor: page.next.map(encode_cursor),
    }))
}

#[derive(Debug, Serialize)]
pub struct EventList {
    events: Vec<Event>,
}

pub async fn list_events(
    State(state): State<AppState>,
    Path(message_id): Path<String>,
) -> Result<Json<EventList>, ApiError> {
    let events = state.store.list_events(&message_id).await?;
    if events.is_empty() && state.store.get_run(&message_id).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "no run with message_id {message_id:?}"
        )));
    }
    Ok(Json(EventList { events }))
}

/// Cursors are opaque to clients: a versioned, URL-safe encoding of the keyset position.
fn encode_cursor(cursor: RunCursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("v1:{}", cursor.seq))
}

fn decode_cursor(text: &str) -> Option<RunCursor> {
    let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let seq = text.strip_prefix("v1:")?.parse::<i64>().ok()?;
    Some(RunCursor { seq })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let cursor = RunCursor { seq: 12345 };
        assert_eq!(decode_cursor(&encode_cursor(cursor)), Some(cursor));
        assert_eq!(decode_cursor("12345"), None);
        assert_eq!(decode_cursor("!!"), None);
        assert_eq!(decode_cursor(&URL_SAFE_NO_PAD.encode("v2:1")), None);
    }
}
