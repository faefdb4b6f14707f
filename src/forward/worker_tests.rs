//! The delivery worker against the in-memory outbox (`fake`) and a real receiving HTTP server
//! that checks every signature with the official Standard Webhooks library.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State as Extract;
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::fake::{FakeOutbox, State};
use super::wake::WorkerLink;
use super::{prune, send, stuck, Backoff, OutboxSource, Target, Worker, WorkerSettings};
use crate::config::TargetSettings;
use crate::runs::stuck::StuckRule;
use crate::store::AttemptOutcome;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const TARGET: &str = "orders";
/// A bound on each test, should the worker never get there: a failure, never a wait.
const LIMIT: Duration = Duration::from_secs(30);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    webhook_id: String,
    body: serde_json::Value,
    verified: bool,
    user_agent: String,
    content_type: String,
}

#[derive(Default)]
struct Receiver {
    received: Mutex<Vec<Received>>,
    /// Statuses to answer, one per request, before answering 200 for good.
    answers: Mutex<VecDeque<u16>>,
    /// Answer 500 to everything.
    always_fail: bool,
}

async fn receive(
    Extract(receiver): Extract<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let verified = standardwebhooks::Webhook::new(SECRET)
        .unwrap()
        .verify(&body, &headers)
        .is_ok();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    receiver.received.lock().unwrap().push(Received {
        webhook_id: header("webhook-id"),
        body: serde_json::from_slice(&body).unwrap_or_default(),
        verified,
        user_agent: header("user-agent"),
        content_type: header("content-type"),
    });
    if receiver.always_fail {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let answer = receiver.answers.lock().unwrap().pop_front().unwrap_or(200);
    StatusCode::from_u16(answer).unwrap()
}

async fn serve(listener: TcpListener, receiver: Arc<Receiver>) {
    let app = axum::Router::new()
        .route("/hooks", axum::routing::post(receive))
        .with_state(receiver);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

async fn receiver(receiver: Receiver) -> (Arc<Receiver>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let receiver = Arc::new(receiver);
    serve(listener, receiver.clone()).await;
    (receiver, address)
}

fn settings() -> WorkerSettings {
    WorkerSettings {
        concurrency: 4,
        lease: Duration::from_secs(60),
        // Long: the tests must never depend on the safety-net poll.
        poll_interval: Duration::from_secs(3600),
        max_age: Duration::from_secs(3600),
        backoff: Backoff {
            base: Duration::from_millis(5),
            cap: Duration::from_millis(20),
        },
    }
}

struct Running {
    stop: CancellationToken,
    wake: Arc<Notify>,
    handle: JoinHandle<()>,
}

fn start(fake: &Arc<FakeOutbox>, address: SocketAddr, settings: WorkerSettings) -> Running {
    let target = Target::from_settings(
        TARGET,
        &TargetSettings {
            url: Some(format!("http://{address}/hooks")),
            secret: Some(SecretString::from(SECRET)),
            allow_http: false,
        },
        false,
    )
    .unwrap();
    let link = WorkerLink::claims_only(settings.concurrency);
    let wake = link.wake.clone();
    let outbox: Arc<dyn OutboxSource> = fake.clone();
    let worker = Worker {
        target,
        outbox,
        client: send::client(Duration::from_secs(10)).unwrap(),
        settings,
        link,
    };
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    Running { stop, wake, handle }
}

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future)
        .await
        .expect("the worker got there")
}

fn settled(ids: &[i64]) -> impl Fn(&super::fake::Inner) -> bool + '_ {
    move |inner| {
        ids.iter()
            .all(|id| inner.messages[(*id - 1) as usize].state != State::Pending)
    }
}

#[tokio::test]
async fn messages_are_delivered_signed_and_in_order_per_run() {
    let (receiver, address) = receiver(Receiver::default()).await;
    let fake = Arc::new(FakeOutbox::default());
    let now = Utc::now();
    let mut ids = Vec::new();
    for _change in 0..3 {
        for run in ["a", "b", "c", "d", "e"] {
            ids.push(fake.push(TARGET, run, now));
        }
    }
    let running = start(&fake, address, settings());
    within(fake.wait_for(settled(&ids))).await;
    running.stop.cancel();
    within(running.handle).await.unwrap();

    assert!(fake.with(|inner| inner
        .messages
        .iter()
        .all(|stored| stored.state == State::Delivered
            && stored.outcomes == [AttemptOutcome::Delivered])));
    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(received.len(), ids.len());
    for request in &received {
        assert!(request.verified, "{request:?}");
        assert_eq!(request.body["type"], "run.status_changed");
        assert!(request.user_agent.starts_with("nen-relay/"));
        assert_eq!(request.content_type, "application/json");
    }
    for run in ["a", "b", "c", "d", "e"] {
        let seqs: Vec<_> = received
            .iter()
            .filter(|request| request.body["data"]["message_id"] == run)
            .map(|request| request.body["data"]["seq"].as_i64().unwrap())
            .collect();
        assert_eq!(seqs.len(), 3);
        assert!(
            seqs.windows(2).all(|pair| pair[0] < pair[1]),
            "{run}: {seqs:?}"
        );
    }
    // Every claim leased to the same owner for forward.lease, never more than the room left.
    let leases = fake.with(|inner| inner.leases.clone());
    assert!(leases
        .iter()
        .all(|(lease, claimed_at)| lease.owner == leases[0].0.owner
            && lease.until - *claimed_at == chrono::Duration::seconds(60)));
}

#[tokio::test]
async fn refused_messages_are_retried_with_the_same_webhook_id() {
    let (receiver, address) = receiver(Receiver {
        answers: Mutex::new(VecDeque::from([500, 503, 404])),
        ..Receiver::default()
    })
    .await;
    let fake = Arc::new(FakeOutbox::default());
    let id = fake.push(TARGET, "a", Utc::now());
    let running = start(&fake, address, settings());
    within(fake.wait_for(settled(&[id]))).await;
    running.stop.cancel();

    let outcomes = fake.with(|inner| inner.messages[0].outcomes.clone());
    assert_eq!(outcomes.len(), 4);
    assert_eq!(outcomes[3], AttemptOutcome::Delivered);
    let errors: Vec<_> = outcomes[..3]
        .iter()
        .map(|outcome| match outcome {
            AttemptOutcome::Retry { error, .. } => error.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(errors[0].starts_with("HTTP 500"), "{errors:?}");
    assert!(errors[1].starts_with("HTTP 503"), "{errors:?}");
    assert!(errors[2].starts_with("HTTP 404"), "{errors:?}");
    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(received.len(), 4);
    assert!(received
        .iter()
        .all(|request| request.webhook_id == "msg_1" && request.verified));
}

#[tokio::test]
async fn a_target_that_is_down_gets_the_message_once_it_is_up() {
    // A port nobody listens on: connections are refused until the receiver binds it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let fake = Arc::new(FakeOutbox::default());
    let id = fake.push(TARGET, "a", Utc::now());
    let running = start(&fake, address, settings());
    within(fake.wait_for(|inner| inner.messages[0].outcomes.len() >= 2)).await;
    let outcomes = fake.with(|inner| inner.messages[0].outcomes.clone());
    for outcome in &outcomes {
        match outcome {
            AttemptOutcome::Retry { error, .. } => {
                assert!(error.starts_with("cannot connect"), "{error}");
                assert!(!error.contains("127.0.0.1"), "no URL in errors: {error}");
            }
            other => panic!("{other:?}"),
        }
    }

    let receiver = Arc::new(Receiver::default());
    serve(TcpListener::bind(address).await.unwrap(), receiver.clone()).await;
    within(fake.wait_for(settled(&[id]))).await;
    running.stop.cancel();
    assert_eq!(fake.with(|inner| inner.messages[0].state), State::Delivered);
    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    assert!(received[0].verified);
}

#[tokio::test]
async fn a_message_past_its_maximum_age_is_kept_as_failed() {
    let (receiver, address) = receiver(Receiver {
        always_fail: true,
        ..Receiver::default()
    })
    .await;
    let fake = Arc::new(FakeOutbox::default());
    // Queued two hours ago, with an hour to live: the first refusal is the last attempt.
    let id = fake.push(TARGET, "a", Utc::now() - chrono::Duration::hours(2));
    let running = start(&fake, address, settings());
    within(fake.wait_for(settled(&[id]))).await;
    running.stop.cancel();
    let (state, outcomes) =
        fake.with(|inner| (inner.messages[0].state, inner.messages[0].outcomes.clone()));
    assert_eq!(state, State::Failed);
    assert!(
        matches!(&outcomes[..], [AttemptOutcome::Failed { error }] if error.starts_with("HTTP 500")),
        "{outcomes:?}"
    );
    assert_eq!(receiver.received.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_message_that_cannot_be_sent_is_failed_at_once() {
    let (receiver, address) = receiver(Receiver::default()).await;
    let fake = Arc::new(FakeOutbox::default());
    let id = fake.push(TARGET, "a", Utc::now());
    fake.inner.lock().unwrap().messages[0].message.run = "{not json".into();
    let running = start(&fake, address, settings());
    within(fake.wait_for(settled(&[id]))).await;
    running.stop.cancel();
    assert_eq!(fake.with(|inner| inner.messages[0].state), State::Failed);
    assert!(receiver.received.lock().unwrap().is_empty());
}

/// Idle, the worker asks the store once, then waits for a wake (or a due time, or the poll
/// interval, an hour here): however often the runtime turns, no further call.
#[tokio::test(flavor = "current_thread")]
async fn an_idle_worker_does_not_poll() {
    let fake = Arc::new(FakeOutbox::default());
    let running = start(&fake, "127.0.0.1:9".parse().unwrap(), settings());
    let asked = |times: u32| {
        let fake = fake.clone();
        async move {
            fake.wait_for(|inner| inner.calls.claim >= times && inner.calls.next_due >= times)
                .await
        }
    };
    within(asked(1)).await;
    // On one thread, each yield lets the worker run: a busy loop would call again here.
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(fake.calls().claim, 1);
    assert_eq!(fake.calls().next_due, 1);
    // A wake: one more look, at once, and idle again.
    running.wake.notify_one();
    within(asked(2)).await;
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(fake.calls().claim, 2);
    assert_eq!(fake.calls().next_due, 2);
    assert_eq!(fake.calls().finish, 0);
    running.stop.cancel();
    within(running.handle).await.unwrap();
}

#[tokio::test]
async fn stuck_runs_are_queued_until_a_batch_comes_back_short() {
    let fake = FakeOutbox::default();
    fake.inner.lock().unwrap().stuck_answers = VecDeque::from([500, 500, 7, 99]);
    let queued = stuck::queue_stuck(&fake, StuckRule::new(Duration::from_secs(3600)), Utc::now())
        .await
        .unwrap();
    assert_eq!(queued, 1007);
    assert_eq!(fake.with(|inner| inner.stuck_answers.clone()), [99]);
}

#[tokio::test]
async fn pruning_goes_on_until_a_batch_comes_back_short() {
    let fake = FakeOutbox::default();
    fake.inner.lock().unwrap().prune_answers = VecDeque::from([1000, 1000, 0, 5]);
    assert_eq!(prune::prune(&fake, Utc::now()).await.unwrap(), 2000);
    assert_eq!(fake.with(|inner| inner.prune_answers.clone()), [5]);
}
