//! PostgreSQL's side of `store::handoff`: the room a batch reserves in the delivery workers
//! before it writes, and what goes to them once it commits.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::store::outbox::{OutboxMessage, STATUS_CHANGED};
use crate::store::{HandedMessage, Handoff, Reservation};

/// Room reserved in each target's worker for the messages of one batch.
pub(super) struct HandoffOffer {
    handoff: Option<Arc<dyn Handoff>>,
    /// Per target, in the order of the targets given: its reservation, if its worker had room.
    reserved: Vec<Option<Reservation>>,
}

impl HandoffOffer {
    /// Reserves room for up to `wanted` messages in the worker of each of `targets`; nothing
    /// without a hand-off.
    pub(super) fn reserve(
        handoff: Option<&Arc<dyn Handoff>>,
        targets: &[String],
        wanted: usize,
    ) -> Self {
        let reserved = match handoff {
            Some(handoff) if wanted > 0 => targets
                .iter()
                .map(|target| handoff.reserve(target, wanted))
                .collect(),
            _ => targets.iter().map(|_| None).collect(),
        };
        HandoffOffer {
            handoff: handoff.cloned(),
            reserved,
        }
    }

    /// Per target, the lease owner to write its messages with (as text), if any.
    pub(super) fn owners(&self) -> Vec<Option<String>> {
        self.reserved
            .iter()
            .map(|reserved| reserved.as_ref().map(|r| r.lease.owner.to_string()))
            .collect()
    }

    /// Per target, how many of its messages may be written leased.
    pub(super) fn rooms(&self) -> Vec<i32> {
        self.reserved
            .iter()
            .map(|reserved| {
                reserved
                    .as_ref()
                    .map_or(0, |r| i32::try_from(r.room()).unwrap_or(i32::MAX))
            })
            .collect()
    }

    /// When every lease offered ends (they were all taken at once).
    pub(super) fn until(&self) -> Option<DateTime<Utc>> {
        self.reserved
            .iter()
            .flatten()
            .map(|reserved| reserved.lease.until)
            .min()
    }

    /// What the batch wrote for `targets`: each message as `QueuedRow`. The leased ones go to
    /// their worker with a slot each; the slots left over go back with this offer.
    pub(super) fn written(
        mut self,
        targets: &[String],
        rows: Vec<QueuedRow>,
        committed_at: DateTime<Utc>,
    ) -> Handed {
        let Some(handoff) = self.handoff.take() else {
            return Handed::default();
        };
        let mut per_target: Vec<(String, Vec<HandedMessage>, bool)> = targets
            .iter()
            .map(|target| (target.clone(), Vec::new(), false))
            .collect();
        for row in rows {
            let Some(at) = targets.iter().position(|target| *target == row.target) else {
                continue;
            };
            let slot = match (&row.run, self.reserved[at].as_mut()) {
                (Some(_), Some(reservation)) => reservation.take_slot(),
                _ => None,
            };
            match (slot, row.run) {
                (Some(slot), Some(run)) => per_target[at].1.push(HandedMessage {
                    message: OutboxMessage {
                        id: row.id,
                        target: row.target,
                        message_id: row.message_id,
                        event_type: STATUS_CHANGED.to_owned(),
                        run,
                        committed_at,
                        queued_at: committed_at,
                        attempts: 0,
                    },
                    slot,
                }),
                (None, Some(_)) => {
                    // Written leased beyond the room reserved, which the statement does not
                    // do: the message goes to a claim after its lease.
                    tracing::error!(target_name = %row.target, message_id = %row.message_id, "a message was written leased without room for it");
                }
                (_, None) => per_target[at].2 = true,
            }
        }
        per_target.retain(|(_, handed, claimable)| !handed.is_empty() || *claimable);
        for (_, handed, _) in &mut per_target {
            // `returning` follows no order.
            handed.sort_by_key(|handed| handed.message.id);
        }
        Handed {
            handoff: Some(handoff),
            per_target,
        }
    }
}

/// A message a batch wrote: its run's JSON when it was written leased, none otherwise.
pub(super) struct QueuedRow {
    pub id: i64,
    pub target: String,
    pub message_id: String,
    pub run: Option<String>,
}

/// What a write queued, per target: the messages written leased, and whether others wait for a
/// claim; reported after the commit. Dropped instead (the write failed), the slots go back to
/// the workers, and nothing was committed.
#[derive(Default)]
pub(super) struct Handed {
    handoff: Option<Arc<dyn Handoff>>,
    per_target: Vec<(String, Vec<HandedMessage>, bool)>,
}

impl Handed {
    /// Messages of `targets` written without a lease, to be claimed.
    pub(super) fn claimable(handoff: Option<&Arc<dyn Handoff>>, targets: &[String]) -> Handed {
        Handed {
            handoff: handoff.cloned(),
            per_target: targets
                .iter()
                .map(|target| (target.clone(), Vec::new(), true))
                .collect(),
        }
    }

    pub(super) fn hand_over(self) {
        let Some(handoff) = self.handoff else { return };
        for (target, messages, claimable) in self.per_target {
            handoff.committed(&target, messages, claimable);
        }
    }
}
