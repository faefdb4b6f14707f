//! Operations endpoints (no auth): liveness, readiness, metrics.

use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::AppState;
use crate::error::ApiError;

/// Readiness must answer quickly even when the database hangs.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// 200 while the process runs.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// 200 when the store answers, else 503.
pub async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    match tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => Ok(Json(json!({"status": "ready"}))),
        Ok(Err(error)) => Err(ApiError::Unavailable(format!("store: {error}"))),
        Err(_) => Err(ApiError::Unavailable(
            "store did not answer within 1 s".into(),
        )),
    }
}

/// Prometheus text format.
pub async fn metrics() -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::prometheus().render(),
    )
}
