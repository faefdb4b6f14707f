//! The forwarding outbox's operations (`Outbox`), checked the same way on every backend: claims
//! in order and per run, leases, outcomes, the queue, the failed list, retry-failed, replay,
//! stuck runs and pruning.
//!
//! Messages are written straight into `forward_outbox` (`insert`), so that these tests hold
//! whatever writes them when a run changes. Times are fixed instants (`at`): no clock.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use nen_relay::store::{
    self, AttemptOutcome, FinishedAttempt, Lease, OutboxMessage, Store, StoreOptions,
};
use secrecy::SecretString;
use serde_json::{json, Value};
use sqlx::Connection;
use tokio::sync::Barrier;
use uuid::Uuid;

use crate::on_both_backends;
use crate::support::app::callback;
use crate::support::store_fixtures::{at, delivery, open};
use crate::support::{Backend, TestDatabase};

const T: &str = "ours";

/// A pending message of `target` for the run `message_id`, committed and queued at
/// `at(committed)`, due at `at(due)`. Answers its id.
async fn insert(
    db: &TestDatabase,
    target: &str,
    message_id: &str,
    committed: i64,
    due: i64,
) -> i64 {
    let run = json!({"message_id": message_id, "committed": committed}).to_string();
    let sql = "insert into forward_outbox (target, message_id, event_type, run, committed_at,
                                           queued_at, next_attempt_at)
               values ($1, $2, 'run.status_changed', $3, $4, $4, $5) returning id";
    match db.backend {
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(sql)
                .bind(target)
                .bind(message_id)
                .bind(run)
                .bind(at(committed))
                .bind(at(due))
                .fetch_one(&mut connection)
                .await
                .unwrap()
        }
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(sql)
                .bind(target)
                .bind(message_id)
                .bind(run)
                .bind(text(at(committed)))
                .bind(text(at(due)))
                .fetch_one(&mut connection)
                .await
                .unwrap()
        }
    }
}

/// The store's one fixed-width UTC form of times on SQLite.
fn text(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string()
}

/// A message as stored, for what the `Outbox` API does not show.
#[derive(Debug, PartialEq)]
struct Stored {
    state: String,
    attempts: i32,
    last_error: Option<String>,
    leased: bool,
    /// `queued_at` and `next_attempt_at`, as the store's fixed-width text.
    queued_at: String,
    next_attempt_at: String,
}

async fn stored(db: &TestDatabase, id: i64) -> Stored {
    type Row = (String, i32, Option<String>, bool, String, String);
    let row: Row = match db.backend {
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
            let (state, attempts, last_error, leased, queued_at, next_attempt_at): (
                String,
                i32,
                Option<String>,
                bool,
                DateTime<Utc>,
                DateTime<Utc>,
            ) = sqlx::query_as(
                "select state, attempts, last_error, lease_owner is not null, queued_at,
                        next_attempt_at
                 from forward_outbox where id = $1",
            )
            .bind(id)
            .fetch_one(&mut connection)
            .await
            .unwrap();
            (
                state,
                attempts,
                last_error,
                leased,
                text(queued_at),
                text(next_attempt_at),
            )
        }
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_as(
                "select state, attempts, last_error, lease_owner is not null, queued_at,
                        next_attempt_at
                 from forward_outbox where id = $1",
            )
            .bind(id)
            .fetch_one(&mut connection)
            .await
            .unwrap()
        }
    };
    Stored {
        state: row.0,
        attempts: row.1,
        last_error: row.2,
        leased: row.3,
        queued_at: row.4,
        next_attempt_at: row.5,
    }
}

/// `(target, message_id, run)` of every `run.stuck` message, in id order.
async fn stuck_messages(db: &TestDatabase) -> Vec<(String, String, Value)> {
    let sql = "select target, message_id, run from forward_outbox
               where event_type = 'run.stuck' order by id";
    let rows: Vec<(String, String, String)> = match db.backend {
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_as(sql)
                .fetch_all(&mut connection)
                .await
                .unwrap()
        }
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_as(sql)
                .fetch_all(&mut connection)
                .await
                .unwrap()
        }
    };
    rows.into_iter()
        .map(|(target, id, run)| (target, id, serde_json::from_str(&run).unwrap()))
        .collect()
}

async fn count_messages(db: &TestDatabase) -> i64 {
    crate::support::stored::count(db, "forward_outbox").await
}

fn lease(until: i64) -> Lease {
    Lease {
        owner: Uuid::new_v4(),
        until: at(until),
    }
}

fn ids(messages: &[OutboxMessage]) -> Vec<i64> {
    messages.iter().map(|message| message.id).collect()
}

fn finished(id: i64, lease: Lease, attempted: i64, outcome: AttemptOutcome) -> FinishedAttempt {
    FinishedAttempt {
        id,
        lease_owner: lease.owner,
        attempted_at: at(attempted),
        outcome,
    }
}

fn retry(next: i64, error: &str) -> AttemptOutcome {
    AttemptOutcome::Retry {
        next_attempt_at: at(next),
        error: error.to_owned(),
    }
}

fn failed(error: &str) -> AttemptOutcome {
    AttemptOutcome::Failed {
        error: error.to_owned(),
    }
}

/// Claims every due message of `T` at `at(now)` and records `outcome` for each.
async fn claim_and_finish(store: &dyn Store, now: i64, outcome: AttemptOutcome) -> Vec<i64> {
    let outbox = store.outbox();
    let lease = lease(now + 1_000);
    let claimed = outbox
        .claim_forward_messages(T, 100, lease, at(now))
        .await
        .unwrap();
    let attempts: Vec<_> = claimed
        .iter()
        .map(|message| finished(message.id, lease, now, outcome.clone()))
        .collect();
    assert_eq!(
        outbox.finish_forward_attempts(&attempts).await.unwrap(),
        claimed.len() as u64
    );
    ids(&claimed)
}

/// A store whose changes are forwarded to `targets`.
async fn open_forwarding_to(db: &TestDatabase, targets: &[&str]) -> Arc<dyn Store> {
    let options = StoreOptions {
        forward_targets: targets.iter().map(|name| name.to_string()).collect(),
        ..StoreOptions::default()
    };
    store::connect(&SecretString::from(db.url.clone()), &options, true)
        .await
        .expect("the store opens and migrates")
}

async fn claims_go_in_id_order_and_wait_for_earlier_changes_of_the_run(db: TestDatabase) {
    let store = open(&db).await;
    let outbox = store.outbox();
    let a1 = insert(&db, T, "m-a", 0, 0).await;
    let b1 = insert(&db, T, "m-b", 1, 1).await;
    let a2 = insert(&db, T, "m-a", 2, 2).await;
    let c1 = insert(&db, T, "m-c", 3, 3).await;
    let later = insert(&db, T, "m-later", 4, 50_000).await;
    insert(&db, "theirs", "m-d", 5, 5).await;

    let first = lease(60_000);
    let claimed = outbox
        .claim_forward_messages(T, 1, first, at(10_000))
        .await
        .unwrap();
    assert_eq!(ids(&claimed), [a1]);
    assert_eq!(
        claimed[0],
        OutboxMessage {
            id: a1,
            target: T.to_owned(),
            message_id: "m-a".to_owned(),
            event_type: "run.status_changed".to_owned(),
            run: json!({"message_id": "m-a", "committed": 0}).to_string(),
            committed_at: at(0),
            queued_at: at(0),
            attempts: 0,
        }
    );
    // m-a's second change waits while its first is leased; other runs go; a message not yet
    // due and another target's stay.
    let second = lease(60_000);
    let claimed = outbox
        .claim_forward_messages(T, 10, second, at(10_000))
        .await
        .unwrap();
    assert_eq!(ids(&claimed), [b1, c1]);
    assert!(outbox
        .claim_forward_messages(T, 10, lease(60_000), at(10_000))
        .await
        .unwrap()
        .is_empty());

    // Still waiting while its first change is pending again (retried later), not leased.
    let recorded = outbox
        .finish_forward_attempts(&[finished(a1, first, 10_000, retry(20_000, "503"))])
        .await
        .unwrap();
    assert_eq!(recorded, 1);
    assert!(outbox
        .claim_forward_messages(T, 10, lease(60_000), at(15_000))
        .await
        .unwrap()
        .is_empty());
    // Once the first is delivered, the second goes.
    let third = lease(60_000);
    assert_eq!(
        ids(&outbox
            .claim_forward_messages(T, 10, third, at(20_000))
            .await
            .unwrap()),
        [a1]
    );
    outbox
        .finish_forward_attempts(&[finished(a1, third, 20_000, AttemptOutcome::Delivered)])
        .await
        .unwrap();
    assert_eq!(
        ids(&outbox
            .claim_forward_messages(T, 10, lease(60_000), at(50_000))
            .await
            .unwrap()),
        [a2, later]
    );
}

async fn a_lease_holds_a_message_until_it_ends_and_only_its_owner_records(db: TestDatabase) {
    let store = open(&db).await;
    let outbox = store.outbox();
    let id = insert(&db, T, "m-1", 0, 0).await;

    let first = lease(1_000);
    assert_eq!(
        ids(&outbox
            .claim_forward_messages(T, 10, first, at(0))
            .await
            .unwrap()),
        [id]
    );
    assert!(stored(&db, id).await.leased);
    assert!(outbox
        .claim_forward_messages(T, 10, lease(5_000), at(999))
        .await
        .unwrap()
        .is_empty());
    // The lease ended: another claim takes it, and the first owner's outcome is ignored.
    let second = lease(5_000);
    assert_eq!(
        ids(&outbox
            .claim_forward_messages(T, 10, second, at(1_000))
            .await
            .unwrap()),
        [id]
    );
    let recorded = outbox
        .finish_forward_attempts(&[
            finished(id, first, 1_500, AttemptOutcome::Delivered),
            finished(id + 1_000, second, 1_500, AttemptOutcome::Delivered),
        ])
        .await
        .unwrap();
    assert_eq!(recorded, 0);
    let before = stored(&db, id).await;
    assert_eq!((before.state.as_str(), before.attempts), ("pending", 0));
    assert!(before.leased);

    // Retry: pending again, unleased, due later, with the error.
    let recorded = outbox
        .finish_forward_attempts(&[finished(id, second, 2_000, retry(9_000, "HTTP 503"))])
        .await
        .unwrap();
    assert_eq!(recorded, 1);
    let retried = stored(&db, id).await;
    assert_eq!(
        retried,
        Stored {
            state: "pending".into(),
            attempts: 1,
            last_error: Some("HTTP 503".into()),
            leased: false,
            queued_at: text(at(0)),
            next_attempt_at: text(at(9_000)),
        }
    );
    assert!(outbox
        .claim_forward_messages(T, 10, lease(20_000), at(8_999))
        .await
        .unwrap()
        .is_empty());
    let third = lease(20_000);
    let claimed = outbox
        .claim_forward_messages(T, 10, third, at(9_000))
        .await
        .unwrap();
    assert_eq!((ids(&claimed), claimed[0].attempts), (vec![id], 1));

    // Failed: kept, no longer claimed; its lease is gone, so a second outcome is ignored.
    let recorded = outbox
        .finish_forward_attempts(&[finished(id, third, 10_000, failed("timed out"))])
        .await
        .unwrap();
    assert_eq!(recorded, 1);
    let gone = stored(&db, id).await;
    assert_eq!(
        (
            gone.state.as_str(),
            gone.attempts,
            gone.last_error.as_deref(),
            gone.leased
        ),
        ("failed", 2, Some("timed out"), false)
    );
    assert!(outbox
        .claim_forward_messages(T, 10, lease(99_000), at(90_000))
        .await
        .unwrap()
        .is_empty());
    let again = outbox
        .finish_forward_attempts(&[finished(id, third, 10_001, AttemptOutcome::Delivered)])
        .await
        .unwrap();
    assert_eq!(again, 0);
    assert_eq!(stored(&db, id).await.state, "failed");
}

async fn next_due_is_the_soonest_retry_still_to_come(db: TestDatabase) {
    let store = open(&db).await;
    let outbox = store.outbox();
    assert_eq!(outbox.next_forward_due(T, at(0)).await.unwrap(), None);
    insert(&db, T, "m-a", 0, 5_000).await;
    let b1 = insert(&db, T, "m-b", 1, 3_000).await;
    insert(&db, "theirs", "m-x", 0, 100).await;
    assert_eq!(
        outbox.next_forward_due(T, at(0)).await.unwrap(),
        Some(at(3_000))
    );
    // Due already is not "to come": the claim takes those, or they wait for an outcome.
    assert_eq!(
        outbox.next_forward_due(T, at(3_000)).await.unwrap(),
        Some(at(5_000))
    );
    assert_eq!(outbox.next_forward_due(T, at(5_000)).await.unwrap(), None);

    let held = lease(8_000);
    outbox
        .claim_forward_messages(T, 10, held, at(3_000))
        .await
        .unwrap();
    // A retry of m-b at 6000 is the next thing to come after 5000.
    outbox
        .finish_forward_attempts(&[finished(b1, held, 3_500, retry(6_000, "HTTP 500"))])
        .await
        .unwrap();
    assert_eq!(
        outbox.next_forward_due(T, at(5_000)).await.unwrap(),
        Some(at(6_000))
    );
    // Delivered and failed messages never come due.
    let again = lease(9_000);
    outbox
        .claim_forward_messages(T, 10, again, at(6_000))
        .await
        .unwrap();
    outbox
        .finish_forward_attempts(&[finished(b1, again, 6_100, AttemptOutcome::Delivered)])
        .await
        .unwrap();
    assert_eq!(outbox.next_forward_due(T, at(5_000)).await.unwrap(), None);
}

/// A message sent again later holds back the later messages of its run (they could not go
/// before it anyway), so that they are not due, and walked past by every claim, while a target
/// is down; other runs' messages keep their own times, and a delivery holds back nothing.
async fn a_retry_holds_back_the_later_messages_of_its_run(db: TestDatabase) {
    let store = open(&db).await;
    let outbox = store.outbox();
    let a1 = insert(&db, T, "m-a", 0, 0).await;
    let a2 = insert(&db, T, "m-a", 1, 1).await;
    let a3 = insert(&db, T, "m-a", 2, 9_000).await;
    let b1 = insert(&db, T, "m-b", 3, 3).await;
    let elsewhere = insert(&db, "theirs", "m-a", 4, 4).await;
    let held = lease(1_000);
    let claimed = outbox
        .claim_forward_messages(T, 10, held, at(10))
        .await
        .unwrap();
    let mut claimed = ids(&claimed);
    claimed.sort_unstable();
    assert_eq!(claimed, vec![a1, b1]);
    outbox
        .finish_forward_attempts(&[
            finished(a1, held, 20, retry(5_000, "HTTP 503")),
            finished(b1, held, 20, AttemptOutcome::Delivered),
        ])
        .await
        .unwrap();
    assert_eq!(stored(&db, a1).await.next_attempt_at, text(at(5_000)));
    assert_eq!(stored(&db, a2).await.next_attempt_at, text(at(5_000)));
    // Already later than the retry: it keeps its time.
    assert_eq!(stored(&db, a3).await.next_attempt_at, text(at(9_000)));
    assert_eq!(stored(&db, elsewhere).await.next_attempt_at, text(at(4)));
    // Nothing of m-a is due before the retry; then the head goes first, as always.
    assert!(outbox
        .claim_forward_messages(T, 10, lease(5_000), at(4_999))
        .await
        .unwrap()
        .is_empty());
    let again = outbox
        .claim_forward_messages(T, 10, lease(6_000), at(5_000))
        .await
        .unwrap();
    assert_eq!(ids(&again), vec![a1]);
}

async fn the_queue_counts_pending_and_failed_and_shows_the_latest_error(db: TestDatabase) {
    let store = open(&db).await;
    let outbox = store.outbox();
    assert_eq!(outbox.forward_queue(T).await.unwrap(), Default::default());
    let first = insert(&db, T, "m-a", 0, 0).await;
    let second = insert(&db, T, "m-b", 1, 1).await;
    insert(&db, T, "m-c", 2, 50_000).await;
    insert(&db, "theirs", "m-d", 0, 0).await;

    let held = lease(20_000);
    outbox
        .claim_forward_messages(T, 2, held, at(10_000))
        .await
        .unwrap();
    outbox
        .finish_forward_attempts(&[
            finished(first, held, 10_200, failed("gave up")),
            finished(second, held, 10_100, retry(30_000, "HTTP 500")),
        ])
        .await
        .unwrap();
    let queue = outbox.forward_queue(T).await.unwrap();
    assert_eq!(queue.pending, 2);
    assert_eq!(queue.oldest_pending_queued_at, Some(at(1)));
    assert_eq!(queue.failed, 1);
    assert_eq!(queue.last_error.as_deref(), Some("gave up"));

    // A later attempt's error wins; a delivery leaves no error behind.
    let again = lease(40_000);
    outbox
        .claim_forward_messages(T, 10, again, at(30_000))
        .await
        .unwrap();
    outbox
        .finish_forward_attempts(&[finished(second, again, 30_000, retry(60_000, "HTTP 502"))])
        .await
        .unwrap();
    assert_eq!(
        outbox.forward_queue(T).await.unwrap().last_error.as_deref(),
        Some("HTTP 502")
    );
    let last = lease(90_000);
    outbox
        .claim_forward_messages(T, 10, last, at(60_000))
        .await
        .unwrap();
    outbox
        .finish_forward_attempts(&[finished(second, last, 60_000, AttemptOutcome::Delivered)])
        .await
        .unwrap();
    let queue = outbox.forward_queue(T).await.unwrap();
    assert_eq!(
        (queue.pending, queue.oldest_pending_queued_at, queue.failed),
        (1, Some(at(2)), 1)
    );
    assert_eq!(queue.last_error.as_deref(), Some("gave up"));
}

async fn failed_messages_are_listed_newest_first_in_pages(db: TestDatabase) {
    let store = open(&db).await;
    let outbox = store.outbox();
    let mut failed_ids = Vec::new();
    for i in 0..5 {
        failed_ids.push(insert(&db, T, &format!("m-{i}"), i, i).await);
    }
    insert(&db, "theirs", "m-x", 0, 0).await;
    claim_and_finish(&*store, 1_000, failed("HTTP 410")).await;
    insert(&db, T, "m-pending", 9, 9).await;

    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let page = outbox.list_failed_forwards(T, 2, before).await.unwrap();
        pages.push(page.messages.iter().map(|m| m.id).collect::<Vec<_>>());
        match page.next_before {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    let newest_first: Vec<i64> = failed_ids.iter().rev().copied().collect();
    assert_eq!(
        pages,
        [
            newest_first[0..2].to_vec(),
            newest_first[2..4].to_vec(),
            newest_first[4..].to_vec()
        ]
    );

    let page = outbox.list_failed_forwards(T, 1, None).await.unwrap();
    let message = &page.messages[0];
    assert_eq!(message.webhook_id, format!("msg_{}", failed_ids[4]));
    assert_eq!(
        (
            message.event_type.as_str(),
            message.message_id.as_str(),
            message.committed_at,
            message.queued_at,
            message.attempts,
            message.last_attempt_at,
            message.last_error.as_deref()
        ),
        (
            "run.status_changed",
            "m-4",
            at(4),
            at(4),
            1,
            Some(at(1_000)),
            Some("HTTP 410")
        )
    );
    assert_eq!(page.next_before, Some(failed_ids[4]));
    assert!(outbox
        .list_failed_forwards("theirs", 10, None)
        .await
        .unwrap()
        .messages
        .is_empty());
}

async fn retry_failed_queues_failed_messages_again_under_their_ids(db: TestDatabase) {
    let store = open(&db).await;
    let outbox = store.outbox();
    let delivered = insert(&db, T, "m-delivered", 0, 0).await;
    claim_and_finish(&*store, 100, AttemptOutcome::Delivered).await;
    let gave_up = [
        insert(&db, T, "m-1", 1, 1).await,
        insert(&db, T, "m-2", 2, 2).await,
    ];
    claim_and_finish(&*store, 200, failed("HTTP 404")).await;
    let pending = insert(&db, T, "m-pending", 3, 40_000).await;
    let theirs = insert(&db, "theirs", "m-x", 0, 0).await;
    claim_theirs_and_fail(&*store, theirs).await;

    assert_eq!(
        outbox.retry_failed_forwards(T, at(30_000)).await.unwrap(),
        2
    );
    for id in gave_up {
        assert_eq!(
            stored(&db, id).await,
            Stored {
                state: "pending".into(),
                attempts: 0,
                last_error: Some("HTTP 404".into()),
                leased: false,
                queued_at: text(at(30_000)),
                next_attempt_at: text(at(30_000)),
            }
        );
    }
    assert_eq!(stored(&db, delivered).await.state, "delivered");
    assert_eq!(stored(&db, pending).await.queued_at, text(at(3)));
    assert_eq!(stored(&db, theirs).await.state, "failed");
    let claimed = outbox
        .claim_forward_messages(T, 10, lease(40_000), at(30_000))
        .await
        .unwrap();
    assert_eq!(ids(&claimed), gave_up);
    assert!(claimed.iter().all(|m| m.queued_at == at(30_000)));
    assert_eq!(
        outbox.retry_failed_forwards(T, at(31_000)).await.unwrap(),
        0
    );
}

async fn claim_theirs_and_fail(store: &dyn Store, id: i64) {
    let outbox = store.outbox();
    let held = lease(2_000_000);
    let claimed = outbox
        .claim_forward_messages("theirs", 10, held, at(1_000_000))
        .await
        .unwrap();
    assert_eq!(ids(&claimed), [id]);
    outbox
        .finish_forward_attempts(&[finished(id, held, 1_000_000, failed("no"))])
        .await
        .unwrap();
}

async fn replay_queues_a_window_of_commits_again_and_leaves_pending_ones(db: TestDatabase) {
    let store = open(&db).await;
    let outbox = store.outbox();
    let early = insert(&db, T, "m-1", 1_000, 1_000).await;
    let start = insert(&db, T, "m-2", 2_000, 2_000).await;
    claim_and_finish(&*store, 5_000, AttemptOutcome::Delivered).await;
    let inside = insert(&db, T, "m-3", 3_000, 3_000).await;
    claim_and_finish(&*store, 6_000, failed("HTTP 400")).await;
    let end = insert(&db, T, "m-4", 4_000, 4_000).await;
    claim_and_finish(&*store, 7_000, AttemptOutcome::Delivered).await;
    let pending = insert(&db, T, "m-5", 3_500, 90_000).await;
    let theirs = insert(&db, "theirs", "m-x", 3_000, 3_000).await;
    claim_theirs_and_fail(&*store, theirs).await;

    // [2000, 4000): the delivered and the failed one; not the pending one.
    let replayed = outbox
        .replay_forwards(T, at(2_000), Some(at(4_000)), at(10_000))
        .await
        .unwrap();
    assert_eq!(replayed, 2);
    for id in [start, inside] {
        let message = stored(&db, id).await;
        assert_eq!(
            (message.state.as_str(), message.attempts, message.queued_at),
            ("pending", 0, text(at(10_000)))
        );
    }
    assert_eq!(stored(&db, early).await.state, "delivered");
    assert_eq!(stored(&db, end).await.state, "delivered");
    assert_eq!(stored(&db, pending).await.queued_at, text(at(3_500)));
    assert_eq!(stored(&db, theirs).await.state, "failed");
    let claimed = outbox
        .claim_forward_messages(T, 10, lease(20_000), at(10_000))
        .await
        .unwrap();
    assert_eq!(ids(&claimed), [start, inside]);

    // No end: everything from `since` that is not pending (leased ones are).
    let replayed = outbox
        .replay_forwards(T, at(0), None, at(11_000))
        .await
        .unwrap();
    assert_eq!(replayed, 2);
    assert_eq!(stored(&db, early).await.state, "pending");
    assert_eq!(stored(&db, end).await.state, "pending");
}

async fn stuck_runs_are_queued_once_until_they_change_again(db: TestDatabase) {
    let store = open_forwarding_to(&db, &["alpha", "beta"]).await;
    let outbox = store.outbox();
    store
        .record_deliveries(&[
            delivery(&callback("m-stuck", "submitted", json!({})), 0),
            delivery(&callback("m-done", "success", json!({})), 0),
            delivery(&callback("m-fresh", "processing", json!({})), 100_000),
        ])
        .await
        .unwrap();

    let queued = outbox
        .queue_stuck_runs(at(50_000), 10, at(60_000))
        .await
        .unwrap();
    assert_eq!(queued, 1);
    let messages = stuck_messages(&db).await;
    let shown = serde_json::to_value(store.get_run("m-stuck").await.unwrap().unwrap()).unwrap();
    let mut expected = shown.clone();
    expected["stuck"] = json!(true);
    assert_eq!(shown["stuck"], false);
    assert_eq!(
        messages,
        [
            ("alpha".to_owned(), "m-stuck".to_owned(), expected.clone()),
            ("beta".to_owned(), "m-stuck".to_owned(), expected.clone()),
        ]
    );
    // Queued once: not again while the run does not change.
    assert_eq!(
        outbox
            .queue_stuck_runs(at(65_000), 10, at(70_000))
            .await
            .unwrap(),
        0
    );
    assert_eq!(stuck_messages(&db).await.len(), 2);

    // It changes, then stays unchanged again: queued a second time, as it is now.
    store
        .record_deliveries(&[delivery(
            &callback("m-stuck", "processing", json!({})),
            80_000,
        )])
        .await
        .unwrap();
    assert_eq!(
        outbox
            .queue_stuck_runs(at(75_000), 10, at(90_000))
            .await
            .unwrap(),
        0,
        "changed after changed_before"
    );
    assert_eq!(
        outbox
            .queue_stuck_runs(at(150_000), 10, at(160_000))
            .await
            .unwrap(),
        2,
        "m-stuck again, and m-fresh"
    );
    let messages = stuck_messages(&db).await;
    assert_eq!(messages.len(), 6);
    let again: Vec<_> = messages[2..]
        .iter()
        .filter(|(_, id, _)| id == "m-stuck")
        .collect();
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].2["status"], "processing");
    assert_eq!(again[0].2["stuck"], true);
}

async fn stuck_runs_are_queued_up_to_the_limit_and_not_without_targets(db: TestDatabase) {
    {
        let store = open(&db).await;
        store
            .record_deliveries(&[
                delivery(&callback("m-1", "processing", json!({})), 0),
                delivery(&callback("m-2", "processing", json!({})), 0),
                delivery(&callback("m-3", "submitted", json!({})), 0),
            ])
            .await
            .unwrap();
        assert_eq!(
            store
                .outbox()
                .queue_stuck_runs(at(50_000), 10, at(60_000))
                .await
                .unwrap(),
            0
        );
        assert_eq!(count_messages(&db).await, 0);
    }
    let store = open_forwarding_to(&db, &["alpha"]).await;
    let outbox = store.outbox();
    assert_eq!(
        outbox
            .queue_stuck_runs(at(50_000), 2, at(60_000))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        outbox
            .queue_stuck_runs(at(50_000), 2, at(60_000))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        outbox
            .queue_stuck_runs(at(50_000), 2, at(60_000))
            .await
            .unwrap(),
        0
    );
    let queued: HashSet<String> = stuck_messages(&db)
        .await
        .into_iter()
        .map(|(_, id, _)| id)
        .collect();
    assert_eq!(queued.len(), 3);
}

async fn prune_deletes_old_delivered_and_failed_messages_only(db: TestDatabase) {
    let store = open(&db).await;
    let outbox = store.outbox();
    // Delivered at 1000, failed at 2000, three delivered at 3000, one still pending.
    insert(&db, T, "m-1", 0, 0).await;
    claim_and_finish(&*store, 1_000, AttemptOutcome::Delivered).await;
    insert(&db, T, "m-2", 0, 0).await;
    claim_and_finish(&*store, 2_000, failed("HTTP 400")).await;
    for run in ["m-3", "m-4", "m-5"] {
        insert(&db, T, run, 0, 0).await;
    }
    claim_and_finish(&*store, 3_000, AttemptOutcome::Delivered).await;
    let waiting = insert(&db, T, "m-6", 0, 90_000).await;

    assert_eq!(outbox.prune_forwarded(at(1_500), 10).await.unwrap(), 1);
    assert_eq!(count_messages(&db).await, 5);
    assert_eq!(outbox.prune_forwarded(at(2_500), 10).await.unwrap(), 1);
    // Up to the limit at a time.
    assert_eq!(outbox.prune_forwarded(at(99_000), 2).await.unwrap(), 2);
    assert_eq!(outbox.prune_forwarded(at(99_000), 2).await.unwrap(), 1);
    assert_eq!(outbox.prune_forwarded(at(99_000), 2).await.unwrap(), 0);
    assert_eq!(count_messages(&db).await, 1);
    assert_eq!(stored(&db, waiting).await.state, "pending");
}

on_both_backends!(
    a_retry_holds_back_the_later_messages_of_its_run,
    claims_go_in_id_order_and_wait_for_earlier_changes_of_the_run,
    a_lease_holds_a_message_until_it_ends_and_only_its_owner_records,
    next_due_is_the_soonest_retry_still_to_come,
    the_queue_counts_pending_and_failed_and_shows_the_latest_error,
    failed_messages_are_listed_newest_first_in_pages,
    retry_failed_queues_failed_messages_again_under_their_ids,
    replay_queues_a_window_of_commits_again_and_leaves_pending_ones,
    stuck_runs_are_queued_once_until_they_change_again,
    stuck_runs_are_queued_up_to_the_limit_and_not_without_targets,
    prune_deletes_old_delivered_and_failed_messages_only,
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Claimed,
    Finishing,
}

/// Two claimers on one PostgreSQL store, each with its own lease, racing over many runs of two
/// changes each: every message is claimed once, and a run's second change only after its first
/// was recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_take_the_same_message_on_postgres() {
    let db = crate::support::backends::fresh_database(Backend::Postgres).await;
    let store = open(&db).await;
    const RUNS: usize = 150;
    let mut firsts = Vec::new();
    for run in 0..RUNS {
        firsts.push(insert(&db, T, &format!("m-{run}"), 0, 0).await);
    }
    let mut seconds = Vec::new();
    for run in 0..RUNS {
        seconds.push(insert(&db, T, &format!("m-{run}"), 1, 0).await);
    }
    let barrier = Arc::new(Barrier::new(2));
    // `Finishing` is logged before the outcome is recorded and `Claimed` after the claim
    // answered, so a run's second change must be logged claimed after its first finishing.
    let log = Arc::new(Mutex::new(Vec::new()));
    let claimers: Vec<_> = (0..2)
        .map(|_| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let outbox = store.outbox();
                barrier.wait().await;
                let mut claimed = Vec::new();
                loop {
                    let held = lease(1_000_000);
                    let batch = outbox
                        .claim_forward_messages(T, 7, held, at(10))
                        .await
                        .unwrap();
                    if batch.is_empty() {
                        return claimed;
                    }
                    {
                        let mut entries = log.lock().unwrap();
                        entries.extend(batch.iter().map(|m| (Step::Claimed, m.id)));
                        entries.extend(batch.iter().map(|m| (Step::Finishing, m.id)));
                    }
                    let attempts: Vec<_> = batch
                        .iter()
                        .map(|m| finished(m.id, held, 10, AttemptOutcome::Delivered))
                        .collect();
                    assert_eq!(
                        outbox.finish_forward_attempts(&attempts).await.unwrap(),
                        batch.len() as u64
                    );
                    claimed.extend(batch.into_iter().map(|m| (m.id, m.message_id)));
                }
            })
        })
        .collect();
    let mut every = Vec::new();
    for claimer in claimers {
        every.extend(claimer.await.unwrap());
    }
    let distinct: HashSet<i64> = every.iter().map(|(id, _)| *id).collect();
    assert_eq!(every.len(), 2 * RUNS, "each message claimed exactly once");
    assert_eq!(distinct.len(), 2 * RUNS);
    let log = log.lock().unwrap().clone();
    let position = |step: Step, id: i64| log.iter().position(|entry| *entry == (step, id));
    for run in 0..RUNS {
        let (first, second) = (firsts[run], seconds[run]);
        assert!(
            position(Step::Finishing, first) < position(Step::Claimed, second),
            "m-{run}: its second change was claimed before its first was recorded"
        );
    }
    assert_eq!(
        store.outbox().forward_queue(T).await.unwrap().pending,
        0,
        "nothing left behind"
    );
}
