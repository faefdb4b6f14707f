//! SQLite keys events by their run's `seq` (migration 0007, which rebuilds the table). A file
//! written before it keeps every event, its counters and its place in deduplication; an event
//! without its run stops the upgrade instead of being dropped.

use std::str::FromStr;

use nen_relay::store::{self, StoreOptions};
use secrecy::SecretString;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};

use crate::support::app::callback;
use crate::support::backends::{fresh_database, Backend};
use crate::support::store_fixtures::{delivery, open};
use crate::support::TestDatabase;

/// The migrations before 0007 (SQLite has no 0006: that one is PostgreSQL's batch statement).
const BEFORE_EVENTS_BY_RUN: usize = 5;

/// A file as a release before migration 0007 left it, holding what `rows` inserts.
async fn file_before_events_by_run(db: &TestDatabase, rows: &str) {
    let mut earlier = sqlx::migrate!("migrations/sqlite");
    assert_eq!(
        earlier.migrations[BEFORE_EVENTS_BY_RUN].version, 7,
        "migration 0007 rebuilds events"
    );
    earlier.migrations = earlier.migrations[..BEFORE_EVENTS_BY_RUN].to_vec().into();
    let options = SqliteConnectOptions::from_str(&db.url)
        .unwrap()
        .create_if_missing(true);
    let mut connection = SqliteConnection::connect_with(&options).await.unwrap();
    earlier.run(&mut connection).await.unwrap();
    sqlx::raw_sql(rows).execute(&mut connection).await.unwrap();
    connection.close().await.unwrap();
}

const TIME: &str = "'2025-10-09T08:53:20.000000000Z'";

/// A run and one stored event of it, `status`, whose body is `body`.
fn run_with_event(message_id: &str, status: &str, rank: u8, body: &str) -> String {
    let sha256 = hex::encode(Sha256::digest(body.as_bytes()));
    format!(
        "insert into runs (message_id, workflow_id, status, status_rank, created_at, updated_at) \
         values ('{message_id}', 'wf', '{status}', {rank}, {TIME}, {TIME}); \
         insert into events (message_id, status, received_at, last_received_at, payload, \
                             body_sha256, key_id, duplicates) \
         values ('{message_id}', '{status}', {TIME}, {TIME}, '{body}', x'{sha256}', 'key-1', 3);"
    )
}

#[tokio::test]
async fn an_upgraded_file_keeps_its_events_and_still_recognises_their_copies() {
    let db = fresh_database(Backend::Sqlite).await;
    let stored = callback("m-old", "processing", json!({}));
    let other = callback("m-other", "processing", json!({}));
    let rows = run_with_event("m-old", "processing", 1, &stored)
        + &run_with_event("m-other", "processing", 1, &other);
    file_before_events_by_run(&db, &rows).await;

    let store = open(&db).await;
    let events = store.list_events("m-old").await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].status.as_str(), events[0].duplicates),
        ("processing", 3)
    );
    assert_eq!(events[0].payload.get(), stored);

    // A copy of the stored event is a duplicate, counted on it; a new status is a new event.
    let finished = callback("m-old", "success", json!({ "result": {} }));
    let outcomes = store
        .record_deliveries(&[delivery(&stored, 0), delivery(&finished, 1)])
        .await
        .unwrap();
    assert_eq!(
        outcomes
            .iter()
            .map(|outcome| outcome.duplicate)
            .collect::<Vec<_>>(),
        vec![true, false]
    );
    let events = store.list_events("m-old").await.unwrap();
    let counted: Vec<(&str, i64)> = events
        .iter()
        .map(|event| (event.status.as_str(), event.duplicates))
        .collect();
    assert_eq!(counted, vec![("processing", 4), ("success", 0)]);
    assert_eq!(
        store.get_run("m-old").await.unwrap().unwrap().status,
        "success"
    );
    // The other run's event stayed with its own run.
    assert_eq!(store.list_events("m-other").await.unwrap().len(), 1);
}

#[tokio::test]
async fn an_event_without_its_run_stops_the_upgrade_and_stays() {
    let db = fresh_database(Backend::Sqlite).await;
    let body = callback("m-orphan", "processing", json!({}));
    let rows = run_with_event("m-orphan", "processing", 1, &body)
        + "delete from runs where message_id = 'm-orphan';";
    file_before_events_by_run(&db, &rows).await;

    let url = SecretString::from(db.url.clone());
    let error = store::connect(&url, &StoreOptions::default(), true)
        .await
        .err()
        .expect("the upgrade is refused");
    assert!(error.to_string().contains("run_seq"), "{error}");

    // The migration's transaction rolled back: the event is still there, in the old table.
    let mut connection = SqliteConnection::connect(&db.url).await.unwrap();
    let kept: (String, i64) = sqlx::query_as(
        "select message_id, (select max(version) from _sqlx_migrations) from events",
    )
    .fetch_one(&mut connection)
    .await
    .unwrap();
    assert_eq!(kept, ("m-orphan".to_owned(), 5));
}
