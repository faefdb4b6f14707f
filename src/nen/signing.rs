//! Signed requests to Nen (docs/nen.md, "Signed requests"): needed whenever `secure_workflow_params` is sent.
//!
//! The canonical request is built in one place so that, should Nen's exact format turn out to
//! differ, the correction is a one-line change checked by the test vector below.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// `POST\n/runs\n<timestamp>\n<lowercase hex SHA-256 of the body>`, no trailing newline.
pub fn canonical_request(timestamp: &str, body: &[u8]) -> String {
    format!(
        "POST\n/runs\n{timestamp}\n{}",
        hex::encode(Sha256::digest(body))
    )
}

/// The `x-signature` value: lowercase hex HMAC-SHA256(signing key, canonical request).
/// `body` must be exactly the bytes that will be sent.
pub fn signature(signing_key: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(signing_key).expect("HMAC accepts keys of any length");
    mac.update(canonical_request(timestamp, body).as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_test_vector() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/request-signature.json"))
                .unwrap();
        let text = |name: &str| fixture[name].as_str().unwrap().to_owned();
        let body = text("body");
        let timestamp = text("x_timestamp");
        let canonical = canonical_request(&timestamp, body.as_bytes());
        // Its last line is the body's hash, which the fixture also gives on its own.
        assert_eq!(
            canonical.rsplit('\n').next(),
            Some(text("body_hash").as_str())
        );
        assert_eq!(canonical, text("canonical_request"));
        assert_eq!(
            signature(text("signing_key").as_bytes(), &timestamp, body.as_bytes()),
            text("x_signature")
        );
    }

    #[test]
    fn any_change_to_the_body_or_time_changes_the_signature() {
        let base = signature(b"key", "1767225600", b"{}");
        assert_ne!(base, signature(b"key", "1767225601", b"{}"));
        assert_ne!(base, signature(b"key", "1767225600", b"{ }"));
        assert_ne!(base, signature(b"other", "1767225600", b"{}"));
    }
}
