//! Receiving Nen's callbacks: the signature over the raw bytes, lenient parsing of the body, and
//! group-committed, deduplicated storage.
//!
//! [`Receiver::receive`] takes one callback from its body to its acknowledgement, in the order
//! the README (HTTP API, callbacks) fixes:
//! 1. a body that could not be read: too large (413), too slow (408);
//! 2. a signature that is missing, malformed or matches no secret (401), with nothing stored;
//! 3. a signed body that is not a callback (400), kept as a rejected payload;
//! 4. a store that cannot take the delivery in time (503, so that Nen retries);
//! 5. otherwise the acknowledgement, only once the delivery is committed.

pub mod ingest;
pub mod payload;
pub mod signature;

use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use serde::Serialize;

use crate::metrics::{self, CallbackOutcome};
use crate::store::{Delivery, RejectedPayload, Store, StoreError};
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

impl Receiver<'_> {
    /// Takes one callback. `signature` is the value of the one `X-Hmac-Signature` header, `None`
    /// when there is none or more than one (ambiguous, so refused whichever would verify).
    /// `body` is the body as read, or why it could not be.
    pub async fn receive(
        &self,
        signature: Option<&[u8]>,
        body: Result<Bytes, BodyError>,
    ) -> Result<Acknowledgement, CallbackError> {
        let result = self.verify_and_record(signature, body).await;
        metrics::record_callback(outcome(&result));
        result
    }

    async fn verify_and_record(
        &self,
        signature: Option<&[u8]>,
        body: Result<Bytes, BodyError>,
    ) -> Result<Acknowledgement, CallbackError> {
        let raw = body?;
        let key_id = self.verify(signature, &raw)?;
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

    /// Returns the id of the secret that signed `body`.
    fn verify(&self, signature: Option<&[u8]>, body: &[u8]) -> Result<&str, CallbackError> {
        let header = signature
            .and_then(|value| SignatureHeader::parse(value).ok())
            .ok_or(CallbackError::InvalidSignature)?;
        self.keys
            .verify(&header, body)
            .ok_or(CallbackError::InvalidSignature)
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
        Err(CallbackError::PayloadTooLarge { .. }) => CallbackOutcome::PayloadTooLarge,
        Err(CallbackError::RequestTimeout) => CallbackOutcome::RequestTimeout,
        Err(CallbackError::InvalidSignature) => CallbackOutcome::InvalidSignature,
        Err(CallbackError::InvalidPayload(_)) => CallbackOutcome::InvalidPayload,
        Err(CallbackError::Unavailable(_) | CallbackError::Store(_)) => {
            CallbackOutcome::Unavailable
        }
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
