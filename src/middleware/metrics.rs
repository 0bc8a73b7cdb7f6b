//! Counts and times every request by team, route and status, and measures the gateway's own
//! overhead: the request's duration minus the time it spent waiting on the upstream.
//!
//! It sits just inside tracing, so it sees every request, including those refused by
//! authentication (`team="unknown"`). Later layers and handlers fill in [`RequestFacts`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};

use crate::{app::AppState, metrics::team_label};

/// What handlers learn about a request that its metrics need.
#[derive(Debug, Default)]
pub struct RequestFacts {
    team: OnceLock<String>,
    upstream_wait_micros: AtomicU64,
}

impl RequestFacts {
    pub fn set_team(&self, team: &str) {
        let _ = self.team.set(team.to_owned());
    }

    /// Adds time spent waiting on the upstream (or on another request's upstream read).
    pub fn add_upstream_wait(&self, wait: Duration) {
        let micros = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        self.upstream_wait_micros
            .fetch_add(micros, Ordering::Relaxed);
    }

    fn upstream_wait(&self) -> Duration {
        Duration::from_micros(self.upstream_wait_micros.load(Ordering::Relaxed))
    }
}

pub async fn record(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let facts = Arc::new(RequestFacts::default());
    request.extensions_mut().insert(facts.clone());
    let started = Instant::now();
    let response = next.run(request).await;
    let elapsed = started.elapsed();

    let config = state.config.load();
    let team = facts
        .team
        .get()
        .map_or("unknown", |team| team_label(&config, team));
    let metrics = &state.metrics;
    metrics
        .requests
        .with_label_values(&[team, &route, response.status().as_str()])
        .inc();
    metrics
        .request_duration
        .with_label_values(&[&route])
        .observe(elapsed.as_secs_f64());
    metrics
        .overhead
        .with_label_values(&[&route])
        .observe(elapsed.saturating_sub(facts.upstream_wait()).as_secs_f64());
    response
}
