//! One integration test binary: shared helpers in `support`, one file per area.

mod support;

mod callbacks;
mod group_commit;
mod hostile;
mod migrations;
mod operations;
mod query;
mod retention;
mod store_behaviour;
mod trigger;
