//! What the integration tests share: fresh databases, the app in process or as a child process,
//! captured logs, and readers for metrics and stored rows.

pub mod app;
pub mod backends;
pub mod logs;
pub mod metrics;
pub mod observed;
mod postgres;
pub mod process;
pub mod store_fixtures;
pub mod stored;
mod throwaway_cluster;

pub use app::TestApp;
pub use backends::{Backend, TestDatabase};
