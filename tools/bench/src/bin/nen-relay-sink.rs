//! `nen-relay-sink`: a forwarding target that answers 204 at once, for measuring what forwarding
//! costs. It checks no signature (the fault scripts do, with an independent library): it only
//! counts messages and measures the lag from each change's commit (the envelope's `timestamp`)
//! to its arrival. `GET /stats` answers `{"messages", "lag_p50_ms", "lag_p99_ms", "lag_max_ms"}`.
//! Listens on 127.0.0.1 only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(name = "nen-relay-sink", version)]
struct Args {
    /// Port on 127.0.0.1.
    #[arg(long)]
    port: u16,
}

#[derive(Default)]
struct Stats {
    /// Lag of every message, in milliseconds.
    lags_ms: Vec<f64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], args.port))).await?;
    let stats = Arc::new(Mutex::new(Stats::default()));
    loop {
        let (stream, _) = listener.accept().await?;
        let stats = stats.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| handle(request, stats.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    request: Request<Incoming>,
    stats: Arc<Mutex<Stats>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() == hyper::Method::GET {
        let mut lags = stats.lock().expect("stats lock").lags_ms.clone();
        lags.sort_by(f64::total_cmp);
        let at = |q: f64| {
            lags.get(((lags.len() as f64 * q) as usize).min(lags.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        let body = serde_json::json!({
            "messages": lags.len(),
            "lag_p50_ms": at(0.5),
            "lag_p99_ms": at(0.99),
            "lag_max_ms": lags.last().copied().unwrap_or(0.0),
        });
        return Ok(Response::new(Full::new(Bytes::from(body.to_string()))));
    }
    let arrived = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let body = request
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    if let Some(committed) = committed_at(&body) {
        let lag_ms = ((arrived - committed) * 1000.0).max(0.0);
        stats.lock().expect("stats lock").lags_ms.push(lag_ms);
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = hyper::StatusCode::NO_CONTENT;
    Ok(response)
}

/// The envelope's `timestamp` (RFC 3339), as Unix seconds.
fn committed_at(body: &[u8]) -> Option<f64> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        timestamp: String,
    }
    let envelope: Envelope = serde_json::from_slice(body).ok()?;
    parse_rfc3339(&envelope.timestamp)
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+00:00)`, UTC only: what nen-relay writes.
fn parse_rfc3339(text: &str) -> Option<f64> {
    let text = text
        .strip_suffix('Z')
        .or_else(|| text.strip_suffix("+00:00"))?;
    let (date, time) = text.split_once('T')?;
    let mut date = date.split('-').map(|p| p.parse::<i64>());
    let (year, month, day) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let mut time = time.split(':');
    let (hour, minute) = (
        time.next()?.parse::<i64>().ok()?,
        time.next()?.parse::<i64>().ok()?,
    );
    let second = time.next()?.parse::<f64>().ok()?;
    // Days since 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hour * 3600 + minute * 60) as f64 + second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_commit_time_of_an_envelope() {
        let body =
            br#"{"type":"run.status_changed","timestamp":"2026-12-03T11:27:41.5Z","data":{}}"#;
        assert_eq!(committed_at(body), Some(1_796_297_261.5));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00+00:00"), Some(0.0));
        assert_eq!(committed_at(b"not json"), None);
    }
}
