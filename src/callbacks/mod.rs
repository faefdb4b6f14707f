//! Receiving Nen's callbacks: the signature over the raw bytes, lenient parsing of the body, and
//! group-committed, deduplicated storage.

pub mod ingest;
pub mod payload;
pub mod signature;
