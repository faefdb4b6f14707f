//! What a test's database holds, read straight from it rather than through the app.

use sqlx::Connection;

use super::backends::{Backend, TestDatabase};

/// Every event's payload, in insertion order.
pub async fn event_payloads(db: &TestDatabase) -> Vec<String> {
    column(db, "select payload from events order by id").await
}

/// Every rejected payload's body, in insertion order.
pub async fn rejected_bodies(db: &TestDatabase) -> Vec<Vec<u8>> {
    column(db, "select body from rejected_payloads order by id").await
}

/// How many rows `table` holds.
pub async fn count(db: &TestDatabase, table: &str) -> i64 {
    column::<i64>(db, &format!("select count(*) from {table}"))
        .await
        .into_iter()
        .next()
        .unwrap_or_default()
}

async fn column<T>(db: &TestDatabase, sql: &str) -> Vec<T>
where
    T: Send + Unpin,
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    T: for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    match db.backend {
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(sql)
                .fetch_all(&mut connection)
                .await
                .unwrap()
        }
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(sql)
                .fetch_all(&mut connection)
                .await
                .unwrap()
        }
    }
}

/// Sets a run's `updated_at`, as if nothing had been heard of it since `time`.
pub async fn set_updated_at(
    db: &TestDatabase,
    message_id: &str,
    time: chrono::DateTime<chrono::Utc>,
) {
    match db.backend {
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query("update runs set updated_at = $1 where message_id = $2")
                .bind(time)
                .bind(message_id)
                .execute(&mut connection)
                .await
                .unwrap();
        }
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            // The store's one fixed-width UTC form.
            sqlx::query("update runs set updated_at = ? where message_id = ?")
                .bind(time.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string())
                .bind(message_id)
                .execute(&mut connection)
                .await
                .unwrap();
        }
    }
}

/// One row of `forward_outbox`, as a test checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRow {
    pub id: i64,
    pub target: String,
    pub message_id: String,
    pub event_type: String,
    pub run: String,
    pub state: String,
    pub attempts: i64,
    /// `committed_at`, `queued_at` and `next_attempt_at` are one instant.
    pub times_agree: bool,
}

type ForwardTuple = (i64, String, String, String, String, String, i64, bool);

/// Every forwarding message, in id order, read with plain SQL.
pub async fn forward_rows(db: &TestDatabase) -> Vec<ForwardRow> {
    const COLUMNS: &str = "id, target, message_id, event_type, run, state, attempts, \
         (committed_at = queued_at and queued_at = next_attempt_at) as times_agree";
    let rows: Vec<ForwardTuple> = match db.backend {
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_as(&format!(
                "select {} from forward_outbox order by id",
                COLUMNS.replace("attempts,", "attempts::int8,")
            ))
            .fetch_all(&mut connection)
            .await
            .unwrap()
        }
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_as(&format!("select {COLUMNS} from forward_outbox order by id"))
                .fetch_all(&mut connection)
                .await
                .unwrap()
        }
    };
    rows.into_iter()
        .map(
            |(id, target, message_id, event_type, run, state, attempts, times_agree)| ForwardRow {
                id,
                target,
                message_id,
                event_type,
                run,
                state,
                attempts,
                times_agree,
            },
        )
        .collect()
}
