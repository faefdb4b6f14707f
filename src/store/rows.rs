//! How the rows both backends read become a [`Run`] or an [`Event`].
//!
//! The statements name their columns as these structs do (each backend writes its own). Only
//! the type of the time columns differs: `timestamptz` on PostgreSQL, fixed-width UTC text on
//! SQLite, so each backend says how to read it.
//!
//! Text columns are read as [`StoredText`]: PostgreSQL guarantees UTF-8, but an SQLite text
//! column holds whatever bytes were written into it (by another tool, by hand), and one row must
//! never make a read fail.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgTypeInfo, PgValueRef};
use sqlx::sqlite::{SqliteTypeInfo, SqliteValueRef};
use sqlx::{Decode, Postgres, Sqlite, Type};

use super::model::{Event, Run};
use super::StoreError;

/// One run, as a run query selects it.
#[derive(Debug, sqlx::FromRow)]
pub struct RunRow<Time> {
    pub message_id: StoredText,
    pub workflow_id: Option<StoredText>,
    pub status: StoredText,
    pub created_at: Time,
    pub updated_at: Time,
    pub completed_at: Option<Time>,
    pub expires_at: Option<Time>,
    /// JSON text.
    pub result: Option<StoredText>,
    pub assets_url: Option<StoredText>,
    pub error: Option<StoredText>,
    pub triggered_here: bool,
    /// Derived when read: see [`super::forward_only::terminals_conflict`].
    pub conflicting_terminals: bool,
    /// JSON text.
    pub workflow_params: Option<StoredText>,
    pub seq: i64,
}

impl<Time> RunRow<Time> {
    /// The run, reading each time column with `time`.
    pub fn into_run(
        self,
        time: impl Fn(Time) -> Result<DateTime<Utc>, StoreError>,
    ) -> Result<Run, StoreError> {
        Ok(Run {
            message_id: self.message_id.0,
            workflow_id: self.workflow_id.map(StoredText::into_string),
            status: self.status.0,
            created_at: time(self.created_at)?,
            updated_at: time(self.updated_at)?,
            completed_at: self.completed_at.map(&time).transpose()?,
            expires_at: self.expires_at.map(&time).transpose()?,
            result: self.result.map(|text| json_or_string(text.0)),
            assets_url: self.assets_url.map(StoredText::into_string),
            error: self.error.map(StoredText::into_string),
            triggered_here: self.triggered_here,
            conflicting_terminals: self.conflicting_terminals,
            stuck: false,
            workflow_params: self.workflow_params.map(|text| json_or_string(text.0)),
            seq: self.seq,
        })
    }
}

/// One event, as an event query selects it.
#[derive(Debug, sqlx::FromRow)]
pub struct EventRow<Time> {
    pub status: StoredText,
    pub received_at: Time,
    pub duplicates: i64,
    pub differing_duplicates: i64,
    /// Derived when read: see [`super::forward_only::terminals_conflict`].
    pub conflicting_terminal: bool,
    pub key_id: StoredText,
    pub last_received_at: Time,
    /// The body as received; empty once pruned.
    pub payload: StoredText,
    pub payload_pruned: bool,
}

impl<Time> EventRow<Time> {
    /// The event, reading each time column with `time`.
    pub fn into_event(
        self,
        time: impl Fn(Time) -> Result<DateTime<Utc>, StoreError>,
    ) -> Result<Event, StoreError> {
        Ok(Event {
            status: self.status.0,
            received_at: time(self.received_at)?,
            duplicates: self.duplicates,
            differing_duplicates: self.differing_duplicates,
            conflicting_terminal: self.conflicting_terminal,
            key_id: self.key_id.0,
            last_received_at: time(self.last_received_at)?,
            payload: if self.payload_pruned {
                RawValue::NULL.to_owned()
            } else {
                json_or_string(self.payload.0)
            },
            payload_pruned: self.payload_pruned,
        })
    }
}

/// A text column as read: its bytes as text, any that are not UTF-8 replaced by U+FFFD (and a
/// warning logged). On SQLite any stored value is taken (text, blob, number) as the text SQLite
/// gives for it; on PostgreSQL it reads exactly as a `String`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredText(pub String);

impl StoredText {
    pub fn into_string(self) -> String {
        self.0
    }

    fn from_bytes(bytes: &[u8]) -> Self {
        match String::from_utf8_lossy(bytes) {
            Cow::Borrowed(text) => StoredText(text.to_owned()),
            Cow::Owned(replaced) => {
                tracing::warn!("a stored text column is not UTF-8; it is read with U+FFFD");
                StoredText(replaced)
            }
        }
    }
}

impl Type<Sqlite> for StoredText {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }

    /// SQLite keeps any value in any column: whatever is there is read as its text.
    fn compatible(_: &SqliteTypeInfo) -> bool {
        true
    }
}

impl<'r> Decode<'r, Sqlite> for StoredText {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        <&[u8] as Decode<Sqlite>>::decode(value).map(StoredText::from_bytes)
    }
}

impl Type<Postgres> for StoredText {
    fn type_info() -> PgTypeInfo {
        <String as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <String as Type<Postgres>>::compatible(ty)
    }
}

/// The synchronous write path (`sqlite::batch`) reads with rusqlite: the same rule as above.
impl rusqlite::types::FromSql for StoredText {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        use rusqlite::types::{FromSqlError, ValueRef};
        match value {
            ValueRef::Text(bytes) | ValueRef::Blob(bytes) => Ok(StoredText::from_bytes(bytes)),
            ValueRef::Integer(number) => Ok(StoredText(number.to_string())),
            ValueRef::Real(number) => Ok(StoredText(number.to_string())),
            ValueRef::Null => Err(FromSqlError::InvalidType),
        }
    }
}

impl<'r> Decode<'r, Postgres> for StoredText {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        <String as Decode<Postgres>>::decode(value).map(StoredText)
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
    fn stored_bytes_that_are_not_utf8_are_read_with_replacement_characters() {
        assert_eq!(StoredText::from_bytes(b"plain").0, "plain");
        assert_eq!(
            StoredText::from_bytes(b"caf\xe9 \xff\xfe").0,
            "caf\u{fffd} \u{fffd}\u{fffd}"
        );
    }

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
