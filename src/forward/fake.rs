//! An in-memory [`Outbox`] for the forwarding tests: the claim rules of `store::outbox` (due,
//! not leased, first pending of its run), outcomes recorded for the lease's owner only, and a
//! count of every call, so that tests see what the worker asks of the store.

use std::collections::VecDeque;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::OutboxSource;
use crate::store::{
    AttemptOutcome, FailedPage, FinishedAttempt, Lease, Outbox, OutboxMessage, StoreError,
    TargetQueue,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    Delivered,
    Failed,
}

pub struct Stored {
    pub message: OutboxMessage,
    pub state: State,
    pub next_attempt_at: DateTime<Utc>,
    pub lease: Option<Lease>,
    /// Every recorded outcome, in order.
    pub outcomes: Vec<AttemptOutcome>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Calls {
    pub claim: u32,
    pub finish: u32,
    pub next_due: u32,
}

#[derive(Default)]
pub struct Inner {
    pub messages: Vec<Stored>,
    pub calls: Calls,
    /// Leases handed out, with the `now` of their claim.
    pub leases: Vec<(Lease, DateTime<Utc>)>,
    /// While set, every claim fails.
    pub claims_fail: bool,
    /// What `queue_stuck_runs` and `prune_forwarded` answer, call by call.
    pub stuck_answers: VecDeque<u64>,
    pub prune_answers: VecDeque<u64>,
}

#[derive(Default)]
pub struct FakeOutbox {
    pub inner: Mutex<Inner>,
    /// Notified (all waiters) after every call.
    changed: Notify,
}

impl FakeOutbox {
    /// Queues a message of run `run` for target `target`; answers its id.
    pub fn push(&self, target: &str, run: &str, queued_at: DateTime<Utc>) -> i64 {
        let mut inner = self.inner.lock().unwrap();
        let id = inner.messages.len() as i64 + 1;
        inner.messages.push(Stored {
            message: OutboxMessage {
                id,
                target: target.into(),
                message_id: run.into(),
                event_type: "run.status_changed".into(),
                run: format!(r#"{{"message_id":"{run}","seq":{id}}}"#),
                committed_at: queued_at,
                queued_at,
                attempts: 0,
            },
            state: State::Pending,
            next_attempt_at: queued_at,
            lease: None,
            outcomes: Vec::new(),
        });
        id
    }

    pub fn calls(&self) -> Calls {
        self.inner.lock().unwrap().calls
    }

    pub fn with<T>(&self, read: impl FnOnce(&Inner) -> T) -> T {
        read(&self.inner.lock().unwrap())
    }

    /// Waits until `done` holds, checking after every call the worker makes.
    pub async fn wait_for(&self, done: impl Fn(&Inner) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.with(&done) {
                return;
            }
            notified.await;
        }
    }

    fn touched(&self) {
        self.changed.notify_waiters();
    }
}

impl OutboxSource for FakeOutbox {
    fn outbox(&self) -> &dyn Outbox {
        self
    }
}

fn not_faked() -> StoreError {
    StoreError::Internal("not part of the fake".into())
}

#[async_trait]
impl Outbox for FakeOutbox {
    async fn claim_forward_messages(
        &self,
        target: &str,
        limit: u32,
        lease: Lease,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let claimed = {
            let mut inner = self.inner.lock().unwrap();
            inner.calls.claim += 1;
            if inner.claims_fail {
                drop(inner);
                self.touched();
                return Err(StoreError::Unavailable("the fake is down".into()));
            }
            inner.leases.push((lease, now));
            let mut claimed = Vec::new();
            let mut blocked_runs = Vec::new();
            for stored in &mut inner.messages {
                if stored.message.target != target || stored.state != State::Pending {
                    continue;
                }
                let run = stored.message.message_id.clone();
                if blocked_runs.contains(&run) {
                    continue;
                }
                // An earlier pending message of the run holds back every later one.
                blocked_runs.push(run);
                let leased = stored.lease.is_some_and(|held| held.until > now);
                if stored.next_attempt_at <= now && !leased && claimed.len() < limit as usize {
                    stored.lease = Some(lease);
                    claimed.push(stored.message.clone());
                }
            }
            claimed
        };
        self.touched();
        Ok(claimed)
    }

    async fn finish_forward_attempts(
        &self,
        attempts: &[FinishedAttempt],
    ) -> Result<u64, StoreError> {
        let mut recorded = 0;
        {
            let mut inner = self.inner.lock().unwrap();
            inner.calls.finish += 1;
            for attempt in attempts {
                let Some(stored) = inner
                    .messages
                    .iter_mut()
                    .find(|stored| stored.message.id == attempt.id)
                else {
                    continue;
                };
                if stored.state != State::Pending
                    || stored.lease.map(|lease| lease.owner) != Some(attempt.lease_owner)
                {
                    continue;
                }
                stored.lease = None;
                stored.message.attempts += 1;
                stored.outcomes.push(attempt.outcome.clone());
                match &attempt.outcome {
                    AttemptOutcome::Delivered => stored.state = State::Delivered,
                    AttemptOutcome::Failed { .. } => stored.state = State::Failed,
                    AttemptOutcome::Retry {
                        next_attempt_at, ..
                    } => stored.next_attempt_at = *next_attempt_at,
                }
                recorded += 1;
            }
        }
        self.touched();
        Ok(recorded)
    }

    async fn next_forward_due(&self, target: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let due = {
            let mut inner = self.inner.lock().unwrap();
            inner.calls.next_due += 1;
            inner
                .messages
                .iter()
                .filter(|stored| stored.message.target == target && stored.state == State::Pending)
                .map(|stored| match stored.lease {
                    Some(lease) => lease.until.max(stored.next_attempt_at),
                    None => stored.next_attempt_at,
                })
                .min()
        };
        self.touched();
        Ok(due)
    }

    async fn forward_queue(&self, _target: &str) -> Result<TargetQueue, StoreError> {
        Err(not_faked())
    }

    async fn list_failed_forwards(
        &self,
        _target: &str,
        _limit: u32,
        _before: Option<i64>,
    ) -> Result<FailedPage, StoreError> {
        Err(not_faked())
    }

    async fn retry_failed_forwards(
        &self,
        _target: &str,
        _now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        Err(not_faked())
    }

    async fn replay_forwards(
        &self,
        _target: &str,
        _since: DateTime<Utc>,
        _until: Option<DateTime<Utc>>,
        _now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        Err(not_faked())
    }

    async fn queue_stuck_runs(
        &self,
        _changed_before: DateTime<Utc>,
        _limit: u32,
        _now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .stuck_answers
            .pop_front()
            .unwrap_or(0))
    }

    async fn prune_forwarded(
        &self,
        _before: DateTime<Utc>,
        _limit: u32,
    ) -> Result<u64, StoreError> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .prune_answers
            .pop_front()
            .unwrap_or(0))
    }
}
