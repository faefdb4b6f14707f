//! One delivery worker per target: takes due messages (handed over at commit, or claimed),
//! sends them concurrently, records what came of each, and sleeps when nothing is due.
//!
//! - It holds at most `forward.concurrency` messages, one slot each (`wake::WorkerLink`).
//!   Commits in this process hand it the messages they wrote leased to it while it has room
//!   (`store::handoff`); it claims the rest, up to its free slots, leased until
//!   `now + forward.lease`. Another replica's claim skips a leased message until then, and a
//!   replica that dies mid-send leaves it to the next claim after the lease.
//! - Order per run is the store's: neither a claim nor a hand-off gives a worker a later
//!   message of a run while an earlier one is pending. Outcomes are recorded, and more
//!   claimed, in rounds: all finished sends are recorded in one statement and the free slots
//!   are refilled with one claim. A round comes when the worker has nothing at all (no send
//!   in flight, no outcome to record), when `forward.concurrency` outcomes wait to be
//!   recorded, or [`ROUND_WAIT`] after the first outcome or wake since the last round,
//!   whichever comes first. A finished send frees its slot at once (hand-offs fill it
//!   meanwhile), so under load a round records dozens of outcomes in one statement instead
//!   of a few, and a run's next change, or a wake from another replica, waits at most
//!   [`ROUND_WAIT`] longer.
//! - When nothing is in flight and nothing is claimable, it waits for a wake (a commit queued
//!   messages), for the soonest pending message to become due (`next_forward_due`), or for
//!   `forward.poll_interval`, whichever comes first: never a busy loop. While sends are in
//!   flight, their ends are what wake it: a retry that comes due meanwhile is claimed in the
//!   next round.
//! - A round in which the target answered nothing (no connection, no answer in time) makes
//!   the worker rest before it claims again, longer for each such round in a row (`outage`):
//!   a target that is down is probed, not sent every message that comes due.
//! - A store error is logged (at most once a minute while it lasts) and the worker pauses,
//!   longer each time up to [`MAX_PAUSE`]; outcomes not yet recorded are kept and recorded
//!   later. Nothing ends the task but its stop token.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::backoff::Backoff;
use super::outage::{self, Outage, Reach};
use super::send::{self, Sent};
use super::wake::WorkerLink;
use super::{OutboxSource, Target};
use crate::config::ForwardSettings;
use crate::metrics;
use crate::store::handoff;
use crate::store::outbox::webhook_id;
use crate::store::{
    AttemptOutcome, FinishedAttempt, HandedMessage, Lease, OutboxMessage, StoreError,
};

/// How long a finished send's outcome, or a wake, waits for the next round at most.
pub const ROUND_WAIT: Duration = Duration::from_millis(10);
/// The longest pause after store errors.
pub const MAX_PAUSE: Duration = Duration::from_secs(30);
/// A store error that lasts is logged this often at most.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What a worker needs of `[forward]`.
#[derive(Debug, Clone, Copy)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub max_age: Duration,
    pub backoff: Backoff,
}

impl From<&ForwardSettings> for WorkerSettings {
    fn from(settings: &ForwardSettings) -> Self {
        WorkerSettings {
            concurrency: settings.concurrency.max(1),
            lease: settings.lease,
            poll_interval: settings.poll_interval,
            max_age: settings.max_age,
            backoff: Backoff::STANDARD,
        }
    }
}

/// The worker of one target.
pub struct Worker {
    pub target: Target,
    pub outbox: Arc<dyn OutboxSource>,
    pub client: reqwest::Client,
    pub settings: WorkerSettings,
    /// How commits wake it and hand it messages (`wake`).
    pub link: WorkerLink,
}

/// One finished send, not yet recorded.
struct Done {
    attempt: FinishedAttempt,
    reach: Reach,
    committed_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
}

impl Worker {
    /// Runs until `stop` is cancelled, then waits for the sends in flight and records them (the
    /// caller bounds how long; whatever is cut off is sent again after its lease).
    pub async fn run(mut self, stop: CancellationToken) {
        // One lease owner per worker, for its claims and its hand-offs: they never overlap.
        let owner = self.link.owner;
        let mut in_flight: JoinSet<Done> = JoinSet::new();
        let mut unrecorded: Vec<Done> = Vec::new();
        let mut trouble = StoreTrouble::default();
        let mut outage = Outage::default();
        // Since when the next round has been wanted: the first outcome or wake after the last.
        let mut wanted_since: Option<Instant> = None;
        loop {
            if stop.is_cancelled() {
                break;
            }
            // Hand-offs bypass the outage's rests, so none while resting.
            self.accept_handoffs(outage.resting_until(Instant::now()).is_none());
            if let Some(pause) = trouble.take_pause() {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
            collect_finished(&mut in_flight, &mut unrecorded);
            while let Ok(handed) = self.link.handed.try_recv() {
                self.start_handed(&mut in_flight, handed);
            }
            if !unrecorded.is_empty() {
                wanted_since.get_or_insert_with(Instant::now);
            }
            let mut wake_at = None;
            if round_due(
                self.settings.concurrency,
                in_flight.len(),
                unrecorded.len(),
                wanted_since,
                Instant::now(),
            ) {
                wanted_since = None;
                if !unrecorded.is_empty() {
                    if let Err(error) = self.record(&mut unrecorded, &mut outage).await {
                        trouble.failed(&self.target.name, "record delivery outcomes", &error);
                        continue;
                    }
                }
                if let Some(until) = outage.resting_until(Instant::now()) {
                    // No hand-offs while resting; those handed over already are leased to this
                    // worker, and go now rather than outlast their lease in the channel.
                    self.accept_handoffs(false);
                    while let Ok(handed) = self.link.handed.try_recv() {
                        self.start_handed(&mut in_flight, handed);
                    }
                    if in_flight.is_empty() {
                        sleep_or_stop(until, &stop).await;
                    } else {
                        // The sends under way end the wait; the rest is checked again then.
                        wait_for_one(&mut in_flight, &mut unrecorded, until, &stop).await;
                    }
                    continue;
                }
                // Every free slot: those not held by a send or reserved for a hand-off.
                let mut slots = handoff::free_slots(&self.link.slots, usize::MAX);
                let claimed_at = Utc::now();
                match self
                    .claim(
                        owner,
                        slots.as_ref().map_or(0, |s| s.num_permits()),
                        claimed_at,
                    )
                    .await
                {
                    Ok(messages) => {
                        trouble.recovered(&self.target.name);
                        for message in messages {
                            match slots.as_mut().and_then(|slots| slots.split(1)) {
                                Some(slot) => self.start(&mut in_flight, owner, message, slot),
                                None => {
                                    tracing::error!(target_name = %self.target.name, "a claim returned more messages than asked for; the rest go after their lease")
                                }
                            }
                        }
                    }
                    Err(error) => {
                        trouble.failed(&self.target.name, "claim messages", &error);
                        continue;
                    }
                }
                // Idle: nothing was claimable. Sleep until something may be.
                if in_flight.is_empty() {
                    match self.next_wake(claimed_at).await {
                        Ok(at) => wake_at = Some(at),
                        Err(error) => {
                            trouble.failed(&self.target.name, "find the next due message", &error);
                            continue;
                        }
                    }
                }
            }
            let round_at = wanted_since.map(|since| since + ROUND_WAIT);
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Some(done) = finished(done) {
                        unrecorded.push(done);
                    }
                }
                Some(handed) = self.link.handed.recv() => self.start_handed(&mut in_flight, handed),
                () = self.link.wake.notified() => {
                    wanted_since.get_or_insert_with(Instant::now);
                }
                () = sleep_until(round_at), if round_at.is_some() => {}
                () = sleep_until(wake_at), if wake_at.is_some() => {}
            }
        }
        // Messages handed over already are leased to this worker: they go now, with the rest.
        self.accept_handoffs(false);
        self.link.handed.close();
        while let Some(handed) = self.link.handed.recv().await {
            self.start_handed(&mut in_flight, handed);
        }
        while let Some(done) = in_flight.join_next().await {
            unrecorded.extend(finished(done));
        }
        if !unrecorded.is_empty() {
            if let Err(error) = self.record(&mut unrecorded, &mut outage).await {
                tracing::warn!(
                    target_name = %self.target.name,
                    %error,
                    "cannot record the last delivery outcomes; those messages go again after \
                     their lease"
                );
            }
        }
    }

    async fn claim(
        &self,
        owner: Uuid,
        room: usize,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let until = chrono::Duration::from_std(self.settings.lease)
            .ok()
            .and_then(|lease| now.checked_add_signed(lease))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.outbox
            .outbox()
            .claim_forward_messages(
                &self.target.name,
                u32::try_from(room).unwrap_or(u32::MAX),
                Lease { owner, until },
                now,
            )
            .await
    }

    /// When to look again: when the soonest pending message becomes due, at the latest after
    /// `poll_interval`. A message that was due already when the claim ran and was not claimed
    /// waits for something else (an earlier message of its run in flight, or another replica's
    /// lease): the end of a send here claims again anyway, so it is left to the poll.
    async fn next_wake(&self, claimed_at: DateTime<Utc>) -> Result<Instant, StoreError> {
        let poll_at = Instant::now() + self.settings.poll_interval;
        let due = self
            .outbox
            .outbox()
            .next_forward_due(&self.target.name, claimed_at)
            .await?;
        Ok(match due {
            Some(due) if due > claimed_at => {
                let wait = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                poll_at.min(Instant::now() + wait)
            }
            _ => poll_at,
        })
    }

    /// Whether commits may write messages leased to this worker now (`store::handoff`).
    fn accept_handoffs(&self, accept: bool) {
        self.link.accepting.store(accept, Ordering::Release);
    }

    /// Sends messages written leased to this worker, each in the slot reserved for it.
    fn start_handed(&self, in_flight: &mut JoinSet<Done>, handed: Vec<HandedMessage>) {
        for HandedMessage { message, slot } in handed {
            self.start(in_flight, self.link.owner, message, slot);
        }
    }

    /// Sends `message` in a task that holds `slot` until the send ends.
    fn start(
        &self,
        in_flight: &mut JoinSet<Done>,
        owner: Uuid,
        message: OutboxMessage,
        slot: OwnedSemaphorePermit,
    ) {
        let client = self.client.clone();
        let target = self.target.clone();
        let settings = self.settings;
        in_flight.spawn(async move {
            let attempted_at = Utc::now();
            let sent = send::send(&client, &target, &message, attempted_at).await;
            let finished_at = Utc::now();
            drop(slot);
            let reach = Reach::of(&sent);
            let outcome = match sent {
                Sent::Delivered => AttemptOutcome::Delivered,
                Sent::Unsendable(error) => AttemptOutcome::Failed { error },
                Sent::Refused(error) | Sent::Unreachable(error) => settings.backoff.after_failure(
                    message.attempts,
                    message.queued_at,
                    settings.max_age,
                    finished_at,
                    error,
                    rand::random::<f64>(),
                ),
            };
            match &outcome {
                AttemptOutcome::Delivered => {}
                AttemptOutcome::Retry {
                    next_attempt_at,
                    error,
                } => tracing::debug!(
                    target_name = %target.name,
                    webhook_id = %webhook_id(message.id),
                    %error,
                    %next_attempt_at,
                    "not delivered; trying again"
                ),
                AttemptOutcome::Failed { error } => tracing::warn!(
                    target_name = %target.name,
                    webhook_id = %webhook_id(message.id),
                    %error,
                    "not delivered; kept as failed"
                ),
            }
            Done {
                reach,
                attempt: FinishedAttempt {
                    id: message.id,
                    lease_owner: owner,
                    attempted_at,
                    outcome,
                },
                committed_at: message.committed_at,
                finished_at,
            }
        });
    }

    /// Records every finished send in one call, counts them once recorded, and tells `outage`
    /// what the round came to.
    async fn record(
        &self,
        unrecorded: &mut Vec<Done>,
        outage: &mut Outage,
    ) -> Result<(), StoreError> {
        let attempts: Vec<FinishedAttempt> =
            unrecorded.iter().map(|done| done.attempt.clone()).collect();
        self.outbox
            .outbox()
            .finish_forward_attempts(&attempts)
            .await?;
        let change = outage.after_round(
            unrecorded.iter().map(|done| done.reach),
            &self.settings.backoff,
            Instant::now(),
            rand::random::<f64>(),
        );
        match change {
            outage::Change::Began => tracing::warn!(
                target_name = %self.target.name,
                "the target answered nothing in a round; claiming less often until it answers"
            ),
            outage::Change::Ended => {
                tracing::info!(target_name = %self.target.name, "the target answers again")
            }
            outage::Change::None => {}
        }
        for done in unrecorded.drain(..) {
            let lag = (done.finished_at - done.committed_at)
                .to_std()
                .unwrap_or(Duration::ZERO);
            metrics::record_forward_attempt(&self.target.name, &done.attempt.outcome, lag);
        }
        Ok(())
    }
}

/// Whether to record and claim now (see the module): the worker has nothing at all (so it
/// claims, or sleeps until something comes due), `concurrency` outcomes wait, or the first
/// outcome or wake since the last round has waited [`ROUND_WAIT`] by `now`.
fn round_due(
    concurrency: usize,
    in_flight: usize,
    unrecorded: usize,
    wanted_since: Option<Instant>,
    now: Instant,
) -> bool {
    (in_flight == 0 && unrecorded == 0)
        || unrecorded >= concurrency
        || wanted_since.is_some_and(|since| now.duration_since(since) >= ROUND_WAIT)
}

/// Takes the sends that finished already, without waiting.
fn collect_finished(in_flight: &mut JoinSet<Done>, unrecorded: &mut Vec<Done>) {
    while let Some(done) = in_flight.try_join_next() {
        unrecorded.extend(finished(done));
    }
}

/// A send that panicked has no outcome: its lease ends and it goes again.
fn finished(done: Result<Done, tokio::task::JoinError>) -> Option<Done> {
    match done {
        Ok(done) => Some(done),
        Err(error) => {
            tracing::error!(%error, "a forwarding send failed unexpectedly; it goes again after its lease");
            None
        }
    }
}

/// Sleeps until `until`, or until `stop`.
async fn sleep_or_stop(until: Instant, stop: &CancellationToken) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep_until(until) => {}
    }
}

/// Waits for one send to finish, for `until`, or for `stop`, whichever comes first.
async fn wait_for_one(
    in_flight: &mut JoinSet<Done>,
    unrecorded: &mut Vec<Done>,
    until: Instant,
    stop: &CancellationToken,
) {
    tokio::select! {
        () = stop.cancelled() => {}
        Some(done) = in_flight.join_next() => unrecorded.extend(finished(done)),
        () = tokio::time::sleep_until(until) => {}
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Store errors in a row: how long to pause, and whether to log.
#[derive(Default)]
struct StoreTrouble {
    failures: u32,
    pause_pending: bool,
    last_logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl StoreTrouble {
    fn failed(&mut self, target: &str, doing: &str, error: &StoreError) {
        self.failures = self.failures.saturating_add(1);
        self.pause_pending = true;
        let now = std::time::Instant::now();
        if self
            .last_logged
            .is_none_or(|last| now.duration_since(last) >= LOG_EVERY)
        {
            tracing::warn!(
                target_name = %target,
                %error,
                failures_since_last_log = self.unlogged,
                "forwarding cannot {doing}; pausing, then trying again"
            );
            self.last_logged = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
    }

    fn recovered(&mut self, target: &str) {
        if self.failures > 0 {
            tracing::info!(target_name = %target, "forwarding reaches the store again");
        }
        *self = StoreTrouble::default();
    }

    /// The pause owed after a failure (1 s doubling, at most [`MAX_PAUSE`]), once.
    fn take_pause(&mut self) -> Option<Duration> {
        if !std::mem::take(&mut self.pause_pending) {
            return None;
        }
        let exponent = self.failures.saturating_sub(1).min(16);
        Some(
            Duration::from_secs(1)
                .saturating_mul(1 << exponent)
                .min(MAX_PAUSE),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_comes_when_idle_when_a_rounds_worth_waits_or_after_the_round_wait() {
        let now = Instant::now();
        let just = Some(now);
        let waited = now.checked_sub(ROUND_WAIT);
        // Nothing at all: claim (or look for the next due message) at once.
        assert!(round_due(64, 0, 0, None, now));
        // Outcomes to record, sends still under way, or a wake: they wait for company...
        assert!(!round_due(64, 0, 1, just, now));
        assert!(!round_due(64, 3, 0, None, now));
        assert!(!round_due(64, 3, 63, just, now));
        assert!(!round_due(64, 3, 0, just, now));
        // ...until a round's worth of outcomes waits, or the first has waited long enough.
        assert!(round_due(64, 3, 64, just, now));
        assert!(round_due(64, 3, 1, waited, now));
        assert!(round_due(64, 3, 0, waited, now));
    }

    #[test]
    fn store_errors_pause_longer_each_time_and_once_per_error() {
        let mut trouble = StoreTrouble::default();
        assert_eq!(trouble.take_pause(), None);
        let error = StoreError::Unavailable("down".into());
        let mut pauses = Vec::new();
        for _ in 0..7 {
            trouble.failed("orders", "claim messages", &error);
            pauses.push(trouble.take_pause().unwrap().as_secs());
            assert_eq!(trouble.take_pause(), None);
        }
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30]);
        trouble.recovered("orders");
        trouble.failed("orders", "claim messages", &error);
        assert_eq!(trouble.take_pause(), Some(Duration::from_secs(1)));
    }
}
