//! Prometheus metrics, all in one registry, all named `ketchup_gateway_*`.
//!
//! Labels are bounded by construction: teams and models come from the configuration (anything
//! else is `unknown` / `other`), routes from the router's fixed set, statuses are HTTP codes.
//! Never a task id, key, URL or prompt. Budget and cache gauges are read at scrape time from
//! their sources, so they can never drift from what the ledger says.

use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

mod series;

pub use series::Series;
use series::Vector;

use crate::key_use::KeyUse;
use ketchup_domain::{config::Config, credits::Credits, settlement::SettlementMetrics};

const PREFIX: &str = "ketchup_gateway";

/// The `route` label of upstream metrics.
pub mod upstream_route {
    pub const GENERATE: &str = "generate";
    pub const QUERY: &str = "query";
    pub const BALANCE: &str = "balance";
    pub const TEXT: &str = "text";
}

/// Every kind of failed upstream attempt (the `kind` label), for metrics created at zero.
pub const UPSTREAM_ERROR_KINDS: [&str; 4] = ["connect", "timeout", "broken", "5xx"];

/// Why a text answer was charged its reservation (the `reason` label).
pub const TEXT_RESERVATION_REASONS: [&str; 4] = [
    "client_left",
    "upstream_error",
    "upstream_timeout",
    "no_usage",
];

/// Request latencies, from 100 µs to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    pub connections: IntCounterVec,
    pub open_connections: IntGauge,
    pub refused_connections: IntCounter,
    pub ops_open_connections: IntGauge,
    pub ops_refused_connections: IntCounter,
    pub requests: Series<RequestVectors>,
    pub upstream_requests: Series<UpstreamVectors>,
    pub upstream_retries: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub budget_rejections: IntCounterVec,
    pub budget_limit: GaugeVec,
    pub budget_spent: GaugeVec,
    pub budget_reserved: GaugeVec,
    pub budget_remaining: GaugeVec,
    pub tasks_in_flight: IntGaugeVec,
    pub tasks_started: IntCounterVec,
    /// Generations with an Idempotency-Key, by what the key did: `claimed`, `replayed`,
    /// `in_progress` (409), `reused` (422).
    pub idempotent_requests: IntCounterVec,
    /// Unknown outcomes given back because a retry with the same key got a task.
    pub unknown_outcomes_resolved: IntCounterVec,
    /// Text requests the upstream answered, and what they used.
    pub text_requests: IntCounterVec,
    pub text_tokens: IntCounterVec,
    pub text_settled_at_reservation: IntCounterVec,
    /// Tasks settled and what they cost.
    pub settlement: SettlementMetrics,
    /// Team keys' last use, expiry and refusals.
    pub keys: KeyUse,
    pub reconciler_settlements: IntCounter,
    pub reconciler_expirations: IntCounter,
    pub reconciler_abandoned: IntCounter,
    pub reconciler_released: IntCounter,
    pub reconciler_backlog: IntGauge,
    pub cache_entries: IntGauge,
    pub cache_evictions: IntCounter,
    pub owners_in_memory: IntGauge,
    pub callbacks: IntCounterVec,
    pub webhook_deliveries: IntCounterVec,
    pub webhook_deliveries_deleted: IntCounter,
    /// Budget notifications queued, by team and threshold (a percentage of its `notify_at`).
    pub budget_notifications: IntCounterVec,
    /// The upstream account's balance, as last read, and what it went down by in all.
    pub upstream_credit: GaugeVec,
    pub upstream_credit_consumed: CounterVec,
    pub upstream_balance_checks: IntCounterVec,
    /// Whether each upstream account is out of rotation, and why; how often it left; how many
    /// are in.
    pub upstream_account_out: IntGaugeVec,
    pub upstream_account_removals: IntCounterVec,
    pub upstream_accounts_in_rotation: IntGauge,
    /// A status read's counters, resolved once, so that a read counts without label lookups.
    pub status_reads: StatusReadCounters,
}

/// The series of `ownership_lookups_total` (by where the task's owner came from) and
/// `cache_requests_total` that every status read counts; made with the registry, so they are
/// exported at zero from the start.
pub struct StatusReadCounters {
    pub owner_from_memory: IntCounter,
    pub owner_from_ledger: IntCounter,
    pub cache_hit: IntCounter,
    pub cache_miss: IntCounter,
    pub cache_coalesced: IntCounter,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(PREFIX)
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(PREFIX)
        .buckets(buckets.to_vec())
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! register {
            ($metric:expr) => {{
                let metric = $metric.expect("metric definition is valid");
                registry
                    .register(Box::new(metric.clone()))
                    .expect("metric names are unique");
                metric
            }};
        }
        let ownership_lookups = register!(IntCounterVec::new(
            opts(
                "ownership_lookups_total",
                "Status reads by where their task's owner came from: memory (the ownership index) or ledger."
            ),
            &["source"]
        ));
        let cache_requests = register!(IntCounterVec::new(
            opts(
                "cache_requests_total",
                "Status reads by how the cache served them: hit, miss, coalesced."
            ),
            &["result"]
        ));
        let metrics = Metrics {
            requests: Series::new(RequestVectors {
                total: register!(IntCounterVec::new(
                    opts(
                        "requests_total",
                        "Requests answered, by team, route and HTTP status."
                    ),
                    &["team", "route", "status"]
                )),
                duration: register!(HistogramVec::new(
                    histogram(
                        "request_duration_seconds",
                        "Time to answer a request, by route.",
                        LATENCY_BUCKETS
                    ),
                    &["route"]
                )),
                overhead: register!(HistogramVec::new(
                    histogram(
                        "overhead_seconds",
                        "The gateway's own share of a request: its duration minus the time spent waiting on the upstream.",
                        LATENCY_BUCKETS
                    ),
                    &["route"]
                )),
            }),
            upstream_requests: Series::new(UpstreamVectors {
                total: register!(IntCounterVec::new(
                    opts(
                        "upstream_requests_total",
                        "Requests sent to the upstream (each attempt), by route and answer status (`error` when none came)."
                    ),
                    &["route", "status"]
                )),
                duration: register!(HistogramVec::new(
                    histogram(
                        "upstream_request_duration_seconds",
                        "Time one upstream attempt took.",
                        LATENCY_BUCKETS
                    ),
                    &["route"]
                )),
            }),
            upstream_retries: register!(IntCounterVec::new(
                opts(
                    "upstream_retries_total",
                    "Upstream attempts that were retries."
                ),
                &["route"]
            )),
            upstream_errors: register!(IntCounterVec::new(
                opts(
                    "upstream_errors_total",
                    "Failed upstream attempts, by kind: connect, timeout, broken, 5xx."
                ),
                &["route", "kind"]
            )),
            rate_limited: register!(IntCounterVec::new(
                opts(
                    "rate_limited_total",
                    "Requests refused by a rate limit: generate, query or global."
                ),
                &["team", "limit"]
            )),
            budget_rejections: register!(IntCounterVec::new(
                opts(
                    "budget_rejections_total",
                    "Generations refused for the budget (402), the in-flight cap (429) or the team's model allow-list (403)."
                ),
                &["team", "reason"]
            )),
            budget_limit: register!(GaugeVec::new(
                opts(
                    "budget_limit_credits",
                    "The team's budget for the current period."
                ),
                &["team"]
            )),
            budget_spent: register!(GaugeVec::new(
                opts(
                    "budget_spent_credits",
                    "Credits spent in the current period."
                ),
                &["team"]
            )),
            budget_reserved: register!(GaugeVec::new(
                opts(
                    "budget_reserved_credits",
                    "Credits held by open reservations in the current period."
                ),
                &["team"]
            )),
            budget_remaining: register!(GaugeVec::new(
                opts(
                    "budget_remaining_credits",
                    "Credits left in the current period."
                ),
                &["team"]
            )),
            tasks_in_flight: register!(IntGaugeVec::new(
                opts("tasks_in_flight", "Unsettled tasks (reserved or open)."),
                &["team"]
            )),
            tasks_started: register!(IntCounterVec::new(
                opts(
                    "tasks_started_total",
                    "Tasks the upstream accepted, by team, route family and model."
                ),
                &["team", "family", "model"]
            )),
            idempotent_requests: register!(IntCounterVec::new(
                opts(
                    "idempotent_requests_total",
                    "Generations with an Idempotency-Key, by outcome: claimed (sent on), replayed (the first answer), in_progress (409), reused (422: another request)."
                ),
                &["team", "outcome"]
            )),
            unknown_outcomes_resolved: register!(IntCounterVec::new(
                opts(
                    "unknown_outcomes_resolved_total",
                    "Unknown-outcome reservations given back because a retry with the same Idempotency-Key got a task; the upstream may have rendered each without charge to the team."
                ),
                &["team"]
            )),
            text_requests: register!(IntCounterVec::new(
                opts(
                    "text_requests_total",
                    "Text requests whose answer started, by team, model, dialect and whether streamed."
                ),
                &["team", "model", "dialect", "stream"]
            )),
            text_tokens: register!(IntCounterVec::new(
                opts(
                    "text_tokens_total",
                    "Tokens text answers reported, by team, model and direction (input or output)."
                ),
                &["team", "model", "direction"]
            )),
            text_settled_at_reservation: register!(IntCounterVec::new(
                opts(
                    "text_settled_at_reservation_total",
                    "Text answers charged their reservation because no usage came, by why: client_left, upstream_error, upstream_timeout, no_usage."
                ),
                &["team", "reason"]
            )),
            settlement: SettlementMetrics::register(&registry, PREFIX)
                .expect("settlement metrics are valid and unique"),
            keys: KeyUse::register(&registry),
            reconciler_settlements: register!(IntCounter::with_opts(opts(
                "reconciler_settlements_total",
                "Tasks the reconciler settled."
            ))),
            reconciler_expirations: register!(IntCounter::with_opts(opts(
                "reconciler_expirations_total",
                "Tasks that passed the maximum age unsettled and were charged their reservation."
            ))),
            reconciler_abandoned: register!(IntCounter::with_opts(opts(
                "reconciler_abandoned_total",
                "Reservations without an upstream answer turned into unknown outcomes."
            ))),
            reconciler_released: register!(IntCounter::with_opts(opts(
                "reconciler_released_total",
                "Reservations left by a gateway that stopped before sending them upstream, given back."
            ))),
            reconciler_backlog: register!(IntGauge::with_opts(opts(
                "reconciler_backlog",
                "Open tasks due for a reconciler read at its last pass."
            ))),
            connections: register!(IntCounterVec::new(
                opts(
                    "connections_accepted_total",
                    "Client connections accepted, by the HTTP worker thread that serves them (ops: server.metrics_listen's)."
                ),
                &["worker"]
            )),
            open_connections: register!(IntGauge::with_opts(opts(
                "connections_open",
                "Client connections open now, at most server.max_connections."
            ))),
            refused_connections: register!(IntCounter::with_opts(opts(
                "connections_refused_total",
                "New client connections closed unread because server.max_connections were open."
            ))),
            ops_open_connections: register!(IntGauge::with_opts(opts(
                "ops_connections_open",
                "Connections open now on server.metrics_listen, at most 32."
            ))),
            ops_refused_connections: register!(IntCounter::with_opts(opts(
                "ops_connections_refused_total",
                "New connections to server.metrics_listen closed unread because 32 were open."
            ))),
            cache_entries: register!(IntGauge::with_opts(opts(
                "cache_entries",
                "Task statuses in the cache."
            ))),
            cache_evictions: register!(IntCounter::with_opts(opts(
                "cache_evictions_total",
                "Statuses evicted from the cache to keep it within max_entries."
            ))),
            owners_in_memory: register!(IntGauge::with_opts(opts(
                "owners_in_memory",
                "Tasks whose owner the ownership index holds (at most cache.max_owners)."
            ))),
            callbacks: register!(IntCounterVec::new(
                opts(
                    "callbacks_total",
                    "Upstream callbacks received, by outcome: settled, repeated, unknown_token, malformed, too_early, not_final, unconfirmed, contradicted."
                ),
                &["outcome"]
            )),
            webhook_deliveries: register!(IntCounterVec::new(
                opts(
                    "webhook_deliveries_total",
                    "Attempts to deliver a webhook to a team, by outcome: delivered, failed (retried later), dead (dead-lettered)."
                ),
                &["team", "outcome"]
            )),
            webhook_deliveries_deleted: register!(IntCounter::with_opts(opts(
                "webhook_deliveries_deleted_total",
                "Delivered and dead webhook deliveries deleted once [webhooks] keep_finished had passed."
            ))),
            budget_notifications: register!(IntCounterVec::new(
                opts(
                    "budget_notifications_total",
                    "Budget notifications queued for delivery to a team's notify_url, by team and threshold (a percentage of budget.notify_at): one per threshold and budget period."
                ),
                &["team", "threshold"]
            )),
            upstream_credit: register!(GaugeVec::new(
                opts(
                    "upstream_credit",
                    "The upstream account's credit at its last balance check ([upstream] balance_check)."
                ),
                &["account"]
            )),
            upstream_credit_consumed: register!(CounterVec::new(
                opts(
                    "upstream_credit_consumed_total",
                    "Credit the upstream account lost between balance checks (top-ups not counted): \
                     rate() of it is the account's spending."
                ),
                &["account"]
            )),
            upstream_balance_checks: register!(IntCounterVec::new(
                opts(
                    "upstream_balance_checks_total",
                    "Balance checks of the upstream account, by outcome: ok, unauthorized, failed."
                ),
                &["account", "outcome"]
            )),
            upstream_account_out: register!(IntGaugeVec::new(
                opts(
                    "upstream_account_out_of_rotation",
                    "1 while the upstream account takes no new generation, by why: unauthorized \
                     (the upstream refused its token) or below_floor (its credit is at or below \
                     [upstream] balance_floor)."
                ),
                &["account", "reason"]
            )),
            upstream_account_removals: register!(IntCounterVec::new(
                opts(
                    "upstream_account_removals_total",
                    "Times the upstream account left rotation, by why: unauthorized or below_floor."
                ),
                &["account", "reason"]
            )),
            upstream_accounts_in_rotation: register!(IntGauge::with_opts(opts(
                "upstream_accounts_in_rotation",
                "Upstream accounts that take new generations; at 0 every generation is refused \
                 with a 503."
            ))),
            status_reads: StatusReadCounters {
                owner_from_memory: ownership_lookups.with_label_values(&["memory"]),
                owner_from_ledger: ownership_lookups.with_label_values(&["ledger"]),
                cache_hit: cache_requests.with_label_values(&["hit"]),
                cache_miss: cache_requests.with_label_values(&["miss"]),
                cache_coalesced: cache_requests.with_label_values(&["coalesced"]),
            },
            registry,
        };
        let build = GaugeVec::new(
            opts(
                "build_info",
                "Version and git commit of the running gateway.",
            ),
            &["version", "git_commit"],
        )
        .expect("metric definition is valid");
        metrics
            .registry
            .register(Box::new(build.clone()))
            .expect("metric names are unique");
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("KETCHUP_GIT_COMMIT")])
            .set(1.0);
        let process = prometheus::process_collector::ProcessCollector::for_self();
        metrics
            .registry
            .register(Box::new(process))
            .expect("process metrics register once");
        metrics
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .expect("the text encoder writes to memory");
        String::from_utf8(text).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the labelled counters that alerts compute rates of, at zero, for every configured
    /// team (and key): a counter that first appears at 1 would hide its first event from
    /// `increase()`.
    pub fn start_at_zero(&self, config: &Config) {
        for team in &config.teams {
            let team = team.name.as_str();
            for reason in ["missing", "malformed"] {
                self.settlement
                    .settlements_without_consumed
                    .with_label_values(&[team, reason]);
            }
            for reason in ["budget", "in_flight", "model_not_allowed"] {
                self.budget_rejections.with_label_values(&[team, reason]);
            }
            for reason in TEXT_RESERVATION_REASONS {
                self.text_settled_at_reservation
                    .with_label_values(&[team, reason]);
            }
            for limit in ["generate", "query", "text", "global"] {
                self.rate_limited.with_label_values(&[team, limit]);
            }
            for outcome in ["delivered", "failed", "dead"] {
                self.webhook_deliveries.with_label_values(&[team, outcome]);
            }
            if let Some(budget) = config.team(team).and_then(|t| t.budget) {
                for percent in budget.notify_at.iter() {
                    let threshold = percent.to_string();
                    self.budget_notifications
                        .with_label_values(&[team, threshold.as_str()]);
                }
            }
            self.unknown_outcomes_resolved.with_label_values(&[team]);
        }
        for (digest, entry) in config.key_entries() {
            self.settlement
                .credits_spent
                .with_label_values(&[entry.team.name.as_str(), &entry.name(digest)]);
        }
        for route in [
            upstream_route::GENERATE,
            upstream_route::QUERY,
            upstream_route::TEXT,
        ] {
            for kind in UPSTREAM_ERROR_KINDS {
                self.upstream_errors.with_label_values(&[route, kind]);
            }
        }
    }
}

impl Metrics {
    /// Drops the budget gauges a reload made meaningless: those of teams that are gone, and the
    /// limit and remaining credits of teams that no longer have a budget. Left alone they would
    /// freeze at their last values and keep budget alerts firing.
    pub fn forget_budgets(&self, old: &Config, new: &Config) {
        for team in &old.teams {
            let name = [team.name.as_str()];
            let kept = new.team(&team.name);
            if kept.is_none() {
                let _ = self.budget_spent.remove_label_values(&name);
                let _ = self.budget_reserved.remove_label_values(&name);
                let _ = self.tasks_in_flight.remove_label_values(&name);
            }
            if kept.is_none_or(|t| t.budget.is_none()) {
                let _ = self.budget_limit.remove_label_values(&name);
                let _ = self.budget_remaining.remove_label_values(&name);
            }
        }
    }
}

/// What every answered request is counted in, by team, route and status, and timed in, by
/// route: one series of each per request, found in one lookup.
pub struct RequestVectors {
    total: IntCounterVec,
    duration: HistogramVec,
    overhead: HistogramVec,
}

/// The series of one team, route and status of [`RequestVectors`].
pub struct RequestSeries {
    pub total: IntCounter,
    pub duration: Histogram,
    pub overhead: Histogram,
}

impl Vector for RequestVectors {
    type Series = RequestSeries;

    fn series(&self, labels: &[&str]) -> RequestSeries {
        let [_team, route, _status] = labels else {
            panic!("requests are labelled by team, route and status, not {labels:?}");
        };
        RequestSeries {
            total: self.total.with_label_values(labels),
            duration: self.duration.with_label_values(&[route]),
            overhead: self.overhead.with_label_values(&[route]),
        }
    }
}

/// What every upstream attempt is counted in, by route and status, and timed in, by route.
pub struct UpstreamVectors {
    total: IntCounterVec,
    duration: HistogramVec,
}

/// The series of one route and status of [`UpstreamVectors`].
pub struct UpstreamSeries {
    pub total: IntCounter,
    pub duration: Histogram,
}

impl Vector for UpstreamVectors {
    type Series = UpstreamSeries;

    fn series(&self, labels: &[&str]) -> UpstreamSeries {
        let [route, _status] = labels else {
            panic!("upstream attempts are labelled by route and status, not {labels:?}");
        };
        UpstreamSeries {
            total: self.total.with_label_values(labels),
            duration: self.duration.with_label_values(&[route]),
        }
    }
}

/// Credits as a float, for gauges and counters only.
pub fn credits(amount: Credits) -> f64 {
    amount.as_f64_for_metrics()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = Metrics::new();
        metrics
            .requests
            .with(&["design", "/healthz", "200"], |series| series.total.inc());
        let text = metrics.render();
        assert!(text.contains(
            "ketchup_gateway_requests_total{route=\"/healthz\",status=\"200\",team=\"design\"} 1"
        ));
        assert!(text.contains("ketchup_gateway_build_info{"));
        assert!(text.contains("process_resident_memory_bytes"));
        for line in text
            .lines()
            .filter(|l| l.starts_with("# TYPE ketchup_gateway_"))
        {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
    }
}
