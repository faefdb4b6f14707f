//! A forwarding target: a name, a URL, and the Standard Webhooks secret its messages are signed
//! with.

use std::fmt;

use base64::Engine;
use secrecy::{ExposeSecret, SecretBox};
use url::Url;

use crate::config::{is_loopback, TargetSettings};

/// Standard Webhooks secrets are written `whsec_<base64 of the key bytes>`.
const SECRET_PREFIX: &str = "whsec_";

/// A checked target.
#[derive(Clone)]
pub struct Target {
    /// Lowercase `[a-z0-9_]`, as in `[forward.<name>]`.
    pub name: String,
    pub url: Url,
    /// The key bytes (the base64 after `whsec_`, decoded).
    key: std::sync::Arc<SecretBox<Vec<u8>>>,
}

impl fmt::Debug for Target {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Target")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("key", &"[redacted]")
            .finish()
    }
}

impl Target {
    /// Checks a `[forward.<name>]` table. Errors name the target and never show the secret.
    pub fn from_settings(
        name: &str,
        settings: &TargetSettings,
        production: bool,
    ) -> Result<Self, String> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(format!(
                "forward target {name:?}: a target name is lowercase letters, digits and _ \
                 (or is it a misspelt forward setting?)"
            ));
        }
        let Some(url) = settings.url.as_deref().filter(|url| !url.is_empty()) else {
            return Err(format!(
                "forward target {name:?} has no url (forward.{name}.url, or \
                 NEN_RELAY_FORWARD__{}__URL)",
                name.to_ascii_uppercase()
            ));
        };
        let url = Url::parse(url)
            .map_err(|error| format!("forward target {name:?}: url is not a URL: {error}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(format!(
                "forward target {name:?}: url must be an http:// or https:// URL"
            ));
        }
        if production && url.scheme() == "http" && !settings.allow_http && !is_loopback(&url) {
            return Err(format!(
                "forward target {name:?}: url must be https:// when NEN_RELAY_ENV=production \
                 (http:// is allowed only to 127.0.0.0/8, ::1 or localhost, or with \
                 forward.{name}.allow_http = true): messages carry run results"
            ));
        }
        let Some(secret) = &settings.secret else {
            return Err(format!(
                "forward target {name:?} has no secret (forward.{name}.secret, or \
                 NEN_RELAY_FORWARD__{}__SECRET or ..._SECRET_FILE): a whsec_... value",
                name.to_ascii_uppercase()
            ));
        };
        let key = decode_secret(secret.expose_secret())
            .map_err(|reason| format!("forward target {name:?}: secret {reason}"))?;
        Ok(Target {
            name: name.to_owned(),
            url,
            key: std::sync::Arc::new(SecretBox::new(Box::new(key))),
        })
    }

    /// The HMAC key bytes.
    pub fn key(&self) -> &[u8] {
        self.key.expose_secret()
    }
}

/// The key bytes of a `whsec_<base64>` secret. The reason never quotes the secret.
fn decode_secret(secret: &str) -> Result<Vec<u8>, &'static str> {
    let encoded = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or("must start with whsec_ (a Standard Webhooks secret)")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| "is not whsec_ followed by standard base64")?;
    // Standard Webhooks asks for 24 to 64 random bytes; fewer than 16 is not a secret.
    if key.len() < 16 {
        return Err("must hold at least 16 bytes (24 to 64 random bytes, base64-encoded)");
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn settings(url: &str, secret: Option<&str>) -> TargetSettings {
        TargetSettings {
            url: Some(url.into()),
            secret: secret.map(SecretString::from),
            allow_http: false,
        }
    }

    #[test]
    fn a_good_target_decodes_its_key() {
        let target = Target::from_settings(
            "orders_1",
            &settings("https://x.test/h", Some(SECRET)),
            true,
        )
        .unwrap();
        assert_eq!(target.key().len(), 24);
        assert!(!format!("{target:?}").contains("MfKQ"));
    }

    #[test]
    fn bad_targets_are_refused_by_name_without_the_secret() {
        let cases = [
            ("Orders", settings("https://x.test/h", Some(SECRET))),
            ("orders", settings("ftp://x.test/h", Some(SECRET))),
            ("orders", settings("not a url", Some(SECRET))),
            ("orders", settings("https://x.test/h", None)),
            (
                "orders",
                settings("https://x.test/h", Some("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")),
            ),
            (
                "orders",
                settings("https://x.test/h", Some("whsec_!!notbase64!!")),
            ),
            (
                "orders",
                settings("https://x.test/h", Some("whsec_c2hvcnQ=")),
            ),
        ];
        for (name, settings) in cases {
            let error = Target::from_settings(name, &settings, false).unwrap_err();
            assert!(error.contains(&format!("{name:?}")), "{error}");
            assert!(
                !error.contains("MfKQ") && !error.contains("c2hvcnQ"),
                "{error}"
            );
        }
    }

    #[test]
    fn production_refuses_cleartext_to_another_host_unless_allowed() {
        let remote = settings("http://orders.internal/h", Some(SECRET));
        assert!(Target::from_settings("orders", &remote, false).is_ok());
        assert!(Target::from_settings("orders", &remote, true).is_err());
        let local = settings("http://127.0.0.1:9000/h", Some(SECRET));
        assert!(Target::from_settings("orders", &local, true).is_ok());
        let allowed = TargetSettings {
            allow_http: true,
            ..remote
        };
        assert!(Target::from_settings("orders", &allowed, true).is_ok());
    }
}
