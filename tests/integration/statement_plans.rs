//! The PostgreSQL store plans its pooled statements generically (`plan_cache_mode =
//! force_generic_plan`): a batch's arrays, bound as parameters, made the default choice plan
//! the batch anew at every execution. A connection makes each statement's generic plan at its
//! first execution, with the statistics of that moment, and keeps it for its life, so a plan
//! made on a fresh, small table is the plan of every batch after on that connection. Here
//! every statement the store runs is executed first on nearly empty tables, and `auto_explain`
//! (PostgreSQL's contrib module) sends each plan back as a notice, which sqlx logs: the
//! generic ones must walk indexes, and only the three statements meant to be planned for
//! their parameters may be planned otherwise.

/// PostgreSQL only: the name carries it, so `--skip postgres` leaves it out.
mod postgres {
    use chrono::{TimeDelta, Utc};
    use nen_relay::store::{
        AttemptOutcome, FinishedAttempt, IdempotencyClaim, Lease, RunCursor, RunQuery,
        StoredResponse, TriggeredRun,
    };
    use serde_json::json;
    use url::Url;
    use uuid::Uuid;

    use crate::support::app::callback;
    use crate::support::backends::fresh_database;
    use crate::support::logs;
    use crate::support::store_fixtures::{delivery, open_forwarding};
    use crate::support::Backend;

    /// Session settings for the store's connections: every plan reported as a notice, with
    /// its parameters or values (`log_verbose`). How they are planned is the store's own.
    const REPORT_PLANS: &str = "-c session_preload_libraries=auto_explain \
         -c auto_explain.log_min_duration=0 -c auto_explain.log_level=notice \
         -c auto_explain.log_verbose=on";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pooled_statements_probe_indexes_on_generic_plans_made_for_empty_tables() {
        logs::capture();
        let mut db = fresh_database(Backend::Postgres).await;
        let mut url = Url::parse(&db.url).expect("a PostgreSQL URL");
        url.query_pairs_mut().append_pair("options", REPORT_PLANS);
        db.url = url.to_string();
        let store = open_forwarding(&db, &["alpha"]).await;
        // The migrations are explained too, and may scan: only what comes after them counts.
        let migrated = logs::captured().len();
        for round in 0..3 {
            let batch: Vec<_> = (0..4)
                .map(|n| {
                    let body = callback(&format!("m-plan-{round}-{n}"), "processing", json!({}));
                    delivery(&body, round * 10 + n)
                })
                .collect();
            store.record_deliveries(&batch).await.expect("recorded");
        }
        // And a worker's round: claim what is due, then record its deliveries and a retry.
        let lease = Lease {
            owner: Uuid::new_v4(),
            until: Utc::now() + TimeDelta::minutes(1),
        };
        let claimed = store
            .outbox()
            .claim_forward_messages("alpha", 100, lease, Utc::now())
            .await
            .expect("claimed");
        assert_eq!(claimed.len(), 12, "every run's message is due");
        let attempts: Vec<FinishedAttempt> = claimed
            .iter()
            .enumerate()
            .map(|(n, message)| FinishedAttempt {
                id: message.id,
                lease_owner: lease.owner,
                attempted_at: Utc::now(),
                outcome: if n == 0 {
                    AttemptOutcome::Retry {
                        next_attempt_at: Utc::now() + TimeDelta::minutes(1),
                        error: "HTTP 500".into(),
                    }
                } else {
                    AttemptOutcome::Delivered
                },
            })
            .collect();
        let counted = store
            .outbox()
            .finish_forward_attempts(&attempts)
            .await
            .expect("recorded");
        assert_eq!(counted, 12);
        // And what the gauges and `GET /v1/forwarding` count.
        let queue = store
            .outbox()
            .forward_queue("alpha")
            .await
            .expect("counted");
        assert_eq!((queue.pending, queue.failed), (1, 0));
        assert_eq!(queue.last_error.as_deref(), Some("HTTP 500"));
        // And the stuck sweep: every run here is unfinished, and last changed long ago.
        let stuck = store
            .outbox()
            .queue_stuck_runs(Utc::now(), 100, Utc::now())
            .await
            .expect("queued");
        assert_eq!(stuck, 12);
        // And the reads, and the other writes, of the API and the worker.
        let run = store.get_run("m-plan-1-2").await.expect("read");
        assert_eq!(run.map(|run| run.status), Some("processing".to_string()));
        for (workflow_id, status) in [
            (None, None),
            (Some("wf-plan"), None),
            (None, Some("processing")),
            (Some("wf-plan"), Some("processing")),
        ] {
            let query = RunQuery {
                workflow_id: workflow_id.map(str::to_string),
                status: status.map(str::to_string),
                limit: 5,
                after: Some(RunCursor { seq: i64::MAX }),
            };
            store.list_runs(&query).await.expect("listed");
            store
                .list_stuck_runs(&query, Utc::now())
                .await
                .expect("listed");
        }
        assert_eq!(
            store
                .count_stuck_runs(Utc::now(), 100)
                .await
                .expect("counted"),
            12
        );
        assert_eq!(
            store.list_events("m-plan-0-0").await.expect("read").len(),
            1
        );
        store
            .outbox()
            .next_forward_due("alpha", Utc::now())
            .await
            .expect("looked up");
        store
            .outbox()
            .list_failed_forwards("alpha", 10, Some(i64::MAX))
            .await
            .expect("listed");
        store
            .outbox()
            .retry_failed_forwards("alpha", Utc::now())
            .await
            .expect("queued");
        let replayed = store
            .outbox()
            .replay_forwards("alpha", Utc::now() - TimeDelta::hours(1), None, Utc::now())
            .await
            .expect("replayed");
        assert_eq!(replayed, 11, "every delivered message");
        store
            .outbox()
            .prune_forwarded(Utc::now(), 100)
            .await
            .expect("pruned");
        let triggered = TriggeredRun {
            message_id: "m-plan-triggered".into(),
            workflow_id: "wf-plan".into(),
            workflow_params: None,
            created_at: Utc::now(),
        };
        store
            .record_triggered_run(&triggered)
            .await
            .expect("recorded");
        let claim = IdempotencyClaim {
            key: "key-plan".into(),
            request_sha256: [7; 32],
            now: Utc::now(),
            expires_at: Utc::now() + TimeDelta::hours(1),
        };
        for _ in 0..2 {
            store.claim_idempotency_key(&claim).await.expect("claimed");
        }
        let answer = StoredResponse {
            status: 201,
            body: "{}".into(),
        };
        store
            .complete_idempotency_key("key-plan", &answer)
            .await
            .expect("completed");
        store
            .release_idempotency_key("key-plan")
            .await
            .expect("released");

        let logged = logs::captured();
        // Only this test's connections load auto_explain, so every plan here is its store's.
        let plans: Vec<(String, String)> = logged[migrated..]
            .lines()
            .filter(|line| line.contains("sqlx::postgres::notice") && line.contains("Query Text"))
            .map(query_and_plan)
            .collect();
        // A generic plan shows the parameters where a custom one shows their values. The pool
        // plans generically; three statements choose by their parameters, in a transaction of
        // their own: the stuck count, replay, and pruning.
        let (generic, custom): (Vec<_>, Vec<_>) =
            plans.iter().partition(|(_, plan)| plan.contains("$1"));
        // Named by their first lines: the batch's whole text is long.
        let custom: Vec<&str> = custom
            .iter()
            .map(|(query, _)| query.lines().next().unwrap_or_default())
            .collect();
        assert_eq!(custom.len(), 3, "planned for their parameters: {custom:#?}");
        for (query, prefix) in custom.iter().zip([
            "select count(*) from (",
            "update forward_outbox set",
            "delete from forward_outbox",
        ]) {
            assert!(query.starts_with(prefix), "{query}");
        }
        // Three batches, a worker's round, the counts, the sweep, the reads and the other
        // writes of the API.
        assert!(
            generic.len() >= 25,
            "auto_explain reported every statement: {} generic plans",
            generic.len()
        );
        for (query, plan) in generic {
            for table in ["runs", "events", "forward_outbox"] {
                assert!(
                    !plan.contains(&format!("Seq Scan on {table} ")),
                    "a statement scans all of {table}: {query}\n{plan}"
                );
            }
        }
    }

    /// The query text, and the plan, of one line of auto_explain's notices as sqlx logs them.
    fn query_and_plan(line: &str) -> (String, String) {
        let logged: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        let message = logged["fields"]["message"].as_str().expect("a message");
        let text = message.split_once("Query Text: ").expect("a query text").1;
        // The plan starts at its first node, the first line with a cost.
        let node = text.find("(cost=").expect("a plan");
        let start = text[..node].rfind('\n').map_or(0, |at| at + 1);
        (text[..start].trim().to_string(), text[start..].to_string())
    }
}
