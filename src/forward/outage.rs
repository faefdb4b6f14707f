//! A target that answers nothing is given a rest, instead of being sent every message that
//! comes due.
//!
//! Each message backs off on its own (`backoff`), but while a target is down every run has a
//! message coming due, so the worker would still try a target that cannot be reached about as
//! often as messages were queued, and each try costs a claim and an outcome in the store.
//! After a round in which no send reached the target (no connection, or no answer in time),
//! the worker claims nothing more for a while: the message backoff's delay for that many such
//! rounds in a row, capped at [`MAX_REST`]. The next round is the probe; any answer ends the
//! rest. A target that answers, even with errors, is up: its messages back off one by one, and
//! the others keep going.

use std::time::Duration;

use tokio::time::Instant;

use super::backoff::Backoff;
use super::send::Sent;

/// The longest rest: also how late, at worst, a target that is back sees its first message.
pub const MAX_REST: Duration = Duration::from_secs(60);

/// Whether one send reached the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// It answered (2xx or not).
    Answered,
    /// No connection, a transport error, or no answer within `forward.timeout`.
    Unreachable,
    /// Nothing was sent (the message cannot be): says nothing of the target.
    NotSent,
}

impl Reach {
    pub fn of(sent: &Sent) -> Reach {
        match sent {
            Sent::Delivered | Sent::Refused(_) => Reach::Answered,
            Sent::Unreachable(_) => Reach::Unreachable,
            Sent::Unsendable(_) => Reach::NotSent,
        }
    }
}

/// What the last rounds of one target came to.
#[derive(Debug, Default)]
pub struct Outage {
    /// Rounds in a row in which the target answered nothing.
    silent_rounds: u32,
    resting_until: Option<Instant>,
}

/// What a round changed, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// The first round in a row in which the target answered nothing.
    Began,
    /// An answer after such rounds.
    Ended,
}

impl Outage {
    /// Takes how far each send of a round got, recorded at `now`; `random` in `[0, 1)` picks
    /// the jitter.
    pub fn after_round(
        &mut self,
        sends: impl IntoIterator<Item = Reach>,
        backoff: &Backoff,
        now: Instant,
        random: f64,
    ) -> Change {
        let (mut answered, mut unreachable) = (false, false);
        for reach in sends {
            match reach {
                Reach::Answered => answered = true,
                Reach::Unreachable => unreachable = true,
                Reach::NotSent => {}
            }
        }
        if answered {
            let was_down = self.silent_rounds > 0;
            *self = Outage::default();
            return if was_down {
                Change::Ended
            } else {
                Change::None
            };
        }
        if !unreachable {
            return Change::None;
        }
        self.silent_rounds = self.silent_rounds.saturating_add(1);
        let rest = backoff.delay(self.silent_rounds, random).min(MAX_REST);
        self.resting_until = Some(now + rest);
        if self.silent_rounds == 1 {
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

    const BACKOFF: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(600),
    };

    #[test]
    fn rounds_that_reach_nothing_rest_longer_each_time_up_to_the_cap() {
        let now = Instant::now();
        let mut outage = Outage::default();
        assert_eq!(outage.resting_until(now), None);
        let mut rests = Vec::new();
        for round in 0..12 {
            let change =
                outage.after_round([Reach::Unreachable, Reach::Unreachable], &BACKOFF, now, 1.0);
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
    fn any_answer_ends_the_rest_even_an_error() {
        let now = Instant::now();
        let mut outage = Outage::default();
        outage.after_round([Reach::Unreachable], &BACKOFF, now, 0.5);
        outage.after_round([Reach::Unreachable], &BACKOFF, now, 0.5);
        assert!(outage.resting_until(now).is_some());
        // A 500 is an answer: the target is up, its messages back off one by one.
        let change = outage.after_round([Reach::Unreachable, Reach::Answered], &BACKOFF, now, 0.5);
        assert_eq!(change, Change::Ended);
        assert_eq!(outage.resting_until(now), None);
        // And the next silent round starts from the shortest rest again.
        outage.after_round([Reach::Unreachable], &BACKOFF, now, 1.0);
        assert_eq!(
            outage.resting_until(now).map(|until| until - now),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn a_target_that_answers_only_errors_is_never_rested() {
        let now = Instant::now();
        let mut outage = Outage::default();
        for _ in 0..5 {
            assert_eq!(
                outage.after_round([Reach::Answered, Reach::Answered], &BACKOFF, now, 1.0),
                Change::None
            );
        }
        assert_eq!(outage.resting_until(now), None);
    }

    #[test]
    fn messages_not_sent_say_nothing_of_the_target() {
        let now = Instant::now();
        let mut outage = Outage::default();
        assert_eq!(
            outage.after_round([Reach::NotSent], &BACKOFF, now, 0.5),
            Change::None
        );
        assert_eq!(outage.resting_until(now), None);
        outage.after_round([Reach::Unreachable], &BACKOFF, now, 1.0);
        let until = outage.resting_until(now);
        assert_eq!(
            outage.after_round([Reach::NotSent], &BACKOFF, now, 1.0),
            Change::None
        );
        assert_eq!(outage.resting_until(now), until);
    }

    #[test]
    fn reach_follows_what_the_send_got() {
        assert_eq!(Reach::of(&Sent::Delivered), Reach::Answered);
        assert_eq!(
            Reach::of(&Sent::Refused("HTTP 500".into())),
            Reach::Answered
        );
        assert_eq!(
            Reach::of(&Sent::Unreachable("cannot connect".into())),
            Reach::Unreachable
        );
        assert_eq!(
            Reach::of(&Sent::Unsendable("not JSON".into())),
            Reach::NotSent
        );
    }
}
