//! Operations endpoints (no auth): liveness, readiness, metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;

use super::readiness::Readiness;
use super::scrape::Scrape;
use crate::error::ApiError;

/// The body of `/healthz` and `/readyz`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct OpsStatus {
    /// `ok` (`/healthz`) or `ready` (`/readyz`).
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// 200 while the process runs.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process runs", body = OpsStatus, example = json!({"status": "ok"})))
)]
pub async fn healthz() -> Json<OpsStatus> {
    Json(OpsStatus { status: "ok" })
}

/// 200 when the store answered, else 503. The answer may be up to a second old: the store is
/// pinged at most once a second, however many callers ask. From the shutdown signal on: 503.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "The store answers", body = OpsStatus, example = json!({"status": "ready"})),
        (status = 503, description = "The store does not answer (or the service is shutting down): `unavailable`", body = crate::error::ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn readyz(State(readiness): State<Arc<Readiness>>) -> Result<Json<OpsStatus>, ApiError> {
    if readiness.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    match readiness.check().await {
        Ok(()) => Ok(Json(OpsStatus { status: "ready" })),
        Err(why) => Err(ApiError::Unavailable(why)),
    }
}

/// Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    description = "Prometheus text format. Not served here when `NEN_RELAY_OPS_BIND` puts it on its own listener.",
    responses((status = 200, description = "Every metric family", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(scrape): State<Arc<Scrape>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        scrape.render(),
    )
}
