//! When a message that was not delivered goes again, or whether it is kept as failed.
//!
//! Exponential backoff with equal jitter: after the n-th failed attempt since the message was
//! queued, the next waits between half and all of `base * 2^(n-1)` (1 s doubling, capped at
//! 10 min). Half is fixed so that retries really back off; half is random so that the messages
//! of a target that was down do not all come back at the same instant. A message whose next
//! attempt would fall past `queued_at + forward.max_age` is kept as failed instead.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::AttemptOutcome;

/// The delays of [`Backoff::STANDARD`] (SPEC: "1 s doubling, capped at 10 min").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    pub const STANDARD: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(600),
    };

    /// The wait after the `failed`-th failed attempt (1 for the first), with `random` in
    /// `[0, 1)` choosing where in the jittered half it falls.
    pub fn delay(&self, failed: u32, random: f64) -> Duration {
        let exponent = failed.saturating_sub(1).min(31);
        let full = self
            .base
            .checked_mul(1u32 << exponent)
            .unwrap_or(self.cap)
            .min(self.cap);
        let half = full / 2;
        half + half.mul_f64(random.clamp(0.0, 1.0))
    }

    /// What becomes of an attempt that was not delivered: another at `now + delay`, or failed
    /// when that is past `queued_at + max_age`. `attempts_before` counts the attempts made
    /// before this one since the message was queued.
    pub fn after_failure(
        &self,
        attempts_before: i32,
        queued_at: DateTime<Utc>,
        max_age: Duration,
        now: DateTime<Utc>,
        error: String,
        random: f64,
    ) -> AttemptOutcome {
        let failed = u32::try_from(attempts_before.max(0))
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let next_attempt_at = chrono::Duration::from_std(self.delay(failed, random))
            .ok()
            .and_then(|delay| now.checked_add_signed(delay));
        let deadline = chrono::Duration::from_std(max_age)
            .ok()
            .and_then(|max_age| queued_at.checked_add_signed(max_age));
        match (next_attempt_at, deadline) {
            (Some(next_attempt_at), Some(deadline)) if next_attempt_at > deadline => {
                AttemptOutcome::Failed { error }
            }
            (Some(next_attempt_at), _) => AttemptOutcome::Retry {
                next_attempt_at,
                error,
            },
            (None, _) => AttemptOutcome::Failed { error },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn delays_double_from_one_second_up_to_ten_minutes() {
        let lowest: Vec<_> = (1..=12)
            .map(|n| Backoff::STANDARD.delay(n, 0.0).as_millis())
            .collect();
        assert_eq!(
            lowest,
            [500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 256000, 300000, 300000]
        );
        let highest: Vec<_> = (1..=12)
            .map(|n| Backoff::STANDARD.delay(n, 0.999_999).as_secs_f64().round() as u64)
            .collect();
        assert_eq!(highest, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(
            Backoff::STANDARD.delay(u32::MAX, 0.5),
            7 * MINUTE + MINUTE / 2
        );
        assert_eq!(Backoff::STANDARD.delay(0, 0.0), Duration::from_millis(500));
    }

    #[test]
    fn jitter_falls_within_the_upper_half() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for failed in 1..40 {
            // A small deterministic generator: the test sees many points of [0, 1).
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let random = (seed >> 11) as f64 / (1u64 << 53) as f64;
            let full = Backoff::STANDARD.delay(failed, 1.0);
            let delay = Backoff::STANDARD.delay(failed, random);
            assert!(delay >= full / 2 && delay <= full, "{failed}: {delay:?}");
        }
    }

    #[test]
    fn a_retry_past_the_maximum_age_is_failed() {
        let queued_at = Utc::now();
        let max_age = 10 * MINUTE;
        let retry = Backoff::STANDARD.after_failure(
            3,
            queued_at,
            max_age,
            queued_at + chrono::Duration::minutes(1),
            "HTTP 500".into(),
            0.0,
        );
        assert_eq!(
            retry,
            AttemptOutcome::Retry {
                next_attempt_at: queued_at
                    + chrono::Duration::minutes(1)
                    + chrono::Duration::seconds(4),
                error: "HTTP 500".into()
            }
        );
        let failed = Backoff::STANDARD.after_failure(
            3,
            queued_at,
            max_age,
            queued_at + chrono::Duration::seconds(597),
            "HTTP 500".into(),
            0.0,
        );
        assert_eq!(
            failed,
            AttemptOutcome::Failed {
                error: "HTTP 500".into()
            }
        );
    }
}
