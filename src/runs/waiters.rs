//! Who is waiting on which run, and waking them: the in-memory side of
//! `GET /v1/runs/{id}?wait=`.
//!
//! A waiter holds no database connection while it waits: it parks on a [`Notify`] of its run
//! and reads the run again only when woken. Wakes come from this process's own commits (the
//! ingest writers) and, on PostgreSQL, from every replica's commits through the terminal-run
//! feed (`runs::feed_listener`), and, as a safety net, from their own slow re-read
//! (`query.wait_recheck`). The number of waiters is capped (`query.max_waiters`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::futures::Notified;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::metrics;

/// Every waiter of this process. Cheap to clone: everything is shared.
#[derive(Clone)]
pub struct Waiters {
    inner: Arc<Inner>,
}

struct Inner {
    /// The runs waited on, each with its waiters' wake-up and how many they are.
    runs: Mutex<HashMap<String, RunWaiters>>,
    slots: Arc<Semaphore>,
    /// The shortest pause between a waiter's own re-reads, the safety net for a wake that
    /// never came (`query.wait_recheck`).
    recheck: Duration,
    /// Registrations so far, to spread the re-checks.
    registered: AtomicU64,
}

struct RunWaiters {
    notify: Arc<Notify>,
    count: usize,
}

/// No slot is free: `query.max_waiters` requests are waiting already.
#[derive(Debug, thiserror::Error)]
#[error("{0} requests are waiting on runs already")]
pub struct TooManyWaiters(pub usize);

impl Waiters {
    /// At most `max_waiters` at once, each re-reading its run after `recheck` (and up to as
    /// much again) without a wake.
    pub fn new(max_waiters: usize, recheck: Duration) -> Self {
        Waiters {
            inner: Arc::new(Inner {
                runs: Mutex::new(HashMap::new()),
                slots: Arc::new(Semaphore::new(max_waiters)),
                recheck,
                registered: AtomicU64::new(0),
            }),
        }
    }

    /// Takes a slot to wait on `message_id`; the slot is freed when the [`Waiter`] drops.
    pub fn register(&self, message_id: &str) -> Result<Waiter, TooManyWaiters> {
        let slot = self
            .inner
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| TooManyWaiters(self.waiting()))?;
        let notify = {
            let mut runs = self.runs();
            let run = runs
                .entry(message_id.to_owned())
                .or_insert_with(|| RunWaiters {
                    notify: Arc::new(Notify::new()),
                    count: 0,
                });
            run.count += 1;
            let notify = run.notify.clone();
            // Under the lock, so that the gauge ends at the last count, not a stale one.
            metrics::set_run_waiters(total(&runs));
            notify
        };
        let number = self.inner.registered.fetch_add(1, Ordering::Relaxed);
        Ok(Waiter {
            waiters: self.clone(),
            message_id: message_id.to_owned(),
            notify,
            recheck: spread(self.inner.recheck, number),
            _slot: slot,
        })
    }

    /// Wakes the waiters of these runs (they read their run again).
    pub fn wake<'a>(&self, message_ids: impl IntoIterator<Item = &'a str>) {
        let runs = self.runs();
        for message_id in message_ids {
            if let Some(run) = runs.get(message_id) {
                run.notify.notify_waiters();
            }
        }
    }

    /// Wakes every waiter: after a gap in the feed, any of them may have missed its wake.
    /// Returns how many were woken.
    pub fn wake_all(&self) -> usize {
        let runs = self.runs();
        for run in runs.values() {
            run.notify.notify_waiters();
        }
        total(&runs)
    }

    /// Requests waiting right now.
    pub fn waiting(&self) -> usize {
        total(&self.runs())
    }

    fn runs(&self) -> MutexGuard<'_, HashMap<String, RunWaiters>> {
        // Every change under this lock is a single step: a panic cannot leave it half done.
        self.inner
            .runs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn total(runs: &HashMap<String, RunWaiters>) -> usize {
    runs.values().map(|run| run.count).sum()
}

/// One request waiting on one run. Dropping it frees its slot.
pub struct Waiter {
    waiters: Waiters,
    message_id: String,
    notify: Arc<Notify>,
    recheck: Duration,
    _slot: OwnedSemaphorePermit,
}

impl Waiter {
    /// Completes at the next wake of this run. Enable it (`Notified::enable`) before reading
    /// the run, so that a wake between the read and the wait is not lost.
    pub fn woken(&self) -> Notified<'_> {
        self.notify.notified()
    }

    /// How long to wait without a wake before reading the run again anyway.
    pub fn recheck_interval(&self) -> Duration {
        self.recheck
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut runs = self.waiters.runs();
        if let Some(run) = runs.get_mut(&self.message_id) {
            run.count -= 1;
            if run.count == 0 {
                runs.remove(&self.message_id);
            }
        }
        metrics::set_run_waiters(total(&runs));
    }
}

/// `recheck` and up to as much again, spread evenly over registrations, so that waiters that
/// started together do not re-read together.
fn spread(recheck: Duration, number: u64) -> Duration {
    recheck + recheck / 16 * (number % 16) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_reaches_the_waiters_of_that_run_only() {
        let waiters = Waiters::new(10, Duration::from_secs(5));
        let (first, second, other) = (
            waiters.register("m-1").unwrap(),
            waiters.register("m-1").unwrap(),
            waiters.register("m-2").unwrap(),
        );
        assert_eq!(waiters.waiting(), 3);
        {
            let mut woken = [first.woken(), second.woken(), other.woken()].map(Box::pin);
            for notified in &mut woken {
                notified.as_mut().enable();
            }
            waiters.wake(["m-1", "m-unknown"]);
            let [first_woken, second_woken, mut other_woken] = woken;
            first_woken.await;
            second_woken.await;
            assert!(
                poll_once(other_woken.as_mut()).is_none(),
                "m-2 was not woken"
            );
            assert_eq!(waiters.wake_all(), 3);
            other_woken.await;
        }
        drop((first, second, other));
        assert_eq!(waiters.waiting(), 0);
        assert!(waiters.runs().is_empty(), "no entry outlives its waiters");
    }

    #[test]
    fn past_the_cap_registration_fails_until_a_slot_is_freed() {
        let waiters = Waiters::new(2, Duration::from_secs(5));
        let a = waiters.register("m").unwrap();
        let _b = waiters.register("n").unwrap();
        assert_eq!(waiters.register("o").err().map(|full| full.0), Some(2));
        drop(a);
        assert!(waiters.register("o").is_ok());
    }

    #[test]
    fn rechecks_are_spread_between_one_and_two_intervals() {
        let recheck = Duration::from_secs(5);
        for number in 0..100 {
            let pause = spread(recheck, number);
            assert!(pause >= recheck && pause < recheck * 2, "{pause:?}");
        }
        assert_ne!(spread(recheck, 0), spread(recheck, 1));
    }

    /// Polls a future once, without waiting.
    fn poll_once<F: std::future::Future + Unpin>(future: F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        let mut future = future;
        match std::pin::Pin::new(&mut future).poll(&mut context) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        }
    }
}
