//! Metric names and the helpers that record them, so that every name is spelled once.
//!
//! Labels are low-cardinality by construction: outcomes and key ids come from fixed sets, the
//! method is a standard one or `other`, and routes are the matched route templates or
//! `unmatched`, never raw paths. Whatever clients send, `/metrics` stays small.

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

use crate::store::PoolUsage;

pub const CALLBACKS_TOTAL: &str = "nen_relay_callbacks_total";
pub const CALLBACKS_BY_KEY_TOTAL: &str = "nen_relay_callbacks_by_key_total";
pub const CALLBACK_ANOMALIES_TOTAL: &str = "nen_relay_callback_anomalies_total";
pub const CONNECTIONS_OPEN: &str = "nen_relay_connections_open";
pub const CONNECTIONS_REFUSED_TOTAL: &str = "nen_relay_connections_refused_total";
pub const CONNECTION_TIMEOUTS_TOTAL: &str = "nen_relay_connection_timeouts_total";
pub const HTTP_REQUEST_DURATION: &str = "nen_relay_http_request_duration_seconds";
pub const INGEST_BATCH_SIZE: &str = "nen_relay_ingest_batch_size";
pub const INGEST_COMMIT_DURATION: &str = "nen_relay_ingest_commit_duration_seconds";
pub const INGEST_FAILURES_TOTAL: &str = "nen_relay_ingest_failures_total";
pub const TRIGGERS_TOTAL: &str = "nen_relay_triggers_total";
pub const BUILD_INFO: &str = "nen_relay_build_info";
pub const INGEST_QUEUE_DEPTH: &str = "nen_relay_ingest_queue_depth";
pub const STORE_POOL_CONNECTIONS: &str = "nen_relay_store_pool_connections";
pub const STORE_POOL_IDLE_CONNECTIONS: &str = "nen_relay_store_pool_idle_connections";
pub const STORE_POOL_MAX_CONNECTIONS: &str = "nen_relay_store_pool_max_connections";

/// Gives every family its `# HELP` line. Runs once, right after the recorder is installed; a
/// family recorded elsewhere must be described here too (a test checks every family has help).
pub fn describe_all() {
    describe_counter!(
        CALLBACKS_TOTAL,
        "Callbacks answered on POST /webhooks/nen, by outcome."
    );
    describe_counter!(
        CALLBACKS_BY_KEY_TOTAL,
        "Verified callbacks by the id of the secret that verified them (rotation)."
    );
    describe_counter!(
        CALLBACK_ANOMALIES_TOTAL,
        "Stored callbacks that disagree with earlier ones: differing_duplicate, conflicting_terminal."
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "Time to answer an HTTP request, by method, matched route and status."
    );
    describe_histogram!(
        INGEST_BATCH_SIZE,
        Unit::Count,
        "Callbacks committed together in one transaction."
    );
    describe_histogram!(
        INGEST_COMMIT_DURATION,
        Unit::Seconds,
        "Time to write and commit one batch of callbacks."
    );
    describe_counter!(
        INGEST_FAILURES_TOTAL,
        "Batches of callbacks that could not be committed, by reason."
    );
    describe_counter!(
        TRIGGERS_TOTAL,
        "Requests to start a run (POST /v1/runs), by outcome."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label names the running build."
    );
    describe_gauge!(
        INGEST_QUEUE_DEPTH,
        Unit::Count,
        "Verified callbacks waiting for a writer (at most ingest.queue_capacity)."
    );
    describe_gauge!(
        STORE_POOL_CONNECTIONS,
        Unit::Count,
        "Open database connections, by pool."
    );
    describe_gauge!(
        STORE_POOL_IDLE_CONNECTIONS,
        Unit::Count,
        "Open database connections not in use, by pool."
    );
    describe_gauge!(
        STORE_POOL_MAX_CONNECTIONS,
        Unit::Count,
        "Most connections a pool may open, by pool."
    );
    describe_gauge!(
        RUN_WAITERS,
        Unit::Count,
        "Requests waiting on a run with ?wait= (at most query.max_waiters)."
    );
    describe_gauge!(
        RUNS_STUCK,
        Unit::Count,
        "Runs not terminal and unchanged for longer than runs.stuck_after (database-wide, counted \
         every 30 s, capped at 10,000; aggregate replicas with max)."
    );
    describe_counter!(
        FEED_RECONNECTS_TOTAL,
        "Times the connection that hears of runs turning terminal on other replicas was reopened."
    );
    describe_counter!(
        WEBHOOK_BUDGET_EXHAUSTED_TOTAL,
        "Callbacks answered 503 because unverified bodies in memory reached \
         webhook.max_inflight_body_bytes."
    );
    describe_gauge!(
        WEBHOOK_INFLIGHT_BODY_BYTES,
        Unit::Bytes,
        "Bytes of unverified callback bodies reserved right now."
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        Unit::Count,
        "Client connections open, by listener (at most http.max_connections each)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "Connections closed at once, by listener and reason: max_connections or \
         out_of_file_descriptors."
    );
    describe_counter!(
        CONNECTION_TIMEOUTS_TOTAL,
        "Connections closed by a clock, by phase: head (no complete request head in time) or \
         idle (keep-alive unused)."
    );
    describe_counter!(
        RETENTION_SWEPT_TOTAL,
        "Rows the retention sweep pruned or deleted, by kind: payloads, runs, rejected, \
         idempotency_keys."
    );
    describe_counter!(
        RETENTION_SWEEPS_TOTAL,
        "Retention sweeps by outcome: done, skipped (another replica was sweeping), failed."
    );
    describe_gauge!(
        FORWARD_PENDING,
        Unit::Count,
        "Messages waiting to be forwarded, by target (database-wide, counted every 15 s; \
         aggregate replicas with max)."
    );
    describe_gauge!(
        FORWARD_OLDEST_PENDING_SECONDS,
        Unit::Seconds,
        "Age of the oldest message waiting to be forwarded, by target (0 when none; counted \
         every 15 s)."
    );
    describe_counter!(
        FORWARD_DELIVERIES_TOTAL,
        "Attempts to forward a message, by target and outcome: delivered, retried, failed \
         (out of forward.max_age)."
    );
    describe_histogram!(
        FORWARD_LAG_SECONDS,
        Unit::Seconds,
        "Time from a change's commit to its delivery to a target, by target."
    );
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Gauges read at scrape time: how full the ingest queue and the database pools are.
pub fn record_load(queue_depth: usize, pools: &[PoolUsage]) {
    gauge!(INGEST_QUEUE_DEPTH).set(queue_depth as f64);
    for usage in pools {
        gauge!(STORE_POOL_CONNECTIONS, "pool" => usage.pool).set(f64::from(usage.open));
        gauge!(STORE_POOL_IDLE_CONNECTIONS, "pool" => usage.pool).set(usage.idle as f64);
        gauge!(STORE_POOL_MAX_CONNECTIONS, "pool" => usage.pool).set(f64::from(usage.max));
    }
}
pub const RUN_WAITERS: &str = "nen_relay_run_waiters";
pub const RUNS_STUCK: &str = "nen_relay_runs_stuck";
pub const FEED_RECONNECTS_TOTAL: &str = "nen_relay_feed_reconnects_total";
pub const WEBHOOK_BUDGET_EXHAUSTED_TOTAL: &str = "nen_relay_webhook_budget_exhausted_total";
pub const WEBHOOK_INFLIGHT_BODY_BYTES: &str = "nen_relay_webhook_inflight_body_bytes";
pub const RETENTION_SWEPT_TOTAL: &str = "nen_relay_retention_swept_total";
pub const RETENTION_SWEEPS_TOTAL: &str = "nen_relay_retention_sweeps_total";
pub const FORWARD_PENDING: &str = "nen_relay_forward_pending";
pub const FORWARD_OLDEST_PENDING_SECONDS: &str = "nen_relay_forward_oldest_pending_seconds";
pub const FORWARD_DELIVERIES_TOTAL: &str = "nen_relay_forward_deliveries_total";
pub const FORWARD_LAG_SECONDS: &str = "nen_relay_forward_lag_seconds";

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

/// A callback refused because unverified bodies already hold the whole byte budget.
pub fn record_body_budget_exhausted() {
    counter!(WEBHOOK_BUDGET_EXHAUSTED_TOTAL).increment(1);
}

/// The gauge of bytes reserved for unverified callback bodies moves by each reservation, so
/// that it stays exact without a lock.
pub fn add_inflight_body_bytes(bytes: usize) {
    gauge!(WEBHOOK_INFLIGHT_BODY_BYTES).increment(bytes as f64);
}

pub fn remove_inflight_body_bytes(bytes: usize) {
    gauge!(WEBHOOK_INFLIGHT_BODY_BYTES).decrement(bytes as f64);
}

/// `listener` is `public` or `ops`.
pub fn set_connections_open(listener: &'static str, open: usize) {
    gauge!(CONNECTIONS_OPEN, "listener" => listener).set(open as f64);
}

pub fn connection_opened(listener: &'static str) {
    gauge!(CONNECTIONS_OPEN, "listener" => listener).increment(1.0);
}

pub fn connection_closed(listener: &'static str) {
    gauge!(CONNECTIONS_OPEN, "listener" => listener).decrement(1.0);
}

/// `reason` is `max_connections` or `out_of_file_descriptors`.
pub fn record_connection_refused(listener: &'static str, reason: &'static str) {
    counter!(CONNECTIONS_REFUSED_TOTAL, "listener" => listener, "reason" => reason).increment(1);
}

/// `phase` is `head` (no complete request head in time) or `idle` (keep-alive unused).
pub fn record_connection_timeout(phase: &'static str) {
    counter!(CONNECTION_TIMEOUTS_TOTAL, "phase" => phase).increment(1);
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

/// Requests of this process waiting on a run (`?wait=`) right now.
pub fn set_run_waiters(waiting: usize) {
    gauge!(RUN_WAITERS).set(waiting as f64);
}

/// Stuck runs in the database (every replica reports the same figure), counted up to a cap.
pub fn set_runs_stuck(count: u64) {
    gauge!(RUNS_STUCK).set(count as f64);
}

/// The terminal-run feed (PostgreSQL) was lost and opened again.
pub fn record_feed_reconnect() {
    counter!(FEED_RECONNECTS_TOTAL).increment(1);
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

/// A target's queue, as the gauge task last counted it.
pub fn set_forward_queue(target: &str, pending: u64, oldest_pending_seconds: f64) {
    gauge!(FORWARD_PENDING, "target" => target.to_owned()).set(pending as f64);
    gauge!(FORWARD_OLDEST_PENDING_SECONDS, "target" => target.to_owned())
        .set(oldest_pending_seconds);
}

/// One recorded attempt to forward a message; `lag` runs from the change's commit to the end
/// of the attempt, and is recorded for deliveries only.
pub fn record_forward_attempt(
    target: &str,
    outcome: &crate::store::AttemptOutcome,
    lag: std::time::Duration,
) {
    use crate::store::AttemptOutcome;
    let label = match outcome {
        AttemptOutcome::Delivered => "delivered",
        AttemptOutcome::Retry { .. } => "retried",
        AttemptOutcome::Failed { .. } => "failed",
    };
    counter!(FORWARD_DELIVERIES_TOTAL, "target" => target.to_owned(), "outcome" => label)
        .increment(1);
    if *outcome == AttemptOutcome::Delivered {
        histogram!(FORWARD_LAG_SECONDS, "target" => target.to_owned()).record(lag.as_secs_f64());
    }
}
