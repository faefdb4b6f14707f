//! The forward-only rule: what a run becomes when callbacks move it, or when this service records
//! that it started it.
//!
//! The SQLite store reads the run, applies [`RunState::advanced`] or [`RunState::triggered`] as
//! written here, and stores the result. The PostgreSQL store cannot read before it writes without
//! a second round trip per batch, so its statements implement the same two rules in their own
//! `on conflict (message_id) do update` clauses (`postgres::RECORD_BATCH`,
//! `postgres::RECORD_TRIGGERED_RUN`). The behaviour suite and the property test in
//! `tests/integration/store_behaviour.rs` keep the two equal.

use chrono::{DateTime, Utc};

use super::model::TriggeredRun;
use super::plan::RunChange;
use crate::runs::status::StatusRank;

/// Every column of a run that callbacks and triggers set (all but its listing position).
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    pub workflow_id: Option<String>,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// JSON text.
    pub result: Option<String>,
    pub assets_url: Option<String>,
    pub error: Option<String>,
    pub triggered_here: bool,
    /// JSON text.
    pub workflow_params: Option<String>,
}

impl RunState {
    pub fn rank(&self) -> StatusRank {
        StatusRank::of(&self.status)
    }

    /// The run after the new events of a batch moved it (`stored`: the run before, if any).
    ///
    /// Only a further status moves the run, and only then do the fields that belong to a status
    /// (completion, result, assets, error) change; its expiry replaces the stored one if it has
    /// one. A status that is not further never lowers the run, but may fill in a workflow_id or an
    /// expiry the run lacks. A workflow_id once known stays. The run was created when it was
    /// first heard of, and was updated at its latest arrival.
    pub fn advanced(stored: Option<RunState>, change: &RunChange) -> RunState {
        let Some(stored) = stored else {
            return RunState {
                workflow_id: change.workflow_id.clone(),
                status: change.status.clone(),
                created_at: change.first_received_at,
                updated_at: change.last_received_at,
                completed_at: change.completed_at,
                expires_at: change.expires_at,
                result: change.result.clone(),
                assets_url: change.assets_url.clone(),
                error: change.error.clone(),
                triggered_here: false,
                workflow_params: None,
            };
        };
        let advances = change.rank > stored.rank();
        let updated_at = stored.updated_at.max(change.last_received_at);
        let workflow_id = stored.workflow_id.or_else(|| change.workflow_id.clone());
        if advances {
            RunState {
                workflow_id,
                status: change.status.clone(),
                updated_at,
                completed_at: change.completed_at,
                expires_at: change.expires_at.or(stored.expires_at),
                result: change.result.clone(),
                assets_url: change.assets_url.clone(),
                error: change.error.clone(),
                ..stored
            }
        } else {
            RunState {
                workflow_id,
                updated_at,
                expires_at: stored.expires_at.or(change.expires_at),
                ..stored
            }
        }
    }

    /// The run after this service recorded that it started it on Nen (`stored`: the run before,
    /// if any). A callback may have created the run first (Nen can call back before its answer
    /// to the start reaches us): then the run is only marked as started here, and its status and
    /// the fields that belong to it stay. It was created at the earlier of the two moments.
    pub fn triggered(stored: Option<RunState>, run: &TriggeredRun) -> RunState {
        let Some(stored) = stored else {
            return RunState {
                workflow_id: Some(run.workflow_id.clone()),
                status: "submitted".to_owned(),
                created_at: run.created_at,
                updated_at: run.created_at,
                completed_at: None,
                expires_at: None,
                result: None,
                assets_url: None,
                error: None,
                triggered_here: true,
                workflow_params: run.workflow_params.clone(),
            };
        };
        RunState {
            workflow_id: stored.workflow_id.or_else(|| Some(run.workflow_id.clone())),
            created_at: stored.created_at.min(run.created_at),
            triggered_here: true,
            workflow_params: run.workflow_params.clone().or(stored.workflow_params),
            ..stored
        }
    }
}

/// Whether an event's status conflicts with the status its run settled on: both are terminal
/// and they differ. A terminal status never changes, so the run keeps the first one and every
/// other terminal event is flagged. The write path ([`super::plan::BatchPlan`]) decides the
/// flags it answers with here; reads derive the stored flags in SQL, each backend in its own
/// statements (`conflicting_terminal` and `conflicting_terminals` columns), by the same rule.
pub fn terminals_conflict(event_status: &str, run_status: &str) -> bool {
    StatusRank::of(event_status).is_terminal()
        && StatusRank::of(run_status).is_terminal()
        && event_status != run_status
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(second: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + second, 0).unwrap()
    }

    fn change(status: &str, second: i64) -> RunChange {
        let rank = StatusRank::of(status);
        RunChange {
            message_id: "m".into(),
            workflow_id: None,
            status: status.into(),
            rank,
            first_received_at: at(second),
            last_received_at: at(second),
            completed_at: rank.is_terminal().then_some(at(second)),
            expires_at: None,
            result: None,
            assets_url: None,
            error: None,
        }
    }

    #[test]
    fn a_further_status_moves_the_run_and_brings_its_fields() {
        let mut processing = change("processing", 0);
        processing.workflow_id = Some("w".into());
        processing.expires_at = Some(at(100));
        let run = RunState::advanced(None, &processing);
        assert_eq!((run.status.as_str(), run.created_at), ("processing", at(0)));
        let mut success = change("success", 5);
        success.result = Some("[1]".into());
        success.workflow_id = Some("other".into());
        let run = RunState::advanced(Some(run), &success);
        assert_eq!(run.status, "success");
        assert_eq!(
            run.workflow_id.as_deref(),
            Some("w"),
            "a known workflow_id stays"
        );
        assert_eq!(
            run.expires_at,
            Some(at(100)),
            "kept when the new status has none"
        );
        assert_eq!(run.result.as_deref(), Some("[1]"));
        assert_eq!((run.created_at, run.updated_at), (at(0), at(5)));
        assert_eq!(run.completed_at, Some(at(5)));
    }

    #[test]
    fn a_later_status_that_is_not_further_only_fills_gaps() {
        let mut success = change("success", 0);
        success.result = Some("1".into());
        let done = RunState::advanced(None, &success);
        let mut late = change("processing", 10);
        late.workflow_id = Some("w".into());
        late.expires_at = Some(at(100));
        let run = RunState::advanced(Some(done.clone()), &late);
        assert_eq!(run.status, "success");
        assert_eq!(run.result.as_deref(), Some("1"));
        assert_eq!(run.completed_at, Some(at(0)));
        assert_eq!(run.workflow_id.as_deref(), Some("w"));
        assert_eq!(run.expires_at, Some(at(100)));
        assert_eq!(run.updated_at, at(10));
        // A different terminal is not further either: the first one stays.
        let mut failed = change("failed", 20);
        failed.error = Some("boom".into());
        let run = RunState::advanced(Some(run), &failed);
        assert_eq!((run.status.as_str(), run.error), ("success", None));
        assert!(terminals_conflict("failed", &run.status));
    }

    #[test]
    fn an_earlier_arrival_never_moves_updated_at_back() {
        let run = RunState::advanced(None, &change("processing", 10));
        let run = RunState::advanced(Some(run), &change("success", 3));
        assert_eq!((run.status.as_str(), run.updated_at), ("success", at(10)));
    }

    #[test]
    fn a_trigger_marks_a_run_without_moving_it() {
        let started = TriggeredRun {
            message_id: "m".into(),
            workflow_id: "w-started".into(),
            workflow_params: Some("{}".into()),
            created_at: at(5),
        };
        let fresh = RunState::triggered(None, &started);
        assert_eq!(fresh.status, "submitted");
        assert!(fresh.triggered_here);
        assert_eq!(fresh.workflow_params.as_deref(), Some("{}"));

        let called_back = RunState::advanced(None, &change("success", 10));
        let run = RunState::triggered(Some(called_back), &started);
        assert_eq!(run.status, "success");
        assert!(run.triggered_here);
        assert_eq!(run.workflow_id.as_deref(), Some("w-started"));
        assert_eq!(run.created_at, at(5), "the earlier moment wins");
        assert_eq!(run.updated_at, at(10));
        assert_eq!(run.completed_at, Some(at(10)));
    }

    #[test]
    fn only_two_different_terminals_conflict() {
        assert!(terminals_conflict("failed", "success"));
        assert!(terminals_conflict("timeout", "failed"));
        assert!(!terminals_conflict("success", "success"));
        assert!(!terminals_conflict("processing", "success"));
        assert!(!terminals_conflict("success", "processing"));
        assert!(!terminals_conflict("submitted", "failed"));
    }
}
