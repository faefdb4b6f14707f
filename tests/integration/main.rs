//! One integration test binary: shared helpers in `support`, one file per area.

mod support;

mod callbacks;
mod command_line;
mod group_commit;
mod hostile;
mod openapi;
mod operations;
mod query;
mod store_behaviour;
mod trigger;
