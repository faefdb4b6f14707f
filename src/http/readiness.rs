//! The store check behind `/readyz`, cached briefly: however many callers ask at once, the store
//! is pinged at most once per `READY_CACHE_FOR`, so a flood of `/readyz` cannot crowd the pool
//! that callbacks are written through. From the shutdown signal on, it answers "not ready"
//! without asking the store, so that load balancers stop sending before the listener closes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::store::Store;

/// Readiness must answer quickly even when the database hangs.
pub const READY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one ping's result answers every `/readyz`.
pub const READY_CACHE_FOR: Duration = Duration::from_secs(1);

type Ping = dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync;

/// Shared by every `/readyz` caller of one router.
pub struct Readiness {
    ping: Box<Ping>,
    cache_for: Duration,
    /// The last result and when it was known. Held across the ping, so that callers arriving
    /// meanwhile wait for its result instead of pinging too.
    last: Mutex<Option<(Instant, Result<(), String>)>>,
    shutting_down: AtomicBool,
}

impl Readiness {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_ping(READY_CACHE_FOR, move || {
            let store = store.clone();
            Box::pin(async move {
                store
                    .ping()
                    .await
                    .map_err(|error| format!("store: {error}"))
            })
        })
    }

    /// With any check; `cache_for` is how long its result is reused.
    pub fn with_ping<F, Fut>(cache_for: Duration, ping: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Self {
            ping: Box::new(move || Box::pin(ping())),
            cache_for,
            last: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// From now on, the service is not ready, whatever the store says.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// `Ok` when the store answered its last ping, else why not. Pings only when the cached
    /// result is older than `cache_for`; failures and timeouts are cached too.
    pub async fn check(&self) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = last.as_ref() {
            if at.elapsed() < self.cache_for {
                return result.clone();
            }
        }
        let result = match tokio::time::timeout(READY_TIMEOUT, (self.ping)()).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "store did not answer within {} s",
                READY_TIMEOUT.as_secs()
            )),
        };
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counting(cache_for: Duration, answer: Result<(), String>) -> (Readiness, Arc<AtomicUsize>) {
        let pings = Arc::new(AtomicUsize::new(0));
        let counter = pings.clone();
        let readiness = Readiness::with_ping(cache_for, move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            async move {
                // Let the other callers arrive while this ping is still out.
                tokio::task::yield_now().await;
                answer
            }
        });
        (readiness, pings)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_checks_share_one_ping() {
        let (readiness, pings) = counting(Duration::from_secs(3600), Ok(()));
        let readiness = Arc::new(readiness);
        let checks = (0..200).map(|_| {
            let readiness = readiness.clone();
            tokio::spawn(async move { readiness.check().await })
        });
        for result in futures::future::join_all(checks).await {
            assert_eq!(result.unwrap(), Ok(()));
        }
        assert_eq!(pings.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failure_is_shared_too() {
        let (readiness, pings) = counting(Duration::from_secs(3600), Err("down".into()));
        for _ in 0..5 {
            assert_eq!(readiness.check().await, Err("down".into()));
        }
        assert_eq!(pings.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_expired_result_is_checked_again() {
        let (readiness, pings) = counting(Duration::ZERO, Ok(()));
        for _ in 0..3 {
            assert_eq!(readiness.check().await, Ok(()));
        }
        assert_eq!(pings.load(Ordering::SeqCst), 3);
    }
}
