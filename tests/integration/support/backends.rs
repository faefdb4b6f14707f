//! A fresh, empty database per test, on either backend.
//!
//! PostgreSQL: a new database on the suite's server (see `postgres`), dropped when the test
//! ends. SQLite: a file in a temporary directory, removed when the test ends.

use sqlx::Connection;

use super::postgres;

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
    DropPostgres {
        admin_url: &'static str,
        name: String,
    },
    /// Held for its `Drop`, which removes the directory.
    Sqlite { _directory: tempfile::TempDir },
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Cleanup::DropPostgres { admin_url, name } = &self.cleanup else {
            return;
        };
        let (admin_url, name) = (*admin_url, name.clone());
        // Drop runs outside any runtime the test may still be using: use a thread of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            runtime.block_on(async {
                if let Ok(mut admin) = sqlx::PgConnection::connect(admin_url).await {
                    let _ =
                        sqlx::query(&format!("drop database if exists \"{name}\" with (force)"))
                            .execute(&mut admin)
                            .await;
                }
            });
        })
        .join();
    }
}

/// A fresh database. For PostgreSQL, panics with instructions when no server can be had.
pub async fn fresh_database(backend: Backend) -> TestDatabase {
    match backend {
        Backend::Sqlite => {
            let directory = tempfile::tempdir().expect("a temporary directory");
            let url = format!("sqlite://{}/relay.db", directory.path().display());
            TestDatabase {
                backend,
                url,
                cleanup: Cleanup::Sqlite {
                    _directory: directory,
                },
            }
        }
        Backend::Postgres => {
            let admin_url = postgres::admin_url().await;
            let mut admin = sqlx::PgConnection::connect(admin_url)
                .await
                .expect("the PostgreSQL server answers");
            let name = format!("nen_relay_test_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(&format!("create database \"{name}\""))
                .execute(&mut admin)
                .await
                .expect("create a test database");
            let mut url = url::Url::parse(admin_url).expect("a valid PostgreSQL URL");
            url.set_path(&format!("/{name}"));
            TestDatabase {
                backend,
                url: url.to_string(),
                cleanup: Cleanup::DropPostgres { admin_url, name },
            }
        }
    }
}

/// Runs each listed `async fn name(db: TestDatabase)` once per backend, as
/// `<module>::postgres::name` and `<module>::sqlite::name`; `cargo test -- --skip postgres`
/// leaves the PostgreSQL half out.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::support::backends::fresh_database(
                        $crate::support::backends::Backend::Postgres,
                    ).await;
                    super::$name(db).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::support::backends::fresh_database(
                        $crate::support::backends::Backend::Sqlite,
                    ).await;
                    super::$name(db).await;
                }
            )*
        }
    };
}
