//! Batch planning: which deliveries of a batch are repeats of each other, how a run moves when
//! several of its statuses arrive together, and what each delivery is answered.
//!
//! Both stores group the batch and answer each delivery with this code. Two steps depend on
//! what the database holds, and are made differently:
//! - The SQLite store runs them here: [`BatchPlan::run_changes`] for the runs, and
//!   [`BatchPlan::differing_copies`] for the copies of stored events.
//! - The PostgreSQL store writes a whole batch with one statement (`postgres::RECORD_BATCH`), and
//!   only that statement knows which events are new, so it implements the same two rules in SQL.
//!   The behaviour suite and the property test in `tests/integration/store_behaviour.rs` keep
//!   the two equal.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::forward_only::terminals_conflict;
use super::model::{Delivery, DeliveryOutcome};
use crate::runs::status::StatusRank;

/// Deliveries of one `(message_id, status)` within a batch, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Index of the first delivery: the one stored as the event if the key is new.
    pub first: usize,
    /// Indices of the later copies in this batch.
    pub repeats: Vec<usize>,
}

/// A batch split into its distinct `(message_id, status)` keys.
#[derive(Debug)]
pub struct BatchPlan<'a> {
    pub deliveries: &'a [Delivery],
    /// In order of first arrival.
    pub groups: Vec<Group>,
}

/// How one run changes because of the new events of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct RunChange {
    pub message_id: String,
    pub workflow_id: Option<String>,
    /// The furthest new status (the first to arrive among equally far ones).
    pub status: String,
    pub rank: StatusRank,
    /// When the earliest of these events arrived (the run's `created_at` if it is new).
    pub first_received_at: DateTime<Utc>,
    /// When the latest of these events arrived (the run's `updated_at`).
    pub last_received_at: DateTime<Utc>,
    /// Set when `status` is terminal.
    pub completed_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub result: Option<String>,
    pub assets_url: Option<String>,
    pub error: Option<String>,
}

impl<'a> BatchPlan<'a> {
    pub fn new(deliveries: &'a [Delivery]) -> Self {
        let mut index: HashMap<(&str, &str), usize> = HashMap::with_capacity(deliveries.len());
        let mut groups: Vec<Group> = Vec::with_capacity(deliveries.len());
        for (position, delivery) in deliveries.iter().enumerate() {
            let key = (delivery.message_id.as_str(), delivery.status.as_str());
            match index.get(&key) {
                Some(&group) => groups[group].repeats.push(position),
                None => {
                    index.insert(key, groups.len());
                    groups.push(Group {
                        first: position,
                        repeats: Vec::new(),
                    });
                }
            }
        }
        Self { deliveries, groups }
    }

    /// The delivery a group stores as its event.
    pub fn first(&self, group: &Group) -> &'a Delivery {
        &self.deliveries[group.first]
    }

    /// Later copies within the batch whose body differs from the group's first delivery.
    pub fn differing_repeats(&self, group: &Group) -> usize {
        let first = &self.deliveries[group.first].body_sha256;
        group
            .repeats
            .iter()
            .filter(|&&i| &self.deliveries[i].body_sha256 != first)
            .count()
    }

    /// Every delivery of a group, the first one included.
    pub fn copies<'p>(&'p self, group: &'p Group) -> impl Iterator<Item = &'a Delivery> + 'p {
        std::iter::once(&group.first)
            .chain(&group.repeats)
            .map(|&i| &self.deliveries[i])
    }

    /// How many deliveries of a group whose event was already stored have a body that differs
    /// from the stored one (`stored_sha256`): every one of them counts as a copy of it.
    pub fn differing_copies(&self, group: &Group, stored_sha256: &[u8]) -> usize {
        self.copies(group)
            .filter(|copy| copy.body_sha256.as_slice() != stored_sha256)
            .count()
    }

    /// The latest arrival among a group's deliveries.
    pub fn last_received_at(&self, group: &Group) -> DateTime<Utc> {
        group
            .repeats
            .iter()
            .map(|&i| self.deliveries[i].received_at)
            .fold(self.deliveries[group.first].received_at, DateTime::max)
    }

    /// One change per run that got at least one new event. `inserted[g]` says whether group `g`
    /// became a new event. Changes are sorted by `message_id`, so that concurrent writers lock
    /// runs in the same order.
    ///
    /// Among a run's new events, the furthest status wins, the first to arrive among equally far
    /// ones, and brings its completion, result, assets and error. A workflow_id or expiry the
    /// winner lacks comes from the first new event (in arrival order) that has one. The run spans
    /// from the earliest to the latest arrival among them.
    pub fn run_changes(&self, inserted: &[bool]) -> Vec<RunChange> {
        let mut by_run: HashMap<&str, RunChange> = HashMap::new();
        // Per run, the first workflow_id and expiry among its new events, in arrival order.
        let mut first_known: HashMap<&str, FirstKnown> = HashMap::new();
        for (group, _) in self.groups.iter().zip(inserted).filter(|(_, &new)| new) {
            let delivery = self.first(group);
            let message_id = delivery.message_id.as_str();
            let known = first_known.entry(message_id).or_default();
            known.workflow_id = known.workflow_id.take().or(delivery.workflow_id.clone());
            known.expires_at = known.expires_at.or(delivery.expires_at);
            match by_run.get_mut(message_id) {
                None => {
                    by_run.insert(message_id, change_from(delivery));
                }
                Some(change) => {
                    let first_received_at = change.first_received_at.min(delivery.received_at);
                    let last_received_at = change.last_received_at.max(delivery.received_at);
                    if delivery.rank() > change.rank {
                        *change = change_from(delivery);
                    }
                    change.first_received_at = first_received_at;
                    change.last_received_at = last_received_at;
                }
            }
        }
        let mut changes: Vec<RunChange> = by_run
            .into_values()
            .map(|mut change| {
                // Safe: in-memory, and every run in `by_run` was put in `first_known` above.
                let known = first_known
                    .remove(change.message_id.as_str())
                    .unwrap_or_default();
                change.workflow_id = change.workflow_id.or(known.workflow_id);
                change.expires_at = change.expires_at.or(known.expires_at);
                change
            })
            .collect();
        changes.sort_by(|a, b| a.message_id.cmp(&b.message_id));
        changes
    }

    /// New terminal events that disagree with their run's final status: `(group index)`.
    /// `final_status` maps each changed run to its status after the batch.
    pub fn conflicting_terminals(
        &self,
        inserted: &[bool],
        final_status: &HashMap<String, String>,
    ) -> Vec<usize> {
        self.groups
            .iter()
            .enumerate()
            .filter(|(g, _)| inserted[*g])
            .filter_map(|(g, group)| {
                let delivery = self.first(group);
                let run_status = final_status.get(&delivery.message_id)?;
                terminals_conflict(&delivery.status, run_status).then_some(g)
            })
            .collect()
    }

    /// Each delivery's answer. `inserted[g]` as above; `stored_sha256[g]` is the body hash of
    /// the event already stored for a group that was not inserted; `conflicting` lists groups
    /// from [`Self::conflicting_terminals`].
    pub fn outcomes(
        &self,
        inserted: &[bool],
        stored_sha256: &[Option<[u8; 32]>],
        conflicting: &[usize],
    ) -> Vec<DeliveryOutcome> {
        let mut outcomes = vec![DeliveryOutcome::default(); self.deliveries.len()];
        for (g, group) in self.groups.iter().enumerate() {
            let reference = if inserted[g] {
                outcomes[group.first].conflicting_terminal = conflicting.contains(&g);
                self.deliveries[group.first].body_sha256
            } else {
                // Safe: a hash the store could not read back (missing, or not 32 bytes) only
                // means the copy is not flagged as differing; it is still a duplicate.
                stored_sha256[g].unwrap_or(self.deliveries[group.first].body_sha256)
            };
            let copies = group
                .repeats
                .iter()
                .chain((!inserted[g]).then_some(&group.first));
            for &i in copies {
                outcomes[i].duplicate = true;
                outcomes[i].body_differs = self.deliveries[i].body_sha256 != reference;
            }
        }
        outcomes
    }
}

/// The first workflow_id and expiry a run's new events carry.
#[derive(Default)]
struct FirstKnown {
    workflow_id: Option<String>,
    expires_at: Option<DateTime<Utc>>,
}

fn change_from(delivery: &Delivery) -> RunChange {
    let rank = delivery.rank();
    RunChange {
        message_id: delivery.message_id.clone(),
        workflow_id: delivery.workflow_id.clone(),
        status: delivery.status.clone(),
        rank,
        first_received_at: delivery.received_at,
        last_received_at: delivery.received_at,
        completed_at: rank.is_terminal().then_some(delivery.received_at),
        expires_at: delivery.expires_at,
        result: delivery.result.clone(),
        assets_url: delivery.assets_url.clone(),
        error: delivery.error.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use chrono::TimeZone;
    use sha2::{Digest, Sha256};

    fn delivery(message_id: &str, status: &str, body: &str, second: i64) -> Delivery {
        Delivery {
            message_id: message_id.into(),
            status: status.into(),
            workflow_id: Some("w".into()),
            expires_at: None,
            result: None,
            assets_url: None,
            error: None,
            raw_body: Bytes::from(body.to_owned()),
            body_sha256: Sha256::digest(body.as_bytes()).into(),
            key_id: "k".into(),
            received_at: Utc.timestamp_opt(1_700_000_000 + second, 0).unwrap(),
        }
    }

    #[test]
    fn groups_repeats_by_message_and_status() {
        let batch = [
            delivery("a", "processing", "1", 0),
            delivery("a", "success", "2", 1),
            delivery("a", "processing", "1", 2),
            delivery("b", "processing", "3", 3),
            delivery("a", "processing", "changed", 4),
        ];
        let plan = BatchPlan::new(&batch);
        assert_eq!(plan.groups.len(), 3);
        assert_eq!(
            plan.groups[0],
            Group {
                first: 0,
                repeats: vec![2, 4]
            }
        );
        assert_eq!(plan.differing_repeats(&plan.groups[0]), 1);
        assert_eq!(
            plan.last_received_at(&plan.groups[0]).timestamp(),
            1_700_000_004
        );
    }

    #[test]
    fn a_run_moves_to_its_furthest_new_status_keeping_earlier_fields() {
        let mut processing = delivery("a", "processing", "1", 5);
        processing.expires_at = Some(Utc.timestamp_opt(1_800_000_000, 0).unwrap());
        let mut success = delivery("a", "success", "2", 3);
        success.result = Some("{}".into());
        let batch = [success, processing];
        let plan = BatchPlan::new(&batch);
        let changes = plan.run_changes(&[true, true]);
        assert_eq!(changes.len(), 1);
        let change = &changes[0];
        assert_eq!(change.status, "success");
        assert_eq!(change.result.as_deref(), Some("{}"));
        assert_eq!(change.expires_at, batch[1].expires_at);
        assert_eq!(change.first_received_at, batch[0].received_at);
        assert_eq!(change.last_received_at, batch[1].received_at);
        assert_eq!(change.completed_at, Some(batch[0].received_at));
    }

    #[test]
    fn fields_the_winner_lacks_come_from_the_first_new_event_that_has_them() {
        let mut submitted = delivery("a", "submitted", "1", 0);
        submitted.workflow_id = Some("first".into());
        submitted.expires_at = Some(Utc.timestamp_opt(1_800_000_000, 0).unwrap());
        let mut processing = delivery("a", "processing", "2", 1);
        processing.workflow_id = Some("second".into());
        processing.expires_at = Some(Utc.timestamp_opt(1_800_000_001, 0).unwrap());
        let mut success = delivery("a", "success", "3", 2);
        success.workflow_id = None;
        let batch = [submitted, processing, success];
        let plan = BatchPlan::new(&batch);
        let change = &plan.run_changes(&[true, true, true])[0];
        assert_eq!(change.status, "success");
        assert_eq!(change.workflow_id.as_deref(), Some("first"));
        assert_eq!(change.expires_at, batch[0].expires_at);

        // The winner's own values come first.
        let mut winner = batch.clone();
        winner[2].workflow_id = Some("winner".into());
        let plan = BatchPlan::new(&winner);
        let change = &plan.run_changes(&[true, true, true])[0];
        assert_eq!(change.workflow_id.as_deref(), Some("winner"));
    }

    #[test]
    fn the_first_of_two_terminals_wins_and_the_second_conflicts() {
        let batch = [
            delivery("a", "success", "1", 0),
            delivery("a", "failed", "2", 1),
        ];
        let plan = BatchPlan::new(&batch);
        let changes = plan.run_changes(&[true, true]);
        assert_eq!(changes[0].status, "success");
        let final_status = HashMap::from([("a".to_owned(), "success".to_owned())]);
        assert_eq!(
            plan.conflicting_terminals(&[true, true], &final_status),
            vec![1]
        );
    }

    #[test]
    fn only_inserted_groups_change_runs() {
        let batch = [
            delivery("a", "processing", "1", 0),
            delivery("b", "success", "2", 1),
        ];
        let plan = BatchPlan::new(&batch);
        let changes = plan.run_changes(&[false, true]);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].message_id, "b");
    }

    #[test]
    fn outcomes_mark_copies_and_differing_bodies() {
        let batch = [
            delivery("a", "processing", "1", 0),
            delivery("a", "processing", "1", 1),
            delivery("a", "processing", "x", 2),
            delivery("b", "processing", "2", 3),
            delivery("b", "processing", "2", 4),
        ];
        let plan = BatchPlan::new(&batch);
        let stored_b: [u8; 32] = Sha256::digest(b"other").into();
        let outcomes = plan.outcomes(&[true, false], &[None, Some(stored_b)], &[]);
        let flags: Vec<(bool, bool)> = outcomes
            .iter()
            .map(|o| (o.duplicate, o.body_differs))
            .collect();
        assert_eq!(
            flags,
            vec![
                (false, false),
                (true, false),
                (true, true),
                (true, true),
                (true, true)
            ]
        );
    }
}
