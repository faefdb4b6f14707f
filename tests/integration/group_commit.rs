//! Group commit: cases that only arise when several deliveries share one batch.
//!
//! A gated store holds the single writer inside its first batch while the test queues the
//! deliveries under test; each queued `Ingest::record` future is polled once, which is when it
//! enters the queue, so the next batch holds exactly them. No sleeps, no timing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use nen_relay::callbacks::ingest::{Ingest, IngestError};
use nen_relay::callbacks::payload::parse_callback;
use nen_relay::config::IngestSettings;
use nen_relay::forward::ForwardWake;
use nen_relay::runs::waiters::Waiters;
use nen_relay::store::{
    self, ClaimOutcome, Delivery, DeliveryOutcome, Event, IdempotencyClaim, RejectedPayload, Run,
    RunPage, RunQuery, Store, StoreError, StoredResponse, SweepSession, TerminalRunFeed,
    TriggeredRun,
};
use reqwest::StatusCode;
use tokio::sync::{oneshot, Semaphore};

use crate::on_both_backends;
use crate::support::app::{callback, error_code};
use crate::support::{logs, TestApp, TestDatabase};

/// Passes every call to `inner`, except that the first batch waits for `open`, and that
/// `fail_batches` makes every batch fail the way an unreachable database does.
struct GatedStore {
    inner: Option<Arc<dyn Store>>,
    gate: Semaphore,
    entered: Mutex<Option<oneshot::Sender<()>>>,
    batches: Mutex<Vec<usize>>,
    failure: Option<StoreError>,
}

impl GatedStore {
    fn new(
        inner: Option<Arc<dyn Store>>,
        failure: Option<StoreError>,
    ) -> (Arc<Self>, oneshot::Receiver<()>) {
        let (entered, first_batch_entered) = oneshot::channel();
        let store = Arc::new(Self {
            inner,
            gate: Semaphore::new(0),
            entered: Mutex::new(Some(entered)),
            batches: Mutex::new(Vec::new()),
            failure,
        });
        (store, first_batch_entered)
    }

    /// Lets the held batch and every later one through.
    fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    fn batch_sizes(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }

    fn inner(&self) -> &Arc<dyn Store> {
        self.inner.as_ref().expect("this store has a backend")
    }
}

#[async_trait]
impl Store for GatedStore {
    async fn record_deliveries(
        &self,
        deliveries: &[Delivery],
    ) -> Result<Vec<DeliveryOutcome>, StoreError> {
        self.batches.lock().unwrap().push(deliveries.len());
        let entered = self.entered.lock().unwrap().take();
        if let Some(entered) = entered {
            let _ = entered.send(());
        }
        let _permit = self.gate.acquire().await.expect("never closed");
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        self.inner().record_deliveries(deliveries).await
    }
    async fn record_rejected_payload(&self, rejected: &RejectedPayload) -> Result<(), StoreError> {
        self.inner().record_rejected_payload(rejected).await
    }
    async fn get_run(&self, message_id: &str) -> Result<Option<Run>, StoreError> {
        self.inner().get_run(message_id).await
    }
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        self.inner().list_runs(query).await
    }
    async fn list_events(&self, message_id: &str) -> Result<Vec<Event>, StoreError> {
        self.inner().list_events(message_id).await
    }
    async fn record_triggered_run(&self, run: &TriggeredRun) -> Result<(), StoreError> {
        self.inner().record_triggered_run(run).await
    }
    async fn claim_idempotency_key(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<ClaimOutcome, StoreError> {
        self.inner().claim_idempotency_key(claim).await
    }
    async fn complete_idempotency_key(
        &self,
        key: &str,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        self.inner().complete_idempotency_key(key, response).await
    }
    async fn release_idempotency_key(&self, key: &str) -> Result<(), StoreError> {
        self.inner().release_idempotency_key(key).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        match &self.failure {
            Some(failure) => Err(failure.clone()),
            None => self.inner().ping().await,
        }
    }

    fn pool_usage(&self) -> Vec<nen_relay::store::PoolUsage> {
        self.inner().pool_usage()
    }

    async fn list_stuck_runs(
        &self,
        query: &RunQuery,
        changed_before: DateTime<Utc>,
    ) -> Result<RunPage, StoreError> {
        self.inner().list_stuck_runs(query, changed_before).await
    }
    async fn count_stuck_runs(
        &self,
        changed_before: DateTime<Utc>,
        cap: u32,
    ) -> Result<u64, StoreError> {
        self.inner().count_stuck_runs(changed_before, cap).await
    }
    async fn terminal_run_feed(&self) -> Result<Option<Box<dyn TerminalRunFeed>>, StoreError> {
        self.inner().terminal_run_feed().await
    }
    async fn begin_sweep(&self) -> Result<Option<Box<dyn SweepSession>>, StoreError> {
        self.inner().begin_sweep().await
    }
    fn outbox(&self) -> &dyn nen_relay::store::Outbox {
        self.inner().outbox()
    }
}

fn delivery(body: &str) -> Delivery {
    let parsed = parse_callback(body.as_bytes()).expect("a valid callback");
    Delivery::verified(Bytes::from(body.to_owned()), parsed, "k-test", Utc::now())
}

fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4().simple())
}

/// Runs `bodies` through an ingest whose one writer is held until all of them are queued, and
/// returns each one's result. Insists that they were written as one batch.
async fn record_in_one_batch(
    store: Arc<dyn Store>,
    failure: Option<StoreError>,
    bodies: &[String],
) -> Vec<Result<DeliveryOutcome, IngestError>> {
    let batches_fail = failure.is_some();
    let (gated, first_batch_entered) = GatedStore::new(Some(store), failure);
    let settings = IngestSettings {
        writers: 1,
        max_batch: 64,
        queue_capacity: 64,
    };
    let (ingest, writers) = Ingest::start(
        gated.clone(),
        &settings,
        Duration::from_secs(30),
        Waiters::new(1, Duration::from_secs(5)),
        ForwardWake::default(),
    );

    // A first delivery occupies the writer until the gate opens.
    let mut holder = Box::pin(ingest.record(delivery(&callback(
        &unique("holder"),
        "processing",
        serde_json::json!({}),
    ))));
    assert!(futures::poll!(&mut holder).is_pending());
    first_batch_entered
        .await
        .expect("the writer takes the first delivery");

    let mut queued: Vec<_> = bodies
        .iter()
        .map(|body| Box::pin(ingest.record(delivery(body))))
        .collect();
    for future in &mut queued {
        // The first poll puts the delivery in the queue; it then waits for its commit.
        assert!(futures::poll!(future).is_pending());
    }
    gated.open();
    assert_eq!(
        holder.await.is_ok(),
        !batches_fail,
        "the holder's own delivery"
    );
    let mut results = Vec::with_capacity(queued.len());
    for future in queued {
        results.push(future.await);
    }
    assert_eq!(
        gated.batch_sizes(),
        vec![1, bodies.len()],
        "one batch after the holder"
    );
    drop(ingest);
    writers.drain(Duration::from_secs(5)).await;
    results
}

async fn open(db: &TestDatabase) -> Arc<dyn Store> {
    let options = store::StoreOptions::default();
    store::connect(&db.url.clone().into(), &options, true)
        .await
        .expect("the test database opens and migrates")
}

fn outcome(result: &Result<DeliveryOutcome, IngestError>) -> DeliveryOutcome {
    *result.as_ref().expect("recorded")
}

async fn two_identical_copies_in_one_batch_make_one_event_and_one_duplicate(db: TestDatabase) {
    let store = open(&db).await;
    let id = unique("twin");
    let body = callback(&id, "processing", serde_json::json!({}));
    let results = record_in_one_batch(store.clone(), None, &[body.clone(), body]).await;
    assert!(!outcome(&results[0]).duplicate);
    assert!(outcome(&results[1]).duplicate);
    assert!(!outcome(&results[1]).body_differs);
    let events = store.list_events(&id).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].duplicates, 1);
    assert_eq!(events[0].differing_duplicates, 0);
}

async fn processing_and_success_in_one_batch_leave_the_run_at_success(db: TestDatabase) {
    let store = open(&db).await;
    let id = unique("pair");
    // Arrival order reversed on purpose: the terminal status wins either way.
    let bodies = [
        callback(&id, "success", serde_json::json!({"result": {"n": 1}})),
        callback(
            &id,
            "processing",
            serde_json::json!({"expires_at": 1_900_000_000}),
        ),
    ];
    let results = record_in_one_batch(store.clone(), None, &bodies).await;
    assert!(results.iter().all(|r| !outcome(r).duplicate));
    let run = store.get_run(&id).await.unwrap().expect("the run exists");
    assert_eq!(run.status, "success");
    let result: serde_json::Value =
        serde_json::from_str(run.result.as_ref().unwrap().get()).unwrap();
    assert_eq!(result, serde_json::json!({"n": 1}));
    assert!(
        run.expires_at.is_some(),
        "the processing callback's expiry is kept"
    );
    assert!(run.completed_at.is_some());
    assert_eq!(store.list_events(&id).await.unwrap().len(), 2);
}

async fn a_differing_copy_and_a_conflicting_terminal_in_one_batch_are_flagged(db: TestDatabase) {
    let store = open(&db).await;
    let id = unique("conflict");
    let bodies = [
        callback(&id, "success", serde_json::json!({"result": {"n": 1}})),
        callback(&id, "success", serde_json::json!({"result": {"n": 2}})),
        callback(&id, "failed", serde_json::json!({"error": "boom"})),
    ];
    let results = record_in_one_batch(store.clone(), None, &bodies).await;
    let first = outcome(&results[0]);
    assert!(!first.duplicate && !first.conflicting_terminal);
    let copy = outcome(&results[1]);
    assert!(copy.duplicate && copy.body_differs, "{copy:?}");
    let failed = outcome(&results[2]);
    assert!(
        !failed.duplicate && failed.conflicting_terminal,
        "{failed:?}"
    );
    let run = store.get_run(&id).await.unwrap().unwrap();
    assert_eq!(run.status, "success");
    assert!(run.conflicting_terminals);
    let events = store.list_events(&id).await.unwrap();
    let success = events.iter().find(|e| e.status == "success").unwrap();
    assert_eq!((success.duplicates, success.differing_duplicates), (1, 1));
    assert!(events
        .iter()
        .any(|e| e.status == "failed" && e.conflicting_terminal));
}

async fn a_failed_batch_answers_every_waiting_delivery_with_an_error_and_stores_nothing(
    db: TestDatabase,
) {
    let store = open(&db).await;
    let ids: Vec<String> = (0..5).map(|_| unique("lost")).collect();
    let bodies: Vec<String> = ids
        .iter()
        .map(|id| callback(id, "processing", serde_json::json!({})))
        .collect();
    let failure = StoreError::Unavailable("the database went away".into());
    let results = record_in_one_batch(store.clone(), Some(failure), &bodies).await;
    for result in &results {
        assert!(
            matches!(result, Err(IngestError::Store(StoreError::Unavailable(_)))),
            "{result:?}"
        );
    }
    for id in &ids {
        assert!(store.get_run(id).await.unwrap().is_none());
    }
}

async fn when_the_store_fails_every_callback_is_answered_503_and_none_acknowledged(
    db: TestDatabase,
) {
    // The app's own store is replaced by one that is down; a second connection reads the truth.
    let real = open(&db).await;
    let (down, _) = GatedStore::new(
        Some(real.clone()),
        Some(StoreError::Unavailable("down".into())),
    );
    down.open();
    let app = TestApp::spawn_with_store(db, down).await;
    let ids: Vec<String> = (0..8).map(|_| unique("down")).collect();
    let bodies: Vec<String> = ids
        .iter()
        .map(|id| callback(id, "processing", serde_json::json!({})))
        .collect();
    let answers = futures::future::join_all(bodies.iter().map(|body| app.deliver(body))).await;
    for response in answers {
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key("retry-after"));
        assert_eq!(error_code(response).await, "unavailable");
    }
    for id in &ids {
        assert!(real.get_run(id).await.unwrap().is_none());
    }
    // The reason goes to the log, inside the request's span, and never into the body.
    let request_id = unique("request");
    let response = app
        .client
        .post(app.url("/webhooks/nen"))
        .header("x-request-id", &request_id)
        .header("x-hmac-signature", app.signature(bodies[0].as_bytes()))
        .body(bodies[0].clone())
        .send()
        .await
        .expect("the app answers");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = response.text().await.unwrap();
    assert!(
        !body.contains("down"),
        "the detail reached the body: {body}"
    );
    let logged = logs::captured();
    assert!(
        logged.lines().any(|line| line.contains(&request_id)
            && line.contains("request not served")
            && line.contains("down")),
        "no log line names the request and the reason"
    );
}

async fn a_repeat_of_a_stored_event_and_a_new_status_in_one_batch_are_both_applied(
    db: TestDatabase,
) {
    let store = open(&db).await;
    let id = unique("mixed");
    let processing = callback(&id, "processing", serde_json::json!({}));
    store
        .record_deliveries(&[delivery(&processing)])
        .await
        .expect("stored");
    // One group already stored (counted) and one new (moves the run): one statement does both.
    let bodies = [
        processing.clone(),
        callback(&id, "success", serde_json::json!({"result": {"n": 3}})),
        processing,
    ];
    let results = record_in_one_batch(store.clone(), None, &bodies).await;
    assert!(outcome(&results[0]).duplicate && outcome(&results[2]).duplicate);
    assert!(!outcome(&results[0]).body_differs);
    assert!(!outcome(&results[1]).duplicate);
    assert_eq!(store.get_run(&id).await.unwrap().unwrap().status, "success");
    let events = store.list_events(&id).await.unwrap();
    let stored = events.iter().find(|e| e.status == "processing").unwrap();
    assert_eq!(stored.duplicates, 2);
    assert_eq!(events.len(), 2);
}

on_both_backends!(
    two_identical_copies_in_one_batch_make_one_event_and_one_duplicate,
    processing_and_success_in_one_batch_leave_the_run_at_success,
    a_differing_copy_and_a_conflicting_terminal_in_one_batch_are_flagged,
    a_failed_batch_answers_every_waiting_delivery_with_an_error_and_stores_nothing,
    when_the_store_fails_every_callback_is_answered_503_and_none_acknowledged,
    a_repeat_of_a_stored_event_and_a_new_status_in_one_batch_are_both_applied,
);
