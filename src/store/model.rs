//! The domain types that cross the store boundary.

use std::borrow::Cow;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::callbacks::payload::ParsedCallback;
use crate::runs::status::StatusRank;

/// One verified callback, parsed leniently, ready to be stored.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message_id: String,
    pub status: String,
    pub workflow_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The workflow output as JSON text, exactly as it appeared in the body.
    pub result: Option<String>,
    pub assets_url: Option<String>,
    pub error: Option<String>,
    /// The exact bytes Nen signed. Valid UTF-8: `payload::parse_callback` refuses any other.
    pub raw_body: Bytes,
    /// SHA-256 of `raw_body`, to tell an identical repeat from one whose body differs.
    pub body_sha256: [u8; 32],
    /// Non-secret id of the webhook secret that verified the signature.
    pub key_id: String,
    pub received_at: DateTime<Utc>,
}

impl Delivery {
    /// A callback whose signature checked out: `parsed` is what `payload::parse_callback` read
    /// from `raw`, and `key_id` names the secret that verified it.
    pub fn verified(
        raw: Bytes,
        parsed: ParsedCallback,
        key_id: &str,
        received_at: DateTime<Utc>,
    ) -> Self {
        Delivery {
            body_sha256: Sha256::digest(&raw).into(),
            message_id: parsed.message_id,
            status: parsed.status,
            workflow_id: parsed.workflow_id,
            expires_at: parsed.expires_at,
            result: parsed.result,
            assets_url: parsed.assets_url,
            error: parsed.error,
            raw_body: raw,
            key_id: key_id.to_owned(),
            received_at,
        }
    }

    pub fn rank(&self) -> StatusRank {
        StatusRank::of(&self.status)
    }

    /// The raw body as text. It is valid UTF-8 whenever it came through `parse_callback`, and
    /// then this borrows it unchanged. Should a delivery built some other way not be, invalid
    /// bytes become U+FFFD: the stored text stays as close to the body as text can be, and
    /// stays JSON if the body was JSON apart from those bytes (it used to become empty, which
    /// no reader could parse).
    pub fn body_text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.raw_body)
    }
}

/// What became of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeliveryOutcome {
    /// `(message_id, status)` was already stored: nothing new was written but the counters.
    pub duplicate: bool,
    /// A duplicate whose body differs from the stored one: a provider bug or tampering.
    pub body_differs: bool,
    /// A terminal status that disagrees with the run's earlier terminal status.
    pub conflicting_terminal: bool,
}

/// A signed callback that was not a JSON object with string `message_id` and `status`.
#[derive(Debug, Clone)]
pub struct RejectedPayload {
    pub raw_body: Bytes,
    pub key_id: String,
    pub reason: String,
    pub received_at: DateTime<Utc>,
}

/// A run as the query API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Run {
    pub message_id: String,
    pub workflow_id: Option<String>,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<serde_json::Value>)]
    pub result: Option<Box<RawValue>>,
    pub assets_url: Option<String>,
    pub error: Option<String>,
    pub triggered_here: bool,
    /// Two different terminal statuses arrived for this run.
    pub conflicting_terminals: bool,
    /// Not terminal, and unchanged for longer than `runs.stuck_after`. A fact about the run and
    /// the clock, so it is computed when read (`runs::stuck::StuckRule::mark`), never stored:
    /// the store always reads it as `false`.
    pub stuck: bool,
    /// Only present when storing workflow parameters is turned on.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub workflow_params: Option<Box<RawValue>>,
    /// Position in the listing order; not part of the JSON.
    #[serde(skip)]
    pub seq: i64,
}

/// One distinct `(message_id, status)` delivery.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Event {
    pub status: String,
    pub received_at: DateTime<Utc>,
    /// How many further copies arrived after the first.
    pub duplicates: i64,
    /// How many of those copies had a body different from the first.
    pub differing_duplicates: i64,
    /// A terminal status that disagrees with the run's terminal status.
    pub conflicting_terminal: bool,
    pub key_id: String,
    pub last_received_at: DateTime<Utc>,
    /// The body as received, byte for byte. A stored payload that is not JSON (not written by
    /// this service) is a JSON string holding the stored text instead: see `rows::json_or_string`.
    /// `null` once retention pruned it.
    #[schema(value_type = serde_json::Value)]
    pub payload: Box<RawValue>,
    /// Retention removed the payload (`retention.payloads`); the event itself, its counters and
    /// its body hash remain, so redeliveries are still recognised.
    pub payload_pruned: bool,
}

/// Filters and position for `GET /v1/runs`.
#[derive(Debug, Clone, Default)]
pub struct RunQuery {
    pub workflow_id: Option<String>,
    pub status: Option<String>,
    pub limit: u32,
    /// Only runs strictly older (in listing order) than this one.
    pub after: Option<RunCursor>,
}

/// Keyset position in the newest-first listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunCursor {
    pub seq: i64,
}

#[derive(Debug, Clone)]
pub struct RunPage {
    pub runs: Vec<Run>,
    /// Present when more runs follow.
    pub next: Option<RunCursor>,
}

/// A run this service started on Nen.
#[derive(Debug, Clone)]
pub struct TriggeredRun {
    pub message_id: String,
    pub workflow_id: String,
    /// Stored only when the operator turned that on (personal data).
    pub workflow_params: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// An attempt to claim an `Idempotency-Key`.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub key: String,
    /// SHA-256 of the canonical request; never the request itself.
    pub request_sha256: [u8; 32],
    pub now: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// The answer stored for a completed idempotent request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key is ours: call Nen, then complete or release it.
    Claimed,
    /// The same request already completed: answer this again.
    Completed(StoredResponse),
    /// The same request is being handled right now elsewhere.
    InProgress,
    /// The key was used with a different request.
    Conflict,
}
