//! Driving a store directly, without the HTTP layer: open one on a test database, and build
//! deliveries at fixed instants.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use nen_relay::callbacks::payload::parse_callback;
use nen_relay::store::{self, Delivery, Store, StoreOptions};
use secrecy::SecretString;

use super::TestDatabase;

/// The store `db` names, migrated.
pub async fn open(db: &TestDatabase) -> Arc<dyn Store> {
    open_with(db, &StoreOptions::default()).await
}

/// The store `db` names, opened with `options`, migrated.
pub async fn open_with(db: &TestDatabase, options: &StoreOptions) -> Arc<dyn Store> {
    store::connect(&SecretString::from(db.url.clone()), options, true)
        .await
        .expect("the store opens and migrates")
}

/// The store `db` names, migrated, forwarding to `targets` (`StoreOptions::forward_targets`).
pub async fn open_forwarding(db: &TestDatabase, targets: &[&str]) -> Arc<dyn Store> {
    let options = StoreOptions {
        forward_targets: targets.iter().map(|&target| target.to_owned()).collect(),
        ..StoreOptions::default()
    };
    open_with(db, &options).await
}

/// A fixed instant plus `millis`; whole milliseconds survive every backend's precision.
pub fn at(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(1_760_000_000_000 + millis)
        .single()
        .expect("a valid instant")
}

/// A verified delivery of `body`, received at `at(millis)`, built the way the webhook does.
pub fn delivery(body: &str, millis: i64) -> Delivery {
    let raw = Bytes::from(body.to_owned());
    let parsed = parse_callback(&raw).expect("a valid callback body");
    Delivery::verified(raw, parsed, "key-1", at(millis))
}
