//! Lenient parsing of a verified callback body.
//!
//! Only `message_id` and `status` are required (strings). Everything else Nen may send is
//! optional and read if it has the expected shape; the raw body is always stored as well, so a
//! field read wrongly today is not lost.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest `message_id` accepted. Nen's ids are UUIDs; the bound keeps keys and indexes sane.
pub const MAX_MESSAGE_ID_LEN: usize = 200;
/// Longest `status` accepted.
pub const MAX_STATUS_LEN: usize = 64;
/// Deeper `result`s stay in the raw body only: databases refuse to index absurdly deep JSON,
/// and one such delivery must not fail the batch it is written with.
pub const MAX_RESULT_DEPTH: usize = 64;

/// The fields of a callback that nen-relay understands.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCallback {
    pub message_id: String,
    pub status: String,
    pub workflow_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// JSON text of `result`, as it appeared in the body.
    pub result: Option<String>,
    pub assets_url: Option<String>,
    pub error: Option<String>,
}

/// Why a signed body is not a callback. The message is shown to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// JSON text is UTF-8 (RFC 8259, section 8.1), and the body is stored and served as text.
    #[error("the body is not valid UTF-8 (the first invalid byte is at offset {0})")]
    NotUtf8(usize),
    #[error("the body is not valid JSON: {0}")]
    NotJson(String),
    #[error("the body is not a JSON object")]
    NotAnObject,
    #[error("the body is not a valid callback: {0}")]
    Malformed(String),
    #[error("'{0}' is missing or not a string")]
    MissingField(&'static str),
    #[error("'{field}' must be 1 to {max} characters long")]
    BadLength { field: &'static str, max: usize },
    #[error("'{0}' must not contain NUL characters")]
    ContainsNul(&'static str),
}

/// Borrowing view of the body; unknown fields are skipped (and kept in the raw body).
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    message_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    status: Option<&'a RawValue>,
    #[serde(borrow, default)]
    workflow_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    expires_at: Option<&'a RawValue>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    assets: Option<&'a RawValue>,
    #[serde(borrow, default)]
    assets_url: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

pub fn parse_callback(body: &[u8]) -> Result<ParsedCallback, PayloadError> {
    // serde_json skips unknown string fields without checking their bytes, so a body with
    // `\xff` in an unknown field would otherwise parse. Checked first, the whole body is known
    // to be UTF-8 from here on, which is what `Delivery::body_text` relies on.
    let body = std::str::from_utf8(body)
        .map_err(|error| PayloadError::NotUtf8(error.valid_up_to()))?
        .as_bytes();
    // serde would read a JSON array into the struct positionally: insist on an object.
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => PayloadError::NotAnObject,
                Err(error) => PayloadError::NotJson(error.to_string()),
            },
        );
    }
    let wire: Wire = serde_json::from_slice(body).map_err(|error| match error.classify() {
        // A type error inside an object, e.g. a duplicated field.
        serde_json::error::Category::Data => PayloadError::Malformed(error.to_string()),
        _ => PayloadError::NotJson(error.to_string()),
    })?;
    let message_id = required_string(wire.message_id, "message_id", MAX_MESSAGE_ID_LEN)?;
    let status = required_string(wire.status, "status", MAX_STATUS_LEN)?;
    Ok(ParsedCallback {
        message_id,
        status,
        workflow_id: optional_string(wire.workflow_id),
        expires_at: wire.expires_at.and_then(timestamp),
        result: wire
            .result
            .filter(|raw| raw.get() != "null" && storable_as_json_column(raw.get()))
            .map(|raw| raw.get().to_owned()),
        assets_url: optional_string(wire.assets).or_else(|| optional_string(wire.assets_url)),
        error: wire.error.and_then(error_text),
    })
}

fn required_string(
    raw: Option<&RawValue>,
    field: &'static str,
    max: usize,
) -> Result<String, PayloadError> {
    let value = raw
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        .ok_or(PayloadError::MissingField(field))?;
    if value.is_empty() || value.chars().count() > max {
        return Err(PayloadError::BadLength { field, max });
    }
    // Database text columns cannot hold NUL; refusing here keeps one delivery from failing
    // the batch it would be written with.
    if value.contains('\0') {
        return Err(PayloadError::ContainsNul(field));
    }
    Ok(value)
}

/// Optional fields that a text column could not hold stay in the raw body only.
fn optional_string(raw: Option<&RawValue>) -> Option<String> {
    raw.and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        .filter(|text| !text.contains('\0'))
}

/// Whether a `result` can go into a JSON column as well as the raw body. A JSON column refuses
/// absurd nesting, `\u0000`, lone surrogates and numbers beyond any float; such a result stays
/// in the raw body only, so that one delivery cannot fail the batch it is written with.
fn storable_as_json_column(json: &str) -> bool {
    nesting_depth(json) <= MAX_RESULT_DEPTH
        && !has_nul_escape(json)
        && serde_json::from_str::<serde_json::Value>(json).is_ok()
}

/// `\u0000` in any case, not preceded by an escaping backslash.
fn has_nul_escape(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' {
            let escape = &bytes[index + 1..];
            if escape.len() >= 5 && escape[0] == b'u' && &escape[1..5] == b"0000" {
                return true;
            }
            index += 2; // skip the escaped character, whatever it is
            continue;
        }
        index += 1;
    }
    false
}

/// `expires_at` is documented as Unix seconds; milliseconds and RFC 3339 are accepted too, since
/// Nen's signed requests accept all three. Anything else is left to the raw body, and so are
/// years RFC 3339 cannot write (outside 0001-9999): the API shows times in it, and PostgreSQL
/// refuses dates before 4713 BC, which would fail the whole batch the callback is written with.
fn timestamp(raw: &RawValue) -> Option<DateTime<Utc>> {
    any_timestamp(raw).filter(|time| (1..=9999).contains(&time.year()))
}

fn any_timestamp(raw: &RawValue) -> Option<DateTime<Utc>> {
    if let Ok(number) = serde_json::from_str::<f64>(raw.get()) {
        if !number.is_finite() {
            return None;
        }
        // Above 10^11 seconds is year 5138: read it as milliseconds instead.
        let millis = if number.abs() >= 1e11 {
            number
        } else {
            number * 1000.0
        };
        if millis.abs() > 8.2e15 {
            return None; // beyond chrono's range
        }
        return Utc.timestamp_millis_opt(millis as i64).single();
    }
    let text = serde_json::from_str::<String>(raw.get()).ok()?;
    DateTime::parse_from_rfc3339(&text)
        .ok()
        .map(|time| time.with_timezone(&Utc))
}

/// How deeply arrays and objects nest in a JSON text (brackets inside strings do not count).
fn nesting_depth(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for byte in json.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// `error` is documented as the exception message; any other JSON is kept as its text.
fn error_text(raw: &RawValue) -> Option<String> {
    match serde_json::from_str::<String>(raw.get()) {
        Ok(text) if text.contains('\0') => None,
        Ok(text) => Some(text),
        Err(_) if raw.get() == "null" => None,
        Err(_) if has_nul_escape(raw.get()) => None,
        Err(_) => Some(raw.get().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_the_documented_processing_example() {
        let parsed = parse_callback(
            br#"{"workflow_id":"w","message_id":"m","status":"processing","expires_at":1730319600}"#,
        )
        .unwrap();
        assert_eq!(parsed.message_id, "m");
        assert_eq!(parsed.status, "processing");
        assert_eq!(parsed.workflow_id.as_deref(), Some("w"));
        assert_eq!(parsed.expires_at.unwrap().timestamp(), 1_730_319_600);
        assert_eq!(parsed.result, None);
    }

    #[test]
    fn reads_success_and_failure_fields() {
        let success = parse_callback(
            br#"{"message_id":"m","status":"success","success":true,"result":{"a": [1, 2]},"assets":"https://x/a.zip"}"#,
        )
        .unwrap();
        assert_eq!(success.result.as_deref(), Some(r#"{"a": [1, 2]}"#));
        assert_eq!(success.assets_url.as_deref(), Some("https://x/a.zip"));
        let failure =
            parse_callback(br#"{"message_id":"m","status":"failed","error":"boom"}"#).unwrap();
        assert_eq!(failure.error.as_deref(), Some("boom"));
        let structured =
            parse_callback(br#"{"message_id":"m","status":"failed","error":{"code":7}}"#).unwrap();
        assert_eq!(structured.error.as_deref(), Some(r#"{"code":7}"#));
    }

    #[test]
    fn tolerates_odd_optional_fields() {
        let parsed = parse_callback(
            br#"{"message_id":"m","status":"s","workflow_id":5,"expires_at":"soon","result":null,"assets":false}"#,
        )
        .unwrap();
        assert_eq!(parsed.workflow_id, None);
        assert_eq!(parsed.expires_at, None);
        assert_eq!(parsed.result, None);
        assert_eq!(parsed.assets_url, None);
        let millis =
            parse_callback(br#"{"message_id":"m","status":"s","expires_at":1730319600000}"#)
                .unwrap();
        assert_eq!(millis.expires_at.unwrap().timestamp(), 1_730_319_600);
        let rfc = parse_callback(
            br#"{"message_id":"m","status":"s","expires_at":"2024-10-30T20:20:00Z"}"#,
        )
        .unwrap();
        assert_eq!(rfc.expires_at.unwrap().timestamp(), 1_730_319_600);
        let huge = parse_callback(br#"{"message_id":"m","status":"s","expires_at":1e300}"#);
        assert_eq!(huge.unwrap().expires_at, None);
        for beyond_rfc3339 in ["-8100000000000000", "8100000000000000", "-62135596801"] {
            let body =
                format!(r#"{{"message_id":"m","status":"s","expires_at":{beyond_rfc3339}}}"#);
            assert_eq!(parse_callback(body.as_bytes()).unwrap().expires_at, None);
        }
        let last_year =
            parse_callback(br#"{"message_id":"m","status":"s","expires_at":253402300799000}"#);
        assert_eq!(last_year.unwrap().expires_at.unwrap().year(), 9999);
    }

    #[test]
    fn rejects_what_is_not_a_callback() {
        assert!(matches!(
            parse_callback(b"not json"),
            Err(PayloadError::NotJson(_))
        ));
        assert_eq!(parse_callback(b"[1,2]"), Err(PayloadError::NotAnObject));
        assert_eq!(
            parse_callback(br#"{"status":"processing"}"#),
            Err(PayloadError::MissingField("message_id"))
        );
        assert_eq!(
            parse_callback(br#"{"message_id":7,"status":"processing"}"#),
            Err(PayloadError::MissingField("message_id"))
        );
        assert_eq!(
            parse_callback(br#"{"message_id":"m"}"#),
            Err(PayloadError::MissingField("status"))
        );
        assert!(matches!(
            parse_callback(br#"{"message_id":"","status":"processing"}"#),
            Err(PayloadError::BadLength {
                field: "message_id",
                ..
            })
        ));
        let long = format!(
            r#"{{"message_id":"{}","status":"processing"}}"#,
            "x".repeat(201)
        );
        assert!(matches!(
            parse_callback(long.as_bytes()),
            Err(PayloadError::BadLength {
                field: "message_id",
                ..
            })
        ));
    }

    #[test]
    fn rejects_bodies_that_are_not_utf8() {
        // Invalid bytes in a field nen-relay does not read, which serde_json alone lets through.
        assert_eq!(
            parse_callback(b"{\"message_id\":\"m\",\"status\":\"s\",\"x\":\"\xff\xfe\"}"),
            Err(PayloadError::NotUtf8(36))
        );
        // Latin-1, in a read field and in an unknown one.
        assert_eq!(
            parse_callback(b"{\"message_id\":\"m\",\"status\":\"s\",\"error\":\"caf\xe9\"}"),
            Err(PayloadError::NotUtf8(43))
        );
        assert_eq!(
            parse_callback(b"{\"message_id\":\"m\",\"status\":\"s\",\"x\":\"\xe9t\xe9\"}"),
            Err(PayloadError::NotUtf8(36))
        );
        // A UTF-16 byte order mark, an overlong encoding, a lone surrogate encoded as UTF-8.
        for body in [
            &b"\xff\xfe{}"[..],
            b"{\"x\":\"\xc0\xaf\"}",
            b"{\"x\":\"\xed\xa0\x80\"}",
        ] {
            assert!(
                matches!(parse_callback(body), Err(PayloadError::NotUtf8(_))),
                "{body:?}"
            );
        }
        // The same text written as UTF-8 is fine.
        let utf8 = "{\"message_id\":\"m\",\"status\":\"s\",\"error\":\"caf\u{e9}\"}";
        assert_eq!(
            parse_callback(utf8.as_bytes()).unwrap().error.as_deref(),
            Some("caf\u{e9}")
        );
    }

    #[test]
    fn deep_nesting_is_kept_raw_but_not_read_as_the_result() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let ignored = format!(r#"{{"message_id":"m","status":"s","x":{deep}}}"#);
        assert_eq!(parse_callback(ignored.as_bytes()).unwrap().message_id, "m");
        let as_result = format!(r#"{{"message_id":"m","status":"s","result":{deep}}}"#);
        assert_eq!(parse_callback(as_result.as_bytes()).unwrap().result, None);
        let shallow = r#"{"message_id":"m","status":"s","result":{"a":[{"b":"]]]"}]}}"#;
        assert_eq!(
            parse_callback(shallow.as_bytes())
                .unwrap()
                .result
                .as_deref(),
            Some(r#"{"a":[{"b":"]]]"}]}"#)
        );
    }

    #[test]
    fn values_a_database_column_cannot_hold_stay_in_the_raw_body() {
        assert_eq!(
            parse_callback(br#"{"message_id":"m\u0000","status":"s"}"#),
            Err(PayloadError::ContainsNul("message_id"))
        );
        assert_eq!(
            parse_callback(br#"{"message_id":"m","status":"s\u0000"}"#),
            Err(PayloadError::ContainsNul("status"))
        );
        let odd = parse_callback(
            br#"{"message_id":"m","status":"s","workflow_id":"w\u0000","error":{"e":"\u0000"},"assets":"\u0000"}"#,
        )
        .unwrap();
        assert_eq!(
            (odd.workflow_id, odd.error, odd.assets_url),
            (None, None, None)
        );
        for result in [
            r#"{"a":"\u0000"}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":1e999999}"#,
            r#"[-1e400]"#,
        ] {
            let body = format!(r#"{{"message_id":"m","status":"s","result":{result}}}"#);
            assert_eq!(
                parse_callback(body.as_bytes()).unwrap().result,
                None,
                "{result}"
            );
        }
        let kept = r#"{"a":"\\u0000","big":123456789012345678901234567890}"#;
        let body = format!(r#"{{"message_id":"m","status":"s","result":{kept}}}"#);
        assert_eq!(
            parse_callback(body.as_bytes()).unwrap().result.as_deref(),
            Some(kept)
        );
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let accepted = parse_callback(&body).is_ok();
            // Whatever is accepted can be stored and served as text.
            prop_assert!(!accepted || std::str::from_utf8(&body).is_ok());
        }

        #[test]
        fn string_ids_and_statuses_round_trip(id in "[^\u{0}]{1,50}", status in "[a-z]{1,20}") {
            let body = serde_json::json!({"message_id": id, "status": status}).to_string();
            let parsed = parse_callback(body.as_bytes()).unwrap();
            prop_assert_eq!(parsed.message_id, id);
            prop_assert_eq!(parsed.status, status);
        }
    }
}
