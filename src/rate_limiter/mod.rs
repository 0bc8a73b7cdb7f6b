//! Rate limits: per team for generation and for status reads, and one for the whole upstream
//! account. Each is a governor GCRA limiter: a rate with a burst, no hand-made counting.
//!
//! Team limiters live in a map keyed by team name; a configuration reload replaces only the
//! limiters whose settings changed, so a reload does not hand every team a fresh burst.
//!
//! With several replicas on one Redis, the same limits are kept in Redis instead (`shared`), so
//! they hold across replicas. While Redis is down the in-process limiters stand in for the
//! status-read limits, and for the others when `rate_limits_when_unavailable = "allow"`; by
//! default generations and upstream reads are then refused.

pub mod shared;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::{StateInformationMiddleware, StateSnapshot},
    state::{InMemoryState, NotKeyed},
};
use http::{HeaderMap, HeaderValue};

use crate::headers::{RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET};
use crate::metrics::Metrics;
use ketchup_domain::config::{Config, Limits, Rate};

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// Which limit a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Generate,
    Query,
    Text,
    /// The upstream account, all teams together.
    Global,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Generate => "generate",
            LimitKind::Query => "query",
            LimitKind::Text => "text",
            LimitKind::Global => "global",
        }
    }
}

/// What a limiter said, ready to become `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub kind: LimitKind,
    pub limit: u32,
    pub remaining: u32,
    /// Until the limit is whole again (allowed), or until the next request may pass (refused).
    pub reset: Duration,
    pub allowed: bool,
}

impl Verdict {
    /// What an unlimited request is told: no limit, so no headers.
    fn unlimited(kind: LimitKind) -> Self {
        Verdict {
            kind,
            limit: 0,
            remaining: 0,
            reset: Duration::ZERO,
            allowed: true,
        }
    }
}

/// A refusal, with everything the 429 answer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub verdict: Verdict,
    pub detail: String,
}

/// Why a request may not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Over the limit: 429.
    Limited(Refusal),
    /// The shared limits cannot be consulted and the configuration says to refuse meanwhile.
    Unavailable(String),
}

struct TeamLimiters {
    limits: Limits,
    generate: Limiter,
    query: Limiter,
    text: Limiter,
}

/// A team's limit of one kind: its limiter, its rate and burst, and what its refusal says the
/// team may do.
struct TeamLimit<'a> {
    limiter: &'a Limiter,
    rate: Rate,
    burst: NonZeroU32,
    action: &'static str,
}

impl TeamLimiters {
    fn of_kind(&self, kind: LimitKind) -> TeamLimit<'_> {
        let limits = &self.limits;
        match kind {
            LimitKind::Generate => TeamLimit {
                limiter: &self.generate,
                rate: limits.generate,
                burst: limits.generate_burst,
                action: "start",
            },
            LimitKind::Text => TeamLimit {
                limiter: &self.text,
                rate: limits.text,
                burst: limits.text_burst,
                action: "send",
            },
            LimitKind::Query | LimitKind::Global => TeamLimit {
                limiter: &self.query,
                rate: limits.query,
                burst: limits.query_burst,
                action: "read the status of",
            },
        }
    }
}

pub struct RateLimits {
    metrics: Arc<Metrics>,
    teams: DashMap<String, Arc<TeamLimiters>>,
    /// Swapped whole when a reload changes `upstream.max_requests_per_second`.
    global: ArcSwap<GlobalLimit>,
    /// The cluster-wide limits, with several replicas on Redis.
    shared: Option<shared::SharedLimits>,
    /// When (unix seconds) the fallback to local limits was last logged, to log it once a while.
    fallback_logged: AtomicU64,
}

struct GlobalLimit {
    limiter: Limiter,
    rate: NonZeroU32,
}

impl GlobalLimit {
    fn new(rate: NonZeroU32) -> Self {
        let per_second = Rate {
            count: rate,
            per: Duration::from_secs(1),
        };
        GlobalLimit {
            limiter: limiter(per_second, rate),
            rate,
        }
    }

    /// The account's limit as a rate: `rate` requests per second, a burst of as many.
    fn per_second(&self) -> Rate {
        Rate {
            count: self.rate,
            per: Duration::from_secs(1),
        }
    }
}

fn limiter(rate: Rate, burst: std::num::NonZeroU32) -> Limiter {
    let per_request = rate.per / rate.count.get();
    let quota = Quota::with_period(per_request)
        .expect("a rate's period is above zero")
        .allow_burst(burst);
    RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>()
}

fn seconds_up(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

impl RateLimits {
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        shared: Option<shared::SharedLimits>,
    ) -> Self {
        let limits = RateLimits {
            metrics,
            teams: DashMap::new(),
            global: ArcSwap::from_pointee(GlobalLimit::new(
                config.upstream.max_requests_per_second,
            )),
            shared,
            fallback_logged: AtomicU64::new(0),
        };
        limits.reload(config);
        limits
    }

    /// Takes the limits from a (re)loaded configuration; a limit whose setting did not change
    /// keeps its state.
    pub fn reload(&self, config: &Config) {
        let rate = config.upstream.max_requests_per_second;
        if self.global.load().rate != rate {
            self.global.store(Arc::new(GlobalLimit::new(rate)));
        }
        self.teams
            .retain(|name, _| config.teams.iter().any(|t| &t.name == name));
        for team in &config.teams {
            let unchanged = self
                .teams
                .get(&team.name)
                .is_some_and(|current| current.limits == team.limits);
            if !unchanged {
                self.teams.insert(
                    team.name.clone(),
                    Arc::new(TeamLimiters {
                        limits: team.limits,
                        generate: limiter(team.limits.generate, team.limits.generate_burst),
                        query: limiter(team.limits.query, team.limits.query_burst),
                        text: limiter(team.limits.text, team.limits.text_burst),
                    }),
                );
            }
        }
    }

    /// One step of a limit: in Redis when replicas share one, else (or, when so configured,
    /// while Redis is down) in this process. `name` makes the limit's key in Redis.
    async fn step(
        &self,
        name: impl FnOnce() -> String,
        kind: LimitKind,
        rate: Rate,
        burst: NonZeroU32,
        local: &Limiter,
    ) -> Result<Result<Verdict, Verdict>, Refused> {
        let Some(shared) = &self.shared else {
            return Ok(check(local, kind));
        };
        // Boxed, so that a gateway without Redis does not carry the Redis call's future (about
        // a kilobyte) in every request's.
        Box::pin(self.step_shared(shared, &name(), kind, rate, burst, local)).await
    }

    async fn step_shared(
        &self,
        shared: &shared::SharedLimits,
        name: &str,
        kind: LimitKind,
        rate: Rate,
        burst: NonZeroU32,
        local: &Limiter,
    ) -> Result<Result<Verdict, Verdict>, Refused> {
        match shared.check(name, kind, rate, burst).await {
            Ok(decided) => Ok(decided),
            // A status read costs the upstream nothing unless it misses the cache, and then the
            // account's limit (which does refuse) is checked too: so cached statuses stay
            // readable through an outage whatever the setting.
            Err(error) if shared.fail_open || kind == LimitKind::Query => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                if now.saturating_sub(self.fallback_logged.swap(now, Ordering::Relaxed)) >= 10 {
                    tracing::warn!(%error, "shared rate limits unavailable: each replica applies its own");
                }
                Ok(check(local, kind))
            }
            Err(error) => Err(Refused::Unavailable(error)),
        }
    }

    /// Counts one request of `team` against its limit of `kind` (generate or query).
    pub async fn check_team(&self, team: &str, kind: LimitKind) -> Result<Verdict, Refused> {
        let Some(limiters) = self.team_limiters(team) else {
            return Ok(Verdict::unlimited(kind));
        };
        let limit = limiters.of_kind(kind);
        let name = || format!("{team}:{}", kind.as_str());
        let decided = self
            .step(name, kind, limit.rate, limit.burst, limit.limiter)
            .await?;
        decided.map_err(|verdict| self.refuse_team(team, kind, &limit, verdict))
    }

    /// As [`check_team`](Self::check_team), decided at once where the limits are this
    /// process's alone; `None` where replicas share them in Redis, which `check_team` asks.
    pub fn check_team_here(&self, team: &str, kind: LimitKind) -> Option<Result<Verdict, Refused>> {
        if self.shared.is_some() {
            return None;
        }
        let Some(limiters) = self.team_limiters(team) else {
            return Some(Ok(Verdict::unlimited(kind)));
        };
        let limit = limiters.of_kind(kind);
        Some(
            check(limit.limiter, kind)
                .map_err(|verdict| self.refuse_team(team, kind, &limit, verdict)),
        )
    }

    /// The team's limiters. Only teams from the config have any; one removed by a reload a
    /// moment ago is simply not limited for this request.
    fn team_limiters(&self, team: &str) -> Option<Arc<TeamLimiters>> {
        self.teams.get(team).map(|limiters| limiters.clone())
    }

    /// The refusal of a team's request over its limit, counted.
    fn refuse_team(
        &self,
        team: &str,
        kind: LimitKind,
        limit: &TeamLimit,
        verdict: Verdict,
    ) -> Refused {
        self.count_refusal(team, kind);
        let what = if kind == LimitKind::Text {
            "text request"
        } else {
            "task"
        };
        let rate = limit.rate;
        Refused::Limited(Refusal {
            verdict,
            detail: format!(
                "team '{team}' may {} {} {what}{} per {}; retry in {} s",
                limit.action,
                rate.count,
                if rate.count.get() == 1 { "" } else { "s" },
                unit(rate.per),
                seconds_up(verdict.reset).max(1)
            ),
        })
    }

    fn count_refusal(&self, team: &str, kind: LimitKind) {
        self.metrics
            .rate_limited
            .with_label_values(&[team, kind.as_str()])
            .inc();
    }

    /// Counts one request of `team` against the upstream account's limit.
    pub async fn check_global(&self, team: &str) -> Result<Verdict, Refused> {
        let global = self.global.load_full();
        let decided = self
            .step(
                || "global".to_owned(),
                LimitKind::Global,
                global.per_second(),
                global.rate,
                &global.limiter,
            )
            .await?;
        decided.map_err(|verdict| {
            self.count_refusal(team, LimitKind::Global);
            Refused::Limited(Refusal {
                verdict,
                detail: format!(
                    "the upstream account takes at most {} requests per second from all teams together; retry in {} s",
                    global.rate,
                    seconds_up(verdict.reset).max(1)
                ),
            })
        })
    }

    /// Waits until the upstream account's limit lets one more request through (for background
    /// work, which may wait where a client should not).
    pub async fn wait_global(&self) {
        let global = self.global.load_full();
        if let Some(shared) = &self.shared {
            loop {
                let step = shared
                    .check(
                        "global",
                        LimitKind::Global,
                        global.per_second(),
                        global.rate,
                    )
                    .await;
                match step {
                    Ok(Ok(_)) => return,
                    Ok(Err(refused)) => tokio::time::sleep(refused.reset).await,
                    // Pacing background work needs no cluster-wide answer: this replica's own
                    // limiter paces it while Redis is away.
                    Err(_) => break,
                }
            }
        }
        global.limiter.until_ready().await;
    }
}

fn unit(per: Duration) -> &'static str {
    match per.as_secs() {
        1 => "second",
        60 => "minute",
        _ => "hour",
    }
}

fn check(limiter: &Limiter, kind: LimitKind) -> Result<Verdict, Verdict> {
    match limiter.check() {
        Ok(snapshot) => Ok(allowed(kind, &snapshot)),
        Err(not_until) => {
            let quota = not_until.quota();
            Err(Verdict {
                kind,
                limit: quota.burst_size().get(),
                remaining: 0,
                reset: not_until.wait_time_from(DefaultClock::default().now()),
                allowed: false,
            })
        }
    }
}

fn allowed(kind: LimitKind, snapshot: &StateSnapshot) -> Verdict {
    let quota = snapshot.quota();
    let limit = quota.burst_size().get();
    let remaining = snapshot.remaining_burst_capacity();
    Verdict {
        kind,
        limit,
        remaining,
        reset: quota.replenish_interval() * (limit - remaining.min(limit)),
        allowed: true,
    }
}

/// `n` as a header value. The numbers limits nearly always give (up to 1,000) are made once and
/// shared, which saves every limited answer an allocation per header.
fn number(n: u64) -> HeaderValue {
    static SMALL: LazyLock<Vec<HeaderValue>> =
        LazyLock::new(|| (0..=1000u64).map(HeaderValue::from).collect());
    usize::try_from(n)
        .ok()
        .and_then(|n| SMALL.get(n))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(n))
}

impl Verdict {
    /// The `RateLimit-*` headers (and `Retry-After` on a refusal).
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        if self.limit == 0 {
            return;
        }
        headers.insert(RATELIMIT_LIMIT, number(u64::from(self.limit)));
        headers.insert(RATELIMIT_REMAINING, number(u64::from(self.remaining)));
        headers.insert(RATELIMIT_RESET, number(seconds_up(self.reset)));
        if !self.allowed {
            headers.insert(
                http::header::RETRY_AFTER,
                number(seconds_up(self.reset).max(1)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn limits(extra: &str) -> RateLimits {
        let text = format!(
            r#"
            [upstream]
            token_env = "T"
            max_requests_per_second = 5
            [models."m"]
            reserve = "1"
            [[teams]]
            name = "design"
            keys = [{{ sha256 = "{}" }}]
            {extra}
            "#,
            ketchup_domain::config::KeyDigest::of("k").to_hex()
        );
        RateLimits::new(
            &Config::parse(Path::new("t.toml"), &text).unwrap(),
            Arc::new(Metrics::new()),
            None,
        )
    }

    #[tokio::test]
    async fn a_burst_passes_then_the_limit_says_when_to_come_back() {
        let limits = limits(r#"limits = { generate = "60/min", generate_burst = 3 }"#);
        let first = limits
            .check_team("design", LimitKind::Generate)
            .await
            .unwrap();
        assert_eq!((first.limit, first.remaining), (3, 2));
        assert_eq!(first.reset, Duration::from_secs(1));
        limits
            .check_team("design", LimitKind::Generate)
            .await
            .unwrap();
        limits
            .check_team("design", LimitKind::Generate)
            .await
            .unwrap();
        let Err(Refused::Limited(refusal)) = limits.check_team("design", LimitKind::Generate).await
        else {
            panic!("the fourth request of a burst of three is refused");
        };
        assert_eq!(refusal.verdict.remaining, 0);
        assert!(refusal.verdict.reset <= Duration::from_secs(1));
        assert!(
            refusal
                .detail
                .starts_with("team 'design' may start 60 tasks per minute; retry in ")
        );
        // Status reads have their own allowance.
        assert!(limits.check_team("design", LimitKind::Query).await.is_ok());
    }

    #[test]
    fn shared_and_made_numbers_read_the_same() {
        for n in [0, 1, 59, 1000, 1001, 86_400, u64::MAX] {
            assert_eq!(number(n), n.to_string(), "{n}");
        }
    }

    #[test]
    fn headers_follow_the_draft_standard() {
        let mut headers = HeaderMap::new();
        Verdict {
            kind: LimitKind::Query,
            limit: 20,
            remaining: 0,
            reset: Duration::from_millis(1200),
            allowed: false,
        }
        .write_headers(&mut headers);
        assert_eq!(headers["ratelimit-limit"], "20");
        assert_eq!(headers["ratelimit-remaining"], "0");
        assert_eq!(headers["ratelimit-reset"], "2");
        assert_eq!(headers["retry-after"], "2");
    }

    #[tokio::test]
    async fn a_reload_keeps_the_state_of_unchanged_limits() {
        let limits = limits(r#"limits = { generate = "1/h", generate_burst = 1 }"#);
        limits
            .check_team("design", LimitKind::Generate)
            .await
            .unwrap();
        let same = Config::parse(
            Path::new("t.toml"),
            &format!(
                "[upstream]\ntoken_env = \"T\"\n[models.\"m\"]\nreserve = \"1\"\n[[teams]]\nname = \"design\"\nkeys = [{{ sha256 = \"{}\" }}]\nlimits = {{ generate = \"1/h\", generate_burst = 1 }}\n",
                ketchup_domain::config::KeyDigest::of("k").to_hex()
            ),
        )
        .unwrap();
        limits.reload(&same);
        assert!(
            limits
                .check_team("design", LimitKind::Generate)
                .await
                .is_err()
        );
    }
}
