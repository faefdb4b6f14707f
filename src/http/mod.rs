//! HTTP handlers, one file per surface, and the state they share.

pub mod auth;
pub mod callbacks;
pub mod extract;
pub mod middleware;
pub mod ops;
pub mod readiness;
pub mod runs;

use std::sync::Arc;

use crate::callbacks::ingest::Ingest;
use crate::callbacks::signature::WebhookKeys;
use crate::config::Settings;
use crate::nen::NenClient;
use crate::store::Store;

use auth::ApiTokens;

/// What every handler may use. Cheap to clone: everything is shared.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub ingest: Ingest,
    pub webhook_keys: Arc<WebhookKeys>,
    pub api_tokens: Arc<ApiTokens>,
    pub nen: NenClient,
}
