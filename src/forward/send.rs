//! One attempt to send one message to one target: a signed POST, and what came of it.
//!
//! The client follows no redirect (a target that moved answers 3xx, which is not delivered and
//! shows in the error), gives up after `forward.timeout`, and says who it is. Errors are short
//! and hold no secret: the status and the first bytes of the answer, or what failed in
//! connecting, never the URL (its query may carry a token) nor the message.

use std::error::Error as _;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::signature::{self, ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use super::{envelope, Target};
use crate::store::outbox::{webhook_id, OutboxMessage};

/// How much of a refusal's body goes into the error.
const BODY_EXCERPT: usize = 200;
/// A response's body is read to its end, up to this much, so that its connection goes back to
/// the pool: a body left unread closes the connection, and then every message opened one of
/// its own (and, to an https target, made a TLS handshake). A longer body is left unread, and
/// its connection closed.
const DRAIN_LIMIT: usize = 64 * 1024;
/// How long an error may be at most.
const ERROR_LIMIT: usize = 300;

/// The client every worker shares.
pub fn client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .user_agent(concat!("nen-relay/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// A 2xx answer.
    Delivered,
    /// The target answered, but not with a 2xx: the status and the first bytes of the answer.
    Refused(String),
    /// No answer: no connection, a transport error, or nothing within `forward.timeout`.
    Unreachable(String),
    /// The message cannot be sent at all (its stored run is not JSON): trying again would not
    /// help.
    Unsendable(String),
}

/// Sends `message` to `target`, signed for the instant `attempted_at`.
pub async fn send(
    client: &reqwest::Client,
    target: &Target,
    message: &OutboxMessage,
    attempted_at: DateTime<Utc>,
) -> Sent {
    let body = match envelope::body(&message.event_type, message.committed_at, &message.run) {
        Ok(body) => body,
        Err(_) => return Sent::Unsendable("the stored run is not valid JSON".into()),
    };
    let id = webhook_id(message.id);
    let timestamp = attempted_at.timestamp();
    let signature = signature::sign(target.key(), &id, timestamp, &body);
    let request = client
        .post(target.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(ID_HEADER, &id)
        .header(TIMESTAMP_HEADER, timestamp.to_string())
        .header(SIGNATURE_HEADER, signature)
        .body(body);
    match request.send().await {
        Ok(mut response) if response.status().is_success() => {
            // The 2xx is the answer; the body is read only to keep the connection.
            read_body(&mut response, 0).await;
            Sent::Delivered
        }
        Ok(mut response) => {
            let status = response.status();
            // The first bytes only: a target that answers with a page of HTML does not fill
            // the database. A body that fails midway still leaves the status.
            let excerpt = read_body(&mut response, BODY_EXCERPT).await;
            let excerpt = printable(&String::from_utf8_lossy(&excerpt));
            Sent::Refused(if excerpt.is_empty() {
                format!("HTTP {}", status.as_u16())
            } else {
                format!("HTTP {}: {excerpt}", status.as_u16())
            })
        }
        Err(error) => Sent::Unreachable(describe(&error)),
    }
}

/// Reads the body of `response` to its end or past [`DRAIN_LIMIT`], whichever comes first
/// (within the client's timeout, which covers the body too); returns its first `keep` bytes.
async fn read_body(response: &mut reqwest::Response, keep: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut read = 0;
    while read <= DRAIN_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                let room = keep.saturating_sub(kept.len()).min(chunk.len());
                kept.extend_from_slice(&chunk[..room]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    kept
}

/// A transport error in a few words, without the URL.
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "no answer in time (forward.timeout)".into();
    }
    let what = if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    // The innermost causes say what happened (refused, reset, DNS); reqwest's own text names
    // the URL, so it is left out.
    let mut causes = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    let mut text = what.to_owned();
    if let Some(last) = causes.last() {
        text.push_str(": ");
        text.push_str(last);
    }
    truncate(printable(&text), ERROR_LIMIT)
}

/// One line, no control characters.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(body: Vec<u8>) -> reqwest::Response {
        reqwest::Response::from(axum::http::Response::new(body))
    }

    #[tokio::test]
    async fn a_body_is_read_whole_and_its_first_bytes_kept() {
        let long: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        assert_eq!(
            read_body(&mut response(long.clone()), 200).await,
            long[..200]
        );
        assert_eq!(
            read_body(&mut response(b"short".to_vec()), 200).await,
            b"short"
        );
        assert!(read_body(&mut response(long), 0).await.is_empty());
    }

    #[test]
    fn errors_are_one_short_line() {
        assert_eq!(printable(" a\nb\t c "), "a b  c");
        assert_eq!(truncate("ééé".into(), 3), "é");
        assert_eq!(truncate("abc".into(), 5), "abc");
    }
}
