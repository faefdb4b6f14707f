//! `parse_callback` on arbitrary bytes: never panics, and whatever it accepts can be stored:
//! bounded non-empty ids and statuses without NUL, a `result` that is valid JSON, and a body
//! that is UTF-8 (it is stored and served as text).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nen_relay::callbacks::payload::{parse_callback, MAX_MESSAGE_ID_LEN, MAX_STATUS_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = parse_callback(data) {
        for (value, max) in [
            (&parsed.message_id, MAX_MESSAGE_ID_LEN),
            (&parsed.status, MAX_STATUS_LEN),
        ] {
            assert!(!value.is_empty() && value.chars().count() <= max);
            assert!(!value.contains('\0'));
        }
        if let Some(result) = &parsed.result {
            let value: serde_json::Value =
                serde_json::from_str(result).expect("a kept result is JSON");
            assert!(!holds_nul(&value), "a kept result holds NUL");
        }
        assert!(std::str::from_utf8(data).is_ok(), "an accepted body is UTF-8");
        // The body as a whole is a JSON object.
        serde_json::from_slice::<serde::de::IgnoredAny>(data).expect("an accepted body is JSON");
    }
});

/// Whether any string (or key) in the value contains NUL, which a JSON column refuses.
fn holds_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(text) => text.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(holds_nul),
        serde_json::Value::Object(fields) => fields
            .iter()
            .any(|(key, value)| key.contains('\0') || holds_nul(value)),
        _ => false,
    }
}
