//! `GET /v1/runs/{message_id}?wait=<seconds>`: answering when the run turns terminal, instead
//! of being polled.
//!
//! A terminal run is answered at once. Otherwise the request parks (see `waiters`: no database
//! connection is held) until the run is woken, the wait ends, or the server starts draining,
//! then reads the run once more and answers it as it is then.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::query::QueryError;
use super::status::StatusRank;
use super::waiters::Waiters;
use crate::store::{Run, Store};

pub const MAX_WAIT_SECONDS: u64 = 60;

/// `wait` as given: absent or empty is no wait; else a whole number of seconds, 1 to 60.
pub fn parse_wait(text: Option<&str>) -> Result<Option<Duration>, QueryError> {
    match text {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse::<u64>()
            .ok()
            .filter(|seconds| (1..=MAX_WAIT_SECONDS).contains(seconds))
            .map(|seconds| Some(Duration::from_secs(seconds)))
            .ok_or_else(|| {
                QueryError::InvalidRequest(format!(
                    "wait must be a whole number of seconds from 1 to {MAX_WAIT_SECONDS}"
                ))
            }),
    }
}

/// The run once it is terminal, or as it is when `wait` ends or `draining` is cancelled.
pub async fn wait_for_run(
    store: &dyn Store,
    waiters: &Waiters,
    message_id: &str,
    wait: Duration,
    draining: &CancellationToken,
) -> Result<Run, QueryError> {
    let deadline = Instant::now() + wait;
    let waiter = match waiters.register(message_id) {
        Ok(waiter) => waiter,
        // No slot, but a run that needs no waiting is still answered.
        Err(full) => {
            return match store.get_run(message_id).await? {
                Some(run) if is_terminal(&run) => Ok(run),
                _ => Err(QueryError::TooManyWaiters(full.0)),
            };
        }
    };
    loop {
        let woken = waiter.woken();
        tokio::pin!(woken);
        // Registered before the read: a commit after it wakes this waiter.
        woken.as_mut().enable();
        let run = store.get_run(message_id).await?;
        let now = Instant::now();
        if run.as_ref().is_some_and(is_terminal) || now >= deadline || draining.is_cancelled() {
            return run.ok_or_else(|| QueryError::RunNotFound(message_id.to_owned()));
        }
        let pause = waiter.recheck_interval().min(deadline - now);
        tokio::select! {
            () = &mut woken => {}
            () = tokio::time::sleep(pause) => {}
            () = draining.cancelled() => {}
        }
    }
}

fn is_terminal(run: &Run) -> bool {
    StatusRank::of(&run.status).is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_one_to_sixty_whole_seconds() {
        assert_eq!(parse_wait(None).unwrap(), None);
        assert_eq!(parse_wait(Some("")).unwrap(), None);
        assert_eq!(parse_wait(Some("1")).unwrap(), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_wait(Some("60")).unwrap(),
            Some(Duration::from_secs(60))
        );
        for bad in [
            "0",
            "61",
            "-1",
            "1.5",
            "10s",
            "ten",
            " 5",
            "99999999999999999999",
        ] {
            let error = parse_wait(Some(bad)).unwrap_err();
            assert!(error.to_string().contains("wait"), "{bad}: {error}");
        }
    }
}
