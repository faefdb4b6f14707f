//! PostgreSQL keeps the plan of a prepared statement: after a few executions it settles on a
//! generic plan, made with the statistics of that moment, and keeps it while the tables grow.
//! sqlx prepares each statement once per connection, so a plan made on a fresh, small table
//! is the plan of every batch after. Here every statement is planned generically from its
//! first execution, on empty tables, and `auto_explain` (PostgreSQL's contrib module) sends
//! each plan back as a notice, which sqlx logs. The statements covered are forwarding's, on
//! PostgreSQL: a batch with targets, a worker's round, the queue's count, the stuck sweep.

/// PostgreSQL only: the name carries it, so `--skip postgres` leaves it out.
mod postgres {
    use chrono::{TimeDelta, Utc};
    use nen_relay::store::{AttemptOutcome, FinishedAttempt, Lease};
    use serde_json::json;
    use url::Url;
    use uuid::Uuid;

    use crate::support::app::callback;
    use crate::support::backends::fresh_database;
    use crate::support::logs;
    use crate::support::store_fixtures::{delivery, open_forwarding};
    use crate::support::Backend;

    /// Session settings for the store's connections: generic plans at once, each one reported.
    const REPORT_GENERIC_PLANS: &str = "-c plan_cache_mode=force_generic_plan \
         -c session_preload_libraries=auto_explain -c auto_explain.log_min_duration=0 \
         -c auto_explain.log_level=notice";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarding_statements_probe_indexes_on_plans_made_for_empty_tables() {
        logs::capture();
        let mut db = fresh_database(Backend::Postgres).await;
        let mut url = Url::parse(&db.url).expect("a PostgreSQL URL");
        url.query_pairs_mut()
            .append_pair("options", REPORT_GENERIC_PLANS);
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

        let logged = logs::captured();
        // Only this test's connections load auto_explain, so every plan here is its store's.
        let plans: Vec<&str> = logged[migrated..]
            .lines()
            .filter(|line| line.contains("sqlx::postgres::notice") && line.contains("Query Text"))
            .collect();
        // Each batch is one statement (messages included); then the claim, the outcomes, the
        // queue, and the sweep's two.
        assert!(
            plans.len() >= 8,
            "auto_explain reported every statement of three batches, a round, a count and a sweep: \
             {} plans",
            plans.len()
        );
        for plan in plans {
            for table in ["runs", "events", "forward_outbox"] {
                assert!(
                    !plan.contains(&format!("Seq Scan on {table} ")),
                    "a forwarding statement scans all of {table}: {plan}"
                );
            }
        }
    }
}
