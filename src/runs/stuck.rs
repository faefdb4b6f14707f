//! Stuck runs: not terminal, and unchanged for longer than `runs.stuck_after`.
//!
//! Nen documents no retry policy and no deadline for a run, so "stuck" says only that nothing
//! was heard for a while: the callback may still come (Nen retries a refused callback, on a
//! schedule it does not document), may have been lost, or the run may hang at Nen. It is a fact
//! about the run and the clock, so it is computed when read and never stored.
//!
//! The gauge `nen_relay_runs_stuck` is refreshed by one background task per process every
//! [`GAUGE_INTERVAL`], never per scrape, and counts no further than [`GAUGE_CAP`]: both through
//! the partial index of unfinished runs, so a scrape costs nothing and a count costs what the
//! unfinished runs do, however many finished runs are kept.
//!
//! Each stuck run is forwarded once as `run.stuck` (SPEC, "Stuck runs") by `forward::stuck`,
//! every [`GAUGE_INTERVAL`] too, through `Outbox::queue_stuck_runs`: the store marks the run
//! when it queues the message, in the same transaction, and the mark is cleared when the run
//! changes again, so "once" holds across restarts and replicas.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::runs::status::StatusRank;
use crate::store::{Run, Store};

/// How often the gauge is refreshed.
pub const GAUGE_INTERVAL: Duration = Duration::from_secs(30);

/// The gauge counts no further: past this many stuck runs, the number matters less than that
/// someone looks.
pub const GAUGE_CAP: u32 = 10_000;

/// When a run counts as stuck.
#[derive(Debug, Clone, Copy)]
pub struct StuckRule {
    after: chrono::Duration,
}

impl StuckRule {
    pub fn new(stuck_after: Duration) -> Self {
        StuckRule {
            after: chrono::Duration::from_std(stuck_after).unwrap_or(chrono::Duration::MAX),
        }
    }

    /// Runs last changed before this are stuck, unless terminal.
    pub fn changed_before(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now.checked_sub_signed(self.after)
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    pub fn is_stuck(&self, run: &Run, now: DateTime<Utc>) -> bool {
        !StatusRank::of(&run.status).is_terminal() && run.updated_at < self.changed_before(now)
    }

    /// Sets `run.stuck` as of `now`.
    pub fn mark(&self, mut run: Run, now: DateTime<Utc>) -> Run {
        run.stuck = self.is_stuck(&run, now);
        run
    }
}

/// Refreshes `nen_relay_runs_stuck` every [`GAUGE_INTERVAL`] until `stop` is cancelled.
pub fn spawn_gauge(
    store: Arc<dyn Store>,
    rule: StuckRule,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(GAUGE_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = stop.cancelled() => return,
            }
            let changed_before = rule.changed_before(Utc::now());
            match store.count_stuck_runs(changed_before, GAUGE_CAP).await {
                Ok(count) => metrics::set_runs_stuck(count),
                // The gauge keeps its last value; /readyz reports the store's state.
                Err(error) => tracing::debug!(%error, "cannot count stuck runs"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(status: &str, updated_at: DateTime<Utc>) -> Run {
        Run {
            message_id: "m".into(),
            workflow_id: None,
            status: status.into(),
            created_at: updated_at,
            updated_at,
            completed_at: None,
            expires_at: None,
            result: None,
            assets_url: None,
            error: None,
            triggered_here: false,
            conflicting_terminals: false,
            stuck: false,
            workflow_params: None,
            seq: 1,
        }
    }

    #[test]
    fn only_unfinished_runs_unchanged_for_longer_than_the_limit_are_stuck() {
        let rule = StuckRule::new(Duration::from_secs(3600));
        let now = Utc::now();
        let old = now - chrono::Duration::seconds(3601);
        let recent = now - chrono::Duration::seconds(3599);
        assert!(rule.mark(run("processing", old), now).stuck);
        assert!(rule.mark(run("submitted", old), now).stuck);
        assert!(!rule.mark(run("processing", recent), now).stuck);
        assert!(!rule.mark(run("success", old), now).stuck);
        assert!(!rule.mark(run("timeout", old), now).stuck);
    }

    #[test]
    fn an_enormous_limit_means_never_stuck() {
        let rule = StuckRule::new(Duration::from_secs(u64::MAX));
        let now = Utc::now();
        assert_eq!(rule.changed_before(now), DateTime::<Utc>::MIN_UTC);
        assert!(!rule.is_stuck(&run("processing", DateTime::<Utc>::MIN_UTC), now));
    }
}
