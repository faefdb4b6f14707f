//! The loss check: every callback answered 200 must be readable through the query API.
//!
//! For each run with an acknowledged callback: `GET /v1/runs/{id}` shows the furthest
//! acknowledged status, and `GET /v1/runs/{id}/events` holds exactly one event per acknowledged
//! `(message_id, status)`, whose `duplicates` counter covers every acknowledged repeat.

use std::time::Duration;

use anyhow::Context;
use futures_util::stream::{self, StreamExt};
use reqwest::Response;
use serde::Deserialize;

use crate::mix::Mix;

/// Runs checked, and what was wrong (both empty when nothing was lost).
pub struct Verdict {
    pub runs_checked: usize,
    pub acknowledged: usize,
    /// Runs that do not show what was acknowledged: lost or duplicated callbacks.
    pub problems: Vec<String>,
    /// Runs that could not be read (the server went away, a read failed): not proof of loss,
    /// but not proof of its absence either.
    pub unchecked: Vec<String>,
}

/// Why one run failed its check.
enum Failure {
    Mismatch(String),
    Unreadable(String),
}

#[derive(Deserialize)]
struct RunView {
    status: String,
}

#[derive(Deserialize)]
struct EventView {
    status: String,
    duplicates: i64,
}

#[derive(Deserialize)]
struct EventList {
    events: Vec<EventView>,
}

/// What one run should show: `(status, times acknowledged)` per distinct callback.
struct Expectation<'a> {
    message_id: &'a str,
    acknowledged: Vec<(&'static str, u32)>,
}

pub async fn verify(
    mix: &Mix,
    answers: &[u16],
    base_url: &str,
    token: &str,
    concurrency: usize,
    limit: Option<usize>,
) -> anyhow::Result<Verdict> {
    let mut acknowledged_per_callback = vec![0u32; mix.callbacks.len()];
    let mut acknowledged = 0;
    for (index, &status) in answers.iter().enumerate() {
        if status == 200 {
            acknowledged_per_callback[mix.sequence[index] as usize] += 1;
            acknowledged += 1;
        }
    }
    let mut per_run: Vec<Vec<(&'static str, u32)>> = vec![Vec::new(); mix.runs.len()];
    for (callback, &count) in mix.callbacks.iter().zip(&acknowledged_per_callback) {
        if count > 0 {
            per_run[callback.run as usize].push((callback.status, count));
        }
    }
    let mut expectations: Vec<Expectation> = mix
        .runs
        .iter()
        .zip(per_run)
        .filter(|(_, acknowledged)| !acknowledged.is_empty())
        .map(|(message_id, acknowledged)| Expectation {
            message_id,
            acknowledged,
        })
        .collect();
    if let Some(limit) = limit {
        // An even spread over the run, not just its start.
        let step = expectations.len().div_ceil(limit.max(1)).max(1);
        expectations = expectations.into_iter().step_by(step).collect();
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()?;
    let runs_checked = expectations.len();
    let failures: Vec<Failure> = stream::iter(expectations)
        .map(|expectation| {
            let client = &client;
            async move { check_run(client, base_url, token, &expectation).await }
        })
        .buffer_unordered(concurrency.max(1))
        .filter_map(|result| async move {
            match result {
                Ok(None) => None,
                Ok(Some(problem)) => Some(Failure::Mismatch(problem)),
                Err(error) => Some(Failure::Unreadable(format!("{error:#}"))),
            }
        })
        .collect()
        .await;
    let (mut problems, mut unchecked) = (Vec::new(), Vec::new());
    for failure in failures {
        match failure {
            Failure::Mismatch(problem) => problems.push(problem),
            Failure::Unreadable(problem) => unchecked.push(problem),
        }
    }
    Ok(Verdict {
        runs_checked,
        acknowledged,
        problems,
        unchecked,
    })
}

/// How far a status is in a run's life. A run's status only moves forward: `submitted`, then
/// `processing`, then any other status (terminal); so a run must show the furthest status that
/// was acknowledged. Written here, not taken from the service, so that the check is independent.
fn progress(status: &str) -> u8 {
    match status {
        "submitted" => 0,
        "processing" => 1,
        _ => 2,
    }
}

/// A read that the server may ask to repeat: a 503 (its read pool was busy for longer than the
/// acquire timeout, as 64 parallel reads on two cores can make it) is tried again after its
/// `Retry-After`, up to [`READ_ATTEMPTS`] times in all. Anything else is answered as it is.
async fn get(client: &reqwest::Client, url: &str, token: &str) -> reqwest::Result<Response> {
    let mut attempt = 1;
    loop {
        let response = client.get(url).bearer_auth(token).send().await?;
        if response.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE || attempt == READ_ATTEMPTS
        {
            return Ok(response);
        }
        let wait = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(1)
            .min(5);
        tokio::time::sleep(Duration::from_secs(wait)).await;
        attempt += 1;
    }
}

/// How many times a read answered 503 is sent in all.
const READ_ATTEMPTS: u32 = 5;

async fn check_run(
    client: &reqwest::Client,
    base_url: &str,
    token: &str,
    expected: &Expectation<'_>,
) -> anyhow::Result<Option<String>> {
    let id = expected.message_id;
    let run = get(client, &format!("{base_url}/v1/runs/{id}"), token)
        .await
        .with_context(|| format!("GET /v1/runs/{id}"))?;
    if run.status().is_server_error() || run.status() == reqwest::StatusCode::UNAUTHORIZED {
        anyhow::bail!("GET /v1/runs/{id} answered {}", run.status());
    }
    if !run.status().is_success() {
        return Ok(Some(format!(
            "run {id}: GET /v1/runs/{id} answered {} although a callback was acknowledged",
            run.status()
        )));
    }
    let run: RunView = run.json().await.context("a run in JSON")?;
    let furthest = expected
        .acknowledged
        .iter()
        .map(|(status, _)| *status)
        .max_by_key(|status| progress(status))
        .expect("only runs with an acknowledged callback are checked");
    if run.status != furthest {
        return Ok(Some(format!(
            "run {id}: status is {:?}, but {furthest:?} was acknowledged",
            run.status
        )));
    }
    let events = get(client, &format!("{base_url}/v1/runs/{id}/events"), token)
        .await
        .with_context(|| format!("GET /v1/runs/{id}/events"))?
        .error_for_status()?;
    let events: EventList = events.json().await.context("an event list in JSON")?;
    for &(status, times) in &expected.acknowledged {
        let stored: Vec<&EventView> = events
            .events
            .iter()
            .filter(|event| event.status == status)
            .collect();
        if stored.len() != 1 {
            return Ok(Some(format!(
                "run {id}: {} events with status {status:?}, expected exactly 1",
                stored.len()
            )));
        }
        if stored[0].duplicates < i64::from(times) - 1 {
            return Ok(Some(format!(
                "run {id}: {status:?} was acknowledged {times} times but counts {} duplicates",
                stored[0].duplicates
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    fn busy() -> ResponseTemplate {
        ResponseTemplate::new(503).insert_header("retry-after", "0")
    }

    #[tokio::test]
    async fn a_read_answered_503_is_sent_again_until_it_is_answered() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/runs/m-1"))
            .respond_with(busy())
            .up_to_n_times(2)
            .expect(2)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/runs/m-1"))
            .respond_with(ResponseTemplate::new(200))
            .expect(1)
            .mount(&server)
            .await;
        let url = format!("{}/v1/runs/m-1", server.uri());
        let response = get(&reqwest::Client::new(), &url, "token").await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);
    }

    #[tokio::test]
    async fn a_read_that_stays_unavailable_is_given_up_after_the_last_attempt() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(busy())
            .expect(u64::from(READ_ATTEMPTS))
            .mount(&server)
            .await;
        let url = format!("{}/v1/runs/m-1", server.uri());
        let response = get(&reqwest::Client::new(), &url, "token").await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn statuses_only_move_forward_to_any_terminal_one() {
        assert!(progress("submitted") < progress("processing"));
        for terminal in ["success", "failed", "timeout", "Processing"] {
            assert!(progress("processing") < progress(terminal), "{terminal}");
        }
    }
}
