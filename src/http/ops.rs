//! Operations endpoints (no auth): liveness, readiness, metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::readiness::Readiness;
use super::scrape::Scrape;
use crate::error::ApiError;

/// 200 while the process runs.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// 200 when the store answered, else 503. The answer may be up to a second old: the store is
/// pinged at most once a second, however many callers ask. From the shutdown signal on: 503.
pub async fn readyz(
    State(readiness): State<Arc<Readiness>>,
) -> Result<impl IntoResponse, ApiError> {
    if readiness.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    match readiness.check().await {
        Ok(()) => Ok(Json(json!({"status": "ready"}))),
        Err(why) => Err(ApiError::Unavailable(why)),
    }
}

/// Prometheus text format.
pub async fn metrics(State(scrape): State<Arc<Scrape>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        scrape.render(),
    )
}
