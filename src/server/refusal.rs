//! Refusing a connection at once: a best-effort 503 written without waiting, then close.
//!
//! Nothing waits on the refused socket (no task, no timer): under a flood, refusals cost a few
//! system calls each. The answer is written only if the socket takes it at once, and the client
//! may see a reset instead (its request bytes arrive unread); Nen retries either way.

use std::io::{Read, Write};
use std::sync::OnceLock;

use tokio::net::TcpStream;

/// Why a connection was refused; the `reason` label of the refusal counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `http.max_connections` are open on this listener.
    MaxConnections,
    /// The process is out of file descriptors (EMFILE, ENFILE).
    OutOfFileDescriptors,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::OutOfFileDescriptors => "out_of_file_descriptors",
        }
    }
}

/// The JSON error shape, `Retry-After`, and a fresh `x-request-id`, as any 503 of this service.
fn answer() -> Vec<u8> {
    static BODY: OnceLock<String> = OnceLock::new();
    let body = BODY.get_or_init(|| {
        serde_json::json!({
            "error": "unavailable",
            "message": "too many connections; retry shortly",
        })
        .to_string()
    });
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {}\r\nx-request-id: {}\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        crate::error::RETRY_AFTER_SECONDS,
        uuid::Uuid::new_v4(),
        body.len()
    )
    .into_bytes()
}

pub fn refuse(stream: TcpStream, listener: &'static str, why: Refusal) {
    crate::metrics::record_connection_refused(listener, why.as_str());
    // A std stream reads and writes straight away (still non-blocking); tokio's would report
    // "not ready" until the reactor has seen the new socket.
    if let Ok(mut stream) = stream.into_std() {
        // Reading what already arrived makes a reset (which would hide the answer) less likely.
        let mut scratch = [0u8; 2048];
        let _ = stream.read(&mut scratch);
        let _ = stream.write(&answer());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_http_answer_in_the_error_shape() {
        let answer = answer();
        let text = std::str::from_utf8(&answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("retry-after: 1"));
        assert!(head.contains("x-request-id: "));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "unavailable");
        assert!(body["message"].is_string());
    }
}
