//! The in-process link between commits and the delivery workers: waking them instead of
//! polling, and handing them the messages written leased to them (`store::handoff`).
//!
//! One link per target:
//! - a [`Notify`]: `notify_one` keeps a permit when the worker is busy, so a wake that arrives
//!   between its claim and its wait is never lost. Commits in this process wake it directly;
//!   commits on other replicas arrive through the store's feed (PostgreSQL `LISTEN/NOTIFY`);
//!   `forward.poll_interval` is the safety net behind both;
//! - the worker's slots, one per message it may hold (`forward.concurrency`), shared by its
//!   claims and the hand-offs, and its lease owner, which hand-offs write;
//! - a channel that carries committed hand-offs to the worker, and whether it takes any now.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, Notify, Semaphore};
use uuid::Uuid;

use crate::store::{HandedMessage, Handoff, Lease, Reservation};

/// Cheap to clone; every clone wakes the same workers.
#[derive(Clone, Default)]
pub struct ForwardWake {
    targets: Arc<BTreeMap<String, Link>>,
    /// Set once the store reports its commits itself (`Handoff::committed`): a commit in this
    /// process then wakes a worker only when it left messages to claim.
    store_reports: Arc<AtomicBool>,
}

struct Link {
    notify: Arc<Notify>,
    owner: Uuid,
    slots: Arc<Semaphore>,
    lease: Duration,
    accepting: Arc<AtomicBool>,
    handed: mpsc::UnboundedSender<Vec<HandedMessage>>,
    /// Taken by the worker when it starts.
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Vec<HandedMessage>>>>,
}

/// A worker's end of its link.
pub struct WorkerLink {
    pub wake: Arc<Notify>,
    /// The lease owner of every claim and hand-off of this worker.
    pub owner: Uuid,
    /// One permit per message in the worker's hands, or reserved for a hand-off.
    pub slots: Arc<Semaphore>,
    /// Whether commits may write messages leased to this worker now.
    pub accepting: Arc<AtomicBool>,
    pub handed: mpsc::UnboundedReceiver<Vec<HandedMessage>>,
}

impl WorkerLink {
    /// A link that nothing hands off to: its worker claims everything it sends.
    pub fn claims_only(concurrency: usize) -> WorkerLink {
        let (_, handed) = mpsc::unbounded_channel();
        WorkerLink {
            wake: Arc::new(Notify::new()),
            owner: Uuid::new_v4(),
            slots: Arc::new(Semaphore::new(concurrency)),
            accepting: Arc::new(AtomicBool::new(false)),
            handed,
        }
    }
}

impl ForwardWake {
    /// Links for `targets`, each worker holding up to `concurrency` messages, leased for
    /// `lease` when handed off.
    pub fn new<'a>(
        targets: impl IntoIterator<Item = &'a str>,
        concurrency: usize,
        lease: Duration,
    ) -> Self {
        let links = targets.into_iter().map(|name| {
            let (handed, receiver) = mpsc::unbounded_channel();
            let link = Link {
                notify: Arc::new(Notify::new()),
                owner: Uuid::new_v4(),
                slots: Arc::new(Semaphore::new(concurrency.max(1))),
                lease,
                accepting: Arc::new(AtomicBool::new(false)),
                handed,
                receiver: Mutex::new(Some(receiver)),
            };
            (name.to_owned(), link)
        });
        ForwardWake {
            targets: Arc::new(links.collect()),
            store_reports: Arc::default(),
        }
    }

    /// Messages were queued for every target: wake each worker (or leave it a permit).
    pub fn wake_all(&self) {
        for link in self.targets.values() {
            link.notify.notify_one();
        }
    }

    /// A write in this process committed and may have queued messages: wakes every worker,
    /// unless the store reports its commits itself.
    pub fn after_commit(&self) {
        if !self.store_reports.load(Ordering::Acquire) {
            self.wake_all();
        }
    }

    /// The store reports every commit that queued messages from now on (`Handoff::committed`).
    pub fn store_reports_commits(&self) {
        self.store_reports.store(true, Ordering::Release);
    }

    /// Whether any target is configured: with none, nothing is ever queued.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// What a target's worker waits on.
    pub fn notified(&self, target: &str) -> Option<Arc<Notify>> {
        self.targets.get(target).map(|link| link.notify.clone())
    }

    /// The worker's end of `target`'s link; only the first call gets it.
    pub fn worker_link(&self, target: &str) -> Option<WorkerLink> {
        let link = self.targets.get(target)?;
        let handed = link.receiver.lock().ok()?.take()?;
        Some(WorkerLink {
            wake: link.notify.clone(),
            owner: link.owner,
            slots: link.slots.clone(),
            accepting: link.accepting.clone(),
            handed,
        })
    }
}

impl Handoff for ForwardWake {
    fn reserve(&self, target: &str, wanted: usize) -> Option<Reservation> {
        let link = self.targets.get(target)?;
        if !link.accepting.load(Ordering::Acquire) {
            return None;
        }
        let until = chrono::Duration::from_std(link.lease)
            .ok()
            .and_then(|lease| Utc::now().checked_add_signed(lease))?;
        let lease = Lease {
            owner: link.owner,
            until,
        };
        Reservation::of_free_slots(&link.slots, wanted, lease)
    }

    fn committed(&self, target: &str, handed: Vec<HandedMessage>, claimable: bool) {
        let Some(link) = self.targets.get(target) else {
            return;
        };
        if !handed.is_empty() && link.handed.send(handed).is_err() {
            // The worker has stopped: the messages go to a claim after their lease.
            tracing::debug!(target_name = %target, "a hand-off arrived after its worker stopped");
        }
        if claimable {
            link.notify.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OutboxMessage;

    fn message(id: i64) -> OutboxMessage {
        OutboxMessage {
            id,
            target: "orders".into(),
            message_id: format!("m-{id}"),
            event_type: "run.status_changed".into(),
            run: "{}".into(),
            committed_at: Utc::now(),
            queued_at: Utc::now(),
            attempts: 0,
        }
    }

    #[tokio::test]
    async fn a_worker_takes_hand_offs_only_while_it_accepts_them_and_has_room() {
        let wake = ForwardWake::new(["orders"], 3, Duration::from_secs(60));
        let mut link = wake.worker_link("orders").expect("a configured target");
        assert!(wake.worker_link("orders").is_none(), "one worker per link");
        assert!(wake.reserve("orders", 2).is_none(), "not accepting yet");
        link.accepting.store(true, Ordering::Release);
        assert!(wake.reserve("nobody", 2).is_none(), "not a target");

        let mut reservation = wake.reserve("orders", 5).expect("room");
        assert_eq!(reservation.room(), 3, "no more than the concurrency");
        assert_eq!(reservation.lease.owner, link.owner);
        assert!(
            wake.reserve("orders", 1).is_none(),
            "every slot is reserved"
        );
        let slot = reservation.take_slot().expect("a slot");
        drop(reservation);
        assert_eq!(
            link.slots.available_permits(),
            2,
            "the unused slots went back"
        );

        wake.committed(
            "orders",
            vec![HandedMessage {
                message: message(7),
                slot,
            }],
            false,
        );
        let handed = link.handed.try_recv().expect("handed over");
        assert_eq!(handed[0].message.id, 7);
        drop(handed);
        assert_eq!(
            link.slots.available_permits(),
            3,
            "a finished send frees its slot"
        );
    }

    #[tokio::test]
    async fn a_commit_wakes_a_worker_for_what_it_left_to_claim() {
        let wake = ForwardWake::new(["orders"], 3, Duration::from_secs(60));
        let link = wake.worker_link("orders").expect("a configured target");
        let woken = || futures::FutureExt::now_or_never(link.wake.notified()).is_some();
        wake.after_commit();
        assert!(
            woken(),
            "a commit wakes the worker while the store does not report"
        );
        wake.store_reports_commits();
        wake.after_commit();
        assert!(!woken(), "the store reports its commits itself");
        wake.committed("orders", Vec::new(), false);
        assert!(!woken(), "everything was handed over");
        wake.committed("orders", Vec::new(), true);
        assert!(woken(), "something waits for a claim");
    }
}
