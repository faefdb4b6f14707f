//! What the integration tests share: fresh databases, a running app, captured logs.

pub mod app;
pub mod backends;
pub mod logs;

pub use app::TestApp;
pub use backends::{Backend, TestDatabase};
