//! What a claim of an `Idempotency-Key` answers, from what the store found under the key.
//!
//! Both backends first drop the key if it expired, then try to insert it; the insert decides
//! which of several concurrent claims wins. Only when it finds the key taken do they read the
//! row, and [`ClaimOutcome::from_existing`] decides the rest.

use super::model::{ClaimOutcome, StoredResponse};
use super::StoreError;

/// A claim row that was there before this claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingClaim {
    pub request_sha256: Vec<u8>,
    /// Set once the first request completed, together with `response_body`.
    pub response_status: Option<i64>,
    pub response_body: Option<String>,
}

impl ClaimOutcome {
    /// `None`: this claim inserted the key. Otherwise: the same request's stored answer, or that
    /// the same request is still being handled, or that the key was used for another request.
    pub(super) fn from_existing(
        existing: Option<ExistingClaim>,
        request_sha256: &[u8; 32],
    ) -> Result<ClaimOutcome, StoreError> {
        let Some(existing) = existing else {
            return Ok(ClaimOutcome::Claimed);
        };
        if existing.request_sha256.as_slice() != request_sha256.as_slice() {
            return Ok(ClaimOutcome::Conflict);
        }
        match (existing.response_status, existing.response_body) {
            (Some(status), Some(body)) => {
                let status = u16::try_from(status).map_err(|_| {
                    StoreError::Internal(format!("stored response status {status} is invalid"))
                })?;
                Ok(ClaimOutcome::Completed(StoredResponse { status, body }))
            }
            _ => Ok(ClaimOutcome::InProgress),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: [u8; 32] = [7; 32];

    fn existing(request: [u8; 32], response: Option<(i64, &str)>) -> Option<ExistingClaim> {
        Some(ExistingClaim {
            request_sha256: request.to_vec(),
            response_status: response.map(|(status, _)| status),
            response_body: response.map(|(_, body)| body.to_owned()),
        })
    }

    #[test]
    fn each_finding_has_its_answer() {
        let decide = |found| ClaimOutcome::from_existing(found, &REQUEST).unwrap();
        assert_eq!(decide(None), ClaimOutcome::Claimed);
        assert_eq!(decide(existing(REQUEST, None)), ClaimOutcome::InProgress);
        assert_eq!(
            decide(existing(REQUEST, Some((202, "{}")))),
            ClaimOutcome::Completed(StoredResponse {
                status: 202,
                body: "{}".into()
            })
        );
        assert_eq!(decide(existing([8; 32], None)), ClaimOutcome::Conflict);
        assert_eq!(
            decide(existing([8; 32], Some((202, "{}")))),
            ClaimOutcome::Conflict
        );
    }

    #[test]
    fn a_status_outside_http_is_an_error_not_a_wrapped_number() {
        let found = existing(REQUEST, Some((70_000, "{}")));
        assert!(matches!(
            ClaimOutcome::from_existing(found, &REQUEST),
            Err(StoreError::Internal(_))
        ));
    }
}
