//! The routes and the tower stack around them, assembled in one place: each layer says why it
//! sits where it does.

use std::sync::Arc;

use axum::{
    Router,
    routing::{get, post},
};
use tower::ServiceBuilder;

use crate::{
    middleware::{
        audit, auth, outer,
        rate_limit::{self, LimitedRoutes},
        request_metrics,
    },
    rate_limiter::LimitKind,
    routes,
    state::AppState,
};

/// The routes and the middleware around them. Layers listed first wrap the ones below: a request
/// passes them top to bottom, its response bottom to top.
pub fn router(state: Arc<AppState>, admin_tokens: auth::AdminTokens) -> Router {
    let config = state.config.load();
    let request_timeout = config.server.request_timeout;
    let published = routes::openapi::Published {
        admin: !admin_tokens.is_empty(),
        metrics: config.server.metrics_listen.is_none(),
    };

    // The routes a team's rate limit applies to, each added with the kind of limit it counts
    // against, for the `rate_limit` layer in the stack below.
    let mut limited = LimitedRoutes::default();
    let mut limited_route = |router: Router<_>, path: &str, kind, method_router| {
        limited.insert(path, kind);
        router.route(path, method_router)
    };
    // Every asynchronous endpoint of the route table, each at its upstream path.
    let generations = config.routes.iter().fold(Router::new(), |router, route| {
        let generate = post(routes::generate::generate);
        limited_route(router, &route.path, LimitKind::Generate, generate)
    });
    // Text generation in its three dialects, answered at once (streamed or not).
    let text = [
        (
            "/api/v1/chat/completions",
            post(routes::text::chat_completions),
        ),
        ("/api/v1/messages", post(routes::text::messages)),
        (
            "/api/v1beta/models/{model_action}",
            post(routes::text::gemini),
        ),
    ]
    .into_iter()
    .fold(generations, |router, (path, dialect)| {
        limited_route(router, path, LimitKind::Text, dialect)
    });
    let query = get(routes::task_query::query);
    let mut routes = limited_route(text, "/api/task/query", LimitKind::Query, query)
        .route("/api/user", get(routes::budget::user_balance))
        .route("/gateway/v1/budget", get(routes::budget::budget))
        .route("/admin/teams", get(routes::admin::teams))
        .route("/admin/usage", get(routes::admin::usage))
        .route("/admin/reservations", get(routes::admin::reservations))
        .route("/admin/webhooks", get(routes::admin::webhooks))
        .route("/admin/upstream", get(routes::admin::upstream))
        .route("/admin/audit", get(routes::admin::audit))
        .route("/admin/models", get(routes::calibration::models))
        .route("/callbacks/{token}", post(routes::callbacks::receive))
        .route(
            "/admin/reservations/{id}/release",
            post(routes::admin::release_reservation),
        )
        .route("/healthz", get(routes::health::live))
        .route("/readyz", get(routes::health::ready))
        .route(
            "/openapi.json",
            get(move |state| routes::openapi::serve(state, published)),
        );
    // With `server.metrics_listen`, metrics are served only there, never beside the API.
    if published.metrics {
        routes = routes.route("/metrics", get(routes::scrape::scrape));
    }
    // Last: the method fallback reaches only the routes added before it, and every route must
    // answer a wrong method in the envelope.
    let routes = routes
        .fallback(routes::no_such_route)
        .method_not_allowed_fallback(routes::no_such_method);

    let stack = ServiceBuilder::new()
        // First: the team key and token headers hidden from everything after it, the request
        // id, the request its lines are logged for and its closing log line, the metrics, the
        // panic guard and the request timeout, around everything below, so every answer (a
        // refusal too) is counted and logged.
        .layer(outer::Outer::new(
            request_metrics::RequestMetrics::new(state.metrics.clone(), state.config.clone()),
            request_timeout,
        ))
        // Everything above also protects unauthenticated requests; the rate limits on the
        // routes above need the team it finds.
        .layer(auth::Keys::new(
            state.config.clone(),
            admin_tokens,
            state.clock.clone(),
            state.metrics.clone(),
        ))
        // Inside authentication, which names the admin; around every route, so each admin
        // route that changes state is recorded in the audit trail without a line of its own.
        .layer(audit::AuditTrail::new(
            state.ledger.clone(),
            state.clock.clone(),
            state.background.clone(),
        ))
        // Inside authentication, whose caller it counts; before the handler spends anything on
        // the request.
        .layer(rate_limit::Limit::new(state.rate_limits.clone(), limited));

    routes.layer(stack).with_state(state)
}

/// The operations listener's router (`server.metrics_listen`): the metrics and the health
/// checks, so that scrapes and probes are answered on a port of their own while the API's is at
/// `server.max_connections`.
pub fn ops_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(routes::scrape::scrape))
        .route("/healthz", get(routes::health::live))
        .route("/readyz", get(routes::health::ready))
        .with_state(state)
}
