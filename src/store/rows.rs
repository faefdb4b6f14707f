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
            result: self.result.map(json_or_string),
            assets_url: self.assets_url,
            error: self.error,
            triggered_here: self.triggered_here,
            conflicting_terminals: self.conflicting_terminals,
            workflow_params: self.workflow_params.map(json_or_string),
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
    /// The body as received; empty once pruned.
    pub payload: String,
    pub payload_pruned: bool,
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
            payload: if self.payload_pruned {
                RawValue::NULL.to_owned()
            } else {
                json_or_string(self.payload)
            },
            payload_pruned: self.payload_pruned,
        })
    }
}

/// Stored JSON text, handed out as is. This service only stores text that parsed as JSON, but a
/// row written some other way (by hand, by an older version, a damaged file) may hold anything
/// a text column can: such text is handed out as a JSON string holding it, so that one row can
/// never make a read endpoint fail.
pub fn json_or_string(text: String) -> Box<RawValue> {
    // Checked before `from_string` takes the text, so that the text is still there to fall
    // back on; a payload is read twice here, which is cheap next to fetching it.
    if serde_json::from_str::<&RawValue>(&text).is_err() {
        tracing::warn!("a stored JSON column does not parse; it is served as a JSON string");
        // Serializing a string cannot fail; `null` only to avoid a panic path.
        return serde_json::value::to_raw_value(&text)
            .unwrap_or_else(|_| RawValue::NULL.to_owned());
    }
    RawValue::from_string(text).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_text_that_is_not_json_is_served_as_a_string() {
        for json in [r#"{"a": [1, 2]}"#, "\"x\"", "7", "null"] {
            assert_eq!(json_or_string(json.to_owned()).get(), json);
        }
        for text in ["", "{\"a\":", "caf\u{e9}", "\u{fffd}\u{fffd}", "{} {}"] {
            let served = json_or_string(text.to_owned());
            assert_eq!(
                serde_json::from_str::<String>(served.get()).unwrap(),
                text,
                "{text:?}"
            );
        }
    }
}
