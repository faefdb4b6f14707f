//! Which writes change a run, and the outbox messages a change queues (`outbox`).
//!
//! Both stores write a change's messages in the transaction that commits the change. Each finds
//! out in its own way what the run was before (SQLite reads it under its one writer; PostgreSQL
//! locks it, see `postgres::RECORD_BATCH`). SQLite, and PostgreSQL for a triggered run, decide
//! here and render the run with `Run`'s serialization; a PostgreSQL batch does both in its
//! statement (`postgres::RECORD_BATCH_FORWARDING`), to the same rule and the same bytes.

use super::model::Run;
use super::StoreError;
use crate::runs::status::StatusRank;

/// Whether a write that left a run at status `after` changed it: the run is new (`before` is
/// `None`), or its status moved forward from `before`. A duplicate, a conflicting second
/// terminal, or a status that is not further (`processing` after `success`) is no change.
pub fn is_change(before: Option<&str>, after: &str) -> bool {
    before.is_none_or(|before| StatusRank::of(after) > StatusRank::of(before))
}

/// One `run.status_changed` message to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedChange<'a> {
    pub target: &'a str,
    pub message_id: String,
    /// The run as `GET /v1/runs/{id}` shows it: the JSON the API serializes.
    pub run: String,
}

/// The messages of the changed `runs`, as read inside the transaction right after the change:
/// one per run and target, runs in the order given.
pub fn status_changed<'a>(
    targets: &'a [String],
    runs: &[Run],
) -> Result<Vec<QueuedChange<'a>>, StoreError> {
    let mut queued = Vec::with_capacity(runs.len() * targets.len());
    for run in runs {
        let json = serde_json::to_string(run).map_err(|error| {
            StoreError::Internal(format!(
                "cannot render run {} as JSON: {error}",
                run.message_id
            ))
        })?;
        for target in targets {
            queued.push(QueuedChange {
                target,
                message_id: run.message_id.clone(),
                run: json.clone(),
            });
        }
    }
    Ok(queued)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_new_run_or_a_further_status_is_a_change() {
        assert!(is_change(None, "submitted"));
        assert!(is_change(None, "success"));
        assert!(is_change(Some("submitted"), "processing"));
        assert!(is_change(Some("processing"), "timeout"));
        assert!(!is_change(Some("submitted"), "submitted"));
        assert!(!is_change(Some("success"), "success"));
        assert!(!is_change(Some("success"), "failed"));
        assert!(!is_change(Some("success"), "processing"));
    }
}
