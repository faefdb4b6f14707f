//! The columns a run query selects, in this order on both backends, and how they become a
//! `Run`. Only the type of the time columns differs: `timestamptz` on PostgreSQL, fixed-width
//! UTC text on SQLite.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::model::{Run, RunQuery};
use super::StoreError;

pub(super) type RunRow<Time> = (
    String,         // message_id
    Option<String>, // workflow_id
    String,         // status
    Time,           // created_at
    Time,           // updated_at
    Option<Time>,   // completed_at
    Option<Time>,   // expires_at
    Option<String>, // result (JSON text)
    Option<String>, // assets_url
    Option<String>, // error
    bool,           // triggered_here
    bool,           // conflicting_terminals
    Option<String>, // workflow_params (JSON text)
    i64,            // seq
);

/// Builds the run, reading each time column with `time`.
pub(super) fn run_from_row<Time>(
    row: RunRow<Time>,
    time: impl Fn(Time) -> Result<DateTime<Utc>, StoreError>,
) -> Result<Run, StoreError> {
    let (
        message_id,
        workflow_id,
        status,
        created_at,
        updated_at,
        completed_at,
        expires_at,
        result,
        assets_url,
        error,
        triggered_here,
        conflicting_terminals,
        workflow_params,
        seq,
    ) = row;
    Ok(Run {
        message_id,
        workflow_id,
        status,
        created_at: time(created_at)?,
        updated_at: time(updated_at)?,
        completed_at: completed_at.map(&time).transpose()?,
        expires_at: expires_at.map(&time).transpose()?,
        result: raw_json(result)?,
        assets_url,
        error,
        triggered_here,
        conflicting_terminals,
        workflow_params: raw_json(workflow_params)?,
        seq,
    })
}

/// Stored JSON text, handed out as is.
pub(super) fn raw_json(text: Option<String>) -> Result<Option<Box<RawValue>>, StoreError> {
    text.map(RawValue::from_string)
        .transpose()
        .map_err(|error| StoreError::Internal(format!("stored JSON does not parse: {error}")))
}

/// `runs.conflicting_terminals`, derived from the events: the run is terminal and a different
/// terminal status arrived too. A terminal status never changes, so this is exactly what a flag
/// set at the time would say. Select it from `runs` (unaliased); SQL for both backends.
pub(super) const CONFLICTING_TERMINALS: &str = "(runs.status_rank = 2 and exists (\
     select 1 from events c where c.message_id = runs.message_id and c.status <> runs.status \
     and c.status not in ('submitted', 'processing')))";

/// `events.conflicting_terminal`, derived likewise: a terminal event whose run settled on a
/// different terminal status. Select it from `events` (unaliased).
pub(super) const CONFLICTING_TERMINAL: &str = "(events.status not in ('submitted', 'processing') \
     and exists (select 1 from runs r where r.message_id = events.message_id \
     and r.status_rank = 2 and r.status <> events.status))";

/// The filter, keyset and limit part of a listing, for the filters `query` sets, in the bind
/// order workflow_id, status, cursor, limit. One statement per filter combination, so that each
/// is planned to walk its index (a generic `$1 is null or ...` plan would not). `numbered`
/// writes PostgreSQL's `$n` placeholders, else SQLite's `?`.
pub(super) fn listing_clauses(query: &RunQuery, numbered: bool) -> String {
    let clauses = [
        query.workflow_id.is_some().then_some(" and workflow_id = "),
        query.status.is_some().then_some(" and status = "),
        query.after.is_some().then_some(" and seq < "),
        Some(" order by seq desc limit "),
    ];
    let mut sql = String::from(" where true");
    for (position, clause) in clauses.into_iter().flatten().enumerate() {
        sql.push_str(clause);
        if numbered {
            sql.push_str(&format!("${}", position + 1));
        } else {
            sql.push('?');
        }
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RunCursor;

    #[test]
    fn listing_clauses_number_only_the_filters_given() {
        let all = RunQuery {
            workflow_id: Some("w".into()),
            status: Some("s".into()),
            limit: 5,
            after: Some(RunCursor { seq: 9 }),
        };
        assert_eq!(
            listing_clauses(&all, true),
            " where true and workflow_id = $1 and status = $2 and seq < $3 order by seq desc limit $4"
        );
        let status_only = RunQuery {
            status: Some("s".into()),
            ..RunQuery::default()
        };
        assert_eq!(
            listing_clauses(&status_only, true),
            " where true and status = $1 order by seq desc limit $2"
        );
        assert_eq!(
            listing_clauses(&status_only, false),
            " where true and status = ? order by seq desc limit ?"
        );
    }
}
