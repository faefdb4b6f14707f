//! Group commit: verified deliveries wait together and share one transaction.
//!
//! A commit costs a round trip and a disk flush whether it carries one callback or a hundred.
//! Each writer takes every delivery already waiting (up to `max_batch`), records them with one
//! `Store::record_deliveries` call, and only then releases each waiting request's answer. When
//! the service is idle a delivery is written at once: there is no fixed linger.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinSet;

use crate::config::IngestSettings;
use crate::forward::ForwardWake;
use crate::metrics;
use crate::runs::waiters::Waiters;
use crate::store::{feed, Delivery, DeliveryOutcome, Store, StoreError};

/// Why a delivery could not be recorded. Either way the caller answers 503 and Nen retries.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("too many callbacks are waiting to be written")]
    Overloaded,
    #[error("the service is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Job {
    delivery: Delivery,
    reply: oneshot::Sender<Result<DeliveryOutcome, StoreError>>,
}

/// The sending side, shared by every request handler.
#[derive(Clone)]
pub struct Ingest {
    queue: mpsc::Sender<Job>,
}

/// The writer tasks. They stop once every `Ingest` handle is dropped and the queue is drained.
pub struct Writers {
    tasks: JoinSet<()>,
}

impl Writers {
    /// Waits for the writers to finish what was queued, at most `limit`.
    pub async fn drain(mut self, limit: Duration) {
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!(
                "ingest writers did not drain in time; unanswered callbacks will be retried by Nen"
            );
        }
    }
}

impl Ingest {
    /// Callbacks waiting for a writer right now.
    pub fn queue_depth(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Starts the writers. After each commit they wake this process's `waiters` of the runs
    /// it made terminal, and its forwarding workers (`forward_wake`) when a delivery was new,
    /// since the commit may have queued messages; other replicas hear of both through the
    /// store's feed.
    pub fn start(
        store: Arc<dyn Store>,
        settings: &IngestSettings,
        store_timeout: Duration,
        waiters: Waiters,
        forward_wake: ForwardWake,
    ) -> (Ingest, Writers) {
        let (queue, receiver) = mpsc::channel(settings.queue_capacity);
        let receiver = Arc::new(Mutex::new(receiver));
        let mut tasks = JoinSet::new();
        for _ in 0..settings.writers {
            let writer = Writer {
                store: store.clone(),
                receiver: receiver.clone(),
                max_batch: settings.max_batch,
                store_timeout,
                waiters: waiters.clone(),
                forward_wake: forward_wake.clone(),
            };
            tasks.spawn(writer.run());
        }
        (Ingest { queue }, Writers { tasks })
    }

    /// Queues a delivery and waits until it is committed (or failed). Dropping the returned
    /// future gives up waiting; the delivery may still be committed, which is safe: a retry
    /// from Nen is then answered as a duplicate.
    pub async fn record(&self, delivery: Delivery) -> Result<DeliveryOutcome, IngestError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Job { delivery, reply })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => IngestError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => IngestError::ShuttingDown,
            })?;
        match answer.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(error)) => Err(IngestError::Store(error)),
            Err(_) => Err(IngestError::ShuttingDown),
        }
    }
}

struct Writer {
    store: Arc<dyn Store>,
    receiver: Arc<Mutex<mpsc::Receiver<Job>>>,
    max_batch: usize,
    store_timeout: Duration,
    waiters: Waiters,
    forward_wake: ForwardWake,
}

impl Writer {
    async fn run(self) {
        let mut batch: Vec<Job> = Vec::with_capacity(self.max_batch);
        loop {
            {
                // Only one writer waits on the queue at a time; it takes everything that is
                // already there, so batches grow exactly as fast as load does.
                let mut receiver = self.receiver.lock().await;
                if receiver.recv_many(&mut batch, self.max_batch).await == 0 {
                    return; // every sender is gone and the queue is empty
                }
            }
            // A caller that stopped waiting has already been answered 503; Nen will retry it.
            batch.retain(|job| !job.reply.is_closed());
            if !batch.is_empty() {
                self.write(&mut batch).await;
            }
            batch.clear();
        }
    }

    async fn write(&self, batch: &mut Vec<Job>) {
        let (deliveries, replies): (Vec<Delivery>, Vec<_>) =
            batch.drain(..).map(|job| (job.delivery, job.reply)).unzip();
        let started = Instant::now();
        let result = self.record(&deliveries).await;
        metrics::record_batch(deliveries.len(), started.elapsed().as_secs_f64());
        match result {
            Ok(outcomes) => {
                self.waiters.wake(feed::terminal_message_ids(&deliveries));
                self.wake_forwarding(&outcomes);
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(StoreError::Internal(detail)) if deliveries.len() > 1 => {
                // Not a transient failure: perhaps one delivery the database refuses. Write
                // each alone, so that one bad delivery cannot fail the others with it.
                tracing::warn!(batch = deliveries.len(), error = %detail, "batch failed; writing its callbacks one by one");
                for (delivery, reply) in deliveries.into_iter().zip(replies) {
                    let single = std::slice::from_ref(&delivery);
                    let result = self
                        .record(single)
                        .await
                        .map(|mut outcomes| outcomes.remove(0));
                    match &result {
                        Ok(outcome) => {
                            self.waiters.wake(feed::terminal_message_ids(single));
                            self.wake_forwarding(std::slice::from_ref(outcome));
                        }
                        Err(error) => metrics::record_ingest_failure(failure_reason(error)),
                    }
                    let _ = reply.send(result);
                }
            }
            Err(error) => {
                metrics::record_ingest_failure(failure_reason(&error));
                tracing::warn!(batch = deliveries.len(), %error, "could not record callbacks");
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

impl Writer {
    /// Only a delivery that is not a duplicate can have changed a run, and so queued messages.
    /// Called before the answers go out: a caller that was answered finds the workers woken.
    fn wake_forwarding(&self, outcomes: &[DeliveryOutcome]) {
        if outcomes.iter().any(|outcome| !outcome.duplicate) {
            self.forward_wake.after_commit();
        }
    }

    async fn record(&self, deliveries: &[Delivery]) -> Result<Vec<DeliveryOutcome>, StoreError> {
        match tokio::time::timeout(self.store_timeout, self.store.record_deliveries(deliveries))
            .await
        {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "writing {} callbacks took longer than {:?}",
                deliveries.len(),
                self.store_timeout
            ))),
        }
    }
}

fn failure_reason(error: &StoreError) -> &'static str {
    match error {
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Internal(_) => "internal",
    }
}
