//! Metric names and the helpers that record them, so that every name is spelled once.
//!
//! Labels are low-cardinality by construction: outcomes and key ids come from fixed sets, the
//! method is a standard one or `other`, and routes are the matched route templates or
//! `unmatched`, never raw paths. Whatever clients send, `/metrics` stays small.

use metrics::{counter, histogram};

pub const CALLBACKS_TOTAL: &str = "nen_relay_callbacks_total";
pub const CALLBACKS_BY_KEY_TOTAL: &str = "nen_relay_callbacks_by_key_total";
pub const CALLBACK_ANOMALIES_TOTAL: &str = "nen_relay_callback_anomalies_total";
pub const HTTP_REQUEST_DURATION: &str = "nen_relay_http_request_duration_seconds";
pub const INGEST_BATCH_SIZE: &str = "nen_relay_ingest_batch_size";
pub const INGEST_COMMIT_DURATION: &str = "nen_relay_ingest_commit_duration_seconds";
pub const INGEST_FAILURES_TOTAL: &str = "nen_relay_ingest_failures_total";
pub const TRIGGERS_TOTAL: &str = "nen_relay_triggers_total";
pub const RETENTION_SWEPT_TOTAL: &str = "nen_relay_retention_swept_total";
pub const RETENTION_SWEEPS_TOTAL: &str = "nen_relay_retention_sweeps_total";

/// How a callback was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackOutcome {
    Accepted,
    Duplicate,
    InvalidSignature,
    InvalidPayload,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
}

impl CallbackOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackOutcome::Accepted => "accepted",
            CallbackOutcome::Duplicate => "duplicate",
            CallbackOutcome::InvalidSignature => "invalid_signature",
            CallbackOutcome::InvalidPayload => "invalid_payload",
            CallbackOutcome::PayloadTooLarge => "payload_too_large",
            CallbackOutcome::RequestTimeout => "request_timeout",
            CallbackOutcome::Unavailable => "unavailable",
        }
    }
}

pub fn record_callback(outcome: CallbackOutcome) {
    counter!(CALLBACKS_TOTAL, "outcome" => outcome.as_str()).increment(1);
}

/// Counts verified callbacks by the id of the secret that verified them, so that an operator
/// can see when an old secret stops being used and can be removed.
pub fn record_callback_key(key_id: &str) {
    counter!(CALLBACKS_BY_KEY_TOTAL, "key_id" => key_id.to_owned()).increment(1);
}

/// `kind` is `differing_duplicate` or `conflicting_terminal`.
pub fn record_callback_anomaly(kind: &'static str) {
    counter!(CALLBACK_ANOMALIES_TOTAL, "kind" => kind).increment(1);
}

/// `method` is one of `crate::http::middleware::method_label`'s fixed labels.
pub fn record_request(method: &'static str, route: &str, status: u16, seconds: f64) {
    histogram!(
        HTTP_REQUEST_DURATION,
        "method" => method,
        "route" => route.to_owned(),
        "status" => status.to_string()
    )
    .record(seconds);
}

pub fn record_batch(size: usize, seconds: f64) {
    histogram!(INGEST_BATCH_SIZE).record(size as f64);
    histogram!(INGEST_COMMIT_DURATION).record(seconds);
}

pub fn record_ingest_failure(reason: &'static str) {
    counter!(INGEST_FAILURES_TOTAL, "reason" => reason).increment(1);
}

/// How a request to start a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerOutcome {
    Accepted,
    Replayed,
    NenRejected,
    NenUnavailable,
    NenTimeout,
    Conflict,
    Invalid,
}

impl TriggerOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerOutcome::Accepted => "accepted",
            TriggerOutcome::Replayed => "replayed",
            TriggerOutcome::NenRejected => "nen_rejected",
            TriggerOutcome::NenUnavailable => "nen_unavailable",
            TriggerOutcome::NenTimeout => "nen_timeout",
            TriggerOutcome::Conflict => "conflict",
            TriggerOutcome::Invalid => "invalid",
        }
    }
}

pub fn record_trigger(outcome: TriggerOutcome) {
    counter!(TRIGGERS_TOTAL, "outcome" => outcome.as_str()).increment(1);
}

/// What a retention sweep removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionKind {
    /// Event payloads pruned (the events stay).
    Payloads,
    /// Terminal runs deleted with their events.
    Runs,
    Rejected,
    IdempotencyKeys,
}

impl RetentionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionKind::Payloads => "payloads",
            RetentionKind::Runs => "runs",
            RetentionKind::Rejected => "rejected",
            RetentionKind::IdempotencyKeys => "idempotency_keys",
        }
    }
}

/// Rows one sweep batch pruned or deleted.
pub fn record_retention_swept(kind: RetentionKind, rows: u64) {
    counter!(RETENTION_SWEPT_TOTAL, "kind" => kind.as_str()).increment(rows);
}

/// How a scheduled sweep ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepOutcome {
    Done,
    /// Another replica was sweeping.
    Skipped,
    Failed,
}

impl SweepOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            SweepOutcome::Done => "done",
            SweepOutcome::Skipped => "skipped",
            SweepOutcome::Failed => "failed",
        }
    }
}

pub fn record_retention_sweep(outcome: SweepOutcome) {
    counter!(RETENTION_SWEEPS_TOTAL, "outcome" => outcome.as_str()).increment(1);
}
