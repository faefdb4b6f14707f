//! Bearer-token authentication for `/v1/*`.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::AppState;
use crate::error::ApiError;

/// The accepted tokens, kept only as SHA-256 digests.
///
/// Comparing fixed-length digests makes the check independent of the presented token's length,
/// and every configured token is compared, so the time taken reveals neither which token
/// matched nor how much of one did.
pub struct ApiTokens {
    digests: Vec<[u8; 32]>,
}

impl ApiTokens {
    pub fn new(tokens: &[SecretString]) -> Self {
        Self {
            digests: tokens
                .iter()
                .map(|token| Sha256::digest(token.expose_secret().as_bytes()).into())
                .collect(),
        }
    }

    pub fn accepts(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut matched = Choice::from(0);
        for accepted in &self.digests {
            matched |= accepted.ct_eq(&digest);
        }
        bool::from(matched)
    }
}

/// `Authorization: Bearer <token>`; the scheme name is case-insensitive (RFC 7235).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Middleware: lets the request through only with a valid bearer token.
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let mut values = request.headers().get_all(AUTHORIZATION).iter();
    let authorized = match (values.next(), values.next()) {
        (Some(value), None) => bearer_token(value.as_bytes())
            .map(|token| state.api_tokens.accepts(token))
            .unwrap_or(false),
        _ => false,
    };
    if !authorized {
        return Err(ApiError::Unauthorized);
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_of_any_length_are_compared_as_fixed_size_digests() {
        let token = "t".repeat(40);
        let tokens = ApiTokens::new(&[SecretString::from(token.clone())]);
        // Only the token's SHA-256 digest is kept, never the token itself.
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        assert_eq!(tokens.digests, vec![digest]);
        assert!(tokens.accepts(token.as_bytes()));
        for presented in [
            "",
            "t",
            &"t".repeat(39),
            &"t".repeat(41),
            &"t".repeat(10_000),
        ] {
            assert!(
                !tokens.accepts(presented.as_bytes()),
                "{} bytes",
                presented.len()
            );
        }
        // No token is configured: nothing is accepted, not even an empty one.
        assert!(!ApiTokens::new(&[]).accepts(b""));
    }

    #[test]
    fn parses_bearer_tokens_only() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearerabc"), None);
        assert_eq!(bearer_token(b""), None);
    }

    #[test]
    fn accepts_only_whole_configured_tokens() {
        let tokens =
            ApiTokens::new(&[SecretString::from("token-a"), SecretString::from("token-b")]);
        assert!(tokens.accepts(b"token-a"));
        assert!(tokens.accepts(b"token-b"));
        assert!(!tokens.accepts(b"token-"));
        assert!(!tokens.accepts(b"token-ab"));
        assert!(!tokens.accepts(b""));
    }
}
