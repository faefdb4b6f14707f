//! `nen-relay-bench`: a bounded load generator for nen-relay, with a loss check.
//!
//! It signs every callback before the clock starts (it shares the machine with the server), sends
//! them over a fixed set of keep-alive connections for a bounded time or count, prints
//! throughput and latency, and then checks through the query API that every callback answered
//! 200 was stored exactly once. Only loopback targets are accepted.
//!
//! It speaks to the service only over HTTP, as Nen and the service's clients do, and shares no
//! code with it.

mod driver;
mod mix;
mod signature;
mod verify;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use http::HeaderValue;
use serde_json::json;

use driver::{Target, NO_ANSWER};
use mix::Mix;

/// Most requests signed in advance when only `--duration` bounds the run.
const MAX_PRESIGNED: usize = 2_000_000;
/// Requests signed per second of `--duration`: above what one server on this kind of machine
/// answers, so that time, not the supply, ends the run.
const PRESIGNED_PER_SECOND: f64 = 80_000.0;

/// Drive signed callbacks at a nen-relay on this machine and check that none was lost.
#[derive(Debug, Clone, Parser)]
#[command(name = "nen-relay-bench", version)]
struct Args {
    /// Base URL of the server; must be loopback (127.0.0.1, localhost or [::1]).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Keep-alive connections, each sending its next request when the previous one is answered.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds to send for (the run also ends when --requests are sent).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Requests to send at most (signed in advance). Default: enough for --duration.
    #[arg(long)]
    requests: Option<usize>,
    /// Webhook secret to sign with. Default: the first of NEN_WEBHOOK_SECRETS.
    #[arg(long)]
    secret: Option<String>,
    /// Bearer token for the loss check. Default: the first of NEN_RELAY_API_TOKENS.
    #[arg(long)]
    token: Option<String>,
    /// Sign with a wrong secret: measures the 401 path (nothing is stored, nothing verified).
    #[arg(long)]
    bad_signatures: bool,
    /// Skip the loss check.
    #[arg(long)]
    no_verify: bool,
    /// Check at most this many runs (spread evenly) instead of all of them.
    #[arg(long)]
    verify_limit: Option<usize>,
    /// Seed of the callback mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A request not answered within this many milliseconds counts as unanswered.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Also print the figures as one JSON line (last line of the output).
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the reason, with its causes joined.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.connections > 0, "--connections must be positive");
    anyhow::ensure!(
        args.duration > 0.0 && args.duration <= 3600.0,
        "--duration must be between 0 and 3600 seconds"
    );
    let (base_url, address, host) = loopback_target(&args.url).await?;
    let secret = match (&args.secret, args.bad_signatures) {
        (Some(secret), false) => secret.clone(),
        (None, false) => {
            first_of("NEN_WEBHOOK_SECRETS").context("give --secret, or set NEN_WEBHOOK_SECRETS")?
        }
        // Any secret the server does not hold: the body is still hashed in full there.
        (_, true) => format!("not-the-secret-{}", uuid::Uuid::new_v4().simple()),
    };
    let verify = !args.no_verify && !args.bad_signatures;
    let token = match &args.token {
        Some(token) => Some(token.clone()),
        None => first_of("NEN_RELAY_API_TOKENS"),
    };
    if verify && token.is_none() {
        anyhow::bail!(
            "the loss check needs --token (or NEN_RELAY_API_TOKENS); or pass --no-verify"
        );
    }
    let requests = args.requests.unwrap_or_else(|| {
        ((args.duration * PRESIGNED_PER_SECOND) as usize).clamp(1, MAX_PRESIGNED)
    });

    let signing = Instant::now();
    let mix = Arc::new(Mix::build(requests, secret.as_bytes(), args.seed));
    drop(secret);
    eprintln!(
        "signed {} requests ({} runs) in {:.1} s; sending over {} connections to {base_url}",
        requests,
        mix.runs.len(),
        signing.elapsed().as_secs_f64(),
        args.connections
    );

    let target = Target {
        address,
        host,
        connections: args.connections,
        duration: Duration::from_secs_f64(args.duration),
        request_timeout: Duration::from_millis(args.timeout_ms),
    };
    let outcome = driver::drive(mix.clone(), &target).await?;

    let expected = if args.bad_signatures { 401 } else { 200 };
    let seconds = outcome.elapsed.as_secs_f64();
    let mut latencies = outcome.latencies_us.clone();
    latencies.sort_unstable();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        f64::from(latencies[rank - 1]) / 1000.0
    };
    let (p50, p99, p999, max) = (
        percentile(0.50),
        percentile(0.99),
        percentile(0.999),
        percentile(1.0),
    );
    let count =
        |wanted: &dyn Fn(u16) -> bool| outcome.answers.iter().filter(|&&s| wanted(s)).count();
    let as_expected = count(&|status| status == expected);
    let non_2xx = count(&|status| status != NO_ANSWER && !(200..300).contains(&status));
    let unanswered = count(&|status| status == NO_ANSWER);
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for &status in &outcome.answers {
        *by_status.entry(status).or_default() += 1;
    }
    let rate = as_expected as f64 / seconds;

    let mode = if args.bad_signatures {
        "bad-signatures"
    } else {
        "callbacks"
    };
    println!(
        "{mode}: {} connections, {:.1} s, {} requests sent",
        args.connections, seconds, outcome.sent
    );
    println!(
        "throughput: {rate:.0} answered {expected}/s ({as_expected} of {}); non-2xx: {non_2xx}; unanswered: {unanswered}",
        outcome.sent
    );
    println!("latency: p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms, max {max:.2} ms");
    if by_status.len() > 1 || !by_status.contains_key(&expected) {
        let summary: Vec<String> = by_status
            .iter()
            .map(|(status, n)| format!("{status}: {n}"))
            .collect();
        println!("answers by status (0 = no answer): {}", summary.join(", "));
    }

    let mut verdict = None;
    if verify {
        let checking = Instant::now();
        let result = verify::verify(
            &mix,
            &outcome.answers[..outcome.sent],
            &base_url,
            token.as_deref().unwrap_or_default(),
            args.connections.min(32),
            args.verify_limit,
        )
        .await?;
        if result.problems.is_empty() && result.unchecked.is_empty() {
            println!(
                "loss check: OK, {} acknowledged callbacks across {} runs checked, each stored exactly once, every run at its furthest acknowledged status ({:.1} s)",
                result.acknowledged,
                result.runs_checked,
                checking.elapsed().as_secs_f64()
            );
        }
        verdict = Some(result);
    }

    if args.json {
        let mut line = json!({
            "mode": mode,
            "connections": args.connections,
            "seconds": seconds,
            "sent": outcome.sent,
            "ok": as_expected,
            "rate": rate,
            "p50_ms": p50,
            "p99_ms": p99,
            "p999_ms": p999,
            "max_ms": max,
            "non_2xx": non_2xx,
            "unanswered": unanswered,
        });
        if let Some(verdict) = &verdict {
            line["verified_runs"] = json!(verdict.runs_checked);
            line["lost"] = json!(verdict.problems.len());
            line["unchecked"] = json!(verdict.unchecked.len());
        }
        println!("{line}");
    }

    if let Some(verdict) = verdict {
        for problem in verdict.problems.iter().take(20) {
            eprintln!("LOST: {problem}");
        }
        for problem in verdict.unchecked.iter().take(5) {
            eprintln!("UNCHECKED: {problem}");
        }
        anyhow::ensure!(
            verdict.problems.is_empty(),
            "LOSS CHECK FAILED: {} of {} runs checked do not show what was acknowledged \
             ({} more could not be read)",
            verdict.problems.len(),
            verdict.runs_checked,
            verdict.unchecked.len()
        );
        anyhow::ensure!(
            verdict.unchecked.is_empty(),
            "LOSS CHECK INCOMPLETE: {} of {} runs could not be read back (is the server still up?)",
            verdict.unchecked.len(),
            verdict.runs_checked
        );
    }
    anyhow::ensure!(
        as_expected > 0,
        "no request was answered {expected}; is the secret right and the server up?"
    );
    Ok(())
}

fn first_of(variable: &str) -> Option<String> {
    std::env::var(variable)
        .ok()?
        .split(',')
        .map(str::trim)
        .find(|item| !item.is_empty())
        .map(str::to_owned)
}

/// The base URL (without a trailing slash), the address to connect to and the `Host` header,
/// after making sure that the URL names this machine: load must never leave it.
async fn loopback_target(text: &str) -> anyhow::Result<(String, SocketAddr, HeaderValue)> {
    let url = url::Url::parse(text).with_context(|| format!("--url is not a URL: {text:?}"))?;
    anyhow::ensure!(url.scheme() == "http", "--url must be an http:// URL");
    let host = url.host_str().context("--url has no host")?;
    let allowed = matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1");
    anyhow::ensure!(
        allowed,
        "refusing to send load to {host}: only 127.0.0.1, localhost and [::1] are allowed"
    );
    let port = url.port_or_known_default().unwrap_or(80);
    let lookup_host = host.trim_start_matches('[').trim_end_matches(']');
    let address = tokio::net::lookup_host((lookup_host, port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .find(|address| address.ip().is_loopback())
        .with_context(|| format!("{host} does not resolve to a loopback address"))?;
    let base = format!("http://{host}:{port}");
    let header = HeaderValue::from_str(&format!("{host}:{port}"))?;
    Ok((base, address, header))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_loopback_targets_are_accepted() {
        assert!(loopback_target("http://127.0.0.1:8080").await.is_ok());
        assert!(loopback_target("http://[::1]:8080/").await.is_ok());
        for refused in [
            "http://10.0.0.1:8080",
            "http://example.com",
            "https://127.0.0.1:8080",
            "http://127.0.0.2:8080",
        ] {
            assert!(loopback_target(refused).await.is_err(), "{refused}");
        }
    }
}
