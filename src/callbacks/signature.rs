//! `X-Hmac-Signature`: `sha256=` + hex HMAC-SHA256(secret, raw body).
//!
//! Verification runs over the exact bytes received, before anything is parsed, and compares in
//! constant time against every configured secret, so that secrets can be rotated without downtime.

use std::fmt;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

type HmacSha256 = Hmac<Sha256>;

/// The header Nen signs callbacks with.
pub const SIGNATURE_HEADER: &str = "x-hmac-signature";

const PREFIX: &[u8] = b"sha256=";

/// A well-formed `X-Hmac-Signature` value: the 32-byte digest it carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignatureHeader {
    digest: [u8; 32],
}

impl fmt::Debug for SignatureHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SignatureHeader(..)")
    }
}

/// Why a header value is not a signature. Never shown to the caller (the 401 is the same for
/// every cause); kept for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureFormatError {
    #[error("the value does not start with 'sha256='")]
    MissingPrefix,
    #[error("the digest is not 64 hex characters")]
    WrongLength,
    #[error("the digest is not hex")]
    NotHex,
}

impl SignatureHeader {
    /// Parses `sha256=<64 hex>`; the label is matched exactly, hex digits in either case.
    /// Surrounding spaces or tabs are tolerated, as HTTP allows them around a field value.
    pub fn parse(value: &[u8]) -> Result<Self, SignatureFormatError> {
        let value = value.trim_ascii();
        let hex_part = value
            .strip_prefix(PREFIX)
            .ok_or(SignatureFormatError::MissingPrefix)?;
        if hex_part.len() != 64 {
            return Err(SignatureFormatError::WrongLength);
        }
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut digest).map_err(|_| SignatureFormatError::NotHex)?;
        Ok(Self { digest })
    }

    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
}

/// Formats the header value for a body, as Nen would send it.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// One configured webhook secret, ready to verify with.
#[derive(Clone)]
struct WebhookKey {
    id: String,
    /// HMAC state with the key already absorbed: cloning it skips re-hashing the key per request.
    mac: HmacSha256,
}

/// Every webhook secret currently accepted.
#[derive(Clone)]
pub struct WebhookKeys {
    keys: Vec<WebhookKey>,
}

impl fmt::Debug for WebhookKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookKeys")
            .field("ids", &self.ids())
            .finish_non_exhaustive()
    }
}

impl WebhookKeys {
    pub fn new(secrets: &[SecretString]) -> Self {
        let keys = secrets
            .iter()
            .map(|secret| {
                let bytes = secret.expose_secret().as_bytes();
                WebhookKey {
                    id: key_id(bytes),
                    mac: HmacSha256::new_from_slice(bytes)
                        .expect("HMAC accepts keys of any length"),
                }
            })
            .collect();
        Self { keys }
    }

    /// The non-secret ids of the configured secrets, in configuration order.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|key| key.id.as_str()).collect()
    }

    /// Returns the id of the secret whose HMAC of `body` equals the header's digest.
    ///
    /// Every secret is tried, and the comparison is constant-time, so the time taken says
    /// nothing about which secret (if any) matched or how many digest bytes were right.
    pub fn verify(&self, header: &SignatureHeader, body: &[u8]) -> Option<&str> {
        let mut matched: Option<&str> = None;
        for key in &self.keys {
            let mut mac = key.mac.clone();
            mac.update(body);
            let expected = mac.finalize().into_bytes();
            let equal: Choice = expected.as_slice().ct_eq(header.digest());
            if bool::from(equal) && matched.is_none() {
                matched = Some(key.id.as_str());
            }
        }
        matched
    }
}

/// A short, stable, non-secret id for a secret: `k-` + 8 hex digits of SHA-256 over a fixed
/// label and the secret. It lets an operator see in metrics which secret Nen still uses, without
/// the digest being usable as an HMAC key.
pub fn key_id(secret: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"nen-relay webhook key id\0");
    hasher.update(secret);
    let digest = hasher.finalize();
    format!("k-{}", hex::encode(&digest[..4]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(secrets: &[&str]) -> WebhookKeys {
        let secrets: Vec<SecretString> = secrets.iter().map(|s| SecretString::from(*s)).collect();
        WebhookKeys::new(&secrets)
    }

    #[test]
    fn parses_lower_and_upper_case_hex() {
        let lower = format!("sha256={}", "ab".repeat(32));
        let upper = format!("sha256={}", "AB".repeat(32));
        assert_eq!(
            SignatureHeader::parse(lower.as_bytes()).unwrap(),
            SignatureHeader::parse(upper.as_bytes()).unwrap()
        );
    }

    #[test]
    fn rejects_malformed_values_with_their_reason() {
        use SignatureFormatError::*;
        let hex64 = "0".repeat(64);
        let cases: Vec<(String, SignatureFormatError)> = vec![
            (String::new(), MissingPrefix),
            (hex64.clone(), MissingPrefix),
            (format!("sha1={hex64}"), MissingPrefix),
            (format!("SHA256={hex64}"), MissingPrefix),
            (format!("sha256={}", &hex64[..62]), WrongLength),
            (format!("sha256={hex64}00"), WrongLength),
            (format!("sha256={}g", &hex64[..63]), NotHex),
            (format!("sha256= {}", &hex64[..63]), NotHex),
        ];
        for (value, reason) in cases {
            assert_eq!(
                SignatureHeader::parse(value.as_bytes()),
                Err(reason),
                "{value:?}"
            );
        }
    }

    #[test]
    fn verify_names_the_matching_secret_among_several() {
        let keys = keys(&["old-secret", "new-secret"]);
        let body = br#"{"message_id":"m","status":"processing"}"#;
        let by_new = SignatureHeader::parse(sign(b"new-secret", body).as_bytes()).unwrap();
        let by_old = SignatureHeader::parse(sign(b"old-secret", body).as_bytes()).unwrap();
        let by_other = SignatureHeader::parse(sign(b"other", body).as_bytes()).unwrap();
        assert_eq!(
            keys.verify(&by_new, body),
            Some(key_id(b"new-secret").as_str())
        );
        assert_eq!(
            keys.verify(&by_old, body),
            Some(key_id(b"old-secret").as_str())
        );
        assert_eq!(keys.verify(&by_other, body), None);
        assert_eq!(keys.verify(&by_new, b"{}"), None);
    }

    #[test]
    fn key_ids_are_short_distinct_and_do_not_contain_the_secret() {
        let a = key_id(b"whsec-test-3f9a1c");
        let b = key_id(b"whsec-test-3f9a1d");
        assert_ne!(a, b);
        assert_eq!(a.len(), 10);
        assert!(!a.contains("whsec"));
        assert!(!format!("{:?}", keys(&["whsec-test-3f9a1c"])).contains("whsec"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(value in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = SignatureHeader::parse(&value);
        }

        #[test]
        fn signed_bodies_round_trip(secret in ".{1,40}", body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let header = sign(secret.as_bytes(), &body);
            let parsed = SignatureHeader::parse(header.as_bytes()).unwrap();
            let keys = keys(&[secret.as_str()]);
            prop_assert!(keys.verify(&parsed, &body).is_some());
        }

        #[test]
        fn any_single_bit_flip_in_the_digest_fails(body in proptest::collection::vec(any::<u8>(), 0..64), byte in 0usize..32, bit in 0u8..8) {
            let header = sign(b"secret", &body);
            let mut parsed = SignatureHeader::parse(header.as_bytes()).unwrap();
            parsed.digest[byte] ^= 1 << bit;
            prop_assert!(keys(&["secret"]).verify(&parsed, &body).is_none());
        }

        #[test]
        fn only_sha256_label_plus_64_hex_parses(value in "[ -~]{0,80}") {
            let ok = SignatureHeader::parse(value.as_bytes()).is_ok();
            let trimmed = value.trim_matches(|c| c == ' ' || c == '\t');
            let expected = trimmed.strip_prefix("sha256=")
                .map(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .unwrap_or(false);
            prop_assert_eq!(ok, expected);
        }
    }
}
