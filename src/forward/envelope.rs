//! The body of a forwarded message: `{"type", "timestamp", "data"}` (SPEC, "Forwarding to your
//! systems").
//!
//! `data` is the run exactly as it was stored with the change, embedded as raw JSON text: it is
//! what `GET /v1/runs/{id}` showed right after the change, byte for byte, and is never parsed
//! into values and written out again.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    /// When the change was committed, RFC 3339 as every timestamp of the API.
    timestamp: DateTime<Utc>,
    data: &'a RawValue,
}

/// The JSON body for a message, or an error when the stored run is not JSON (a bug: the store
/// writes it from a serialized run).
pub fn body(
    event_type: &str,
    committed_at: DateTime<Utc>,
    run: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    let data: &RawValue = serde_json::from_str(run)?;
    serde_json::to_vec(&Envelope {
        event_type,
        timestamp: committed_at,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn the_run_is_embedded_as_stored() {
        let committed_at = Utc.with_ymd_and_hms(2026, 3, 1, 12, 30, 5).unwrap()
            + chrono::Duration::milliseconds(250);
        // Key order, spacing and number forms survive: nothing is re-serialized.
        let run = r#"{"status": "success", "message_id":"m-1","result":1.50}"#;
        let body = body("run.status_changed", committed_at, run).unwrap();
        let text = String::from_utf8(body).unwrap();
        assert_eq!(
            text,
            format!(
                r#"{{"type":"run.status_changed","timestamp":"2026-03-01T12:30:05.250Z","data":{run}}}"#
            )
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["data"]["message_id"], "m-1");
    }

    #[test]
    fn a_stored_run_that_is_not_json_is_an_error() {
        assert!(body("run.stuck", Utc::now(), "{not json").is_err());
        assert!(body("run.stuck", Utc::now(), "").is_err());
    }
}
