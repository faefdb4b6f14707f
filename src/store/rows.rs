//! How the rows both backends read become a [`Run`] or an [`Event`].
//!
//! The statements name their columns as these structs do (each backend writes its own). Only
//! the type of the time columns differs: `timestamptz` on PostgreSQL, fixed-width UTC text on
//! SQLite, so each backend says how to read it.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::model::{Event, Run};
use super::StoreError;

/// One run, as a run query selects it.
#[derive(Debug, sqlx::FromRow)]
pub struct RunRow<Time> {
    pub message_id: String,
    pub workflow_id: Option<String>,
    pub status: String,
    pub created_at: Time,
    pub updated_at: Time,
    pub completed_at: Option<Time>,
    pub expires_at: Option<Time>,
    /// JSON text.
    pub result: Option<String>,
    pub assets_url: Option<String>,
    pub error: Option<String>,
    pub triggered_here: bool,
    /// Derived when read: see [`super::forward_only::terminals_conflict`].
    pub conflicting_terminals: bool,
    /// JSON text.
    pub workflow_params: Option<String>,
    pub seq: i64,
}

impl<Time> RunRow<Time> {
    /// The run, reading each time column with `time`.
    pub fn into_run(
        self,
        time: impl Fn(Time) -> Result<DateTime<Utc>, StoreError>,
    ) -> Result<Run, StoreError> {
        Ok(Run {
            message_id: self.message_id,
            workflow_id: self.workflow_id,
            status: self.status,
            created_at: time(self.created_at)?,
            updated_at: time(self.updated_at)?,
            completed_at: self.completed_at.map(&time).transpose()?,
            expires_at: self.expires_at.map(&time).transpose()?,
            result: raw_json(self.result)?,
            assets_url: self.assets_url,
            error: self.error,
            triggered_here: self.triggered_here,
            conflicting_terminals: self.conflicting_terminals,
            workflow_params: raw_json(self.workflow_params)?,
            seq: self.seq,
        })
    }
}

/// One event, as an event query selects it.
#[derive(Debug, sqlx::FromRow)]
pub struct EventRow<Time> {
    pub status: String,
    pub received_at: Time,
    pub duplicates: i64,
    pub differing_duplicates: i64,
    /// Derived when read: see [`super::forward_only::terminals_conflict`].
    pub conflicting_terminal: bool,
    pub key_id: String,
    pub last_received_at: Time,
    /// The body as received.
    pub payload: String,
}

impl<Time> EventRow<Time> {
    /// The event, reading each time column with `time`.
    pub fn into_event(
        self,
        time: impl Fn(Time) -> Result<DateTime<Utc>, StoreError>,
    ) -> Result<Event, StoreError> {
        Ok(Event {
            status: self.status,
            received_at: time(self.received_at)?,
            duplicates: self.duplicates,
            differing_duplicates: self.differing_duplicates,
            conflicting_terminal: self.conflicting_terminal,
            key_id: self.key_id,
            last_received_at: time(self.last_received_at)?,
            payload: RawValue::from_string(self.payload).map_err(|error| {
                StoreError::Internal(format!("stored payload does not parse: {error}"))
            })?,
        })
    }
}

/// Stored JSON text, handed out as is.
fn raw_json(text: Option<String>) -> Result<Option<Box<RawValue>>, StoreError> {
    text.map(RawValue::from_string)
        .transpose()
        .map_err(|error| StoreError::Internal(format!("stored JSON does not parse: {error}")))
}
