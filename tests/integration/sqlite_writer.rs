//! SQLite's ingest writes run in place on the store's one writer connection, outside sqlx: a
//! lock another process holds is waited for up to the statement timeout and then reported as
//! unavailable (Nen retries), a failure rolls the whole batch back, and either way the
//! connection goes on serving every later write, sqlx's own included.

use std::time::Duration;

use chrono::Utc;
use nen_relay::store::{RejectedPayload, StoreError, StoreOptions, TriggeredRun};
use sqlx::{Connection, SqliteConnection};

use crate::support::backends::{fresh_database, Backend};
use crate::support::store_fixtures::{delivery, open_with};

fn options() -> StoreOptions {
    StoreOptions {
        statement_timeout: Duration::from_millis(200),
        ..StoreOptions::default()
    }
}

#[tokio::test]
async fn a_batch_behind_another_process_lock_is_unavailable_then_written() {
    let db = fresh_database(Backend::Sqlite).await;
    let store = open_with(&db, &options()).await;
    let mut other = SqliteConnection::connect(&db.url).await.unwrap();
    sqlx::query("begin immediate")
        .execute(&mut other)
        .await
        .unwrap();

    let batch = [delivery(r#"{"message_id":"m-1","status":"processing"}"#, 0)];
    let error = store.record_deliveries(&batch).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error}");
    let triggered = TriggeredRun {
        message_id: "m-2".into(),
        workflow_id: "wf".into(),
        workflow_params: None,
        created_at: Utc::now(),
    };
    let error = store.record_triggered_run(&triggered).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error}");

    sqlx::query("commit").execute(&mut other).await.unwrap();
    other.close().await.unwrap();
    store.record_deliveries(&batch).await.unwrap();
    store.record_triggered_run(&triggered).await.unwrap();
    assert_eq!(
        store.get_run("m-1").await.unwrap().unwrap().status,
        "processing"
    );
    assert_eq!(
        store.get_run("m-2").await.unwrap().unwrap().status,
        "submitted"
    );
    // A write through sqlx, on the same connection.
    store
        .record_rejected_payload(&RejectedPayload {
            raw_body: "[]".into(),
            key_id: "key-1".into(),
            reason: "not an object".into(),
            received_at: Utc::now(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_batch_that_fails_midway_leaves_nothing_behind() {
    let db = fresh_database(Backend::Sqlite).await;
    let store = open_with(&db, &options()).await;
    // Refuses one run after the batch's events are inserted: the batch must roll back whole.
    let mut other = SqliteConnection::connect(&db.url).await.unwrap();
    sqlx::query(
        "create trigger refuse_poison before insert on runs when new.message_id = 'm-poison' \
         begin select raise(abort, 'refused by the test'); end",
    )
    .execute(&mut other)
    .await
    .unwrap();

    let batch = [
        delivery(r#"{"message_id":"m-ok","status":"processing"}"#, 0),
        delivery(r#"{"message_id":"m-poison","status":"processing"}"#, 1),
    ];
    let error = store.record_deliveries(&batch).await.unwrap_err();
    assert!(matches!(error, StoreError::Internal(_)), "{error}");
    assert!(error.to_string().contains("refused by the test"), "{error}");
    assert!(store.get_run("m-ok").await.unwrap().is_none());
    assert!(store.list_events("m-ok").await.unwrap().is_empty());

    sqlx::query("drop trigger refuse_poison")
        .execute(&mut other)
        .await
        .unwrap();
    other.close().await.unwrap();
    let outcomes = store.record_deliveries(&batch).await.unwrap();
    assert!(outcomes.iter().all(|outcome| !outcome.duplicate));
    assert_eq!(store.list_events("m-ok").await.unwrap().len(), 1);
    assert_eq!(
        store.get_run("m-poison").await.unwrap().unwrap().status,
        "processing"
    );
}
