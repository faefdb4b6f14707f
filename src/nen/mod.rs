//! Talking to Nen: the outbound client, request signing, and a stand-in for tests and demos.

pub mod client;
pub mod fake;
pub mod signing;

pub use client::{
    Accepted, NenClient, NenError, NotConfigured, PreparedRun, RunRequest, SecureParams,
};
