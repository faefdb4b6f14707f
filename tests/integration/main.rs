//! One integration test binary: shared helpers in `support`, one file per area.

mod support;

mod callbacks;
mod command_line;
mod connections;
mod forward_outbox_ops;
mod forward_outbox_writes;
mod forwarding;
mod forwarding_api;
mod group_commit;
mod hostile;
mod migrations;
mod openapi;
mod operations;
mod query;
mod replicas;
mod retention;
mod shutdown;
mod sqlite_events_by_run;
mod sqlite_writer;
mod statement_plans;
mod store_behaviour;
mod stuck;
mod trigger;
mod waiting;
