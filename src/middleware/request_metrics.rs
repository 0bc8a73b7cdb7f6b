//! Counts and times every request by team, route and status, and measures the gateway's own
//! overhead: the request's duration minus the time it spent waiting on the upstream.
//!
//! The outer layer (`middleware::outer`) records every request here, including those refused by
//! authentication (`team="unknown"`). Later layers and handlers fill in [`RequestFacts`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{FromRequestParts, MatchedPath};
use http::request::Parts;

use super::request_id::RequestId;
use arc_swap::ArcSwap;
use ketchup_domain::config::Config;

use crate::{error::GatewayError, logging, metrics::Metrics};

/// What layers and handlers learn about a request that its metrics and its closing log line
/// need. Kept here rather than recorded on the request's span: a field recorded on a span after
/// it was made costs the JSON log format a parse and a rewrite of all its fields each time.
#[derive(Debug)]
pub struct RequestFacts {
    /// Known when the request comes in.
    request_id: RequestId,
    method: http::Method,
    route: Option<MatchedPath>,
    team: OnceLock<String>,
    key: OnceLock<Arc<str>>,
    task_id: OnceLock<String>,
    upstream_wait_micros: AtomicU64,
    waited_on_upstream: AtomicBool,
}

impl RequestFacts {
    pub fn new(request_id: RequestId, method: http::Method, route: Option<MatchedPath>) -> Self {
        RequestFacts {
            request_id,
            method,
            route,
            team: OnceLock::new(),
            key: OnceLock::new(),
            task_id: OnceLock::new(),
            upstream_wait_micros: AtomicU64::new(0),
            waited_on_upstream: AtomicBool::new(false),
        }
    }

    pub fn request_id(&self) -> &RequestId {
        &self.request_id
    }

    pub fn method(&self) -> &str {
        self.method.as_str()
    }

    /// The route template (`/api/task/query`), or `unmatched`: the one value the request's
    /// span, its closing line and its metrics label it with.
    pub fn route(&self) -> &str {
        self.route.as_ref().map_or("unmatched", MatchedPath::as_str)
    }

    pub fn set_team(&self, team: &str) {
        let _ = self.team.set(team.to_owned());
    }

    /// The label of the key the caller used (never the key).
    pub fn set_key(&self, label: Arc<str>) {
        let _ = self.key.set(label);
    }

    pub fn set_task_id(&self, task_id: &str) {
        let _ = self.task_id.set(task_id.to_owned());
    }

    /// Adds time spent waiting on the upstream (or on another request's upstream read).
    pub fn add_upstream_wait(&self, wait: Duration) {
        let micros = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        self.upstream_wait_micros
            .fetch_add(micros, Ordering::Relaxed);
        self.waited_on_upstream.store(true, Ordering::Relaxed);
    }

    pub fn team(&self) -> Option<&str> {
        self.team.get().map(String::as_str)
    }

    pub fn key(&self) -> Option<&str> {
        self.key.get().map(|label| &**label)
    }

    pub fn task_id(&self) -> Option<&str> {
        self.task_id.get().map(String::as_str)
    }

    /// How long the request waited on the upstream, if it did at all.
    pub fn upstream_wait(&self) -> Option<Duration> {
        self.waited_on_upstream
            .load(Ordering::Relaxed)
            .then(|| Duration::from_micros(self.upstream_wait_micros.load(Ordering::Relaxed)))
    }
}

/// Lines logged while the request is served name it by these (see [`logging::InRequest`]).
impl logging::RequestContext for RequestFacts {
    fn request_id(&self) -> &str {
        self.request_id.as_str()
    }
    fn method(&self) -> &str {
        RequestFacts::method(self)
    }
    fn route(&self) -> &str {
        RequestFacts::route(self)
    }
}

/// A handler's `RequestId` argument: the id in the request's facts.
impl<S: Sync> FromRequestParts<S> for RequestId {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, GatewayError> {
        let facts = parts.extensions.get::<Arc<RequestFacts>>();
        facts
            .map(|facts| facts.request_id.clone())
            .ok_or_else(|| GatewayError::Internal("a request without its facts".into()))
    }
}

/// What the layer records into, and the configuration that bounds its team labels.
#[derive(Clone)]
pub struct RequestMetrics {
    metrics: Arc<Metrics>,
    config: Arc<ArcSwap<Config>>,
}

impl RequestMetrics {
    pub fn new(metrics: Arc<Metrics>, config: Arc<ArcSwap<Config>>) -> Self {
        RequestMetrics { metrics, config }
    }

    /// Counts and times one answered request.
    pub fn record(&self, facts: &RequestFacts, status: http::StatusCode, elapsed: Duration) {
        let config = self.config.load();
        let team = facts
            .team
            .get()
            .map_or("unknown", |team| config.team_label(team));
        let route = facts.route();
        let metrics = &self.metrics;
        metrics
            .requests
            .with_label_values(&[team, route, status.as_str()])
            .inc();
        metrics
            .request_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        metrics.overhead.with_label_values(&[route]).observe(
            elapsed
                .saturating_sub(facts.upstream_wait().unwrap_or_default())
                .as_secs_f64(),
        );
    }
}
