//! Sends the pre-signed requests over a fixed set of keep-alive HTTP/1.1 connections.
//!
//! Every connection is opened before the clock starts; each then sends its next request as soon
//! as the previous answer is read (a closed loop), taking request numbers from one shared counter.
//! The only work per request is building the request head and reading the answer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Barrier;

use crate::mix::Mix;

/// A request that got no HTTP answer (connection refused, reset, timed out).
pub const NO_ANSWER: u16 = 0;

/// Where and how hard to send.
pub struct Target {
    pub address: SocketAddr,
    pub host: HeaderValue,
    pub connections: usize,
    pub duration: Duration,
    pub request_timeout: Duration,
}

/// What each request got. `answers[i]` is request `i`'s status (or [`NO_ANSWER`]); requests
/// past `sent` were not sent.
pub struct Outcome {
    pub sent: usize,
    pub answers: Vec<u16>,
    pub latencies_us: Vec<u32>,
    pub elapsed: Duration,
}

struct Answer {
    index: u32,
    status: u16,
    latency_us: u32,
}

pub async fn drive(mix: Arc<Mix>, target: &Target) -> anyhow::Result<Outcome> {
    let mut senders = Vec::with_capacity(target.connections);
    for _ in 0..target.connections {
        senders.push(
            connect(target.address)
                .await
                .with_context(|| format!("cannot open a connection to {}", target.address))?,
        );
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(target.connections + 1));
    let deadline = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut tasks = tokio::task::JoinSet::new();
    for sender in senders {
        let (mix, next, start, deadline) =
            (mix.clone(), next.clone(), start.clone(), deadline.clone());
        let (address, host, timeout) =
            (target.address, target.host.clone(), target.request_timeout);
        tasks.spawn(async move {
            start.wait().await;
            let deadline = *deadline.get().expect("set before the start");
            let mut sender = Some(sender);
            let mut answers = Vec::with_capacity(mix.sequence.len() / 16);
            loop {
                // The deadline is checked before a number is taken, so that every number
                // taken below the end is sent and the sent requests are exactly `0..sent`.
                if Instant::now() >= deadline {
                    break;
                }
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= mix.sequence.len() {
                    break;
                }
                let callback = mix.request(index);
                let request = Request::builder()
                    .method(Method::POST)
                    .uri("/webhooks/nen")
                    .header(HOST, host.clone())
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                    .header("x-hmac-signature", callback.signature.clone())
                    .body(Full::new(callback.body.clone()))
                    .expect("a valid request");
                let began = Instant::now();
                let status = match sender.as_mut() {
                    Some(open) => send(open, request, timeout).await,
                    None => None,
                };
                let latency_us = began.elapsed().as_micros().min(u32::MAX as u128) as u32;
                answers.push(Answer {
                    index: index as u32,
                    status: status.unwrap_or(NO_ANSWER),
                    latency_us,
                });
                if status.is_none() {
                    // The connection is unusable: open a new one, as a real sender would.
                    sender = connect(address).await.ok();
                }
            }
            answers
        });
    }
    deadline
        .set(Instant::now() + target.duration)
        .expect("set once");
    start.wait().await;
    let began = Instant::now();
    let mut per_connection = Vec::with_capacity(target.connections);
    while let Some(answers) = tasks.join_next().await {
        per_connection.push(answers.context("a connection task panicked")?);
    }
    let elapsed = began.elapsed();
    let sent: usize = per_connection.iter().map(Vec::len).sum();
    let mut answers = vec![NO_ANSWER; sent];
    let mut latencies_us = Vec::with_capacity(sent);
    for answer in per_connection.into_iter().flatten() {
        // Request numbers are handed out in order, so every number below `sent` was used.
        answers[answer.index as usize] = answer.status;
        latencies_us.push(answer.latency_us);
    }
    Ok(Outcome {
        sent,
        answers,
        latencies_us,
        elapsed,
    })
}

async fn connect(address: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// The answer's status once its body is read, or `None` when the connection failed.
async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Option<u16> {
    let exchange = async {
        sender.ready().await.ok()?;
        let response = sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        response.into_body().collect().await.ok()?;
        Some(status)
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}
