//! The two HMACs Nen computes, written here from Nen's documentation rather than taken from
//! nen-relay: an independent implementation is what makes the stand-in a test oracle for the
//! service's own signing and verification.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The `X-Hmac-Signature` value Nen puts on a callback: `sha256=` and the lowercase hex
/// HMAC-SHA256 of the exact body, keyed with the webhook secret.
pub fn callback_signature(webhook_secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac(webhook_secret, body)))
}

/// The `x-signature` Nen expects on a signed `POST /runs`: lowercase hex HMAC-SHA256, keyed with
/// the signing key, of `POST\n/runs\n<x-timestamp>\n<lowercase hex SHA-256 of the body>`.
pub fn request_signature(signing_key: &[u8], timestamp: &str, body: &[u8]) -> String {
    let canonical = format!(
        "POST\n/runs\n{timestamp}\n{}",
        hex::encode(Sha256::digest(body))
    );
    hex::encode(hmac(signing_key, canonical.as_bytes()))
}

fn hmac(key: &[u8], message: &[u8]) -> impl AsRef<[u8]> {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message);
    mac.finalize().into_bytes()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    // The vectors were computed with Python's hmac module; the service is tested against them too.
    const CALLBACK_VECTORS: &str = include_str!("../../../tests/fixtures/callback-signatures.json");
    const REQUEST_VECTOR: &str = include_str!("../../../tests/fixtures/request-signature.json");

    fn text(value: &Value, field: &str) -> String {
        value[field]
            .as_str()
            .unwrap_or_else(|| panic!("fixture field {field} is a string"))
            .to_owned()
    }

    #[test]
    fn callbacks_are_signed_like_the_published_vectors() {
        let fixture: Value = serde_json::from_str(CALLBACK_VECTORS).unwrap();
        let secret = text(&fixture, "secret");
        let cases = fixture["cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            assert_eq!(
                callback_signature(secret.as_bytes(), text(case, "body").as_bytes()),
                text(case, "x_hmac_signature")
            );
        }
    }

    #[test]
    fn no_invalid_vector_matches_what_the_stand_in_would_send() {
        let fixture: Value = serde_json::from_str(CALLBACK_VECTORS).unwrap();
        let secret = text(&fixture, "secret");
        for case in fixture["invalid"].as_array().unwrap() {
            assert_ne!(
                callback_signature(secret.as_bytes(), text(case, "body").as_bytes()),
                text(case, "x_hmac_signature"),
                "{}",
                text(case, "why")
            );
        }
    }

    #[test]
    fn requests_are_checked_against_the_published_vector() {
        let fixture: Value = serde_json::from_str(REQUEST_VECTOR).unwrap();
        let body = text(&fixture, "body");
        let timestamp = text(&fixture, "x_timestamp");
        let key = text(&fixture, "signing_key");
        assert_eq!(
            request_signature(key.as_bytes(), &timestamp, body.as_bytes()),
            text(&fixture, "x_signature")
        );
        assert_ne!(
            request_signature(key.as_bytes(), "1767225601", body.as_bytes()),
            text(&fixture, "x_signature"),
            "the timestamp is signed"
        );
        assert_ne!(
            request_signature(b"another key", &timestamp, body.as_bytes()),
            text(&fixture, "x_signature")
        );
    }
}
