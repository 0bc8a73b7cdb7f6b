//! `GET /metrics`: the Prometheus text format. Gauges that mirror the ledger and the cache are
//! refreshed from them at scrape time.

use std::sync::Arc;

use axum::{extract::State, response::IntoResponse, response::Response};
use http::{HeaderValue, StatusCode, header};

use super::budget::standing;
use crate::{metrics::credits, state::AppState};
use ketchup_domain::credits::Credits;

pub async fn scrape(State(state): State<Arc<AppState>>) -> Response {
    let metrics = &state.metrics;
    let config = state.config.load_full();
    for team in &config.teams {
        // A ledger that cannot answer leaves the gauges at their last values; /readyz and the
        // request metrics tell that story.
        let Ok(view) = standing(&state, team).await else {
            continue;
        };
        let name = [team.name.as_str()];
        metrics
            .budget_spent
            .with_label_values(&name)
            .set(credits(view.spent));
        metrics
            .budget_reserved
            .with_label_values(&name)
            .set(credits(view.reserved));
        metrics
            .tasks_in_flight
            .with_label_values(&name)
            .set(i64::try_from(view.in_flight).unwrap_or(i64::MAX));
        if let (Some(limit), Some(remaining)) = (view.credits, view.remaining) {
            metrics
                .budget_limit
                .with_label_values(&name)
                .set(credits(limit));
            metrics
                .budget_remaining
                .with_label_values(&name)
                .set(credits(remaining.max(Credits::ZERO)));
        }
    }
    metrics.keys.refresh(&config);
    metrics
        .cache_entries
        .set(i64::try_from(state.status_cache.entry_count().await).unwrap_or(i64::MAX));
    metrics
        .owners_in_memory
        .set(i64::try_from(state.owners.len()).unwrap_or(i64::MAX));

    let mut response = (StatusCode::OK, metrics.render()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
