//! `/v1/forwarding` and `nen-relay forward`: the token, the listing without targets, 404 for an
//! unknown target on every route, refused queries and bodies, and (in `with_store`) what the
//! routes answer over messages written straight into the outbox table.
//!
//! The edge checks never reach the outbox and run on SQLite only. Targets point at a closed
//! loopback port, and pending messages are seeded due in a day, so that a delivery worker has
//! nothing to send that would change what a test reads.

use chrono::{DateTime, Duration, Utc};
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};

use crate::support::app::error_code;
use crate::support::backends::{fresh_database, Backend};
use crate::support::{TestApp, TestDatabase};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Nothing listens there: a delivery can never succeed.
const CLOSED_PORT_URL: &str = "http://127.0.0.1:1/hooks";

/// The app with forwarding targets `name = url`.
async fn spawn_with_targets(db: TestDatabase, targets: &[(&str, &str)]) -> TestApp {
    let targets: Vec<(String, String)> = targets
        .iter()
        .map(|(name, url)| ((*name).to_owned(), (*url).to_owned()))
        .collect();
    TestApp::spawn_with(db, move |variables| {
        for (name, url) in targets {
            let prefix = format!("NEN_RELAY_FORWARD__{}", name.to_ascii_uppercase());
            variables.insert(format!("{prefix}__URL"), url);
            variables.insert(format!("{prefix}__SECRET"), SECRET.into());
        }
    })
    .await
}

async fn sqlite_app(targets: &[(&str, &str)]) -> TestApp {
    spawn_with_targets(fresh_database(Backend::Sqlite).await, targets).await
}

/// A request with the first token, and a JSON body when given.
async fn send(app: &TestApp, method: Method, path: &str, body: Option<&str>) -> Response {
    let mut request = app
        .client
        .request(method, app.url(path))
        .bearer_auth(&app.tokens[0]);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    request.send().await.expect("the app answers")
}

const REPLAY_BODY: &str = r#"{"since": "2026-01-31T09:00:00Z"}"#;

/// Every route, with a body each accepts.
fn routes(target: &str) -> [(Method, String, Option<&'static str>); 4] {
    [
        (Method::GET, "/v1/forwarding".into(), None),
        (Method::GET, format!("/v1/forwarding/{target}/failed"), None),
        (
            Method::POST,
            format!("/v1/forwarding/{target}/retry-failed"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/forwarding/{target}/replay"),
            Some(REPLAY_BODY),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_the_token() {
    let app = sqlite_app(&[("orders", CLOSED_PORT_URL)]).await;
    for (method, path, body) in routes("orders") {
        for token in [None, Some("not-a-token")] {
            let mut request = app.client.request(method.clone(), app.url(&path));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request
                    .header("content-type", "application/json")
                    .body(body);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} {token:?}"
            );
            assert_eq!(error_code(response).await, "unauthorized");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_targets_the_listing_is_empty() {
    let app = sqlite_app(&[]).await;
    let response = send(&app, Method::GET, "/v1/forwarding", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"targets": []})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_target_is_not_found_on_every_route() {
    for targets in [&[][..], &[("orders", CLOSED_PORT_URL)][..]] {
        let app = sqlite_app(targets).await;
        for name in ["nope", "Orders", "orders_", "%00"] {
            for (method, path, body) in routes(name).into_iter().skip(1) {
                let response = send(&app, method.clone(), &path, body).await;
                assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method} {path}");
                assert_eq!(error_code(response).await, "not_found");
            }
            // Known first, then checked: a bad query or body does not hide that it is unknown.
            for (method, path, body) in [
                (
                    Method::GET,
                    format!("/v1/forwarding/{name}/failed?limit=0&x=1"),
                    None,
                ),
                (
                    Method::POST,
                    format!("/v1/forwarding/{name}/replay"),
                    Some("{"),
                ),
            ] {
                let response = send(&app, method.clone(), &path, body).await;
                assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method} {path}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_and_bodies_are_refused() {
    let app = sqlite_app(&[("orders", CLOSED_PORT_URL)]).await;
    for (query, word) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("cursor=garbage", "cursor"),
        // A runs cursor (`v1:5`) is not a position in this listing.
        ("cursor=djE6NQ", "cursor"),
        ("before=5", "before"),
    ] {
        let path = format!("/v1/forwarding/orders/failed?{query}");
        let response = send(&app, Method::GET, &path, None).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request", "{query}");
        assert!(
            body["message"].as_str().unwrap().contains(word),
            "{query}: {body}"
        );
    }
    for (body, word) in [
        ("", ""),
        ("{", ""),
        ("[]", ""),
        ("{}", "since"),
        (r#"{"since": 1769850000}"#, "since"),
        (r#"{"since": "yesterday"}"#, "RFC 3339"),
        (r#"{"since": "2026-01-31"}"#, "RFC 3339"),
        (
            r#"{"since": "2026-01-31T09:00:00Z", "until": "soon"}"#,
            "until",
        ),
        (
            r#"{"since": "2026-01-31T09:00:00Z", "until": "2026-01-31T09:00:00Z"}"#,
            "later",
        ),
        (
            r#"{"since": "2026-01-31T09:00:00Z", "until": "2026-01-31T08:00:00Z"}"#,
            "later",
        ),
        (
            r#"{"since": "2026-01-31T09:00:00Z", "untill": "2026-02-01T09:00:00Z"}"#,
            "untill",
        ),
    ] {
        let response = send(
            &app,
            Method::POST,
            "/v1/forwarding/orders/replay",
            Some(body),
        )
        .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"], "invalid_request", "{body}");
        assert!(
            answer["message"].as_str().unwrap().contains(word),
            "{body}: {answer}"
        );
    }
    // A body that does not say it is JSON.
    let response = app
        .client
        .post(app.url("/v1/forwarding/orders/replay"))
        .bearer_auth(&app.tokens[0])
        .body(REPLAY_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(response).await, "invalid_request");
}

/// `nen-relay forward <args>` against the app: exit code, stdout, stderr.
async fn forward_command(
    app: &TestApp,
    args: &[&str],
    token: &str,
) -> (Option<i32>, String, String) {
    forward_command_at(&app.address, args, token).await
}

async fn forward_command_at(
    url: &str,
    args: &[&str],
    token: &str,
) -> (Option<i32>, String, String) {
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_nen-relay"))
            .arg("forward")
            .args(args)
            .env_clear()
            .env("NEN_RELAY_URL", url)
            .env("NEN_RELAY_TOKEN", token)
            .output(),
    )
    .await
    .expect("the command ends")
    .expect("the command runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forward_command_reports_status_and_refusals() {
    let app = sqlite_app(&[]).await;
    let token = app.tokens[1].clone();
    let (code, stdout, stderr) = forward_command(&app, &["status"], &token).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "no forwarding target is configured\n");
    let (code, stdout, _) = forward_command(&app, &["status", "--json"], &token).await;
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap(),
        json!({"targets": []})
    );
    // Refused by the server: 1, with its reason.
    let (code, _, stderr) = forward_command(&app, &["failed", "nope"], &token).await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("404") && stderr.contains("nope"),
        "{stderr}"
    );
    let (code, _, stderr) = forward_command(&app, &["status"], "not-a-token").await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("401"), "{stderr}");
    // A bad command line: 2, and nothing is asked.
    let (code, _, stderr) =
        forward_command(&app, &["replay", "orders", "--since", "yesterday"], &token).await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("RFC 3339"), "{stderr}");
    // No server: 3.
    let (code, _, stderr) = forward_command_at("http://127.0.0.1:1", &["status"], &token).await;
    assert_eq!(code, Some(3));
    assert!(stderr.contains("no answer"), "{stderr}");
}

/// Needs the outbox's store methods: answers over rows written straight into `forward_outbox`.
mod with_store {
    use super::*;
    use crate::on_both_backends;
    use crate::support::stored::count;
    use crate::support::Backend;
    use sqlx::Connection;

    /// One outbox row as a test writes it.
    struct Row<'a> {
        target: &'a str,
        message_id: &'a str,
        state: &'a str,
        committed_at: DateTime<Utc>,
        queued_at: DateTime<Utc>,
        last_error: Option<&'a str>,
    }

    impl<'a> Row<'a> {
        fn new(target: &'a str, message_id: &'a str, state: &'a str, ago: Duration) -> Self {
            let at = Utc::now() - ago;
            Row {
                target,
                message_id,
                state,
                committed_at: at,
                queued_at: at,
                last_error: None,
            }
        }

        fn error(self, last_error: &'a str) -> Self {
            Row {
                last_error: Some(last_error),
                ..self
            }
        }
    }

    /// Writes `rows` in order and answers their ids. A pending row is due in a day, so that no
    /// worker sends it meanwhile.
    async fn seed(db: &TestDatabase, rows: &[Row<'_>]) -> Vec<i64> {
        let statement = "insert into forward_outbox (target, message_id, event_type, run, \
             committed_at, queued_at, state, attempts, next_attempt_at, last_attempt_at, \
             last_error, delivered_at) values ($1, $2, 'run.status_changed', $3, $4, $5, $6, $7, \
             $8, $9, $10, $11) returning id";
        let mut ids = Vec::new();
        for row in rows {
            let run = json!({"message_id": row.message_id, "status": "success"}).to_string();
            let tried = row.state != "pending" || row.last_error.is_some();
            let attempts: i32 = if tried { 3 } else { 0 };
            let next_attempt_at = Utc::now() + Duration::days(1);
            let last_attempt_at = tried.then_some(row.queued_at + Duration::seconds(1));
            let delivered_at = (row.state == "delivered").then_some(row.queued_at);
            let id: i64 = match db.backend {
                Backend::Postgres => {
                    let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
                    sqlx::query_scalar(statement)
                        .bind(row.target)
                        .bind(row.message_id)
                        .bind(&run)
                        .bind(row.committed_at)
                        .bind(row.queued_at)
                        .bind(row.state)
                        .bind(attempts)
                        .bind(next_attempt_at)
                        .bind(last_attempt_at)
                        .bind(row.last_error)
                        .bind(delivered_at)
                        .fetch_one(&mut connection)
                        .await
                        .unwrap()
                }
                Backend::Sqlite => {
                    // The store's one fixed-width UTC form.
                    let text =
                        |time: DateTime<Utc>| time.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string();
                    let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
                    sqlx::query_scalar(&statement.replace('$', "?"))
                        .bind(row.target)
                        .bind(row.message_id)
                        .bind(&run)
                        .bind(text(row.committed_at))
                        .bind(text(row.queued_at))
                        .bind(row.state)
                        .bind(attempts)
                        .bind(text(next_attempt_at))
                        .bind(last_attempt_at.map(text))
                        .bind(row.last_error)
                        .bind(delivered_at.map(text))
                        .fetch_one(&mut connection)
                        .await
                        .unwrap()
                }
            };
            ids.push(id);
        }
        ids
    }

    /// How many rows of `target` are in `state`.
    async fn in_state(db: &TestDatabase, target: &str, state: &str) -> i64 {
        let statement = "select count(*) from forward_outbox where target = $1 and state = $2";
        match db.backend {
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
                sqlx::query_scalar(statement)
                    .bind(target)
                    .bind(state)
                    .fetch_one(&mut connection)
                    .await
                    .unwrap()
            }
            Backend::Sqlite => {
                let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
                sqlx::query_scalar(&statement.replace('$', "?"))
                    .bind(target)
                    .bind(state)
                    .fetch_one(&mut connection)
                    .await
                    .unwrap()
            }
        }
    }

    async fn json_of(response: Response, status: StatusCode) -> Value {
        assert_eq!(response.status(), status);
        response.json().await.unwrap()
    }

    fn webhook_ids(page: &Value) -> Vec<String> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|message| message["webhook_id"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn status_counts_each_targets_queue(db: TestDatabase) {
        let app = spawn_with_targets(
            db,
            &[
                ("orders", "http://user:hunter22@127.0.0.1:1/hooks"),
                ("pager", CLOSED_PORT_URL),
            ],
        )
        .await;
        let rows = [
            Row::new("orders", "m-1", "pending", Duration::minutes(10)).error("HTTP 503"),
            Row::new("orders", "m-2", "pending", Duration::minutes(1)),
            Row::new("orders", "m-3", "failed", Duration::hours(80)).error("HTTP 500"),
            Row::new("orders", "m-4", "delivered", Duration::minutes(20)),
            // A target no longer configured is not listed.
            Row::new("gone", "m-1", "failed", Duration::hours(80)).error("gone"),
        ];
        seed(&app.db, &rows).await;
        let response = send(&app, Method::GET, "/v1/forwarding", None).await;
        let text = response.text().await.unwrap();
        assert!(
            !text.contains("hunter22") && !text.contains("user@"),
            "{text}"
        );
        let listing: Value = serde_json::from_str(&text).unwrap();
        let targets = listing["targets"].as_array().unwrap();
        assert_eq!(targets.len(), 2, "{listing}");
        let orders = &targets[0];
        assert_eq!(orders["name"], "orders");
        assert_eq!(orders["url"], "http://127.0.0.1:1/hooks");
        assert_eq!(
            (orders["pending"].as_u64(), orders["failed"].as_u64()),
            (Some(2), Some(1))
        );
        let oldest = orders["oldest_pending_seconds"].as_f64().unwrap();
        assert!((600.0..3600.0).contains(&oldest), "{oldest}");
        assert!(
            matches!(orders["last_error"].as_str(), Some("HTTP 503" | "HTTP 500")),
            "{orders}"
        );
        assert_eq!(
            targets[1],
            json!({"name": "pager", "url": CLOSED_PORT_URL, "pending": 0,
                   "oldest_pending_seconds": null, "failed": 0, "last_error": null})
        );
        // The command line shows the same.
        let (code, stdout, stderr) = forward_command(&app, &["status"], &app.tokens[0]).await;
        assert_eq!(code, Some(0), "{stderr}");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 3, "{stdout}");
        assert!(lines[0].starts_with("TARGET"), "{stdout}");
        let orders_line: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            orders_line[..3],
            ["orders", "http://127.0.0.1:1/hooks", "2"],
            "{stdout}"
        );
        assert!(lines[2].starts_with("pager "), "{stdout}");
    }

    async fn failed_messages_page_newest_first(db: TestDatabase) {
        let app = spawn_with_targets(
            db,
            &[("orders", CLOSED_PORT_URL), ("pager", CLOSED_PORT_URL)],
        )
        .await;
        let old = Duration::hours(80);
        let ids = seed(
            &app.db,
            &[
                Row::new("orders", "m-a", "failed", old).error("HTTP 500"),
                Row::new("pager", "m-a", "failed", old).error("HTTP 500"),
                Row::new("orders", "m-b", "failed", old).error("timed out"),
                Row::new("orders", "m-c", "pending", Duration::minutes(1)),
                Row::new("orders", "m-d", "failed", old).error("HTTP 410"),
            ],
        )
        .await;
        let webhook_id = |index: usize| format!("msg_{}", ids[index]);
        let first = json_of(
            send(
                &app,
                Method::GET,
                "/v1/forwarding/orders/failed?limit=2",
                None,
            )
            .await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(webhook_ids(&first), [webhook_id(4), webhook_id(2)]);
        let message = &first["messages"][0];
        assert_eq!(
            (
                &message["type"],
                &message["message_id"],
                &message["last_error"]
            ),
            (
                &json!("run.status_changed"),
                &json!("m-d"),
                &json!("HTTP 410")
            )
        );
        let cursor = first["next_cursor"].as_str().expect("a next page");
        let second = json_of(
            send(
                &app,
                Method::GET,
                &format!("/v1/forwarding/orders/failed?limit=2&cursor={cursor}"),
                None,
            )
            .await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(webhook_ids(&second), [webhook_id(0)]);
        assert_eq!(second["next_cursor"], Value::Null);
        let whole = json_of(
            send(&app, Method::GET, "/v1/forwarding/orders/failed", None).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(
            webhook_ids(&whole),
            [webhook_id(4), webhook_id(2), webhook_id(0)]
        );
        let pager = json_of(
            send(&app, Method::GET, "/v1/forwarding/pager/failed", None).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(webhook_ids(&pager), [webhook_id(1)]);
    }

    async fn retry_failed_queues_failed_messages_again(db: TestDatabase) {
        let app = spawn_with_targets(
            db,
            &[("orders", CLOSED_PORT_URL), ("pager", CLOSED_PORT_URL)],
        )
        .await;
        let old = Duration::hours(80);
        seed(
            &app.db,
            &[
                Row::new("orders", "m-a", "failed", old).error("HTTP 500"),
                Row::new("orders", "m-b", "failed", old).error("HTTP 500"),
                Row::new("orders", "m-c", "delivered", old),
                Row::new("pager", "m-a", "failed", old).error("HTTP 500"),
            ],
        )
        .await;
        let path = "/v1/forwarding/orders/retry-failed";
        let answer = json_of(
            send(&app, Method::POST, path, None).await,
            StatusCode::ACCEPTED,
        )
        .await;
        assert_eq!(answer, json!({"enqueued": 2}));
        let again = json_of(
            send(&app, Method::POST, path, None).await,
            StatusCode::ACCEPTED,
        )
        .await;
        assert_eq!(again, json!({"enqueued": 0}));
        assert_eq!(in_state(&app.db, "orders", "failed").await, 0);
        assert_eq!(in_state(&app.db, "orders", "delivered").await, 1);
        assert_eq!(
            in_state(&app.db, "pager", "failed").await,
            1,
            "another target's"
        );
        // The command line: the pager's one message.
        let (code, stdout, stderr) =
            forward_command(&app, &["retry-failed", "pager"], &app.tokens[0]).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(stdout, "pager: 1 message queued again\n");
    }

    async fn replay_queues_a_window_of_changes_again(db: TestDatabase) {
        let app = spawn_with_targets(
            db,
            &[("orders", CLOSED_PORT_URL), ("pager", CLOSED_PORT_URL)],
        )
        .await;
        seed(
            &app.db,
            &[
                Row::new("orders", "m-a", "delivered", Duration::hours(3)),
                Row::new("orders", "m-b", "failed", Duration::minutes(150)).error("HTTP 500"),
                Row::new("orders", "m-c", "delivered", Duration::hours(2)),
                Row::new("orders", "m-d", "pending", Duration::minutes(100)),
                Row::new("orders", "m-e", "delivered", Duration::hours(1)),
                Row::new("pager", "m-c", "delivered", Duration::hours(2)),
            ],
        )
        .await;
        let replay = |since: DateTime<Utc>, until: Option<DateTime<Utc>>| {
            let mut body = json!({"since": since.to_rfc3339()});
            if let Some(until) = until {
                body["until"] = json!(until.to_rfc3339());
            }
            body.to_string()
        };
        let path = "/v1/forwarding/orders/replay";
        let now = Utc::now();
        // A window in the future holds nothing.
        let future = replay(now + Duration::days(365), Some(now + Duration::days(366)));
        let answer = json_of(
            send(&app, Method::POST, path, Some(&future)).await,
            StatusCode::ACCEPTED,
        )
        .await;
        assert_eq!(answer, json!({"enqueued": 0}));
        // From 2h31m ago to 90 min ago: m-b (failed) and m-c; m-d is pending and left alone.
        let window = replay(
            now - Duration::minutes(151),
            Some(now - Duration::minutes(90)),
        );
        let answer = json_of(
            send(&app, Method::POST, path, Some(&window)).await,
            StatusCode::ACCEPTED,
        )
        .await;
        assert_eq!(answer, json!({"enqueued": 2}));
        assert_eq!(
            in_state(&app.db, "orders", "delivered").await,
            2,
            "m-a and m-e"
        );
        assert_eq!(
            in_state(&app.db, "pager", "delivered").await,
            1,
            "another target's"
        );
        // Open-ended from 4h ago, by the command line: m-a and m-e; the rest are pending now.
        let (code, stdout, stderr) = forward_command(
            &app,
            &["replay", "orders", "--since", "4h", "--json"],
            &app.tokens[0],
        )
        .await;
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(
            serde_json::from_str::<Value>(&stdout).unwrap(),
            json!({"enqueued": 2})
        );
        assert_eq!(in_state(&app.db, "orders", "delivered").await, 0);
        // Queued again, not copied: the same rows, so the same webhook-id.
        assert_eq!(in_state(&app.db, "orders", "pending").await, 5);
        assert_eq!(count(&app.db, "forward_outbox").await, 6);
    }

    on_both_backends!(
        status_counts_each_targets_queue,
        failed_messages_page_newest_first,
        retry_failed_queues_failed_messages_again,
        replay_queues_a_window_of_changes_again,
    );
}
