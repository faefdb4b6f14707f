//! A target that delivers nothing is given a rest, instead of being sent every message that
//! comes due.
//!
//! Each message backs off on its own (`backoff`), but while a target is down every run has a
//! message coming due, so the worker would still try a target that refuses everything about
//! as often as messages were queued, and each try costs a claim and an outcome in the store.
//! After a round in which nothing was delivered and something must go again, the worker
//! claims nothing more for a while: the message backoff's delay for that many such rounds in a
//! row, capped at [`MAX_REST`]. The next round is the probe; one delivery ends the rest.

use std::time::Duration;

use tokio::time::Instant;

use super::backoff::Backoff;
use crate::store::AttemptOutcome;

/// The longest rest: also how late, at worst, a target that is back sees its first message.
pub const MAX_REST: Duration = Duration::from_secs(60);

/// What the last rounds of one target came to.
#[derive(Debug, Default)]
pub struct Outage {
    /// Rounds in a row with nothing delivered and something to send again.
    failed_rounds: u32,
    resting_until: Option<Instant>,
}

/// What a round changed, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// The first round in a row that delivered nothing: the target looks down.
    Began,
    /// A delivery after such rounds.
    Ended,
}

impl Outage {
    /// Takes the outcomes of a round, recorded at `now`; `random` in `[0, 1)` picks the jitter.
    pub fn after_round<'a>(
        &mut self,
        outcomes: impl IntoIterator<Item = &'a AttemptOutcome>,
        backoff: &Backoff,
        now: Instant,
        random: f64,
    ) -> Change {
        let (mut delivered, mut again) = (false, false);
        for outcome in outcomes {
            match outcome {
                AttemptOutcome::Delivered => delivered = true,
                AttemptOutcome::Retry { .. } => again = true,
                // Kept as failed (unsendable, or too old): says nothing of the target.
                AttemptOutcome::Failed { .. } => {}
            }
        }
        if delivered {
            let was_down = self.failed_rounds > 0;
            *self = Outage::default();
            return if was_down {
                Change::Ended
            } else {
                Change::None
            };
        }
        if !again {
            return Change::None;
        }
        self.failed_rounds = self.failed_rounds.saturating_add(1);
        let rest = backoff.delay(self.failed_rounds, random).min(MAX_REST);
        self.resting_until = Some(now + rest);
        if self.failed_rounds == 1 {
            Change::Began
        } else {
            Change::None
        }
    }

    /// Until when to claim nothing, if that is still ahead of `now`.
    pub fn resting_until(&self, now: Instant) -> Option<Instant> {
        self.resting_until.filter(|until| *until > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    const BACKOFF: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(600),
    };

    fn retry() -> AttemptOutcome {
        AttemptOutcome::Retry {
            next_attempt_at: Utc::now(),
            error: "connection refused".into(),
        }
    }

    fn failed() -> AttemptOutcome {
        AttemptOutcome::Failed {
            error: "too old".into(),
        }
    }

    #[test]
    fn rounds_that_deliver_nothing_rest_longer_each_time_up_to_the_cap() {
        let now = Instant::now();
        let mut outage = Outage::default();
        assert_eq!(outage.resting_until(now), None);
        let mut rests = Vec::new();
        for round in 0..12 {
            let change = outage.after_round(&[retry(), retry()], &BACKOFF, now, 1.0);
            assert_eq!(change == Change::Began, round == 0);
            rests.push(outage.resting_until(now).expect("resting") - now);
        }
        assert_eq!(rests[0], Duration::from_secs(1));
        assert_eq!(rests[1], Duration::from_secs(2));
        assert_eq!(rests[5], Duration::from_secs(32));
        assert!(rests[6..].iter().all(|rest| *rest == MAX_REST), "{rests:?}");
        // Over once the time has passed.
        assert_eq!(outage.resting_until(now + MAX_REST), None);
    }

    #[test]
    fn one_delivery_ends_the_rest() {
        let now = Instant::now();
        let mut outage = Outage::default();
        outage.after_round(&[retry()], &BACKOFF, now, 0.5);
        outage.after_round(&[retry()], &BACKOFF, now, 0.5);
        assert!(outage.resting_until(now).is_some());
        let change = outage.after_round(&[retry(), AttemptOutcome::Delivered], &BACKOFF, now, 0.5);
        assert_eq!(change, Change::Ended);
        assert_eq!(outage.resting_until(now), None);
        // And the next failing round starts from the shortest rest again.
        outage.after_round(&[retry()], &BACKOFF, now, 1.0);
        assert_eq!(
            outage.resting_until(now).map(|until| until - now),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn messages_kept_as_failed_say_nothing_of_the_target() {
        let now = Instant::now();
        let mut outage = Outage::default();
        assert_eq!(
            outage.after_round(&[failed()], &BACKOFF, now, 0.5),
            Change::None
        );
        assert_eq!(outage.resting_until(now), None);
        outage.after_round(&[retry()], &BACKOFF, now, 1.0);
        let until = outage.resting_until(now);
        assert_eq!(
            outage.after_round(&[failed()], &BACKOFF, now, 1.0),
            Change::None
        );
        assert_eq!(outage.resting_until(now), until);
    }
}
