//! Migrations run on a connection of their own: the request statement timeout does not cut
//! them, they wait for a lock held elsewhere up to `store.migrate_lock_timeout`, and past it they
//! fail with an error that names that setting.
//!
//! The lock is held from the test: on PostgreSQL a table lock on `_sqlx_migrations` (which every
//! migration run reads), or sqlx's advisory lock held by another replica's migration; on SQLite
//! the write lock, from a `begin immediate` transaction of another connection.

use std::sync::Arc;
use std::time::Duration;

use nen_relay::store::{self, Store, StoreError, StoreOptions};
use secrecy::SecretString;
use sqlx::{Connection, PgConnection, SqliteConnection};
use tokio::task::JoinHandle;

use crate::on_both_backends;
use crate::support::{Backend, TestDatabase};

/// Far shorter than any migration: were it applied to migrations, they would fail at once.
const STATEMENT_TIMEOUT: Duration = Duration::from_millis(100);

fn migrating(
    db: &TestDatabase,
    migrate_lock_timeout: Duration,
) -> JoinHandle<Result<Arc<dyn Store>, StoreError>> {
    let url = SecretString::from(db.url.clone());
    let options = StoreOptions {
        statement_timeout: STATEMENT_TIMEOUT,
        migrate_lock_timeout,
        ..StoreOptions::default()
    };
    tokio::spawn(async move { store::connect(&url, &options, true).await })
}

/// Another session holding what a migration needs.
enum Holder {
    Postgres(PgConnection),
    Sqlite(SqliteConnection),
}

impl Holder {
    /// The database must exist (PostgreSQL: migrated once, so that the table is there).
    async fn hold(db: &TestDatabase) -> Holder {
        match db.backend {
            Backend::Postgres => {
                let mut connection = PgConnection::connect(&db.url).await.unwrap();
                sqlx::query("begin").execute(&mut connection).await.unwrap();
                sqlx::query("lock table _sqlx_migrations in access exclusive mode")
                    .execute(&mut connection)
                    .await
                    .unwrap();
                Holder::Postgres(connection)
            }
            Backend::Sqlite => {
                let mut connection = SqliteConnection::connect(&db.url).await.unwrap();
                sqlx::query("begin immediate")
                    .execute(&mut connection)
                    .await
                    .unwrap();
                Holder::Sqlite(connection)
            }
        }
    }

    async fn release(self) {
        match self {
            Holder::Postgres(mut connection) => {
                sqlx::query("commit")
                    .execute(&mut connection)
                    .await
                    .unwrap();
                connection.close().await.unwrap();
            }
            Holder::Sqlite(mut connection) => {
                sqlx::query("commit")
                    .execute(&mut connection)
                    .await
                    .unwrap();
                connection.close().await.unwrap();
            }
        }
    }
}

/// Prepares the database the holder needs: PostgreSQL migrated once (the migration table
/// exists, and a later run only has to read it); SQLite a file in WAL mode with nothing in it,
/// so that every migration is still to be applied.
async fn prepare(db: &TestDatabase) {
    match db.backend {
        Backend::Postgres => {
            migrating(db, Duration::from_secs(60))
                .await
                .unwrap()
                .expect("the first migration runs");
        }
        Backend::Sqlite => {
            let options = db
                .url
                .parse::<sqlx::sqlite::SqliteConnectOptions>()
                .unwrap()
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
            let connection = SqliteConnection::connect_with(&options).await.unwrap();
            connection.close().await.unwrap();
        }
    }
}

/// PostgreSQL: waits until `sessions` migrating sessions of this database have waited for a
/// lock for longer than the statement timeout, as the server sees it. Polled with a deadline:
/// an "eventually" check, on the server's own account of the wait.
async fn until_migrations_wait(db: &TestDatabase, sessions: i64, wait_event: &str) {
    let mut monitor = PgConnection::connect(&db.url).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where datname = current_database()
               and application_name = 'nen-relay migrate'
               and wait_event_type = 'Lock'
               and wait_event = $1
               and clock_timestamp() - query_start > $2 * interval '1 millisecond'",
        )
        .bind(wait_event)
        .bind(STATEMENT_TIMEOUT.as_millis() as f64 * 2.0)
        .fetch_one(&mut monitor)
        .await
        .unwrap();
        if waiting >= sessions {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no migration is waiting for a {wait_event} lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_migration_waits_for_a_lock_past_the_statement_timeout(db: TestDatabase) {
    prepare(&db).await;
    let holder = Holder::hold(&db).await;
    let mut migration = migrating(&db, Duration::from_secs(60));
    match db.backend {
        Backend::Postgres => until_migrations_wait(&db, 1, "relation").await,
        // SQLite says nothing of who waits: the migration must still be going several statement
        // timeouts later (a migration cut by the statement timeout would have failed by then).
        Backend::Sqlite => assert!(
            tokio::time::timeout(STATEMENT_TIMEOUT * 10, &mut migration)
                .await
                .is_err(),
            "the migration ended while the lock was held"
        ),
    }
    assert!(!migration.is_finished());
    holder.release().await;
    let store = migration
        .await
        .unwrap()
        .expect("the migration succeeds once the lock is released");
    store.ping().await.unwrap();
    assert!(store.get_run("m-none").await.unwrap().is_none());
}

async fn a_migration_gives_up_after_migrate_lock_timeout_and_names_it(db: TestDatabase) {
    prepare(&db).await;
    let holder = Holder::hold(&db).await;
    let patient = match db.backend {
        // Another replica's migration, waiting behind the table lock, holds sqlx's advisory
        // lock: this one waits for that.
        Backend::Postgres => {
            let patient = migrating(&db, Duration::from_secs(60));
            until_migrations_wait(&db, 1, "relation").await;
            Some(patient)
        }
        Backend::Sqlite => None,
    };
    let error = migrating(&db, Duration::from_millis(300))
        .await
        .unwrap()
        .err()
        .expect("the migration gives up");
    let message = error.to_string();
    assert!(
        matches!(error, StoreError::Unavailable(_)),
        "unavailable, not a bug: {message}"
    );
    assert!(
        message.contains("store.migrate_lock_timeout")
            && message.contains("NEN_RELAY_STORE__MIGRATE_LOCK_TIMEOUT")
            && message.contains("300ms"),
        "{message}"
    );
    holder.release().await;
    if let Some(patient) = patient {
        patient
            .await
            .unwrap()
            .expect("the patient replica migrates once the lock is released");
    }
}

/// Rolling back is redeploying the previous release on the database the newer one migrated: a
/// migration this binary does not know is accepted, while one it knows but that was changed is
/// still refused.
async fn a_database_migrated_by_a_newer_release_still_opens(db: TestDatabase) {
    prepare(&db).await;
    migrating(&db, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("the first migration runs");
    // One byte that is no migration's checksum, as each backend writes a byte string.
    let checksum = match db.backend {
        Backend::Postgres => "'\\x00'::bytea",
        Backend::Sqlite => "x'00'",
    };
    let newer = format!(
        "insert into _sqlx_migrations (version, description, success, checksum, execution_time) \
         values (99990101000000, 'from a newer release', true, {checksum}, 0)"
    );
    let tampered = format!("update _sqlx_migrations set checksum = {checksum} where version = 1");
    let execute = |sql: String| {
        let url = db.url.clone();
        let backend = db.backend;
        async move {
            match backend {
                Backend::Postgres => {
                    let mut connection = PgConnection::connect(&url).await.unwrap();
                    sqlx::query(&sql).execute(&mut connection).await.unwrap();
                }
                Backend::Sqlite => {
                    let mut connection = SqliteConnection::connect(&url).await.unwrap();
                    sqlx::query(&sql).execute(&mut connection).await.unwrap();
                }
            }
        }
    };
    execute(newer).await;
    migrating(&db, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("an older release opens a database a newer one migrated");
    execute(tampered).await;
    let refused = migrating(&db, Duration::from_secs(60)).await.unwrap();
    assert!(
        refused.is_err(),
        "a changed migration must still be refused"
    );
}

on_both_backends!(
    a_migration_waits_for_a_lock_past_the_statement_timeout,
    a_migration_gives_up_after_migrate_lock_timeout_and_names_it,
    a_database_migrated_by_a_newer_release_still_opens,
);
