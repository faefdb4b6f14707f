//! nen-relay: verified, deduplicated, durable receiver for Nen workflow callbacks, with a run
//! query API and a safe way to start runs.
//!
//! Data flows one way: HTTP edge (extract, verify) -> domain types -> store -> response.

/// `Application::build`: listeners, routers, middleware stack, graceful shutdown.
pub mod app;
/// Receiving callbacks: signature, payload, group-committed ingest.
pub mod callbacks;
/// Command-line definitions and the subcommands that need no server.
pub mod cli;
/// Layered settings: defaults < config files < environment; secrets as `SecretString`.
pub mod config;
/// `ApiError`: every error answer as `{"error", "message"}` with its status.
pub mod error;
/// Forwarding run changes to the team's own systems: targets, signing, delivery workers.
pub mod forward;
/// HTTP handlers, one file per surface.
pub mod http;
/// Metric names and the helpers that record them.
pub mod metrics;
/// Talking to Nen: the outbound client and request signing.
pub mod nen;
/// Retention: pruning payloads and deleting old runs, rejected payloads and expired keys.
pub mod retention;
/// Runs: status order, starting runs on Nen, idempotency, queries.
pub mod runs;
/// Serving HTTP/1.1: connection limits, header and idle clocks, the accept loop, shutdown.
pub mod server;
/// The `Store` trait and its PostgreSQL and SQLite backends.
pub mod store;
/// Tracing subscriber (JSON or pretty) and the Prometheus recorder.
pub mod telemetry;
