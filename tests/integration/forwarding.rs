//! Forwarding end to end: the real app with a target, callbacks in, signed messages out to a
//! receiver that verifies each with the official Standard Webhooks library (SPEC, "Forwarding
//! to your systems").

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::on_both_backends;
use crate::support::app::callback;
use crate::support::metrics::sample;
use crate::support::stored::set_updated_at;
use crate::support::{TestApp, TestDatabase};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// A bound on each wait, should nothing come: a failure, never a pause.
const LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Received {
    webhook_id: String,
    body: Value,
    verified: bool,
    /// The sender's end of the connection the message came over.
    peer: SocketAddr,
}

#[derive(Default)]
struct Receiver {
    received: Mutex<Vec<Received>>,
    /// Statuses answered first, one per request; then 200.
    answers: Mutex<VecDeque<u16>>,
    /// The body of every answer.
    reply: String,
    arrived: Notify,
}

impl Receiver {
    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `count` requests were received.
    async fn wait_for(&self, count: usize) -> Vec<Received> {
        self.wait_until(|received| received.len() >= count).await
    }

    /// Waits until what was received satisfies `done`.
    async fn wait_until(&self, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        tokio::time::timeout(LIMIT, async {
            loop {
                let arrived = self.arrived.notified();
                tokio::pin!(arrived);
                arrived.as_mut().enable();
                let received = self.received();
                if done(&received) {
                    return received;
                }
                arrived.await;
            }
        })
        .await
        .expect("the messages arrive")
    }
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let verified = standardwebhooks::Webhook::new(SECRET)
        .unwrap()
        .verify(&body, &headers)
        .is_ok();
    let webhook_id = headers
        .get("webhook-id")
        .and_then(|id| id.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let answer = receiver.answers.lock().unwrap().pop_front().unwrap_or(200);
    receiver.received.lock().unwrap().push(Received {
        webhook_id,
        body: serde_json::from_slice(&body).unwrap_or_default(),
        verified,
        peer,
    });
    receiver.arrived.notify_waiters();
    (
        StatusCode::from_u16(answer).unwrap(),
        receiver.reply.clone(),
    )
}

async fn start_receiver(answers: &[u16]) -> (Arc<Receiver>, SocketAddr) {
    start_receiver_replying(answers, String::new()).await
}

async fn start_receiver_replying(answers: &[u16], reply: String) -> (Arc<Receiver>, SocketAddr) {
    let receiver = Arc::new(Receiver {
        answers: Mutex::new(answers.iter().copied().collect()),
        reply,
        ..Receiver::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hooks", axum::routing::post(receive))
        .with_state(receiver.clone());
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (receiver, address)
}

async fn app_forwarding_to(db: TestDatabase, address: SocketAddr) -> TestApp {
    app_forwarding_with(db, address, &[]).await
}

async fn app_forwarding_with(
    db: TestDatabase,
    address: SocketAddr,
    more: &[(&str, &str)],
) -> TestApp {
    TestApp::spawn_with(db, |variables| {
        variables.insert(
            "NEN_RELAY_FORWARD__ORDERS__URL".into(),
            format!("http://{address}/hooks"),
        );
        variables.insert("NEN_RELAY_FORWARD__ORDERS__SECRET".into(), SECRET.into());
        for (name, value) in more {
            variables.insert((*name).into(), (*value).into());
        }
    })
    .await
}

async fn every_change_is_forwarded_signed_and_in_order(db: TestDatabase) {
    let (receiver, address) = start_receiver(&[]).await;
    let app = app_forwarding_to(db, address).await;
    app.deliver_ok(&callback("m-1", "processing", json!({})))
        .await;
    app.deliver_ok(&callback("m-2", "processing", json!({})))
        .await;
    app.deliver_ok(&callback("m-1", "success", json!({"result": {"ok": true}})))
        .await;
    // A duplicate moves nothing: no message.
    app.deliver_ok(&callback("m-1", "success", json!({"result": {"ok": true}})))
        .await;
    let received = receiver.wait_for(3).await;
    assert!(
        received.iter().all(|message| message.verified),
        "{received:?}"
    );
    assert!(received
        .iter()
        .all(|message| message.body["type"] == "run.status_changed"));
    let statuses = |run: &str| -> Vec<String> {
        received
            .iter()
            .filter(|message| message.body["data"]["message_id"] == run)
            .map(|message| message.body["data"]["status"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(statuses("m-1"), ["processing", "success"]);
    assert_eq!(statuses("m-2"), ["processing"]);
    let mut ids: Vec<_> = received.iter().map(|m| m.webhook_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "one webhook-id per change");
    // The last message of m-1 shows the run as the API does.
    let last = received
        .iter()
        .rev()
        .find(|message| message.body["data"]["message_id"] == "m-1")
        .unwrap();
    assert_eq!(last.body["data"], app.run("m-1").await);
    // m-1's first message was recorded before its second was claimed, so at least it counts.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        sample(
            &metrics,
            "nen_relay_forward_deliveries_total",
            &[("target", "orders"), ("outcome", "delivered")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
    assert_eq!(receiver.received().len(), 3, "the duplicate sent nothing");
}

async fn a_refusing_target_gets_the_message_again_with_the_same_id(db: TestDatabase) {
    let (receiver, address) = start_receiver(&[500, 503]).await;
    let app = app_forwarding_to(db, address).await;
    app.deliver_ok(&callback("m-1", "processing", json!({})))
        .await;
    // Retries after about 1 s and 2 s (the backoff).
    let received = receiver.wait_for(3).await;
    assert!(received.iter().all(|message| message.verified));
    assert!(received
        .iter()
        .all(|message| message.webhook_id == received[0].webhook_id));
    assert!(received
        .iter()
        .all(|message| message.body == received[0].body));
}

/// Messages queued without a wake (here by the store call the stuck task makes, called
/// directly so that the test need not wait for its 30 s tick) go out at the next poll.
async fn a_stuck_run_goes_out_once_as_run_stuck(db: TestDatabase) {
    let (receiver, address) = start_receiver(&[]).await;
    let app = app_forwarding_with(
        db,
        address,
        &[("NEN_RELAY_FORWARD__POLL_INTERVAL", "100ms")],
    )
    .await;
    app.deliver_ok(&callback("m-1", "processing", json!({})))
        .await;
    set_updated_at(&app.db, "m-1", Utc::now() - chrono::Duration::hours(2)).await;
    let now = Utc::now();
    let changed_before = now - chrono::Duration::hours(1);
    let outbox = app.store.outbox();
    assert_eq!(
        outbox
            .queue_stuck_runs(changed_before, 500, now)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        outbox
            .queue_stuck_runs(changed_before, 500, now)
            .await
            .unwrap(),
        0,
        "once per stuck spell"
    );
    let is_stuck = |message: &Received| message.body["type"] == "run.stuck";
    let received = receiver
        .wait_until(|received| received.iter().any(is_stuck))
        .await;
    let stuck: Vec<_> = received.iter().filter(|m| is_stuck(m)).collect();
    assert_eq!(stuck.len(), 1);
    assert!(stuck[0].verified);
    assert_eq!(stuck[0].body["data"]["message_id"], "m-1");
    assert_eq!(stuck[0].body["data"]["stuck"], true);
    assert!(stuck[0].webhook_id.starts_with("msg_"));
}

/// A target that answers with a body (a page, an echo of the message) keeps its connection:
/// each answer is read to its end, so the next message goes over the same connection instead
/// of a new one (and, to an https target, a new TLS handshake). Left unread, a 30 kB answer
/// closed the connection after every message.
async fn a_target_answering_with_a_body_keeps_its_connection(db: TestDatabase) {
    const MESSAGES: usize = 8;
    let (receiver, address) = start_receiver_replying(&[], "x".repeat(30_000)).await;
    // One send at a time, so that one connection can carry them all.
    let app = app_forwarding_with(db, address, &[("NEN_RELAY_FORWARD__CONCURRENCY", "1")]).await;
    for run in 0..MESSAGES {
        app.deliver_ok(&callback(&format!("m-{run}"), "processing", json!({})))
            .await;
    }
    let received = receiver.wait_for(MESSAGES).await;
    assert!(received.iter().all(|message| message.verified));
    let connections: HashSet<SocketAddr> = received.iter().map(|message| message.peer).collect();
    // One when every answer is read; a pool may open another when a send checks out a
    // connection just before the last one is back, so some slack.
    assert!(
        connections.len() <= MESSAGES / 2,
        "{} connections for {MESSAGES} messages",
        connections.len()
    );
}

on_both_backends!(
    a_target_answering_with_a_body_keeps_its_connection,
    a_stuck_run_goes_out_once_as_run_stuck,
    every_change_is_forwarded_signed_and_in_order,
    a_refusing_target_gets_the_message_again_with_the_same_id,
);
