//! `nen-relay wait <message_id>`: blocks until a run is terminal, prints it, and says how it
//! ended in the exit code, so that a shell script can trigger, wait, and act.
//!
//! It asks `GET /v1/runs/{message_id}?wait=60` again and again (each answer comes as soon as
//! the run is terminal) until `--timeout`. An overloaded or restarting service (503, no
//! connection) is asked again after a second; a refused token or a bad request ends it at once.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::time::Instant;
use url::Url;

use super::server::ServerArgs;
use crate::runs::status::StatusRank;
use crate::runs::wait::MAX_WAIT_SECONDS;

/// The run is terminal with status `success`.
pub const EXIT_SUCCESS: u8 = 0;
/// The run is terminal with any other status (`failed`, `timeout`, ...).
pub const EXIT_NOT_SUCCESS: u8 = 1;
/// `--timeout` passed first.
pub const EXIT_TIMED_OUT: u8 = 2;
/// No answer could be had: bad token, bad request, a service that never answered.
pub const EXIT_ERROR: u8 = 3;

/// Pause before asking again after a 503 or a failed connection.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The run's message_id, as `POST /v1/runs` answered it.
    pub message_id: String,
    /// Give up after this long: `90s`, `10m`, `2h`.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    /// Terminal: the run's JSON.
    Terminal { success: bool, run: String },
    /// Not terminal in time: the last answer, if the run was known.
    TimedOut { last: Option<String> },
}

/// Runs `nen-relay wait`; prints the run on stdout, anything else on stderr.
pub async fn run(args: WaitArgs) -> ExitCode {
    match wait(&args).await {
        Ok(Ended::Terminal { success, run }) => {
            println!("{run}");
            ExitCode::from(if success {
                EXIT_SUCCESS
            } else {
                EXIT_NOT_SUCCESS
            })
        }
        Ok(Ended::TimedOut { last }) => {
            match last {
                Some(run) => {
                    println!("{run}");
                    eprintln!(
                        "run {} is not finished after {}",
                        args.message_id,
                        humantime::format_duration(args.timeout)
                    );
                }
                None => eprintln!(
                    "no run {} after {}",
                    args.message_id,
                    humantime::format_duration(args.timeout)
                ),
            }
            ExitCode::from(EXIT_TIMED_OUT)
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn wait(args: &WaitArgs) -> anyhow::Result<Ended> {
    let token = args.server.token()?;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + args.timeout;
    let mut last = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ok(Ended::TimedOut { last });
        }
        let seconds = remaining.as_secs().clamp(1, MAX_WAIT_SECONDS);
        let url = run_url(&args.server, &args.message_id, seconds)?;
        let answer = client
            .get(url.clone())
            .bearer_auth(&token)
            // The server answers by the end of the wait; this only bounds a hung connection.
            .timeout(Duration::from_secs(seconds + 30))
            .send()
            .await;
        let response = match answer {
            Ok(response) => response,
            Err(error) => {
                eprintln!("no answer from {url} ({error}); asking again");
                pause(deadline).await;
                continue;
            }
        };
        match response.status() {
            StatusCode::OK => {
                let run = response.text().await.context("reading the run")?;
                let status = serde_json::from_str::<Value>(&run)
                    .ok()
                    .and_then(|run| run["status"].as_str().map(str::to_owned))
                    .with_context(|| format!("{url} answered a run without a status: {run}"))?;
                if StatusRank::of(&status).is_terminal() {
                    return Ok(Ended::Terminal {
                        success: status == "success",
                        run,
                    });
                }
                last = Some(run);
            }
            // Not known yet: its first callback may still be on its way.
            StatusCode::NOT_FOUND => {}
            StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::BAD_GATEWAY
            | StatusCode::GATEWAY_TIMEOUT => pause(deadline).await,
            status => {
                let body = response.text().await.unwrap_or_default();
                anyhow::bail!("{url} answered {status}: {body}");
            }
        }
    }
}

/// `<base>/v1/runs/<message_id>?wait=<seconds>`, the id encoded as one path segment.
fn run_url(server: &ServerArgs, message_id: &str, seconds: u64) -> anyhow::Result<Url> {
    let mut url = server.endpoint(["v1", "runs", message_id])?;
    url.query_pairs_mut()
        .append_pair("wait", &seconds.to_string());
    Ok(url)
}

async fn pause(deadline: Instant) {
    tokio::time::sleep_until(deadline.min(Instant::now() + RETRY_PAUSE)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_url_encodes_the_id_as_one_segment() {
        let server = |url: &str| ServerArgs {
            url: Url::parse(url).unwrap(),
            token: None,
        };
        assert_eq!(
            run_url(&server("http://127.0.0.1:8080"), "a/b c", 60)
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8080/v1/runs/a%2Fb%20c?wait=60"
        );
        assert_eq!(
            run_url(&server("https://relay.example/prefix/"), "m-1", 5)
                .unwrap()
                .as_str(),
            "https://relay.example/prefix/v1/runs/m-1?wait=5"
        );
    }
}
