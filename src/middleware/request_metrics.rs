//! Counts and times every request by team, route and status, and measures the gateway's own
//! overhead: the request's duration minus the time it spent waiting on the upstream.
//!
//! The outer layer (`middleware::outer`) records every request here, including those refused by
//! authentication (`team="unknown"`), from what the request's [`RequestFacts`] say at its end.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::facts::RequestFacts;
use crate::metrics::Metrics;
use ketchup_domain::config::Config;

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
        let team = match (facts.caller(), facts.team()) {
            // Admitted by the configuration of the moment: a configured team.
            (Some(caller), _) => &caller.team.name,
            (None, Some(team)) => self.config.load().team_label(team),
            (None, None) => "unknown",
        };
        let own = elapsed.saturating_sub(facts.upstream_wait().unwrap_or_default());
        let labels = [team, facts.route(), status.as_str()];
        self.metrics.requests.with(&labels, |series| {
            series.total.inc();
            series.duration.observe(elapsed.as_secs_f64());
            series.overhead.observe(own.as_secs_f64());
        });
    }
}
