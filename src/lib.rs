//! nen-relay: verified, deduplicated, durable receiver for Nen workflow callbacks, with a run
//! query API and a safe way to start runs.
//!
//! Data flows one way: HTTP edge (extract, verify) -> domain types -> store -> response.

/// `Application::build`: listener, router, middleware stack, graceful shutdown.
pub mod app;
/// Command-line definitions and the subcommands that need no server.
pub mod cli;
/// Layered settings: defaults < config files < environment; secrets as `SecretString`.
pub mod config;
/// `ApiError`: every error answer as `{"error", "message"}` with its status.
pub mod error;
/// HTTP handlers, one file per surface.
pub mod http;
/// Group commit: verified deliveries wait briefly together and share one transaction.
pub mod ingest;
/// `nen-relay bench`: a bounded load generator with a loss check.
pub mod loadgen;
/// Metric names and the helpers that record them.
pub mod metrics;
/// Talking to Nen: the outbound client, request signing, and a stand-in for tests and demos.
pub mod nen;
/// Lenient parsing of a verified callback body into a `Delivery`.
pub mod payload;
/// `X-Hmac-Signature`: parsing, and constant-time verification against several secrets.
pub mod signature;
/// Run status ordering: submitted < processing < terminal.
pub mod status;
/// The `Store` trait and its PostgreSQL and SQLite backends.
pub mod store;
/// Tracing subscriber (JSON or pretty) and the Prometheus recorder.
pub mod telemetry;
