//! Receiving Nen's callbacks: the signature over the raw bytes, lenient parsing of the body, and
//! group-committed, deduplicated storage.
//!
//! [`check_head`] decides what the request head alone can (a declared length over the limit,
//! then a missing or malformed signature header), so that such a body is never read; a body that
//! may be read reserves its bytes in the [`budget::BodyBudget`] first (503 when it is spent).
//! [`Receiver::receive`] then takes one callback from its body to its acknowledgement, in the
//! order the README (HTTP API, callbacks) fixes:
//! 1. a body that could not be read: too large (413), too slow (408);
//! 2. a signature that matches no secret (401), with nothing stored;
//! 3. a signed body that is not a callback (400), kept as a rejected payload;
//! 4. a store that cannot take the delivery in time (503, so that Nen retries);
//! 5. otherwise the acknowledgement, only once the delivery is committed.

pub mod budget;
pub mod ingest;
pub mod payload;
pub mod signature;

use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use serde::Serialize;

use crate::metrics::{self, CallbackOutcome};
use crate::store::{Delivery, RejectedPayload, Store, StoreError};
use budget::{BudgetExhausted, Reservation};
use ingest::{Ingest, IngestError};
use payload::parse_callback;
use signature::{SignatureHeader, WebhookKeys};

/// What receiving a callback needs, borrowed for one callback.
pub struct Receiver<'a> {
    pub keys: &'a WebhookKeys,
    pub ingest: &'a Ingest,
    pub store: &'a dyn Store,
    /// How long a callback may wait for its commit before it is answered 503.
    pub ack_timeout: Duration,
}

/// Why the body of a callback could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    TooLarge {
        limit: usize,
    },
    TimedOut,
    /// The connection failed while the body was read.
    Broken,
}

/// The acknowledgement Nen gets once the delivery is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Acknowledgement {
    pub received: bool,
    pub duplicate: bool,
    pub message_id: String,
    pub status: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("the body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// Missing, malformed, or matching no secret: the caller is never told which.
    #[error("the signature is missing or does not match")]
    InvalidSignature,
    /// The message says what is wrong with the body, for Nen's operators.
    #[error("{0}")]
    InvalidPayload(String),
    /// Nothing was committed in time, or the ingest queue is full or closing: Nen should retry.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<BodyError> for CallbackError {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::TooLarge { limit } => CallbackError::PayloadTooLarge { limit },
            BodyError::TimedOut => CallbackError::RequestTimeout,
            BodyError::Broken => {
                CallbackError::InvalidPayload("the request body could not be read".into())
            }
        }
    }
}

impl From<BudgetExhausted> for CallbackError {
    fn from(error: BudgetExhausted) -> Self {
        CallbackError::Unavailable(error.to_string())
    }
}

/// What the request head alone decides, before a byte of the body is read: a declared length
/// over `limit` (413), then a signature header that is missing, repeated or malformed (401).
/// `signature` is the value of the one `X-Hmac-Signature` header, `None` when there is none or
/// more than one (ambiguous, so refused whichever would verify). A body refused here is never
/// read, so an unsigned client cannot make the service hold its bytes.
pub fn check_head(
    declared_length: Option<u64>,
    limit: usize,
    signature: Option<&[u8]>,
) -> Result<SignatureHeader, CallbackError> {
    if declared_length.is_some_and(|length| length > limit as u64) {
        return Err(CallbackError::PayloadTooLarge { limit });
    }
    signature
        .and_then(|value| SignatureHeader::parse(value).ok())
        .ok_or(CallbackError::InvalidSignature)
}

/// Counts a callback refused before [`Receiver::receive`] (by [`check_head`] or the budget).
pub fn refused(error: CallbackError) -> CallbackError {
    metrics::record_callback(error_outcome(&error));
    error
}

impl Receiver<'_> {
    /// Takes one callback whose head [`check_head`] accepted. `body` is the body as read, or why
    /// it could not be; `reservation` holds its bytes in the budget until it is verified.
    pub async fn receive(
        &self,
        signature: &SignatureHeader,
        body: Result<Bytes, BodyError>,
        reservation: Reservation,
    ) -> Result<Acknowledgement, CallbackError> {
        let result = self.verify_and_record(signature, body, reservation).await;
        metrics::record_callback(outcome(&result));
        result
    }

    async fn verify_and_record(
        &self,
        signature: &SignatureHeader,
        body: Result<Bytes, BodyError>,
        reservation: Reservation,
    ) -> Result<Acknowledgement, CallbackError> {
        let raw = body?;
        let verified = self.keys.verify(signature, &raw);
        // Verified or refused, the body no longer counts against the budget for unverified ones.
        drop(reservation);
        let key_id = verified.ok_or(CallbackError::InvalidSignature)?;
        let received_at = Utc::now();

        let parsed = match parse_callback(&raw) {
            Ok(parsed) => parsed,
            Err(problem) => {
                tracing::warn!(%key_id, reason = %problem, "signed callback is not a valid payload");
                // Authentic Nen data: keep it. If it cannot be kept, say 503 so Nen sends it again.
                let rejected = RejectedPayload {
                    raw_body: raw,
                    key_id: key_id.to_owned(),
                    reason: problem.to_string(),
                    received_at,
                };
                tokio::time::timeout(
                    self.ack_timeout,
                    self.store.record_rejected_payload(&rejected),
                )
                .await
                .map_err(|_| not_committed_in_time())??;
                return Err(CallbackError::InvalidPayload(problem.to_string()));
            }
        };
        metrics::record_callback_key(key_id);

        let delivery = Delivery::verified(raw, parsed, key_id, received_at);
        let message_id = delivery.message_id.clone();
        let status = delivery.status.clone();
        let outcome = tokio::time::timeout(self.ack_timeout, self.ingest.record(delivery))
            .await
            .map_err(|_| not_committed_in_time())?
            .map_err(|error| match error {
                IngestError::Store(store) => CallbackError::Store(store),
                other => CallbackError::Unavailable(other.to_string()),
            })?;

        if outcome.body_differs {
            metrics::record_callback_anomaly("differing_duplicate");
            tracing::warn!(%message_id, %status, "a repeated callback's body differs from the stored one");
        }
        if outcome.conflicting_terminal {
            metrics::record_callback_anomaly("conflicting_terminal");
            tracing::warn!(%message_id, %status, "a terminal status conflicts with the run's earlier one");
        }
        tracing::debug!(%message_id, %status, duplicate = outcome.duplicate, "callback recorded");
        Ok(Acknowledgement {
            received: true,
            duplicate: outcome.duplicate,
            message_id,
            status,
        })
    }
}

fn not_committed_in_time() -> CallbackError {
    CallbackError::Unavailable("the store did not commit in time".into())
}

/// How a callback is counted: every failure the caller should retry is `unavailable`.
fn outcome(result: &Result<Acknowledgement, CallbackError>) -> CallbackOutcome {
    match result {
        Ok(ack) if ack.duplicate => CallbackOutcome::Duplicate,
        Ok(_) => CallbackOutcome::Accepted,
        Err(error) => error_outcome(error),
    }
}

fn error_outcome(error: &CallbackError) -> CallbackOutcome {
    match error {
        CallbackError::PayloadTooLarge { .. } => CallbackOutcome::PayloadTooLarge,
        CallbackError::RequestTimeout => CallbackOutcome::RequestTimeout,
        CallbackError::InvalidSignature => CallbackOutcome::InvalidSignature,
        CallbackError::InvalidPayload(_) => CallbackOutcome::InvalidPayload,
        CallbackError::Unavailable(_) | CallbackError::Store(_) => CallbackOutcome::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_errors_keep_their_place_in_the_contract() {
        assert!(matches!(
            CallbackError::from(BodyError::TooLarge { limit: 10 }),
            CallbackError::PayloadTooLarge { limit: 10 }
        ));
        assert!(matches!(
            CallbackError::from(BodyError::TimedOut),
            CallbackError::RequestTimeout
        ));
        assert!(matches!(
            CallbackError::from(BodyError::Broken),
            CallbackError::InvalidPayload(_)
        ));
    }

    #[test]
    fn the_head_decides_413_before_401_and_lets_a_well_formed_signature_through() {
        let well_formed = format!("sha256={}", "ab".repeat(32));
        let too_large = |result: Result<SignatureHeader, CallbackError>| {
            matches!(result, Err(CallbackError::PayloadTooLarge { limit: 10 }))
        };
        let unsigned = |result: Result<SignatureHeader, CallbackError>| {
            matches!(result, Err(CallbackError::InvalidSignature))
        };
        assert!(too_large(check_head(Some(11), 10, None)));
        assert!(too_large(check_head(
            Some(11),
            10,
            Some(well_formed.as_bytes())
        )));
        assert!(unsigned(check_head(Some(10), 10, None)));
        assert!(unsigned(check_head(None, 10, Some(b"sha256=abc"))));
        assert!(unsigned(check_head(Some(0), 10, Some(b""))));
        assert!(check_head(Some(10), 10, Some(well_formed.as_bytes())).is_ok());
        assert!(check_head(None, 10, Some(well_formed.as_bytes())).is_ok());
    }

    #[test]
    fn each_outcome_is_counted_under_its_label() {
        let ack = |duplicate| Acknowledgement {
            received: true,
            duplicate,
            message_id: "m".into(),
            status: "processing".into(),
        };
        let label = |result: Result<Acknowledgement, CallbackError>| outcome(&result).as_str();
        assert_eq!(label(Ok(ack(false))), "accepted");
        assert_eq!(label(Ok(ack(true))), "duplicate");
        assert_eq!(
            label(Err(CallbackError::PayloadTooLarge { limit: 1 })),
            "payload_too_large"
        );
        assert_eq!(label(Err(CallbackError::RequestTimeout)), "request_timeout");
        assert_eq!(
            label(Err(CallbackError::InvalidSignature)),
            "invalid_signature"
        );
        assert_eq!(
            label(Err(CallbackError::InvalidPayload("x".into()))),
            "invalid_payload"
        );
        assert_eq!(
            label(Err(CallbackError::Unavailable("x".into()))),
            "unavailable"
        );
        assert_eq!(
            label(Err(StoreError::Internal("x".into()).into())),
            "unavailable"
        );
    }
}
