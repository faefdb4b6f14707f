//! Reading runs back: one run, a filtered newest-first listing, and a run's events.
//!
//! Listings are keyset-paginated. The cursor is opaque to clients: a versioned, URL-safe encoding
//! of the position, so that its form can change without breaking a client that stores one.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::stuck::StuckRule;
use crate::store::{Event, Run, RunCursor, RunQuery, Store, StoreError};

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 500;

/// A listing as asked for; unknown parameters are refused. An empty value means "not given".
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListRequest {
    /// Only runs of this workflow.
    pub workflow_id: Option<String>,
    /// Only runs in this status.
    pub status: Option<String>,
    /// Page size.
    // Read as text, so that a bad value gets this service's own message.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500, default = 50)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// `true`: only stuck runs (any other value is refused). Read as text, so that a bad value
    /// gets this service's own message.
    #[param(value_type = Option<String>, pattern = "^true$")]
    pub stuck: Option<String>,
}

/// One page of runs, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunList {
    pub runs: Vec<Run>,
    /// Present when more runs follow: pass it back as `cursor` for the next page.
    pub next_cursor: Option<String>,
}

/// Every distinct delivery of a run, in arrival order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventList {
    pub events: Vec<Event>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("no run with message_id {0:?}")]
    RunNotFound(String),
    /// A listing parameter is malformed; the message names it.
    #[error("{0}")]
    InvalidRequest(String),
    /// `query.max_waiters` requests are waiting on runs already.
    #[error("{0} requests are waiting on runs already")]
    TooManyWaiters(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub async fn get_run(
    store: &dyn Store,
    stuck: &StuckRule,
    message_id: &str,
) -> Result<Run, QueryError> {
    if message_id.contains('\0') {
        // No stored id has one (callbacks with one are refused), and PostgreSQL refuses it
        // as a parameter: not found, rather than a 500.
        return Err(QueryError::RunNotFound(message_id.to_owned()));
    }
    store
        .get_run(message_id)
        .await?
        .map(|run| stuck.mark(run, Utc::now()))
        .ok_or_else(|| QueryError::RunNotFound(message_id.to_owned()))
}

pub async fn list_runs(
    store: &dyn Store,
    stuck: &StuckRule,
    request: ListRequest,
) -> Result<RunList, QueryError> {
    let only_stuck = parse_stuck(request.stuck.as_deref())?;
    let query = RunQuery {
        workflow_id: filter("workflow_id", request.workflow_id)?,
        status: filter("status", request.status)?,
        limit: parse_limit(request.limit.as_deref())?,
        after: parse_cursor(request.cursor.as_deref())?,
    };
    let now = Utc::now();
    let page = if only_stuck {
        store
            .list_stuck_runs(&query, stuck.changed_before(now))
            .await?
    } else {
        store.list_runs(&query).await?
    };
    Ok(RunList {
        runs: page
            .runs
            .into_iter()
            .map(|run| stuck.mark(run, now))
            .collect(),
        next_cursor: page.next.map(encode_cursor),
    })
}

/// A run's events; an unknown run is not found, a known run may have none yet.
pub async fn list_events(store: &dyn Store, message_id: &str) -> Result<EventList, QueryError> {
    if message_id.contains('\0') {
        return Err(QueryError::RunNotFound(message_id.to_owned()));
    }
    let events = store.list_events(message_id).await?;
    if events.is_empty() && store.get_run(message_id).await?.is_none() {
        return Err(QueryError::RunNotFound(message_id.to_owned()));
    }
    Ok(EventList { events })
}

/// A filter as given; empty means not given. A NUL character is refused: no stored value has
/// one, and PostgreSQL refuses it as a parameter (it was a 500).
fn filter(name: &str, value: Option<String>) -> Result<Option<String>, QueryError> {
    match value {
        Some(value) if value.contains('\0') => Err(QueryError::InvalidRequest(format!(
            "{name} must not contain NUL characters"
        ))),
        value => Ok(value.filter(|value| !value.is_empty())),
    }
}

/// A page size: [`DEFAULT_LIMIT`] when absent, else 1 to [`MAX_LIMIT`]. Every listing shares it.
pub(crate) fn parse_limit(text: Option<&str>) -> Result<u32, QueryError> {
    match text {
        None | Some("") => Ok(DEFAULT_LIMIT),
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|limit| (1..=MAX_LIMIT).contains(limit))
            .ok_or_else(|| {
                QueryError::InvalidRequest(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}"
                ))
            }),
    }
}

/// Only `true` filters. `false` is refused rather than read as "not stuck": that listing would
/// be nearly every run, and no index walks it; leave `stuck` out to list every run.
fn parse_stuck(text: Option<&str>) -> Result<bool, QueryError> {
    match text {
        None | Some("") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(QueryError::InvalidRequest(
            "stuck must be true (leave it out to list every run)".into(),
        )),
    }
}

fn parse_cursor(text: Option<&str>) -> Result<Option<RunCursor>, QueryError> {
    match text {
        None | Some("") => Ok(None),
        Some(text) => decode_cursor(text).map(Some).ok_or_else(|| {
            QueryError::InvalidRequest("cursor is not one this service returned".into())
        }),
    }
}

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

    #[test]
    fn limits_default_and_stay_within_bounds() {
        assert_eq!(parse_limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(parse_limit(Some("")).unwrap(), DEFAULT_LIMIT);
        assert_eq!(parse_limit(Some("1")).unwrap(), 1);
        assert_eq!(parse_limit(Some("500")).unwrap(), MAX_LIMIT);
        for bad in ["0", "501", "-1", "1.5", "ten", " 5"] {
            let error = parse_limit(Some(bad)).unwrap_err();
            assert!(error.to_string().contains("limit"), "{bad}: {error}");
        }
    }

    #[test]
    fn stuck_filters_only_when_true() {
        assert!(!parse_stuck(None).unwrap());
        assert!(!parse_stuck(Some("")).unwrap());
        assert!(parse_stuck(Some("true")).unwrap());
        for bad in ["false", "1", "TRUE", "yes"] {
            let error = parse_stuck(Some(bad)).unwrap_err();
            assert!(error.to_string().contains("stuck"), "{bad}: {error}");
        }
    }

    #[test]
    fn an_empty_cursor_is_the_first_page() {
        assert_eq!(parse_cursor(None).unwrap(), None);
        assert_eq!(parse_cursor(Some("")).unwrap(), None);
        let cursor = RunCursor { seq: 7 };
        assert_eq!(
            parse_cursor(Some(&encode_cursor(cursor))).unwrap(),
            Some(cursor)
        );
        assert!(parse_cursor(Some("garbage"))
            .unwrap_err()
            .to_string()
            .contains("cursor"));
    }
}
