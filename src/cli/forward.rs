//! `nen-relay forward status|failed|retry-failed|replay`: forwarding as an operator sees it,
//! asked of a running server over `/v1/forwarding` (README, "Forwarding").
//!
//! It talks to the server rather than to the database: the one way in is the bearer token (no
//! database credentials on an operator's machine), the server knows which targets are
//! configured, its wake reaches the delivery workers at once, and it works the same on both
//! stores.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};
use url::Url;

use super::server::ServerArgs;

/// The server did what was asked.
pub const EXIT_DONE: u8 = 0;
/// The server refused the request (unknown target, bad time, bad token: a 4xx), or no token was
/// given; the message says which.
pub const EXIT_REFUSED: u8 = 1;
/// No answer could be had: the server is not reachable, or failed (5xx). Worth retrying.
pub const EXIT_NO_ANSWER: u8 = 3;

/// Bounds a hung connection; every answer is one store query away.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct ForwardArgs {
    #[command(subcommand)]
    pub command: ForwardCommand,
    #[command(flatten)]
    pub server: ServerArgs,
    /// Print the server's JSON answer as it came, instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ForwardCommand {
    /// Every configured target's queue: pending, age of the oldest pending, failed, last error.
    Status,
    /// A target's failed messages, newest first.
    Failed {
        /// The target's name, as in [forward.<name>].
        target: String,
        /// Page size (1 to 500; the server's default is 50).
        #[arg(long)]
        limit: Option<u32>,
        /// The cursor the previous page printed.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Send every failed message of a target again (same webhook-id).
    RetryFailed {
        /// The target's name.
        target: String,
    },
    /// Send again every change committed in a window (same webhook-id).
    Replay {
        /// The target's name.
        target: String,
        /// Start of the window: an RFC 3339 time (2026-01-31T09:00:00Z), or a duration such as
        /// 2h, 30m or 1d meaning that long ago.
        #[arg(long, value_parser = parse_instant)]
        since: DateTime<Utc>,
        /// End of the window (exclusive), in the same forms; no end when absent.
        #[arg(long, value_parser = parse_instant)]
        until: Option<DateTime<Utc>>,
    },
}

/// Why a command did not get what it asked for.
#[derive(Debug)]
enum Failure {
    Refused(String),
    NoAnswer(String),
}

/// Runs `nen-relay forward ...`; prints the answer on stdout, anything else on stderr.
pub async fn run(args: ForwardArgs) -> ExitCode {
    match execute(&args).await {
        Ok(output) => {
            print!("{output}");
            ExitCode::from(EXIT_DONE)
        }
        Err(Failure::Refused(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_REFUSED)
        }
        Err(Failure::NoAnswer(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_NO_ANSWER)
        }
    }
}

async fn execute(args: &ForwardArgs) -> Result<String, Failure> {
    let token = args
        .server
        .token()
        .map_err(|error| Failure::Refused(format!("{error:#}")))?;
    let endpoint = |segments: &[&str]| {
        args.server
            .endpoint(
                ["v1", "forwarding"]
                    .into_iter()
                    .chain(segments.iter().copied()),
            )
            .map_err(|error| Failure::Refused(format!("{error:#}")))
    };
    let (method, url, body) = match &args.command {
        ForwardCommand::Status => (Method::GET, endpoint(&[])?, None),
        ForwardCommand::Failed {
            target,
            limit,
            cursor,
        } => {
            let mut url = endpoint(&[target, "failed"])?;
            if let Some(limit) = limit {
                url.query_pairs_mut()
                    .append_pair("limit", &limit.to_string());
            }
            if let Some(cursor) = cursor {
                url.query_pairs_mut().append_pair("cursor", cursor);
            }
            (Method::GET, url, None)
        }
        ForwardCommand::RetryFailed { target } => {
            (Method::POST, endpoint(&[target, "retry-failed"])?, None)
        }
        ForwardCommand::Replay {
            target,
            since,
            until,
        } => {
            let mut body = json!({ "since": rfc3339(*since) });
            if let Some(until) = until {
                body["until"] = json!(rfc3339(*until));
            }
            (Method::POST, endpoint(&[target, "replay"])?, Some(body))
        }
    };
    let answer = request(method, url, &token, body).await?;
    if args.json {
        return Ok(format!("{answer}\n"));
    }
    let parsed: Value = serde_json::from_str(&answer).map_err(|_| {
        Failure::NoAnswer(format!("the server answered what is not JSON: {answer}"))
    })?;
    Ok(match &args.command {
        ForwardCommand::Status => status_text(&parsed),
        ForwardCommand::Failed { target, .. } => failed_text(target, &parsed),
        ForwardCommand::RetryFailed { target } | ForwardCommand::Replay { target, .. } => {
            enqueued_text(target, &parsed)
        }
    })
}

/// One request; the answer's body on 2xx.
async fn request(
    method: Method,
    url: Url,
    token: &str,
    body: Option<Value>,
) -> Result<String, Failure> {
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|error| Failure::NoAnswer(format!("cannot build an HTTP client: {error}")))?;
    let mut request = client
        .request(method.clone(), url.clone())
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .map_err(|error| Failure::NoAnswer(format!("no answer from {url}: {error}")))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|error| Failure::NoAnswer(format!("reading the answer of {url}: {error}")))?;
    if status.is_success() {
        return Ok(text);
    }
    // The service's error bodies are {"error", "message"}; a proxy's may be anything.
    let reason = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|body| body["message"].as_str().map(str::to_owned))
        .unwrap_or(text);
    let message = format!("{method} {url} answered {status}: {reason}");
    Err(if status.is_client_error() {
        Failure::Refused(message)
    } else {
        Failure::NoAnswer(message)
    })
}

/// `--since` and `--until`: an RFC 3339 time, or a duration meaning that long before now.
fn parse_instant(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        format!("{text:?} is neither an RFC 3339 time (2026-01-31T09:00:00Z) nor a duration (2h)")
    })?;
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|ago| Utc::now().checked_sub_signed(ago))
        .ok_or_else(|| format!("{text:?} reaches too far back"))
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn status_text(answer: &Value) -> String {
    let targets = answer["targets"].as_array().cloned().unwrap_or_default();
    if targets.is_empty() {
        return "no forwarding target is configured\n".into();
    }
    let rows = targets
        .iter()
        .map(|target| {
            vec![
                text(&target["name"]),
                text(&target["url"]),
                text(&target["pending"]),
                target["oldest_pending_seconds"]
                    .as_f64()
                    .map(|seconds| {
                        humantime::format_duration(Duration::from_secs(seconds as u64)).to_string()
                    })
                    .unwrap_or_else(|| "-".into()),
                text(&target["failed"]),
                text(&target["last_error"]),
            ]
        })
        .collect();
    table(
        &["TARGET", "URL", "PENDING", "OLDEST", "FAILED", "LAST ERROR"],
        rows,
    )
}

fn failed_text(target: &str, answer: &Value) -> String {
    let messages = answer["messages"].as_array().cloned().unwrap_or_default();
    if messages.is_empty() {
        return format!("no failed messages for {target}\n");
    }
    let rows = messages
        .iter()
        .map(|message| {
            vec![
                text(&message["webhook_id"]),
                text(&message["type"]),
                text(&message["message_id"]),
                text(&message["committed_at"]),
                text(&message["attempts"]),
                text(&message["last_error"]),
            ]
        })
        .collect();
    let mut output = table(
        &[
            "WEBHOOK-ID",
            "TYPE",
            "RUN",
            "COMMITTED",
            "ATTEMPTS",
            "LAST ERROR",
        ],
        rows,
    );
    if let Some(cursor) = answer["next_cursor"].as_str() {
        let _ = writeln!(
            output,
            "more: nen-relay forward failed {target} --cursor {cursor}"
        );
    }
    output
}

fn enqueued_text(target: &str, answer: &Value) -> String {
    let count = answer["enqueued"].as_u64().unwrap_or_default();
    let noun = if count == 1 { "message" } else { "messages" };
    format!("{target}: {count} {noun} queued again\n")
}

/// A value on one line: strings bare, null as `-`.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) => text.replace(['\n', '\r', '\t'], " "),
        other => other.to_string(),
    }
}

/// Columns padded to their widest cell, the last one left ragged.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers
        .iter()
        .map(|header| header.chars().count())
        .collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header = headers.iter().map(|header| (*header).to_owned()).collect();
    let mut output = String::new();
    for row in std::iter::once(header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(column, cell)| {
                if column == last {
                    cell.clone()
                } else {
                    format!("{cell:<width$}", width = widths[column])
                }
            })
            .collect();
        let _ = writeln!(output, "{}", line.join("  "));
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_rfc3339_or_a_duration_ago() {
        assert_eq!(
            rfc3339(parse_instant("2026-01-31T10:00:00+01:00").unwrap()),
            "2026-01-31T09:00:00Z"
        );
        let before = Utc::now();
        let two_hours_ago = parse_instant("2h").unwrap();
        let after = Utc::now();
        let hours = chrono::Duration::hours(2);
        assert!(before - hours <= two_hours_ago && two_hours_ago <= after - hours);
        for bad in ["yesterday", "2026-01-31", "-2h", ""] {
            assert!(parse_instant(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_is_a_table_or_says_there_is_no_target() {
        assert_eq!(
            status_text(&json!({"targets": []})),
            "no forwarding target is configured\n"
        );
        let answer = json!({"targets": [
            {"name": "orders", "url": "https://orders.example/h", "pending": 3,
             "oldest_pending_seconds": 125.5, "failed": 0, "last_error": null},
            {"name": "b", "url": "https://b.example/", "pending": 0,
             "oldest_pending_seconds": null, "failed": 12, "last_error": "HTTP 500\nbody"},
        ]});
        assert_eq!(
            status_text(&answer),
            "TARGET  URL                       PENDING  OLDEST  FAILED  LAST ERROR\n\
             orders  https://orders.example/h  3        2m 5s   0       -\n\
             b       https://b.example/        0        -       12      HTTP 500 body\n"
        );
    }

    #[test]
    fn failed_pages_say_how_to_ask_for_the_next() {
        let answer = json!({"messages": [
            {"webhook_id": "msg_7", "type": "run.stuck", "message_id": "m-1",
             "committed_at": "2026-01-31T09:00:00Z", "attempts": 9, "last_error": "timeout"},
        ], "next_cursor": "ZjE6Nw"});
        let output = failed_text("orders", &answer);
        assert!(output.starts_with("WEBHOOK-ID  TYPE"), "{output}");
        assert!(output.contains("msg_7       run.stuck  m-1"), "{output}");
        assert!(
            output.ends_with("more: nen-relay forward failed orders --cursor ZjE6Nw\n"),
            "{output}"
        );
        assert_eq!(
            failed_text("orders", &json!({"messages": [], "next_cursor": null})),
            "no failed messages for orders\n"
        );
        assert_eq!(
            enqueued_text("orders", &json!({"enqueued": 1})),
            "orders: 1 message queued again\n"
        );
    }
}
