//! The forwarding outbox: the types of its messages as they cross the store boundary.
//!
//! One message per run change and target, written in the transaction that commits the change
//! (`Store::record_deliveries`, `Store::record_triggered_run`, `Store::queue_stuck_runs`), so a
//! crash never loses one, and a duplicate or a change that does not move the run writes none.
//! A message stays in the table after delivery, for replay, until `forward.keep_delivered`.
//!
//! A message is in one of three states:
//! - `pending`: to be sent. It is *due* once `next_attempt_at` has passed, and *claimable* when
//!   due, not leased (or its lease has ended), and no earlier pending message of the same run
//!   and target exists (order per run);
//! - `delivered`: a 2xx answer came back;
//! - `failed`: not delivered within `forward.max_age` of `queued_at`.
//!
//! Retry-failed and replay make messages `pending` again with a new `queued_at`; the id, and so
//! the `webhook-id`, stays.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::model::Run;
use super::rows::StoredText;
use super::StoreError;

/// `type` of a message.
pub const STATUS_CHANGED: &str = "run.status_changed";
pub const STUCK: &str = "run.stuck";

/// A claimed message, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    /// Stable for the message's life: the `webhook-id` is made from it.
    pub id: i64,
    pub target: String,
    pub message_id: String,
    /// [`STATUS_CHANGED`] or [`STUCK`].
    pub event_type: String,
    /// The run as `GET /v1/runs/{id}` showed it right after the change (JSON text).
    pub run: String,
    /// When the change was committed: the envelope's `timestamp`.
    pub committed_at: DateTime<Utc>,
    /// When the message was (last) queued: `forward.max_age` counts from here.
    pub queued_at: DateTime<Utc>,
    /// Attempts made since it was (last) queued.
    pub attempts: i32,
}

/// A claim of due messages for one replica: a lease that ends at `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Only the holder of the lease may record an attempt's outcome.
    pub owner: Uuid,
    pub until: DateTime<Utc>,
}

/// What became of one attempt to send a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A 2xx answer.
    Delivered,
    /// Not delivered: try again at `next_attempt_at`.
    Retry {
        next_attempt_at: DateTime<Utc>,
        error: String,
    },
    /// Not delivered, and out of time (`forward.max_age`): kept as failed.
    Failed { error: String },
}

/// One attempt's outcome, for the message `id` leased by `lease_owner`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedAttempt {
    pub id: i64,
    pub lease_owner: Uuid,
    pub attempted_at: DateTime<Utc>,
    pub outcome: AttemptOutcome,
}

/// A target's queue, for `GET /v1/forwarding` and the gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetQueue {
    pub pending: u64,
    /// `queued_at` of the oldest pending message.
    pub oldest_pending_queued_at: Option<DateTime<Utc>>,
    pub failed: u64,
    /// The error of the most recent attempt that failed, among pending and failed messages.
    pub last_error: Option<String>,
}

/// A failed message, for `GET /v1/forwarding/{name}/failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FailedMessage {
    /// The `webhook-id` it was sent with.
    pub webhook_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub message_id: String,
    pub committed_at: DateTime<Utc>,
    pub queued_at: DateTime<Utc>,
    pub attempts: i32,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// Listing position (the message id); not part of the JSON.
    #[serde(skip)]
    pub id: i64,
}

/// A page of failed messages, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedPage {
    pub messages: Vec<FailedMessage>,
    /// Present when more follow: pass it back as `before`.
    pub next_before: Option<i64>,
}

/// The `webhook-id` of a message: stable across retries and replays.
pub fn webhook_id(id: i64) -> String {
    format!("msg_{id}")
}

/// A failed message as both backends select it (`id, event_type, message_id, committed_at,
/// queued_at, attempts, last_attempt_at, last_error`); only the time type differs.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct FailedRow<Time> {
    pub id: i64,
    pub event_type: StoredText,
    pub message_id: StoredText,
    pub committed_at: Time,
    pub queued_at: Time,
    pub attempts: i32,
    pub last_attempt_at: Option<Time>,
    pub last_error: Option<StoredText>,
}

/// The page from up to `limit + 1` rows fetched newest first: the one past the page only tells
/// that more follow.
pub(crate) fn failed_page<Time>(
    mut rows: Vec<FailedRow<Time>>,
    limit: u32,
    time: impl Fn(Time) -> Result<DateTime<Utc>, StoreError>,
) -> Result<FailedPage, StoreError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let messages = rows
        .into_iter()
        .map(|row| {
            Ok(FailedMessage {
                webhook_id: webhook_id(row.id),
                event_type: row.event_type.into_string(),
                message_id: row.message_id.into_string(),
                committed_at: time(row.committed_at)?,
                queued_at: time(row.queued_at)?,
                attempts: row.attempts,
                last_attempt_at: row.last_attempt_at.map(&time).transpose()?,
                last_error: row.last_error.map(StoredText::into_string),
                id: row.id,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let next_before = if more {
        messages.last().map(|message| message.id)
    } else {
        None
    };
    Ok(FailedPage {
        messages,
        next_before,
    })
}

/// The `run` of a `run.stuck` message: the run as `GET /v1/runs/{id}` shows it once stuck.
pub(crate) fn stuck_run_json(mut run: Run) -> Result<String, StoreError> {
    run.stuck = true;
    serde_json::to_string(&run)
        .map_err(|error| StoreError::Internal(format!("a run does not serialize: {error}")))
}
