//! A fresh, empty database per test, on either backend.
//!
//! PostgreSQL: a new database on the server named by `NEN_RELAY_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), dropped when the test ends. When that server
//! cannot be reached the PostgreSQL half is skipped with a notice on stderr, unless
//! `NEN_RELAY_REQUIRE_POSTGRES=1` (CI sets it), which turns the skip into a failure.
//!
//! SQLite: a file in a temporary directory, removed when the test ends.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::Connection;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A database that exists for one test.
pub struct TestDatabase {
    pub backend: Backend,
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    DropPostgres { admin_url: String, name: String },
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Cleanup::DropPostgres { admin_url, name } = &self.cleanup {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs outside any runtime the test may still be using: use a thread of its own.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for cleanup");
                runtime.block_on(async {
                    if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                        let _ = sqlx::query(&format!(
                            "drop database if exists \"{name}\" with (force)"
                        ))
                        .execute(&mut admin)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

pub fn postgres_admin_url() -> String {
    std::env::var("NEN_RELAY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn postgres_required() -> bool {
    std::env::var("NEN_RELAY_REQUIRE_POSTGRES").is_ok_and(|v| v == "1" || v == "true")
}

/// Says once per test binary, on the real stderr (not captured by the test harness), that the
/// PostgreSQL half did not run.
fn announce_skip(reason: &str) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = writeln!(
            std::io::stderr(),
            "\nSKIPPED: the PostgreSQL half of the suite did not run ({reason}). \
             Start PostgreSQL or set NEN_RELAY_TEST_POSTGRES_URL; NEN_RELAY_REQUIRE_POSTGRES=1 makes this a failure.\n"
        );
    });
}

/// A fresh database, or `None` when PostgreSQL is unreachable and not required.
pub async fn fresh_database(backend: Backend) -> Option<TestDatabase> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let url = format!("sqlite://{}/relay.db", dir.path().display());
            Some(TestDatabase {
                backend,
                url,
                cleanup: Cleanup::Sqlite(dir),
            })
        }
        Backend::Postgres => {
            let admin_url = postgres_admin_url();
            let connected = tokio::time::timeout(
                Duration::from_secs(5),
                sqlx::PgConnection::connect(&admin_url),
            )
            .await;
            let mut admin = match connected {
                Ok(Ok(connection)) => connection,
                Ok(Err(error)) => return skip_or_fail(&format!("{error}")),
                Err(_) => return skip_or_fail("no answer within 5 s"),
            };
            let name = format!("nen_relay_test_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(&format!("create database \"{name}\""))
                .execute(&mut admin)
                .await
                .expect("create a test database");
            let mut url = url::Url::parse(&admin_url).expect("a valid PostgreSQL URL");
            url.set_path(&format!("/{name}"));
            Some(TestDatabase {
                backend,
                url: url.to_string(),
                cleanup: Cleanup::DropPostgres { admin_url, name },
            })
        }
    }
}

fn skip_or_fail(reason: &str) -> Option<TestDatabase> {
    let reason = format!("cannot connect to {}: {reason}", postgres_admin_url());
    if postgres_required() {
        panic!("NEN_RELAY_REQUIRE_POSTGRES=1 but {reason}");
    }
    announce_skip(&reason);
    None
}

/// Runs each listed `async fn name(db: TestDatabase)` once per backend, as
/// `<module>::postgres::name` and `<module>::sqlite::name`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(db) = $crate::support::backends::fresh_database(
                        $crate::support::backends::Backend::Postgres,
                    ).await {
                        super::$name(db).await;
                    }
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::support::backends::fresh_database(
                        $crate::support::backends::Backend::Sqlite,
                    ).await.expect("SQLite needs no server");
                    super::$name(db).await;
                }
            )*
        }
    };
}
