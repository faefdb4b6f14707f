//! Talking to Nen: the outbound client and request signing. The stand-in for Nen used by tests
//! and demos is the `fake-nen` tool (tools/fake-nen).

pub mod client;
pub mod signing;

pub use client::{
    Accepted, NenClient, NenError, NotConfigured, PreparedRun, RunRequest, SecureParams,
};
