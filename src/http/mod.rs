//! HTTP handlers, one file per surface, and the state they share.

pub mod auth;
pub mod callbacks;
pub mod extract;
pub mod forwarding;
pub mod middleware;
pub mod openapi;
pub mod ops;
pub mod readiness;
pub mod runs;
pub mod scrape;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::callbacks::budget::BodyBudget;
use crate::callbacks::ingest::Ingest;
use crate::callbacks::signature::WebhookKeys;
use crate::config::Settings;
use crate::forward::ForwardWake;
use crate::nen::NenClient;
use crate::runs::waiters::Waiters;
use crate::store::Store;

use auth::ApiTokens;

/// What every handler may use. Cheap to clone: everything is shared.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub ingest: Ingest,
    /// Bytes of callback bodies not yet verified, held at once across all requests.
    pub body_budget: BodyBudget,
    pub webhook_keys: Arc<WebhookKeys>,
    pub api_tokens: Arc<ApiTokens>,
    pub nen: NenClient,
    /// Requests waiting on a run (`?wait=`), woken by commits here and on other replicas.
    pub waiters: Waiters,
    /// Cancelled when the server stops accepting connections: requests that would wait (a
    /// long poll) answer at once, so that the drain is not held up.
    pub draining: CancellationToken,
    /// Wakes the forwarding workers after a commit that queued messages (runs started here).
    pub forward_wake: ForwardWake,
}
