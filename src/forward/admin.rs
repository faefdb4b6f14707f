//! What an operator asks of forwarding (SPEC, "Forwarding to your systems"): each target's queue,
//! a target's failed messages a page at a time, and sending failed or past messages again.
//!
//! Every call names a configured target first: an unknown one is [`AdminError::TargetNotFound`]
//! before anything else is looked at. Sending again wakes that target's worker at once, so that
//! the messages go out now rather than at its next poll.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{ForwardWake, Target};
use crate::runs::query;
use crate::store::{FailedMessage, Outbox, StoreError, TargetQueue};

/// `GET /v1/forwarding`: every configured target, in name order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TargetList {
    pub targets: Vec<TargetStatus>,
}

/// One target and its queue.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TargetStatus {
    /// As in `[forward.<name>]`.
    pub name: String,
    /// Where messages are sent, without any user name or password the configured URL holds.
    pub url: String,
    /// Messages not yet delivered nor failed.
    pub pending: u64,
    /// How long the oldest pending message has been queued (since its change, or since it was
    /// queued again by retry-failed or replay), in seconds with millisecond precision; null when
    /// nothing is pending.
    pub oldest_pending_seconds: Option<f64>,
    /// Messages kept as failed (not delivered within `forward.max_age`).
    pub failed: u64,
    /// The error of the most recent attempt that failed, among pending and failed messages.
    pub last_error: Option<String>,
}

/// `GET /v1/forwarding/{name}/failed`'s query; unknown parameters are refused.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FailedRequest {
    /// Page size.
    // Read as text, so that a bad value gets this service's own message.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500, default = 50)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of a target's failed messages, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FailedList {
    pub messages: Vec<FailedMessage>,
    /// Present when more messages follow: pass it back as `cursor` for the next page.
    pub next_cursor: Option<String>,
}

/// `POST /v1/forwarding/{name}/replay`'s body. Times are read as text, so that a bad one gets
/// this service's own message; an unknown field is refused (a misspelt `until` would otherwise
/// replay everything since `since`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Changes committed at or after this instant are sent again (RFC 3339).
    #[schema(value_type = String, format = DateTime)]
    pub since: String,
    /// ... and before this one (RFC 3339), which must be later than `since`; no end when absent.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub until: Option<String>,
}

/// How many messages were queued again.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Enqueued {
    pub enqueued: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no forwarding target named {0:?}")]
    TargetNotFound(String),
    /// A parameter or the body is malformed; the message names it.
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The configured targets, their outbox and their workers' wake.
pub struct ForwardAdmin<'a> {
    targets: &'a [Target],
    outbox: &'a dyn Outbox,
    wake: &'a ForwardWake,
}

impl<'a> ForwardAdmin<'a> {
    pub fn new(targets: &'a [Target], outbox: &'a dyn Outbox, wake: &'a ForwardWake) -> Self {
        ForwardAdmin {
            targets,
            outbox,
            wake,
        }
    }

    /// The configured target `name`.
    pub fn target(&self, name: &str) -> Result<&'a Target, AdminError> {
        self.targets
            .iter()
            .find(|target| target.name == name)
            .ok_or_else(|| AdminError::TargetNotFound(name.to_owned()))
    }

    /// Every target's queue as of `now`, in name order (the order of the settings).
    pub async fn status(&self, now: DateTime<Utc>) -> Result<TargetList, AdminError> {
        let mut targets = Vec::with_capacity(self.targets.len());
        for target in self.targets {
            let queue = self.outbox.forward_queue(&target.name).await?;
            targets.push(target_status(target, queue, now));
        }
        Ok(TargetList { targets })
    }

    /// A page of `target`'s failed messages, newest first.
    pub async fn failed(
        &self,
        target: &Target,
        request: FailedRequest,
    ) -> Result<FailedList, AdminError> {
        let limit = query::parse_limit(request.limit.as_deref())
            .map_err(|error| AdminError::InvalidRequest(error.to_string()))?;
        let before = parse_cursor(request.cursor.as_deref())?;
        let page = self
            .outbox
            .list_failed_forwards(&target.name, limit, before)
            .await?;
        Ok(FailedList {
            messages: page.messages,
            next_cursor: page.next_before.map(encode_cursor),
        })
    }

    /// Queues every failed message of `target` again.
    pub async fn retry_failed(
        &self,
        target: &Target,
        now: DateTime<Utc>,
    ) -> Result<Enqueued, AdminError> {
        let enqueued = self.outbox.retry_failed_forwards(&target.name, now).await?;
        Ok(self.woken(target, enqueued))
    }

    /// Queues again every change of `target` committed in the request's window.
    pub async fn replay(
        &self,
        target: &Target,
        request: &ReplayRequest,
        now: DateTime<Utc>,
    ) -> Result<Enqueued, AdminError> {
        let (since, until) = replay_window(request)?;
        let enqueued = self
            .outbox
            .replay_forwards(&target.name, since, until, now)
            .await?;
        Ok(self.woken(target, enqueued))
    }

    /// Wakes `target`'s worker when messages were queued: they are due now.
    fn woken(&self, target: &Target, enqueued: u64) -> Enqueued {
        if enqueued > 0 {
            if let Some(notify) = self.wake.notified(&target.name) {
                notify.notify_one();
            }
        }
        Enqueued { enqueued }
    }
}

fn target_status(target: &Target, queue: TargetQueue, now: DateTime<Utc>) -> TargetStatus {
    TargetStatus {
        name: target.name.clone(),
        url: shown_url(&target.url),
        pending: queue.pending,
        oldest_pending_seconds: queue
            .oldest_pending_queued_at
            .map(|queued_at| seconds_since(queued_at, now)),
        failed: queue.failed,
        last_error: queue.last_error,
    }
}

/// Seconds from `then` to `now` with millisecond precision, never negative: another replica's
/// clock may be a little ahead of this one's.
fn seconds_since(then: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    (now - then).num_milliseconds().max(0) as f64 / 1000.0
}

/// The target's URL without its user name and password: a URL may carry credentials for the
/// receiving service, and this listing is shown to whoever holds an API token.
pub fn shown_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    // Both only fail for URLs that cannot have credentials, which then have none to strip.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

/// The window of a replay: RFC 3339 times, `until` later than `since`.
fn replay_window(
    request: &ReplayRequest,
) -> Result<(DateTime<Utc>, Option<DateTime<Utc>>), AdminError> {
    let since = parse_time("since", &request.since)?;
    let until = request
        .until
        .as_deref()
        .map(|until| parse_time("until", until))
        .transpose()?;
    if let Some(until) = until {
        if until <= since {
            return Err(AdminError::InvalidRequest(
                "until must be later than since".into(),
            ));
        }
    }
    Ok((since, until))
}

fn parse_time(name: &str, text: &str) -> Result<DateTime<Utc>, AdminError> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|_| {
            AdminError::InvalidRequest(format!(
                "{name} must be an RFC 3339 time, such as 2026-01-31T09:00:00Z"
            ))
        })
}

fn parse_cursor(text: Option<&str>) -> Result<Option<i64>, AdminError> {
    match text {
        None | Some("") => Ok(None),
        Some(text) => decode_cursor(text).map(Some).ok_or_else(|| {
            AdminError::InvalidRequest("cursor is not one this service returned".into())
        }),
    }
}

/// Opaque to clients, as the runs listing's: a versioned, URL-safe encoding of the position.
/// Its own prefix, so that a runs cursor is refused here rather than read as a position.
fn encode_cursor(before: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("f1:{before}"))
}

fn decode_cursor(text: &str) -> Option<i64> {
    let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    text.strip_prefix("f1:")?.parse::<i64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn replay(since: &str, until: Option<&str>) -> ReplayRequest {
        ReplayRequest {
            since: since.into(),
            until: until.map(str::to_owned),
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        assert_eq!(decode_cursor(&encode_cursor(42)), Some(42));
        assert_eq!(parse_cursor(None).unwrap(), None);
        assert_eq!(parse_cursor(Some("")).unwrap(), None);
        for bad in ["42", "!!", &URL_SAFE_NO_PAD.encode("v1:42")] {
            let error = parse_cursor(Some(bad)).unwrap_err();
            assert!(error.to_string().contains("cursor"), "{bad}: {error}");
        }
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        for (configured, shown) in [
            (
                "https://user:p%40ss@orders.example:8443/hooks?x=1",
                "https://orders.example:8443/hooks?x=1",
            ),
            ("https://token@orders.example/", "https://orders.example/"),
            ("http://127.0.0.1:9000/h", "http://127.0.0.1:9000/h"),
        ] {
            assert_eq!(shown_url(&url::Url::parse(configured).unwrap()), shown);
        }
    }

    #[test]
    fn replay_windows_are_rfc3339_and_not_empty() {
        let (since, until) = replay_window(&replay(
            "2026-01-31T10:00:00+01:00",
            Some("2026-01-31T09:00:01Z"),
        ))
        .unwrap();
        assert_eq!(since, Utc.with_ymd_and_hms(2026, 1, 31, 9, 0, 0).unwrap());
        assert_eq!(
            until,
            Some(Utc.with_ymd_and_hms(2026, 1, 31, 9, 0, 1).unwrap())
        );
        assert_eq!(
            replay_window(&replay("2026-01-31T09:00:00Z", None))
                .unwrap()
                .1,
            None
        );
        for (request, word) in [
            (replay("yesterday", None), "since"),
            (replay("2026-01-31", None), "since"),
            (replay("2026-01-31T09:00:00Z", Some("2h")), "until"),
            (
                replay("2026-01-31T09:00:00Z", Some("2026-01-31T09:00:00Z")),
                "later",
            ),
            (
                replay("2026-01-31T09:00:00Z", Some("2026-01-31T08:00:00Z")),
                "later",
            ),
        ] {
            let error = replay_window(&request).unwrap_err();
            assert!(error.to_string().contains(word), "{request:?}: {error}");
        }
    }

    #[test]
    fn oldest_pending_age_is_never_negative() {
        let now = Utc.with_ymd_and_hms(2026, 1, 31, 9, 0, 0).unwrap();
        let earlier = now - chrono::Duration::milliseconds(12_345);
        assert_eq!(seconds_since(earlier, now), 12.345);
        assert_eq!(seconds_since(now + chrono::Duration::seconds(1), now), 0.0);
    }
}
