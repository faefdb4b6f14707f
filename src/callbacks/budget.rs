//! A process-wide byte budget for callback bodies that are not yet verified.
//!
//! Anyone can send a body to `POST /webhooks/nen`; until its signature is checked it is just
//! memory an anonymous client makes the service hold. Each request reserves the bytes it may
//! hold before a byte is read (its declared `Content-Length`, or the whole body limit when the
//! length is not declared), and gives them back when the body is verified, refused or dropped.
//! Past the budget, a callback is answered 503 with `Retry-After` at once, without being read.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics;

/// The budget, shared by every callback request. Cheap to clone.
#[derive(Clone)]
pub struct BodyBudget {
    inner: Arc<Inner>,
}

struct Inner {
    capacity: usize,
    held: AtomicUsize,
    /// Refusals are logged as one line per [`WARNING_INTERVAL`] at most (anyone can cause them,
    /// so a line per request would let anyone fill the log): these count them in between.
    started: Instant,
    refused_unlogged: AtomicU64,
    /// Milliseconds after `started` of the last warning, plus one (0: none yet).
    last_warning: AtomicU64,
}

const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Bytes reserved for one body; given back when dropped.
#[must_use = "the bytes are given back as soon as the reservation is dropped"]
pub struct Reservation {
    inner: Arc<Inner>,
    bytes: usize,
}

/// The budget cannot hold the body now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unverified callback bodies already hold the budget of {capacity} bytes")]
pub struct BudgetExhausted {
    pub capacity: usize,
}

impl BodyBudget {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                capacity,
                held: AtomicUsize::new(0),
                started: Instant::now(),
                refused_unlogged: AtomicU64::new(0),
                last_warning: AtomicU64::new(0),
            }),
        }
    }

    /// Reserves `bytes`, or refuses at once when they do not fit beside what is held.
    pub fn reserve(&self, bytes: usize) -> Result<Reservation, BudgetExhausted> {
        let capacity = self.inner.capacity;
        let fits = |held: usize| held.checked_add(bytes).filter(|total| *total <= capacity);
        self.inner
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, fits)
            .map_err(|_| {
                metrics::record_body_budget_exhausted();
                self.warn_now_and_then();
                BudgetExhausted { capacity }
            })?;
        metrics::add_inflight_body_bytes(bytes);
        Ok(Reservation {
            inner: self.inner.clone(),
            bytes,
        })
    }

    /// Counts a refusal, and logs the count at most once per [`WARNING_INTERVAL`].
    fn warn_now_and_then(&self) {
        let inner = &self.inner;
        inner.refused_unlogged.fetch_add(1, Ordering::Relaxed);
        let now = inner.started.elapsed().as_millis() as u64 + 1;
        let last = inner.last_warning.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARNING_INTERVAL.as_millis() as u64;
        if due
            && inner
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let refused = inner.refused_unlogged.swap(0, Ordering::Relaxed);
            tracing::warn!(
                refused,
                capacity = inner.capacity,
                "unverified callback bodies hold the whole budget: callbacks are answered 503 \
                 (one line per 10 s at most; see nen_relay_webhook_budget_exhausted_total)"
            );
        }
    }

    /// Bytes reserved now.
    pub fn held(&self) -> usize {
        self.inner.held.load(Ordering::Acquire)
    }
}

impl fmt::Debug for BodyBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodyBudget")
            .field("capacity", &self.inner.capacity)
            .field("held", &self.held())
            .finish()
    }
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.inner.held.fetch_sub(self.bytes, Ordering::AcqRel);
        metrics::remove_inflight_body_bytes(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_fit_up_to_the_capacity_and_come_back_when_dropped() {
        let budget = BodyBudget::new(100);
        let first = budget.reserve(60).unwrap();
        let second = budget.reserve(40).unwrap();
        assert_eq!(budget.held(), 100);
        assert_eq!(
            budget.reserve(1).err(),
            Some(BudgetExhausted { capacity: 100 })
        );
        drop(first);
        assert_eq!(budget.held(), 40);
        let third = budget.reserve(60).unwrap();
        assert_eq!(third.bytes(), 60);
        drop((second, third));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_reservation_larger_than_the_capacity_is_refused_even_when_empty() {
        let budget = BodyBudget::new(10);
        assert!(budget.reserve(11).is_err());
        assert!(budget.reserve(usize::MAX).is_err());
        assert_eq!(budget.held(), 0);
        let empty = budget.reserve(0).unwrap();
        assert_eq!(budget.held(), 0);
        drop(empty);
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_capacity() {
        let budget = BodyBudget::new(1_000);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if let Ok(reservation) = budget.reserve(7) {
                            assert!(budget.held() <= 1_000);
                            drop(reservation);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(budget.held(), 0);
    }
}
