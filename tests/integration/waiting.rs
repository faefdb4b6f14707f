//! `GET /v1/runs/{id}?wait=`: answered at once when terminal, woken by the commit that makes it
//! terminal, capped, answered at shutdown, and holding no database connection while waiting.
//!
//! A waiter registers before it reads its run, so a test waits until the store has seen that
//! read (`ObservedStore::reads_reach`) before it delivers: no sleeps. The slow re-read that
//! backs up a lost wake is set to an hour (`NEN_RELAY_QUERY__WAIT_RECHECK`), and every wait to
//! 60 s, so that only a wake can answer a waiter within the generous deadline of `answer`.

use std::sync::Arc;
use std::time::Duration;

use nen_relay::store::postgres::PostgresStore;
use nen_relay::store::{self, StoreOptions};
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection;
use tokio::task::JoinHandle;

use crate::on_both_backends;
use crate::support::app::{callback, error_code};
use crate::support::backends::fresh_database;
use crate::support::observed::ObservedStore;
use crate::support::{Backend, TestApp, TestDatabase};

/// Longer than any wake takes, shorter than the 60 s wait: only a wake answers within it.
const ANSWER_GUARD: Duration = Duration::from_secs(30);

/// The app over an `ObservedStore`, with the re-read safety net out of the way.
async fn spawn_observed(
    db: TestDatabase,
    variables: &[(&str, &str)],
) -> (TestApp, Arc<ObservedStore>) {
    let options = StoreOptions {
        acquire_timeout: Duration::from_secs(10),
        ..StoreOptions::default()
    };
    let url = secrecy::SecretString::from(db.url.clone());
    let inner = store::connect(&url, &options, true)
        .await
        .expect("the test database opens and migrates");
    let observed = ObservedStore::new(inner);
    let app = TestApp::spawn_with_store_and(db, observed.clone(), |vars| {
        vars.insert("NEN_RELAY_QUERY__WAIT_RECHECK".into(), "1h".into());
        for (name, value) in variables {
            vars.insert((*name).into(), (*value).into());
        }
    })
    .await;
    (app, observed)
}

/// Starts `GET /v1/runs/{message_id}?wait={seconds}` in the background.
fn start_waiting(app: &TestApp, message_id: &str, seconds: u32) -> JoinHandle<Response> {
    let request = app
        .client
        .get(app.url(&format!("/v1/runs/{message_id}?wait={seconds}")))
        .bearer_auth(&app.tokens[0]);
    tokio::spawn(async move { request.send().await.expect("the app answers") })
}

/// The waiter's answer, which must come within [`ANSWER_GUARD`].
async fn answer(waiter: JoinHandle<Response>) -> Response {
    tokio::time::timeout(ANSWER_GUARD, waiter)
        .await
        .expect("the waiter is answered once woken, not at the end of its wait")
        .expect("the request task")
}

async fn a_terminal_run_is_answered_at_once(db: TestDatabase) {
    let (app, observed) = spawn_observed(db, &[]).await;
    app.deliver_ok(&callback("m-done", "failed", json!({"error": "no"})))
        .await;
    let response = answer(start_waiting(&app, "m-done", 60)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let run: Value = response.json().await.unwrap();
    assert_eq!(
        (run["status"].as_str(), run["stuck"].as_bool()),
        (Some("failed"), Some(false))
    );
    assert_eq!(observed.reads("m-done"), 1, "one read, no waiting");
}

async fn a_waiter_is_answered_when_its_run_turns_terminal(db: TestDatabase) {
    let (app, observed) = spawn_observed(db, &[]).await;
    // Unknown when the wait starts; a `processing` callback does not end it.
    let waiter = start_waiting(&app, "m-later", 60);
    observed.reads_reach("m-later", 1).await;
    app.deliver_ok(&callback("m-later", "processing", json!({})))
        .await;
    app.deliver_ok(&callback("m-later", "success", json!({"result": {"n": 1}})))
        .await;
    let response = answer(waiter).await;
    assert_eq!(response.status(), StatusCode::OK);
    let run: Value = response.json().await.unwrap();
    assert_eq!(run["status"], "success");
    assert_eq!(run["result"], json!({"n": 1}));
    assert_eq!(run["stuck"], false);
}

async fn an_unknown_run_is_not_found_when_the_wait_ends(db: TestDatabase) {
    let (app, _observed) = spawn_observed(db, &[]).await;
    let response = answer(start_waiting(&app, "m-never", 1)).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(response).await, "not_found");
    app.deliver_ok(&callback("m-slow", "processing", json!({})))
        .await;
    let response = answer(start_waiting(&app, "m-slow", 1)).await;
    assert_eq!(response.status(), StatusCode::OK, "the run as it is then");
    assert_eq!(
        response.json::<Value>().await.unwrap()["status"],
        "processing"
    );
}

async fn wait_must_be_one_to_sixty_whole_seconds(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    app.deliver_ok(&callback("m-bad-wait", "success", json!({})))
        .await;
    for bad in ["0", "61", "-1", "1.5", "5s", "soon"] {
        let response = app.get(&format!("/v1/runs/m-bad-wait?wait={bad}")).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "wait={bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request");
        assert!(body["message"].as_str().unwrap().contains("wait"), "{body}");
    }
    assert_eq!(
        app.get_json("/v1/runs/m-bad-wait?wait=").await["status"],
        "success"
    );
}

async fn waiters_past_the_cap_are_refused_but_finished_runs_are_answered(db: TestDatabase) {
    let (app, observed) = spawn_observed(db, &[("NEN_RELAY_QUERY__MAX_WAITERS", "2")]).await;
    app.deliver_ok(&callback("m-finished", "success", json!({})))
        .await;
    let waiters = [
        start_waiting(&app, "m-capped", 60),
        start_waiting(&app, "m-capped", 60),
    ];
    observed.reads_reach("m-capped", 2).await;
    let refused = app.get("/v1/runs/m-capped?wait=60").await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(error_code(refused).await, "unavailable");
    let finished = app.get("/v1/runs/m-finished?wait=60").await;
    assert_eq!(finished.status(), StatusCode::OK, "no slot needed");
    app.deliver_ok(&callback("m-capped", "success", json!({})))
        .await;
    for waiter in waiters {
        assert_eq!(answer(waiter).await.status(), StatusCode::OK);
    }
    // Both slots are free again.
    app.deliver_ok(&callback("m-capped-2", "processing", json!({})))
        .await;
    let again = start_waiting(&app, "m-capped-2", 60);
    observed.reads_reach("m-capped-2", 1).await;
    app.deliver_ok(&callback("m-capped-2", "timeout", json!({})))
        .await;
    assert_eq!(
        answer(again).await.json::<Value>().await.unwrap()["status"],
        "timeout"
    );
}

async fn waiters_are_answered_at_shutdown_with_the_run_as_it_is(db: TestDatabase) {
    let (mut app, observed) = spawn_observed(db, &[]).await;
    app.deliver_ok(&callback("m-draining", "processing", json!({})))
        .await;
    let waiter = start_waiting(&app, "m-draining", 60);
    observed.reads_reach("m-draining", 1).await;
    let (response, ()) = tokio::join!(answer(waiter), app.shutdown());
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap()["status"],
        "processing"
    );
}

/// `nen-relay wait` against the app: its output and exit code.
async fn wait_command(app: &TestApp, args: &[&str], token: &str) -> (Option<i32>, Value, String) {
    let output = tokio::time::timeout(
        ANSWER_GUARD,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_nen-relay"))
            .arg("wait")
            .args(args)
            .args(["--url", &app.address])
            .env_clear()
            .env("NEN_RELAY_API_TOKENS", format!(" {token} ,other"))
            .output(),
    )
    .await
    .expect("the command ends")
    .expect("the command runs");
    let stdout = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stdout, stderr)
}

async fn the_wait_command_exits_by_how_the_run_ended(db: TestDatabase) {
    let app = TestApp::spawn(db).await;
    let token = app.tokens[1].clone();
    for (id, status) in [
        ("m-cli-ok", "success"),
        ("m-cli-failed", "failed"),
        ("m-cli-timeout", "timeout"),
        ("m-cli-running", "processing"),
    ] {
        app.deliver_ok(&callback(id, status, json!({}))).await;
    }
    let (code, run, _) = wait_command(&app, &["m-cli-ok"], &token).await;
    assert_eq!((code, &run["status"]), (Some(0), &json!("success")));
    for id in ["m-cli-failed", "m-cli-timeout"] {
        let (code, run, _) = wait_command(&app, &[id], &token).await;
        assert_eq!(code, Some(1), "{id}");
        assert_eq!(run["message_id"], id);
    }
    let (code, run, stderr) =
        wait_command(&app, &["m-cli-running", "--timeout", "1s"], &token).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(run["status"], "processing", "the run as it was last seen");
    let (code, _, stderr) = wait_command(&app, &["m-cli-unknown", "--timeout", "1s"], &token).await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("no run m-cli-unknown"), "{stderr}");
    let (code, _, stderr) = wait_command(&app, &["m-cli-ok"], "not-a-token").await;
    assert_eq!(code, Some(3));
    assert!(stderr.contains("401"), "{stderr}");
}

on_both_backends!(
    the_wait_command_exits_by_how_the_run_ended,
    a_terminal_run_is_answered_at_once,
    a_waiter_is_answered_when_its_run_turns_terminal,
    an_unknown_run_is_not_found_when_the_wait_ends,
    wait_must_be_one_to_sixty_whole_seconds,
    waiters_past_the_cap_are_refused_but_finished_runs_are_answered,
    waiters_are_answered_at_shutdown_with_the_run_as_it_is,
);

/// Connections to the test's database, as PostgreSQL counts them (this query's own left out).
async fn server_connections(url: &str) -> i64 {
    let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity \
         where datname = current_database() and pid <> pg_backend_pid()",
    )
    .fetch_one(&mut connection)
    .await
    .unwrap()
}

/// A thousand requests wait on ten runs through a pool of four connections: once their first
/// reads are done, no connection is in use until a wake, and the server sees the pool and the
/// one listening connection, nothing per waiter. Run with `--nocapture` to see the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiters_hold_no_database_connection() {
    const WAITERS: usize = 1000;
    const RUNS: usize = 10;
    const POOL: u32 = 4;
    let db = fresh_database(Backend::Postgres).await;
    let url = db.url.clone();
    let options = StoreOptions {
        max_connections: POOL,
        acquire_timeout: Duration::from_secs(10),
        ..StoreOptions::default()
    };
    let postgres = Arc::new(PostgresStore::connect(&url, &options).await.unwrap());
    postgres.migrate(Duration::from_secs(60)).await.unwrap();
    let observed = ObservedStore::new(postgres.clone());
    let app = TestApp::spawn_with_store_and(db, observed.clone(), |vars| {
        vars.insert("NEN_RELAY_QUERY__WAIT_RECHECK".into(), "1h".into());
    })
    .await;
    let ids: Vec<String> = (0..RUNS).map(|i| format!("m-crowd-{i}")).collect();
    for id in &ids {
        app.deliver_ok(&callback(id, "processing", json!({}))).await;
    }
    let before = postgres.pool_connections();
    let server_before = server_connections(&url).await;

    let waiters: Vec<JoinHandle<Response>> = (0..WAITERS)
        .map(|i| start_waiting(&app, &ids[i % RUNS], 60))
        .collect();
    for id in &ids {
        observed.reads_reach(id, WAITERS / RUNS).await;
    }
    // The last first reads may still be running: eventually none is.
    let deadline = tokio::time::Instant::now() + ANSWER_GUARD;
    let during = loop {
        let (size, idle) = postgres.pool_connections();
        if size as usize == idle || tokio::time::Instant::now() > deadline {
            break (size, idle);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let server_during = server_connections(&url).await;
    println!(
        "{WAITERS} waiters: pool (open, idle) before {before:?}, while waiting {during:?}; \
         connections the server sees: before {server_before}, while waiting {server_during}"
    );
    assert!(
        waiters.iter().all(|waiter| !waiter.is_finished()),
        "all still waiting"
    );
    assert_eq!(
        during.0 as usize, during.1,
        "no connection in use while they wait"
    );
    assert!(during.0 <= POOL);
    assert!(
        server_during <= i64::from(POOL) + 1,
        "the pool and one listener, nothing per waiter: {server_during}"
    );

    for id in &ids {
        app.deliver_ok(&callback(id, "success", json!({}))).await;
    }
    for waiter in waiters {
        let response = answer(waiter).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.json::<Value>().await.unwrap()["status"], "success");
    }
    let after = postgres.pool_connections();
    println!("after every waiter was answered: pool (open, idle) {after:?}");
    assert!(after.0 <= POOL);
}

/// The listening connection is cut while a run turns terminal without an announcement (as
/// when another replica commits during the gap): once the feed is back, every waiter reads
/// its run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_feed_is_reopened_and_every_waiter_reads_its_run_again() {
    let db = fresh_database(Backend::Postgres).await;
    let url = db.url.clone();
    let (app, observed) = spawn_observed(db, &[]).await;
    app.deliver_ok(&callback("m-gap", "processing", json!({})))
        .await;
    let waiter = start_waiting(&app, "m-gap", 60);
    observed.reads_reach("m-gap", 1).await;

    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("update runs set status = 'success', status_rank = 2 where message_id = 'm-gap'")
        .execute(&mut admin)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + ANSWER_GUARD;
    loop {
        let cut: Vec<bool> = sqlx::query_scalar(
            "select pg_terminate_backend(pid) from pg_stat_activity \
             where datname = current_database() and application_name = 'nen-relay-listener'",
        )
        .fetch_all(&mut admin)
        .await
        .unwrap();
        if cut.contains(&true) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener connects"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = answer(waiter).await;
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "success");
    assert!(observed.reads("m-gap") >= 2);
}
