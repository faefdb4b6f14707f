//! `Application::build`: binds the listeners, assembles the routers and their middleware, and
//! serves (see `crate::server`) until a shutdown signal, then hands off gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::error_handling::HandleErrorLayer;
use axum::http::HeaderName;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;
use tracing::Level;

use crate::callbacks::budget::BodyBudget;
use crate::callbacks::ingest::{Ingest, Writers};
use crate::callbacks::signature::WebhookKeys;
use crate::config::Settings;
use crate::forward::{ForwardWake, Forwarding};
use crate::http::auth::{self, ApiTokens};
use crate::http::middleware::{
    drop_invalid_request_id, log_server_errors, make_span, method_not_allowed, not_found,
    overloaded, panic_response, record_request_metrics, REQUEST_ID,
};
use crate::http::readiness::Readiness;
use crate::http::scrape::Scrape;
use crate::http::{callbacks, forwarding, ops, runs, AppState};
use crate::nen::NenClient;
use crate::runs::stuck::{self, StuckRule};
use crate::runs::{feed_listener, waiters::Waiters};
use crate::server::{shutdown, Server};
use crate::store::{self, Store};

/// A built service: listening, but not yet serving.
pub struct Application {
    public: Server,
    /// On `NEN_RELAY_OPS_BIND`, when set.
    ops: Option<Server>,
    readiness: Arc<Readiness>,
    writers: Writers,
    shutdown_delay: Duration,
    shutdown_timeout: Duration,
    draining: CancellationToken,
    /// Delivery to the forwarding targets, when any is configured.
    forwarding: Option<Forwarding>,
}

impl Application {
    /// Opens the store named by the settings (migrating it unless disabled) and binds.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let store = store::connect(
            &settings.database_url,
            &settings.store_options(),
            settings.store.migrate_on_start,
        )
        .await
        .context("cannot open the store named by DATABASE_URL")?;
        Self::build_with_store(settings, store).await
    }

    /// Binds with a store opened by the caller (tests share one this way).
    pub async fn build_with_store(
        settings: Settings,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<Self> {
        // Install the recorder before anything records, so no early sample is lost.
        crate::telemetry::prometheus();
        let listener = TcpListener::bind(settings.bind)
            .await
            .with_context(|| format!("cannot listen on {} (NEN_RELAY_BIND)", settings.bind))?;
        let ops_listener = match settings.ops_bind {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot listen on {address} (NEN_RELAY_OPS_BIND)"))?,
            ),
            None => None,
        };
        // Writers give up on a batch a little after the statement timeout, so a hung
        // connection cannot hold a writer forever.
        let store_timeout = settings.store.statement_timeout + settings.store.acquire_timeout;
        let forward_wake = ForwardWake::new(
            settings
                .forward
                .targets
                .iter()
                .map(|target| target.name.as_str()),
            settings.forward.concurrency,
            settings.forward.lease,
        );
        let waiters = Waiters::new(settings.query.max_waiters, settings.query.wait_recheck);
        let (ingest, writers) = Ingest::start(
            store.clone(),
            &settings.ingest,
            store_timeout,
            waiters.clone(),
            forward_wake.clone(),
        );
        let draining = CancellationToken::new();
        let forwarding = Forwarding::start(
            store.clone(),
            &settings.forward,
            StuckRule::new(settings.runs.stuck_after),
            &forward_wake,
        )
        .context("cannot start forwarding")?;
        // Both stop when the listener closes: waiters are answered then, and a replica that
        // is stopping has no gauge left to refresh.
        feed_listener::spawn(
            store.clone(),
            waiters.clone(),
            forward_wake.clone(),
            draining.clone(),
        );
        stuck::spawn_gauge(
            store.clone(),
            StuckRule::new(settings.runs.stuck_after),
            draining.clone(),
        );
        let ops_endpoints = OpsEndpoints {
            readiness: Arc::new(Readiness::new(store.clone())),
            scrape: Arc::new(Scrape::new(store.clone(), ingest.clone())),
        };
        let readiness = ops_endpoints.readiness.clone();
        crate::retention::spawn(store.clone(), &settings.retention, draining.clone());
        let state = AppState {
            webhook_keys: Arc::new(WebhookKeys::new(&settings.webhook_secrets)),
            api_tokens: Arc::new(ApiTokens::new(&settings.api_tokens)),
            nen: NenClient::new(&settings.nen).context("cannot build the client for Nen")?,
            store,
            ingest,
            waiters,
            body_budget: BodyBudget::new(settings.webhook.max_inflight_body_bytes),
            settings: Arc::new(settings.clone()),
            draining: draining.clone(),
            forward_wake: forward_wake.clone(),
        };
        tracing::info!(
            webhook_key_ids = ?state.webhook_keys.ids(),
            "accepting callbacks signed with {} secret(s)",
            state.webhook_keys.ids().len()
        );
        let http = &settings.http;
        let (public, ops) = match ops_listener {
            Some(ops_listener) => (
                Server::new(
                    "public",
                    listener,
                    public_router(state, ops_endpoints.clone(), false),
                    http,
                ),
                Some(Server::new(
                    "ops",
                    ops_listener,
                    ops_router(ops_endpoints, http.max_in_flight),
                    http,
                )),
            ),
            None => (
                Server::new(
                    "public",
                    listener,
                    public_router(state, ops_endpoints, true),
                    http,
                ),
                None,
            ),
        };
        Ok(Self {
            public,
            ops,
            readiness,
            writers,
            shutdown_delay: http.shutdown_delay,
            shutdown_timeout: http.shutdown_timeout,
            draining,
            forwarding,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.public.local_addr()
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// The ops listener's address, when `NEN_RELAY_OPS_BIND` is set.
    pub fn ops_local_addr(&self) -> Option<SocketAddr> {
        self.ops.as_ref().map(Server::local_addr)
    }

    /// Serves until `shutdown` completes, then hands off (see `crate::server::shutdown`):
    /// not ready at once, serving on for `http.shutdown_delay`, then the listeners close,
    /// in-flight requests finish and the writers commit what was queued, within
    /// `http.shutdown_timeout`.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Application {
            public,
            ops,
            readiness,
            writers,
            shutdown_delay,
            shutdown_timeout,
            draining,
            forwarding,
        } = self;
        let upkeep = crate::telemetry::spawn_upkeep();
        tracing::info!(address = %public.local_addr(), "nen-relay listening");
        if let Some(ops) = &ops {
            tracing::info!(address = %ops.local_addr(), "operations endpoints listening");
        }
        let graceful = GracefulShutdown::new();
        let stop_accepting = CancellationToken::new();
        let serve_ops = async {
            if let Some(ops) = ops {
                ops.accept_until(&stop_accepting, &graceful).await;
            }
        };
        tokio::join!(
            public.accept_until(&stop_accepting, &graceful),
            serve_ops,
            shutdown::hand_off(shutdown, &readiness, shutdown_delay, &stop_accepting),
        );
        // The listeners are closed: requests that would wait answer at once.
        draining.cancel();
        let deadline = tokio::time::Instant::now() + shutdown_timeout;
        shutdown::drain(graceful, writers, shutdown_timeout).await;
        // Forwarding goes on while requests drain, so that the changes the writers commit last
        // are sent at once rather than after a restart; then it gets what is left of the
        // shutdown timeout for the sends in flight (leases cover any it cuts off).
        if let Some(forwarding) = forwarding {
            forwarding.stop(deadline).await;
        }
        upkeep.abort();
        tracing::info!("stopped");
        Ok(())
    }
}

/// What the public listener serves: callbacks, the API under `/v1`, `/healthz` and `/readyz`,
/// and `/metrics` unless the ops listener serves it (`with_metrics`).
pub fn public_router(state: AppState, endpoints: OpsEndpoints, with_metrics: bool) -> Router {
    let max_in_flight = state.settings.http.max_in_flight;
    // Everything under /v1, unknown paths included, needs a token: a caller without one learns
    // nothing about which routes exist.
    let v1 = Router::new()
        .route("/runs", get(runs::list_runs).post(runs::start_run))
        .route("/runs/{message_id}", get(runs::get_run))
        .route("/runs/{message_id}/events", get(runs::list_events))
        .route("/forwarding", get(forwarding::list_targets))
        .route("/forwarding/{name}/failed", get(forwarding::list_failed))
        .route(
            "/forwarding/{name}/retry-failed",
            post(forwarding::retry_failed),
        )
        .route("/forwarding/{name}/replay", post(forwarding::replay))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let api = Router::new()
        .route("/webhooks/nen", post(callbacks::receive))
        .route("/openapi.json", get(crate::http::openapi::serve))
        .nest("/v1", v1)
        .with_state(state);
    with_middleware(
        api.merge(ops_routes(endpoints, with_metrics)),
        max_in_flight,
    )
}

/// What the ops listener (`NEN_RELAY_OPS_BIND`) serves: `/healthz`, `/readyz`, `/metrics`. Its
/// own in-flight limit: a flood on the public listener cannot crowd out probes and scrapes.
pub fn ops_router(endpoints: OpsEndpoints, max_in_flight: usize) -> Router {
    with_middleware(ops_routes(endpoints, true), max_in_flight)
}

/// What the operations routes read: the cached store check and the scrape-time gauges.
#[derive(Clone)]
pub struct OpsEndpoints {
    pub readiness: Arc<Readiness>,
    pub scrape: Arc<Scrape>,
}

/// The operations routes (no auth), to be mounted on either listener.
fn ops_routes(endpoints: OpsEndpoints, with_metrics: bool) -> Router {
    let routes = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz).with_state(endpoints.readiness));
    if with_metrics {
        routes.route("/metrics", get(ops::metrics).with_state(endpoints.scrape))
    } else {
        routes
    }
}

/// The middleware every listener's routes get, and the error shape for unknown routes.
fn with_middleware(routes: Router, max_in_flight: usize) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(SetSensitiveRequestHeadersLayer::new([
                    axum::http::header::AUTHORIZATION,
                    HeaderName::from_static("x-hmac-signature"),
                ]))
                // An incoming id is kept only if it is short and plain; else a new one is made.
                .map_request(drop_invalid_request_id)
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(make_span)
                        .on_request(())
                        .on_response(
                            tower_http::trace::DefaultOnResponse::new().level(Level::DEBUG),
                        )
                        .on_failure(()),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                // Inside the span, outside the panic and load-shed layers: their 5xx are logged too.
                .layer(middleware::from_fn(log_server_errors))
                .layer(CatchPanicLayer::custom(panic_response))
                // Beyond this many requests at once, answer 503 at once instead of queueing:
                // memory stays bounded under a flood, and Nen retries.
                .layer(HandleErrorLayer::new(overloaded))
                .load_shed()
                .concurrency_limit(max_in_flight),
        )
        // Outermost, so that requests shed by the in-flight limit are counted too.
        .layer(middleware::from_fn(record_request_metrics))
}
