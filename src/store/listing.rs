//! `GET /v1/runs`: which listing statement a query needs, and the page its rows make.
//!
//! Each backend writes one statement per filter combination ([`ListingFilter`]), so that each is
//! planned to walk its index backwards from the cursor: `(workflow_id, seq)`, `(status, seq)` or
//! `seq` itself. One statement with `$1 is null or workflow_id = $1` would get a generic plan
//! that walks none of them. Every statement binds its filters in the order workflow_id, status,
//! then [`Listing::before_seq`] and [`Listing::fetch`].

use super::model::{Run, RunCursor, RunPage, RunQuery};
use super::StoreError;

/// The filters a listing query sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingFilter<'q> {
    All,
    Workflow(&'q str),
    Status(&'q str),
    WorkflowAndStatus(&'q str, &'q str),
}

/// A listing query, as the listing statements take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listing<'q> {
    pub filter: ListingFilter<'q>,
    /// Only runs below this `seq`: the cursor's, or past every run for the first page. Always
    /// bound, so that a first page and a later one share a statement (and its index walk).
    pub before_seq: i64,
    /// How many rows to fetch: one more than the page shows, to tell whether more follow.
    pub fetch: i64,
    /// How many runs the page shows.
    limit: u32,
}

impl<'q> Listing<'q> {
    pub fn of(query: &'q RunQuery) -> Self {
        let filter = match (query.workflow_id.as_deref(), query.status.as_deref()) {
            (None, None) => ListingFilter::All,
            (Some(workflow_id), None) => ListingFilter::Workflow(workflow_id),
            (None, Some(status)) => ListingFilter::Status(status),
            (Some(workflow_id), Some(status)) => {
                ListingFilter::WorkflowAndStatus(workflow_id, status)
            }
        };
        let limit = query.limit.max(1);
        Listing {
            filter,
            before_seq: query.after.map_or(i64::MAX, |cursor| cursor.seq),
            fetch: i64::from(limit) + 1,
            limit,
        }
    }

    /// The page from the rows fetched in listing order: the one past the page is not shown, it
    /// only tells that more follow.
    pub fn page(&self, mut runs: Vec<Run>) -> RunPage {
        let more = runs.len() > self.limit as usize;
        runs.truncate(self.limit as usize);
        let next = if more {
            runs.last().map(|run| RunCursor { seq: run.seq })
        } else {
            None
        };
        RunPage { runs, next }
    }

    /// The page from rows as a backend fetched them, each read into a run by `read`.
    pub fn page_of<Row>(
        &self,
        rows: Vec<Row>,
        read: impl FnMut(Row) -> Result<Run, StoreError>,
    ) -> Result<RunPage, StoreError> {
        let runs = rows.into_iter().map(read).collect::<Result<Vec<_>, _>>()?;
        Ok(self.page(runs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn run(seq: i64) -> Run {
        Run {
            message_id: format!("m-{seq}"),
            workflow_id: None,
            status: "processing".into(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            completed_at: None,
            expires_at: None,
            result: None,
            assets_url: None,
            error: None,
            triggered_here: false,
            conflicting_terminals: false,
            stuck: false,
            workflow_params: None,
            seq,
        }
    }

    #[test]
    fn a_query_picks_its_filter_and_bounds() {
        let first_page = RunQuery {
            limit: 10,
            ..RunQuery::default()
        };
        let listing = Listing::of(&first_page);
        assert_eq!(listing.filter, ListingFilter::All);
        assert_eq!((listing.before_seq, listing.fetch), (i64::MAX, 11));
        let later = RunQuery {
            workflow_id: Some("w".into()),
            status: Some("success".into()),
            limit: 0,
            after: Some(RunCursor { seq: 42 }),
        };
        let listing = Listing::of(&later);
        assert_eq!(
            listing.filter,
            ListingFilter::WorkflowAndStatus("w", "success")
        );
        assert_eq!(
            (listing.before_seq, listing.fetch),
            (42, 2),
            "at least one run"
        );
        let status = RunQuery {
            status: Some("failed".into()),
            ..RunQuery::default()
        };
        assert_eq!(Listing::of(&status).filter, ListingFilter::Status("failed"));
    }

    #[test]
    fn the_extra_row_only_says_that_more_follow() {
        let query = RunQuery {
            limit: 2,
            ..RunQuery::default()
        };
        let listing = Listing::of(&query);
        let page = listing.page(vec![run(9), run(7), run(4)]);
        let seqs: Vec<i64> = page.runs.iter().map(|run| run.seq).collect();
        assert_eq!(seqs, vec![9, 7]);
        assert_eq!(page.next, Some(RunCursor { seq: 7 }));
        let last = listing.page(vec![run(3), run(1)]);
        assert_eq!((last.runs.len(), last.next), (2, None));
    }
}
