//! A store that counts the reads of each run, so that a test can tell when a waiting request
//! has registered and read its run: it registers before it reads. No sleeps, no timing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use nen_relay::store::{
    ClaimOutcome, Delivery, DeliveryOutcome, Event, IdempotencyClaim, RejectedPayload, Run,
    RunPage, RunQuery, Store, StoreError, StoredResponse, SweepSession, TerminalRunFeed,
    TriggeredRun,
};
use tokio::sync::Notify;

/// Passes every call to `inner`, counting `get_run` calls per message_id.
pub struct ObservedStore {
    inner: Arc<dyn Store>,
    reads: Mutex<HashMap<String, usize>>,
    read: Notify,
}

impl ObservedStore {
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(ObservedStore {
            inner,
            reads: Mutex::new(HashMap::new()),
            read: Notify::new(),
        })
    }

    /// Reads of `message_id` so far.
    pub fn reads(&self, message_id: &str) -> usize {
        self.reads
            .lock()
            .unwrap()
            .get(message_id)
            .copied()
            .unwrap_or(0)
    }

    /// Returns once `message_id` has been read at least `count` times.
    pub async fn reads_reach(&self, message_id: &str, count: usize) {
        loop {
            let read = self.read.notified();
            tokio::pin!(read);
            read.as_mut().enable();
            if self.reads(message_id) >= count {
                return;
            }
            read.await;
        }
    }
}

#[async_trait]
impl Store for ObservedStore {
    async fn record_deliveries(
        &self,
        deliveries: &[Delivery],
    ) -> Result<Vec<DeliveryOutcome>, StoreError> {
        self.inner.record_deliveries(deliveries).await
    }
    async fn record_rejected_payload(&self, rejected: &RejectedPayload) -> Result<(), StoreError> {
        self.inner.record_rejected_payload(rejected).await
    }
    async fn get_run(&self, message_id: &str) -> Result<Option<Run>, StoreError> {
        *self
            .reads
            .lock()
            .unwrap()
            .entry(message_id.to_owned())
            .or_default() += 1;
        self.read.notify_waiters();
        self.inner.get_run(message_id).await
    }
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        self.inner.list_runs(query).await
    }
    async fn list_events(&self, message_id: &str) -> Result<Vec<Event>, StoreError> {
        self.inner.list_events(message_id).await
    }
    async fn record_triggered_run(&self, run: &TriggeredRun) -> Result<(), StoreError> {
        self.inner.record_triggered_run(run).await
    }
    async fn claim_idempotency_key(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<ClaimOutcome, StoreError> {
        self.inner.claim_idempotency_key(claim).await
    }
    async fn complete_idempotency_key(
        &self,
        key: &str,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        self.inner.complete_idempotency_key(key, response).await
    }
    async fn release_idempotency_key(&self, key: &str) -> Result<(), StoreError> {
        self.inner.release_idempotency_key(key).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    fn pool_usage(&self) -> Vec<nen_relay::store::PoolUsage> {
        self.inner.pool_usage()
    }

    async fn begin_sweep(&self) -> Result<Option<Box<dyn SweepSession>>, StoreError> {
        self.inner.begin_sweep().await
    }
    fn outbox(&self) -> &dyn nen_relay::store::Outbox {
        self.inner.outbox()
    }

    async fn list_stuck_runs(
        &self,
        query: &RunQuery,
        changed_before: DateTime<Utc>,
    ) -> Result<RunPage, StoreError> {
        self.inner.list_stuck_runs(query, changed_before).await
    }
    async fn count_stuck_runs(
        &self,
        changed_before: DateTime<Utc>,
        cap: u32,
    ) -> Result<u64, StoreError> {
        self.inner.count_stuck_runs(changed_before, cap).await
    }
    async fn terminal_run_feed(&self) -> Result<Option<Box<dyn TerminalRunFeed>>, StoreError> {
        self.inner.terminal_run_feed().await
    }
}
