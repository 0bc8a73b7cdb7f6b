//! The application: shared state and the whole HTTP stack, assembled in one place.

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::{
    Router,
    error_handling::HandleErrorLayer,
    middleware,
    response::IntoResponse,
    routing::{get, post},
};
use http::header;
use tokio_util::task::TaskTracker;
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer, sensitive_headers::SetSensitiveRequestHeadersLayer,
    trace::TraceLayer,
};

use crate::{
    error::GatewayError,
    metrics::Metrics,
    middleware::{auth, metrics, rate_limit, request_id, trace},
    rate_limit::RateLimits,
    routes,
    status_cache::StatusCache,
    upstream::UpstreamClient,
};
use ketchup_domain::{
    clock::SharedClock,
    config::{Config, KeyDigest},
    ledger::Ledger,
    ownership::OwnershipIndex,
    settlement::Settler,
};

/// What every handler shares.
pub struct AppState {
    /// Swapped whole on reload, so a request sees one consistent configuration.
    pub config: ArcSwap<Config>,
    pub ledger: Arc<dyn Ledger>,
    pub upstream: UpstreamClient,
    pub metrics: Arc<Metrics>,
    pub rate_limits: Arc<RateLimits>,
    pub status_cache: StatusCache,
    /// Who owns the newest tasks, so that reading their status need not ask the ledger.
    pub owners: Arc<OwnershipIndex>,
    /// Settles tasks from their final state, wherever it is first seen.
    pub settler: Settler,
    /// Tasks whose status a client read lately (for half of `reconciler.settle_after`): their
    /// ledger row is not touched again until then, which is often enough for the reconciler.
    pub recently_observed: moka::sync::Cache<String, ()>,
    pub clock: SharedClock,
    /// SHA-256 of the admin token; `None` turns the admin API off.
    pub admin_token_digest: Option<KeyDigest>,
    /// Work that must finish even if its client has gone (recording a task the upstream
    /// accepted); shutdown waits for it.
    pub background: TaskTracker,
    /// Wakes the webhook worker when a delivery is queued, so it goes out at once rather than at
    /// the worker's next look.
    pub webhook_wake: tokio::sync::Notify,
}

/// The routes and the middleware around them. Layers listed first wrap the ones below: a request
/// passes them top to bottom, its response bottom to top.
pub fn router(state: Arc<AppState>) -> Router {
    let config = state.config.load();
    let request_timeout = config.server.request_timeout;

    let mut routes = Router::new()
        .route("/api/image/gen", post(routes::generate::generate))
        .route("/api/task/query", get(routes::task_query::query))
        .route("/api/user", get(routes::budget::user_balance))
        .route("/gateway/v1/budget", get(routes::budget::budget))
        .route("/admin/teams", get(routes::admin::teams))
        .route("/admin/usage", get(routes::admin::usage))
        .route("/admin/reservations", get(routes::admin::reservations))
        .route("/admin/webhooks", get(routes::admin::webhooks))
        .route("/callbacks/{token}", post(routes::callbacks::receive))
        .route(
            "/admin/reservations/{id}/release",
            post(routes::admin::release_reservation),
        )
        .route("/healthz", get(routes::health::live))
        .route("/readyz", get(routes::health::ready))
        .fallback(routes::no_such_route)
        .method_not_allowed_fallback(routes::no_such_method);
    // With `server.metrics_listen`, metrics are served only there, never beside the API.
    if config.server.metrics_listen.is_none() {
        routes = routes.route("/metrics", get(routes::metrics::scrape));
    }

    let stack = ServiceBuilder::new()
        // First, so that no later layer (or log line) ever sees a key or token in clear.
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
        // Before tracing, so the request span carries the id.
        .layer(middleware::from_fn(request_id::assign))
        // One span and one closing log line per request, covering everything below.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(trace::RequestSpan)
                .on_request(())
                .on_response(trace::LogResponse)
                .on_failure(()),
        )
        // Inside tracing, outside everything that can refuse a request: every answer is counted.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::record,
        ))
        // A bug in a handler answers 500 in the envelope instead of dropping the connection;
        // inside tracing so the 500 is logged with its request id.
        .layer(CatchPanicLayer::custom(|_| {
            GatewayError::Internal("a handler panicked".into()).into_response()
        }))
        // Bounds the whole request; the handler's spawned upstream work is not cut short, so
        // the ledger still records what the upstream accepted.
        .layer(HandleErrorLayer::new(
            move |_: tower::BoxError| async move { GatewayError::RequestTimeout(request_timeout) },
        ))
        .timeout(request_timeout)
        // Everything above also protects unauthenticated requests.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        // Needs the team, and must refuse before the handler spends anything on the request.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            rate_limit::limit,
        ));

    routes.layer(stack).with_state(state)
}

/// The separate metrics listener's router (`server.metrics_listen`): `/metrics` only.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(routes::metrics::scrape))
        .with_state(state)
}
