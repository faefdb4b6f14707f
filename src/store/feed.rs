//! Hearing of runs that other writers turned terminal: the feed behind `GET /v1/runs/{id}?wait=`
//! across replicas.
//!
//! The PostgreSQL store announces, in the statement that commits a batch, the message_ids of
//! its terminal deliveries on [`CHANNEL`] (`pg_notify`, delivered at commit, so never before
//! the change is visible). Every replica listens on one connection of its own and wakes its
//! waiters. A payload is a JSON array of message_ids, at most [`MAX_PAYLOAD_BYTES`] long
//! (PostgreSQL refuses 8000 bytes and more); a batch whose ids do not fit sends several, and an
//! id too long to fit alone is announced as [`WAKE_ALL`]. SQLite has one writer, this process:
//! its waiters are woken in process, and it has no feed.

use std::collections::HashSet;

use async_trait::async_trait;

use super::model::Delivery;
use super::StoreError;

/// The PostgreSQL channel of terminal runs.
pub const CHANNEL: &str = "nen_relay_terminal_runs";

/// The PostgreSQL channel of queued forwarding messages: a commit that queued some notifies it
/// (empty payload), and every replica with forwarding targets listens on it too, to wake its
/// delivery workers.
pub const FORWARD_CHANNEL: &str = "nen_relay_forward";

/// A payload that names no run: every waiter re-reads its run.
pub const WAKE_ALL: &str = "*";

/// PostgreSQL's limit on a payload is 8000 bytes, exclusive.
pub const MAX_PAYLOAD_BYTES: usize = 7999;

/// What the feed heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// These runs turned terminal.
    Terminal(Vec<String>),
    /// Every waiter should re-read its run: an announcement named no run.
    WakeAll,
    /// The connection was lost and is back, listening again: announcements made in between
    /// were missed, so every waiter should re-read its run (and every forwarding worker look
    /// for due messages).
    Resumed,
    /// A commit queued forwarding messages ([`FORWARD_CHANNEL`]).
    ForwardQueued,
}

/// A live subscription to terminal runs. Dropping it ends the subscription.
#[async_trait]
pub trait TerminalRunFeed: Send {
    /// The next announcement. An error means the subscription is lost: open a new one (and
    /// re-check every waiter once it is open).
    async fn next(&mut self) -> Result<FeedEvent, StoreError>;
}

/// The runs a committed batch leaves terminal: those of its terminal deliveries (a run's
/// status only moves forward, so a run that got one is terminal now), each once.
pub fn terminal_message_ids(deliveries: &[Delivery]) -> Vec<&str> {
    let mut seen = HashSet::new();
    deliveries
        .iter()
        .filter(|delivery| delivery.rank().is_terminal())
        .map(|delivery| delivery.message_id.as_str())
        .filter(|message_id| seen.insert(*message_id))
        .collect()
}

/// The payloads announcing `message_ids`, each a JSON array within [`MAX_PAYLOAD_BYTES`].
pub fn payloads<'a>(message_ids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut current_len = 2; // "[]"
    let mut wake_all = false;
    for message_id in message_ids {
        let encoded = serde_json::to_string(message_id).unwrap_or_default();
        if encoded.len() + 2 > MAX_PAYLOAD_BYTES {
            wake_all = true;
            continue;
        }
        let added = encoded.len() + usize::from(!current.is_empty());
        if current_len + added > MAX_PAYLOAD_BYTES {
            payloads.push(format!("[{}]", current.join(",")));
            current.clear();
            current_len = 2;
        }
        current_len += encoded.len() + usize::from(!current.is_empty());
        current.push(encoded);
    }
    if !current.is_empty() {
        payloads.push(format!("[{}]", current.join(",")));
    }
    if wake_all {
        payloads.push(WAKE_ALL.to_owned());
    }
    payloads
}

/// What a payload announces; anything but a JSON array of strings wakes every waiter.
pub fn read_payload(payload: &str) -> FeedEvent {
    match serde_json::from_str::<Vec<String>>(payload) {
        Ok(message_ids) => FeedEvent::Terminal(message_ids),
        Err(_) => FeedEvent::WakeAll,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_payloads_that_fit() {
        let ids: Vec<String> = (0..1000)
            .map(|i| format!("{}-{i}", uuid::Uuid::new_v4()))
            .collect();
        let sent = payloads(ids.iter().map(String::as_str));
        assert!(sent.len() > 1, "1000 uuids do not fit in one payload");
        let mut heard = Vec::new();
        for payload in &sent {
            assert!(payload.len() <= MAX_PAYLOAD_BYTES, "{}", payload.len());
            match read_payload(payload) {
                FeedEvent::Terminal(ids) => heard.extend(ids),
                other => panic!("no id is too long here: {other:?}"),
            }
        }
        assert_eq!(heard, ids);
    }

    #[test]
    fn an_id_too_long_to_announce_wakes_everyone() {
        let long = "x".repeat(MAX_PAYLOAD_BYTES);
        let quoted = "a\"b\n".to_owned();
        let sent = payloads([long.as_str(), quoted.as_str()]);
        assert_eq!(
            sent.iter().map(|p| read_payload(p)).collect::<Vec<_>>(),
            [FeedEvent::Terminal(vec![quoted]), FeedEvent::WakeAll]
        );
        assert!(payloads([]).is_empty());
        assert_eq!(read_payload("garbage"), FeedEvent::WakeAll);
    }

    #[test]
    fn a_payload_is_filled_up_to_the_limit() {
        // Each id is 98 bytes quoted, 99 with its comma: 80 fit in 7999 bytes with the brackets.
        let id = "y".repeat(96);
        let sent = payloads(std::iter::repeat_n(id.as_str(), 81));
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].len(), 2 + 80 * 98 + 79);
    }
}
