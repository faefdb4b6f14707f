//! `Idempotency-Key`: at most one run per key, and the same answer for every repeat.
//!
//! Before Nen is called, the key is claimed in the store together with a fingerprint of the
//! request. A repeat of the same request gets the answer kept for the key; a different request
//! with the same key is a conflict. The key is completed with the answer when Nen accepts the
//! run, and released when it does not (see `start.rs`).

use std::time::Duration;

use chrono::Utc;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use serde_json::Value;
use sha2::Sha256;
use url::Url;

use super::start::{StartRequest, Submitted};
use crate::store::{IdempotencyClaim, StoredResponse};

/// The request header that carries the key.
pub const HEADER: &str = "idempotency-key";
pub const MAX_KEY_LENGTH: usize = 255;

/// The store keeps an HTTP status beside each answer; every answer kept is a 202.
const ACCEPTED: u16 = 202;

/// A well-formed key: 1 to [`MAX_KEY_LENGTH`] visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1 to {MAX_KEY_LENGTH} visible ASCII characters")]
pub struct InvalidKey;

impl IdempotencyKey {
    pub fn parse(value: &[u8]) -> Result<Self, InvalidKey> {
        let well_formed =
            (1..=MAX_KEY_LENGTH).contains(&value.len()) && value.iter().all(u8::is_ascii_graphic);
        if !well_formed {
            return Err(InvalidKey);
        }
        std::str::from_utf8(value)
            .map(|key| Self(key.to_owned()))
            .map_err(|_| InvalidKey)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Label of the derivation of the default [`FingerprintKey`] from `NEN_API_KEY`. Fixed: changing
/// it changes every fingerprint, and keys claimed before would then answer 409 to a retry.
const DERIVATION_LABEL: &[u8] = b"nen-relay idempotency fingerprint";

/// Domain separation of the fingerprint HMAC from any other use of the same key.
const FINGERPRINT_CONTEXT: &[u8] = b"nen-relay idempotency fingerprint v1\n";

/// The server-side key of the fingerprint HMAC.
///
/// It must be secret (else the stored fingerprint could be used to guess `workflow_params`,
/// which are personal data) and the same on every replica and across restarts (else a retry
/// that reaches another replica, or comes after a deploy, would be a conflict). So it is
/// `NEN_RELAY_TRIGGER__FINGERPRINT_KEY` when that is set, and otherwise
/// HMAC-SHA256(`NEN_API_KEY`, "nen-relay idempotency fingerprint"): a secret that every replica
/// already shares and that a trigger cannot work without, never used as is.
#[derive(Clone)]
pub struct FingerprintKey(SecretSlice<u8>);

impl std::fmt::Debug for FingerprintKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("FingerprintKey([REDACTED])")
    }
}

impl FingerprintKey {
    pub fn new(bytes: &[u8]) -> Self {
        Self(SecretSlice::from(bytes.to_vec()))
    }

    /// The configured key, or else the one derived from the API key; `None` without either
    /// (triggering then answers 503 `not_configured` before any key is claimed).
    pub fn from_settings(
        configured: Option<&SecretString>,
        api_key: Option<&SecretString>,
    ) -> Option<Self> {
        if let Some(key) = configured {
            return Some(Self::new(key.expose_secret().as_bytes()));
        }
        let api_key = api_key?;
        let mut mac = Hmac::<Sha256>::new_from_slice(api_key.expose_secret().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(DERIVATION_LABEL);
        Some(Self::new(&mac.finalize().into_bytes()))
    }
}

/// The claim for `key`, valid for `ttl`, naming the request by its fingerprint only.
pub fn claim(
    key: &IdempotencyKey,
    request: &StartRequest,
    signing_key: Option<&[u8]>,
    fingerprint_key: &FingerprintKey,
    ttl: Duration,
) -> IdempotencyClaim {
    let now = Utc::now();
    let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(24));
    IdempotencyClaim {
        key: key.as_str().to_owned(),
        request_sha256: fingerprint(request, signing_key, fingerprint_key),
        now,
        expires_at: now + ttl,
    }
}

/// HMAC-SHA256, keyed with the [`FingerprintKey`], of a canonical form of the request, to tell
/// a repeat from a different request. Keyed, so that the stored value cannot be used to guess
/// the request's personal data: a plain hash of a name and a date of birth is easily
/// brute-forced.
///
/// Secure parameters enter only as an HMAC keyed with the signing key (they cannot be sent
/// without it), so even the fingerprint key does not help guess them. Key order and whitespace
/// do not matter.
pub fn fingerprint(
    request: &StartRequest,
    signing_key: Option<&[u8]>,
    key: &FingerprintKey,
) -> [u8; 32] {
    let secure = match (&request.secure_workflow_params, signing_key) {
        (Some(params), Some(key)) => {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
            mac.update(b"nen-relay idempotency: secure_workflow_params\n");
            mac.update(canonical_json(&Value::Object(params.expose().clone())).as_bytes());
            Value::String(hex::encode(mac.finalize().into_bytes()))
        }
        // Never reached (secure parameters need the signing key); never hash them in the clear.
        (Some(_), None) => Value::String("unsigned".into()),
        (None, _) => Value::Null,
    };
    let canonical = serde_json::json!({
        "workflow_id": request.workflow_id,
        "workflow_params": request.workflow_params,
        "secure_workflow_params_hmac": secure,
        "webhook_callback": request.webhook_callback.as_ref().map(Url::as_str),
    });
    let mut mac = Hmac::<Sha256>::new_from_slice(key.0.expose_secret())
        .expect("HMAC accepts keys of any length");
    mac.update(FINGERPRINT_CONTEXT);
    mac.update(canonical_json(&canonical).as_bytes());
    mac.finalize().into_bytes().into()
}

/// JSON with object keys sorted at every level and no whitespace. Written out rather than left
/// to `serde_json::to_string`, whose key order depends on a crate feature that any dependency
/// may turn on.
fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = entries
                .into_iter()
                .map(|(key, value)| {
                    format!("{}:{}", Value::String(key.clone()), canonical_json(value))
                })
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", inner.join(","))
        }
        scalar => scalar.to_string(),
    }
}

/// The answer to keep for a completed key.
pub fn keep(answer: &Submitted) -> StoredResponse {
    StoredResponse {
        status: ACCEPTED,
        body: serde_json::to_string(answer).expect("plain strings serialise"),
    }
}

/// Why a kept answer cannot be replayed: the row was not written by [`keep`].
#[derive(Debug, thiserror::Error)]
pub enum UnreadableAnswer {
    #[error("the kept answer has status {0}, not 202")]
    Status(u16),
    #[error("the kept answer is not a submitted run: {0}")]
    Body(#[from] serde_json::Error),
}

/// Reads a kept answer back into the value that produced it.
pub fn replay(stored: &StoredResponse) -> Result<Submitted, UnreadableAnswer> {
    if stored.status != ACCEPTED {
        return Err(UnreadableAnswer::Status(stored.status));
    }
    Ok(serde_json::from_str(&stored.body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKFLOW: &str = "12345678-1234-1234-1234-123456789abc";

    fn request(body: &str) -> StartRequest {
        StartRequest::parse(body.as_bytes()).expect("a valid request")
    }

    fn fk() -> FingerprintKey {
        FingerprintKey::new(b"fingerprint-key-for-tests")
    }

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert_eq!(IdempotencyKey::parse(b"key-1").unwrap().as_str(), "key-1");
        assert!(IdempotencyKey::parse("k".repeat(255).as_bytes()).is_ok());
        for bad in [
            "".as_bytes(),
            "k".repeat(256).as_bytes(),
            b"with space",
            b"tab\there",
            "caf\u{e9}".as_bytes(),
            b"nul\0",
        ] {
            assert_eq!(IdempotencyKey::parse(bad), Err(InvalidKey), "{bad:?}");
        }
        assert!(InvalidKey.to_string().contains("Idempotency-Key"));
    }

    #[test]
    fn the_fingerprint_ignores_key_order_and_hides_secure_values() {
        let a = request(&format!(
            r#"{{"workflow_id":"{WORKFLOW}","workflow_params":{{"a":1,"b":2}},"secure_workflow_params":{{"p":"x"}}}}"#
        ));
        let b = request(&format!(
            r#"{{ "secure_workflow_params":{{"p":"x"}}, "workflow_params":{{"b":2,"a":1}},"workflow_id":"{WORKFLOW}"}}"#
        ));
        let c = request(&format!(
            r#"{{"workflow_id":"{WORKFLOW}","workflow_params":{{"a":1,"b":2}},"secure_workflow_params":{{"p":"y"}}}}"#
        ));
        assert_eq!(
            fingerprint(&a, Some(b"k"), &fk()),
            fingerprint(&b, Some(b"k"), &fk())
        );
        assert_ne!(
            fingerprint(&a, Some(b"k"), &fk()),
            fingerprint(&c, Some(b"k"), &fk())
        );
        // Without the key, the hash does not reveal the secure value (it is keyed).
        assert_ne!(
            fingerprint(&a, Some(b"k"), &fk()),
            fingerprint(&a, Some(b"other"), &fk())
        );
    }

    #[test]
    fn every_field_counts_in_the_fingerprint() {
        let base = format!(r#""workflow_id":"{WORKFLOW}","workflow_params":{{"a":1}}"#);
        let variants = [
            format!("{{{base}}}"),
            format!(r#"{{"workflow_id":"{WORKFLOW}","workflow_params":{{"a":2}}}}"#),
            r#"{"workflow_id":"00000000-1234-1234-1234-123456789abc","workflow_params":{"a":1}}"#
                .to_owned(),
            format!(r#"{{{base},"webhook_callback":"https://a.example/h"}}"#),
            format!(r#"{{{base},"webhook_callback":"https://b.example/h"}}"#),
            format!(r#"{{{base},"secure_workflow_params":{{}}}}"#),
        ];
        let fingerprints: Vec<[u8; 32]> = variants
            .iter()
            .map(|body| fingerprint(&request(body), Some(b"k"), &fk()))
            .collect();
        for (i, a) in fingerprints.iter().enumerate() {
            for b in &fingerprints[i + 1..] {
                assert_ne!(a, b, "{} vs another variant", variants[i]);
            }
        }
    }

    #[test]
    fn the_same_request_and_key_give_the_same_fingerprint_and_another_key_another() {
        let body = format!(
            r#"{{"workflow_id":"{WORKFLOW}","workflow_params":{{"name":"Ada Lovelace","dob":"1815-12-10"}}}}"#
        );
        let first = fingerprint(&request(&body), None, &fk());
        let again = fingerprint(
            &request(&body),
            None,
            &FingerprintKey::new(b"fingerprint-key-for-tests"),
        );
        assert_eq!(first, again);
        let other = fingerprint(
            &request(&body),
            None,
            &FingerprintKey::new(b"another-fingerprint-key"),
        );
        assert_ne!(first, other);
    }

    #[test]
    fn no_plain_sha256_of_the_params_is_the_stored_fingerprint() {
        use sha2::Digest;
        let params = r#"{"dob":"1815-12-10","name":"Ada Lovelace"}"#;
        let body = format!(r#"{{"workflow_id":"{WORKFLOW}","workflow_params":{params}}}"#);
        let parsed = request(&body);
        let stored = claim(
            &IdempotencyKey::parse(b"key-1").unwrap(),
            &parsed,
            None,
            &fk(),
            Duration::from_secs(60),
        )
        .request_sha256;
        // What the fingerprint was before it was keyed, and the obvious guesses at the params.
        let unkeyed_request = serde_json::json!({
            "workflow_id": WORKFLOW,
            "workflow_params": parsed.workflow_params,
            "secure_workflow_params_hmac": Value::Null,
            "webhook_callback": Value::Null,
        });
        let params_value = Value::Object(parsed.workflow_params.clone());
        for guess in [
            canonical_json(&unkeyed_request),
            canonical_json(&params_value),
            serde_json::to_string(&params_value).unwrap(),
            params.to_owned(),
            body.clone(),
        ] {
            let plain: [u8; 32] = Sha256::digest(guess.as_bytes()).into();
            assert_ne!(
                plain, stored,
                "the fingerprint is a plain SHA-256 of {guess}"
            );
        }
    }

    #[test]
    fn the_key_is_the_configured_one_or_derived_from_the_api_key() {
        let body = format!(r#"{{"workflow_id":"{WORKFLOW}","workflow_params":{{"a":1}}}}"#);
        let of = |key: &FingerprintKey| fingerprint(&request(&body), None, key);
        let configured = SecretString::from("configured-fingerprint-key");
        let api_key = SecretString::from("nen-api-key-for-tests");
        let api_key_rotated = SecretString::from("nen-api-key-rotated");

        let explicit = FingerprintKey::from_settings(Some(&configured), Some(&api_key)).unwrap();
        assert_eq!(
            of(&explicit),
            of(&FingerprintKey::new(b"configured-fingerprint-key"))
        );
        // The configured key outlives an API key rotation.
        let explicit_rotated =
            FingerprintKey::from_settings(Some(&configured), Some(&api_key_rotated)).unwrap();
        assert_eq!(of(&explicit), of(&explicit_rotated));

        // Derived: the same on every replica and restart, never the API key itself.
        let derived = FingerprintKey::from_settings(None, Some(&api_key)).unwrap();
        let derived_again = FingerprintKey::from_settings(None, Some(&api_key)).unwrap();
        assert_eq!(of(&derived), of(&derived_again));
        assert_ne!(
            of(&derived),
            of(&FingerprintKey::new(b"nen-api-key-for-tests"))
        );
        assert_ne!(of(&derived), of(&explicit));
        let derived_rotated = FingerprintKey::from_settings(None, Some(&api_key_rotated)).unwrap();
        assert_ne!(of(&derived), of(&derived_rotated));

        assert!(FingerprintKey::from_settings(None, None).is_none());
        assert_eq!(format!("{derived:?}"), "FingerprintKey([REDACTED])");
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let value: Value =
            serde_json::from_str(r#"{"b": [ {"y": 1, "x": 2} ], "a": {"d": null, "c": "t"}}"#)
                .unwrap();
        assert_eq!(
            canonical_json(&value),
            r#"{"a":{"c":"t","d":null},"b":[{"x":2,"y":1}]}"#
        );
    }

    #[test]
    fn a_kept_answer_replays_as_the_same_value() {
        let answer = Submitted::new("550e8400-e29b".into(), WORKFLOW.into());
        let kept = keep(&answer);
        assert_eq!(kept.status, 202);
        assert_eq!(
            kept.body,
            format!(
                r#"{{"message_id":"550e8400-e29b","workflow_id":"{WORKFLOW}","status":"submitted"}}"#
            )
        );
        assert_eq!(replay(&kept).unwrap(), answer);
    }

    #[test]
    fn a_kept_answer_this_code_did_not_write_is_refused() {
        let not_202 = StoredResponse {
            status: 200,
            body: keep(&Submitted::new("m".into(), WORKFLOW.into())).body,
        };
        assert!(matches!(
            replay(&not_202),
            Err(UnreadableAnswer::Status(200))
        ));
        let no_message_id = StoredResponse {
            status: 202,
            body: r#"{"workflow_id":"w","status":"submitted"}"#.into(),
        };
        assert!(matches!(
            replay(&no_message_id),
            Err(UnreadableAnswer::Body(_))
        ));
    }
}
