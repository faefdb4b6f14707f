//! `Application::build`: binds the listener, assembles the router and its middleware, and serves
//! until a shutdown signal, letting in-flight requests finish.

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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;
use tracing::Level;

use crate::callbacks::ingest::{Ingest, Writers};
use crate::callbacks::signature::WebhookKeys;
use crate::config::Settings;
use crate::http::auth::{self, ApiTokens};
use crate::http::middleware::{
    drop_invalid_request_id, log_server_errors, make_span, method_not_allowed, not_found,
    overloaded, panic_response, record_request_metrics, REQUEST_ID,
};
use crate::http::readiness::Readiness;
use crate::http::scrape::Scrape;
use crate::http::{callbacks, ops, runs, AppState};
use crate::nen::NenClient;
use crate::store::{self, Store};

/// A built service: listening, but not yet serving.
pub struct Application {
    listener: TcpListener,
    router: Router,
    writers: Writers,
    shutdown_timeout: Duration,
    http: crate::config::HttpSettings,
    draining: CancellationToken,
}

impl Application {
    /// Opens the store named by the settings (migrating it unless disabled) and binds.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let store = store::connect(
            &settings.database_url,
            &settings.store.options(),
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
        // Writers give up on a batch a little after the statement timeout, so a hung
        // connection cannot hold a writer forever.
        let store_timeout = settings.store.statement_timeout + settings.store.acquire_timeout;
        let (ingest, writers) = Ingest::start(store.clone(), &settings.ingest, store_timeout);
        let draining = CancellationToken::new();
        let state = AppState {
            webhook_keys: Arc::new(WebhookKeys::new(&settings.webhook_secrets)),
            api_tokens: Arc::new(ApiTokens::new(&settings.api_tokens)),
            nen: NenClient::new(&settings.nen).context("cannot build the client for Nen")?,
            store,
            ingest,
            settings: Arc::new(settings.clone()),
            draining: draining.clone(),
        };
        tracing::info!(
            webhook_key_ids = ?state.webhook_keys.ids(),
            "accepting callbacks signed with {} secret(s)",
            state.webhook_keys.ids().len()
        );
        Ok(Self {
            listener,
            router: router(state),
            writers,
            shutdown_timeout: settings.http.shutdown_timeout,
            http: settings.http,
            draining,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
    /// (at most `http.shutdown_timeout`), and lets the writers commit what was queued.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Application {
            listener,
            router,
            writers,
            shutdown_timeout,
            http,
            draining,
        } = self;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // A client that trickles its headers is cut off instead of holding a connection.
            .header_read_timeout(http.header_read_timeout)
            .keep_alive(true);
        let graceful = GracefulShutdown::new();
        let upkeep = crate::telemetry::spawn_upkeep();
        tokio::pin!(shutdown);
        tracing::info!(address = %listener.local_addr()?, "nen-relay listening");
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _peer)) => stream,
                        Err(error) => {
                            // Out of file descriptors and the like: back off briefly instead of
                            // spinning on the same error.
                            tracing::warn!(%error, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let service = TowerToHyperService::new(router.clone());
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        draining.cancel();
        tracing::info!("shutting down: finishing in-flight requests");
        if tokio::time::timeout(shutdown_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests did not finish within {shutdown_timeout:?}");
        }
        // The router holds the last handles on the ingest queue: dropping it lets the writers
        // finish what is queued and stop.
        drop(router);
        writers.drain(shutdown_timeout).await;
        upkeep.abort();
        tracing::info!("stopped");
        Ok(())
    }
}

/// The whole HTTP surface with its middleware.
pub fn router(state: AppState) -> Router {
    let max_in_flight = state.settings.http.max_in_flight;
    let readiness = Arc::new(Readiness::new(state.store.clone()));
    let scrape = Arc::new(Scrape::new(state.store.clone(), state.ingest.clone()));
    // Everything under /v1, unknown paths included, needs a token: a caller without one learns
    // nothing about which routes exist.
    let v1 = Router::new()
        .route("/runs", get(runs::list_runs).post(runs::start_run))
        .route("/runs/{message_id}", get(runs::get_run))
        .route("/runs/{message_id}/events", get(runs::list_events))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/webhooks/nen", post(callbacks::receive))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz).with_state(readiness))
        .route("/metrics", get(ops::metrics).with_state(scrape))
        .route("/openapi.json", get(crate::http::openapi::serve))
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
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
