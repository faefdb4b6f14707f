//! Messages written already leased to this replica's delivery worker, and handed to it at
//! commit: the worker sends them without claiming them first.
//!
//! A claim is a statement and a committed row version per message; under load, claims were a
//! large share of what forwarding cost the database. A store that supports it (PostgreSQL) asks the [`Handoff`]
//! before it queues a batch's messages how many of them the worker has room for, writes that
//! many with the worker's lease, and hands them over once the transaction commits. The rules
//! of the outbox stay as they are:
//! - a message is written leased only when no earlier message of its run and target is pending
//!   (the store checks in the insert), so order per run holds: a later change waits for the
//!   claim, as before;
//! - the lease is an ordinary lease: if this replica dies before or during the send, the message
//!   is claimable again when it ends, on any replica;
//! - a slot is a permit of the worker's concurrency, taken before the write and released when
//!   the send ends, so hand-offs and claims together never exceed `forward.concurrency`.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::outbox::{Lease, OutboxMessage};

/// The receiving side: the delivery workers of this process.
pub trait Handoff: Send + Sync + 'static {
    /// Room for up to `wanted` messages of `target`, and the lease to write them with; `None`
    /// when its worker takes none now (no room, resting during an outage, or stopping).
    fn reserve(&self, target: &str, wanted: usize) -> Option<Reservation>;

    /// After a commit that queued messages for `target`: those written with `reserve`'s
    /// lease, and whether others were written without one and wait for a claim.
    fn committed(&self, target: &str, handed: Vec<HandedMessage>, claimable: bool);
}

/// Room reserved in a worker: one permit per message it may take.
pub struct Reservation {
    pub lease: Lease,
    pub slots: OwnedSemaphorePermit,
}

impl Reservation {
    /// Up to `wanted` of the permits free in `slots` now, under `lease`; `None` when none is.
    pub fn of_free_slots(slots: &Arc<Semaphore>, wanted: usize, lease: Lease) -> Option<Self> {
        let slots = free_slots(slots, wanted)?;
        Some(Reservation { lease, slots })
    }

    /// How many messages may still be written leased.
    pub fn room(&self) -> usize {
        self.slots.num_permits()
    }

    /// One slot, for a message that was written leased; `None` when none is left.
    pub fn take_slot(&mut self) -> Option<OwnedSemaphorePermit> {
        self.slots.split(1)
    }
}

/// Up to `wanted` of the permits free in `slots` now, taken at once; `None` when none is. The
/// worker takes its claims' slots this way too.
pub fn free_slots(slots: &Arc<Semaphore>, wanted: usize) -> Option<OwnedSemaphorePermit> {
    let room = wanted.min(slots.available_permits());
    let room = u32::try_from(room).ok().filter(|room| *room > 0)?;
    slots.clone().try_acquire_many_owned(room).ok()
}

/// A committed message, leased to the worker it is handed to, and its slot there.
pub struct HandedMessage {
    pub message: OutboxMessage,
    pub slot: OwnedSemaphorePermit,
}
