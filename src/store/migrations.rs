//! How both backends report a migration that failed, naming the setting when it waited too long.
//!
//! Migrations run on a connection of their own, without the request statement timeout: a schema
//! change may rightly take longer than a callback may. What they wait for is a lock (another
//! replica migrating holds sqlx's advisory lock; a long transaction holds a table), and that wait
//! is capped by `store.migrate_lock_timeout`: PostgreSQL's `lock_timeout` (which covers advisory
//! locks too), SQLite's busy timeout.

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};

use super::StoreError;

/// `migrator` as both backends run it: a database migrated by a newer release (migrations this
/// binary does not know) is accepted, so that rolling back means redeploying the previous
/// release. Every migration only adds, so the older code works on the newer schema; a migration
/// this binary knows but that was changed is still refused (its checksum differs).
pub fn tolerating_newer(mut migrator: Migrator) -> Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

/// The variable that sets the wait, as an operator would write it.
const SETTING: &str = "store.migrate_lock_timeout (NEN_RELAY_STORE__MIGRATE_LOCK_TIMEOUT)";

pub fn failed(error: MigrateError, lock_timeout: Duration) -> StoreError {
    let inner = match &error {
        MigrateError::Execute(inner) | MigrateError::ExecuteMigration(inner, _) => inner,
        _ => return StoreError::Internal(format!("migration failed: {error}")),
    };
    if waited_too_long(inner) {
        return StoreError::Unavailable(format!(
            "migrations waited longer than {SETTING} = {} for a lock held by another session \
             (another replica migrating, or a long transaction); retry, or raise the setting: \
             {error}",
            humantime::format_duration(lock_timeout)
        ));
    }
    match error {
        MigrateError::Execute(inner) | MigrateError::ExecuteMigration(inner, _) => {
            StoreError::from(inner)
        }
        other => StoreError::Internal(format!("migration failed: {other}")),
    }
}

/// PostgreSQL 55P03 `lock_not_available` (lock_timeout); SQLite 5 `SQLITE_BUSY` and its extended
/// codes, 6 `SQLITE_LOCKED` and its own (busy timeout).
fn waited_too_long(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    matches!(
        db.code().as_deref(),
        Some("55P03" | "5" | "261" | "517" | "6" | "262")
    )
}
