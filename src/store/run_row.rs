//! The columns a run query selects, in this order on both backends, and how they become a
//! `Run`. Only the type of the time columns differs: `timestamptz` on PostgreSQL, fixed-width
//! UTC text on SQLite.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::model::Run;
use super::StoreError;

pub(super) type RunRow<Time> = (
    String,         // message_id
    Option<String>, // workflow_id
    String,         // status
    Time,           // created_at
    Time,           // updated_at
    Option<Time>,   // completed_at
    Option<Time>,   // expires_at
    Option<String>, // result (JSON text)
    Option<String>, // assets_url
    Option<String>, // error
    bool,           // triggered_here
    bool,           // conflicting_terminals
    Option<String>, // workflow_params (JSON text)
    i64,            // seq
);

/// Builds the run, reading each time column with `time`.
pub(super) fn run_from_row<Time>(
    row: RunRow<Time>,
    time: impl Fn(Time) -> Result<DateTime<Utc>, StoreError>,
) -> Result<Run, StoreError> {
    let (
        message_id,
        workflow_id,
        status,
        created_at,
        updated_at,
        completed_at,
        expires_at,
        result,
        assets_url,
        error,
        triggered_here,
        conflicting_terminals,
        workflow_params,
        seq,
    ) = row;
    Ok(Run {
        message_id,
        workflow_id,
        status,
        created_at: time(created_at)?,
        updated_at: time(updated_at)?,
        completed_at: completed_at.map(&time).transpose()?,
        expires_at: expires_at.map(&time).transpose()?,
        result: raw_json(result)?,
        assets_url,
        error,
        triggered_here,
        conflicting_terminals,
        workflow_params: raw_json(workflow_params)?,
        seq,
    })
}

/// Stored JSON text, handed out as is.
pub(super) fn raw_json(text: Option<String>) -> Result<Option<Box<RawValue>>, StoreError> {
    text.map(RawValue::from_string)
        .transpose()
        .map_err(|error| StoreError::Internal(format!("stored JSON does not parse: {error}")))
}
