//! Standard Webhooks signing: the three headers every forwarded message carries.
//!
//! `webhook-signature` is `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, with the
//! key bytes of the target's `whsec_` secret; `webhook-timestamp` is the Unix second of the
//! attempt, so that a receiver can refuse replays of old attempts.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// The `webhook-signature` value for one attempt.
pub fn sign(key: &[u8], webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(webhook_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn key() -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(SECRET.strip_prefix("whsec_").unwrap())
            .unwrap()
    }

    /// The specification's published test vector.
    #[test]
    fn the_standard_webhooks_test_vector() {
        assert_eq!(
            sign(
                &key(),
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    /// The official Rust library of Standard Webhooks verifies what we sign, and refuses it
    /// when any part changes.
    #[test]
    fn the_reference_library_verifies_our_signatures() {
        let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
        let now = chrono::Utc::now().timestamp();
        let body = br#"{"type":"run.status_changed","data":{"a":1}}"#;
        let headers = |id: &str, timestamp: i64, signature: &str| {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert(ID_HEADER, id.parse().unwrap());
            headers.insert(TIMESTAMP_HEADER, timestamp.to_string().parse().unwrap());
            headers.insert(SIGNATURE_HEADER, signature.parse().unwrap());
            headers
        };
        let signature = sign(&key(), "msg_42", now, body);
        assert!(verifier
            .verify(body, &headers("msg_42", now, &signature))
            .is_ok());
        assert!(verifier
            .verify(body, &headers("msg_43", now, &signature))
            .is_err());
        assert!(verifier
            .verify(b"{}", &headers("msg_42", now, &signature))
            .is_err());
        let earlier = sign(&key(), "msg_42", now - 1, body);
        assert!(verifier
            .verify(body, &headers("msg_42", now, &earlier))
            .is_err());
    }
}
