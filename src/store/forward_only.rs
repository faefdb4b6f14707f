//! The forward-only rule for runs, as the `on conflict` clause both backends share.
//!
//! `advances` means the new status is further than the stored one. Only then do the fields that
//! belong to a status (completion, result, assets, error) change. A late `processing` may still
//! fill in a workflow_id or expiry the run lacks, and never lowers the status.

/// The clause for an `insert into runs as r (...)`. `greatest` names the SQL function that
/// returns the larger of two values: `greatest` on PostgreSQL, two-argument `max` on SQLite.
pub(super) fn run_conflict_clause(greatest: &str) -> String {
    let advances = "excluded.status_rank > r.status_rank";
    format!(
        "on conflict (message_id) do update set \
         status = case when {advances} then excluded.status else r.status end, \
         status_rank = {greatest}(r.status_rank, excluded.status_rank), \
         workflow_id = coalesce(r.workflow_id, excluded.workflow_id), \
         updated_at = {greatest}(r.updated_at, excluded.updated_at), \
         completed_at = case when {advances} then excluded.completed_at else r.completed_at end, \
         expires_at = case when {advances} then coalesce(excluded.expires_at, r.expires_at) \
                      else coalesce(r.expires_at, excluded.expires_at) end, \
         result = case when {advances} then excluded.result else r.result end, \
         assets_url = case when {advances} then excluded.assets_url else r.assets_url end, \
         error = case when {advances} then excluded.error else r.error end"
    )
}
