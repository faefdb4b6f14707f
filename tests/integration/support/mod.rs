//! What the integration tests share: fresh databases, a running app, captured logs.

// Each area's tests use a different subset of these helpers.
#![allow(dead_code, unused_imports)]

pub mod app;
pub mod backends;
pub mod logs;

pub use app::TestApp;
pub use backends::{Backend, TestDatabase};
