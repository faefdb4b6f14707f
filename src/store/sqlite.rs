//! The embedded SQLite store: one file, no server, for a single instance.

use async_trait::async_trait;

use super::model::*;
use super::{Store, StoreError, StoreOptions};

pub struct SqliteStore;

impl SqliteStore {
    pub async fn connect(_url: &str, _options: &StoreOptions) -> Result<Self, StoreError> {
        Err(StoreError::Internal(
            "the SQLite store is not implemented yet".into(),
        ))
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        Err(StoreError::Internal(
            "the SQLite store is not implemented yet".into(),
        ))
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn record_deliveries(&self, _: &[Delivery]) -> Result<Vec<DeliveryOutcome>, StoreError> {
        unimplemented!()
    }
    async fn record_rejected_payload(&self, _: &RejectedPayload) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn get_run(&self, _: &str) -> Result<Option<Run>, StoreError> {
        unimplemented!()
    }
    async fn list_runs(&self, _: &RunQuery) -> Result<RunPage, StoreError> {
        unimplemented!()
    }
    async fn list_events(&self, _: &str) -> Result<Vec<Event>, StoreError> {
        unimplemented!()
    }
    async fn record_triggered_run(&self, _: &TriggeredRun) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn claim_idempotency_key(
        &self,
        _: &IdempotencyClaim,
    ) -> Result<ClaimOutcome, StoreError> {
        unimplemented!()
    }
    async fn complete_idempotency_key(
        &self,
        _: &str,
        _: &StoredResponse,
    ) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn release_idempotency_key(&self, _: &str) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        unimplemented!()
    }
}
