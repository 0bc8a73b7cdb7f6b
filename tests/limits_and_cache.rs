//! Rate limits (per team and for the whole upstream account) and the status cache, end to end.
//!
//! Most tests run the real binary in front of the fake upstream; the two tests about upstream 404s
//! and the new-task grace run the gateway in-process on a manual clock. The cache's lifetimes run
//! on real time (moka), so tests about TTL windows sleep for real and assert generous bounds only.
//! The tests of this file run one at a time (see [`serial`]): the 100-poller test would otherwise
//! starve the timing-sensitive rate-limit tests of CPU.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ketchup_domain::clock::ManualClock;
use ketchup_domain::credits::Credits;
use ketchup_fake_upstream::{FakeHandle, Fault};
use ketchup_testkit::api::statuses;
use ketchup_testkit::{
    ADS_KEY, DEADLINE, DESIGN_KEY, GEMPIX, Gateway, GatewayConfig, InProcess, Reply, fake_config,
    rendering_at, start_fake, upstream_reads, wait_until_final,
};
use serde_json::{Value, json};

const ZERO: &str = "0.00000000";
const TASK_NOT_FOUND: &str = r#"{"code":1,"message":"task not found"}"#;

/// Limits no test reaches by accident.
const GENEROUS: &str = r#"{ generate = "100000/s", generate_burst = 100000, query = "100000/s", query_burst = 100000 }"#;

/// Tests in this file run one after the other.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// A fake whose tasks spend `phase` in each of pending, submitted and in_progress, and whose
/// `google/gempix2` images consume 0.37 credits each.
async fn start_fake_with_phase(phase: Duration) -> FakeHandle {
    start_fake(rendering_at(phase, "0.37")).await
}

/// The base config in front of `upstream`, both teams with limits no test reaches by accident.
fn config(upstream: &str) -> GatewayConfig {
    GatewayConfig::new()
        .upstream_url(upstream)
        .limits("design", GENEROUS)
        .limits("ads", GENEROUS)
}

/// `RateLimit-*` header values as a test writes them.
fn limit_headers(
    limit: &str,
    remaining: &str,
    reset: &str,
) -> (Option<String>, Option<String>, Option<String>) {
    (
        Some(limit.to_owned()),
        Some(remaining.to_owned()),
        Some(reset.to_owned()),
    )
}

fn x_caches(replies: &[Reply]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for reply in replies {
        *counts.entry(reply.x_cache()).or_default() += 1;
    }
    counts
}

/// The `rate limited` envelope.
fn rate_limited(detail: &str) -> Value {
    json!({"code": 1, "message": "rate limited", "detail": detail})
}

/// The detail of a refusal by the upstream account's limit of `rate` per second (the wait is
/// always under a second: one request passes every 1/rate s).
fn global_detail(rate: u32) -> String {
    format!(
        "the upstream account takes at most {rate} requests per second from all teams together; \
         retry in 1 s"
    )
}

/// Design's budget object with a lifetime budget.
fn lifetime_budget(credits: &str, spent: &str, reserved: &str, in_flight: u64) -> Value {
    let remaining = |credits: &str, spent: &str, reserved: &str| {
        let parse = |s: &str| s.parse::<Credits>().unwrap();
        parse(credits)
            .saturating_sub(parse(spent))
            .saturating_sub(parse(reserved))
            .format_places(8)
    };
    json!({
        "team": "design",
        "period": "lifetime",
        "period_key": "lifetime",
        "credits": credits,
        "spent": spent,
        "reserved": reserved,
        "remaining": remaining(credits, spent, reserved),
        "in_flight": in_flight,
        "max_in_flight": null,
        "resets_at": null,
    })
}

// ---------------------------------------------------------------------------------------------
// 1. Many pollers, one upstream read per TTL window; a final status stays and settles once
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_pollers_of_a_running_task_cost_one_upstream_read_per_ttl() {
    let _serial = serial().await;
    let mut fake = fake_config();
    fake.pending_for = Duration::from_millis(100);
    fake.submitted_for = Duration::from_millis(100);
    fake.in_progress_for = Duration::from_secs(60);
    let fake = ketchup_fake_upstream::start(fake)
        .await
        .expect("fake starts");
    let gateway = Gateway::start(&config(&fake.base_url()).cache(r#"status_ttl = "1s""#));
    let task = gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream_reads(&fake, &task), 0);
    gateway.api.warm_up(100).await;

    let deadline = Instant::now() + Duration::from_secs(3);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (api, task) = (gateway.api.clone(), task.clone());
        set.spawn(async move {
            let mut served: HashMap<String, u64> = HashMap::new();
            while Instant::now() < deadline {
                let reply = api.query(DESIGN_KEY, &task).await;
                assert_eq!(reply.status, 200, "{}", reply.text);
                let body = reply.json();
                assert_eq!(body["data"]["task_id"], task.as_str(), "{body}");
                assert_eq!(body["data"]["status"], "in_progress", "{body}");
                *served.entry(reply.x_cache()).or_default() += 1;
            }
            served
        });
    }
    let mut served: HashMap<String, u64> = HashMap::new();
    while let Some(poller) = set.join_next().await {
        for (how, n) in poller.expect("poller") {
            *served.entry(how).or_default() += n;
        }
    }

    let reads = upstream_reads(&fake, &task);
    let count = |how: &str| served.get(how).copied().unwrap_or(0);
    let (hits, misses, coalesced) = (count("hit"), count("miss"), count("coalesced"));
    let total: u64 = served.values().sum();
    eprintln!("100 pollers: {total} requests, {served:?}, {reads} upstream reads");
    assert_eq!(
        total,
        hits + misses + coalesced,
        "X-Cache is hit, miss or coalesced: {served:?}"
    );
    assert!(
        (2..=5).contains(&reads),
        "3 s of polling with a 1 s TTL should read the upstream about 3 times, not {reads} \
         ({served:?})"
    );
    assert_eq!(
        misses, reads,
        "every miss is one upstream read and nothing else reads: {served:?}"
    );
    assert!(total >= 300, "the pollers made only {total} requests");
    assert!(
        hits + coalesced >= 20 * misses,
        "hits and coalesced reads should dwarf misses: {served:?}"
    );
    assert_eq!(fake.stats().query_requests, reads);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_misses_wait_on_one_upstream_read() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_secs(60)).await;
    let gateway = Gateway::start(&config(&fake.base_url()).cache(r#"status_ttl = "60s""#));
    let task = gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    gateway.api.warm_up(50).await;
    // The one read that reaches the upstream takes half a second: every other poll sent
    // meanwhile waits for it.
    fake.faults()
        .inject_query(Fault::Slow(Duration::from_millis(500)), 1);
    let polls: Vec<(&'static str, Option<String>)> =
        (0..50).map(|_| (DESIGN_KEY, Some(task.clone()))).collect();
    let replies = gateway.api.concurrently(&polls).await;
    assert_eq!(statuses(&replies), HashMap::from([(200, 50)]));
    let served = x_caches(&replies);
    eprintln!("50 concurrent misses: {served:?}");
    assert_eq!(upstream_reads(&fake, &task), 1, "{served:?}");
    assert_eq!(served.get("miss"), Some(&1), "{served:?}");
    assert!(
        served.get("coalesced").copied().unwrap_or(0) >= 1,
        "{served:?}"
    );
    assert_eq!(
        served.get("coalesced").copied().unwrap_or(0) + served.get("hit").copied().unwrap_or(0),
        49,
        "{served:?}"
    );
    for reply in &replies {
        assert_eq!(
            reply.text, replies[0].text,
            "every poller gets the one answer"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_final_status_is_read_once_then_served_from_the_cache_and_settled_once() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_millis(300)).await;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .cache(r#"status_ttl = "1s""#)
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#),
    );
    let task = gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", ZERO, "0.50000000", 1)
    );

    // Poll through the running phases until the gateway shows the final state.
    let deadline = Instant::now() + DEADLINE;
    let first_success = loop {
        let reply = gateway.api.query(DESIGN_KEY, &task).await;
        if reply.task_status() == "success" {
            break reply;
        }
        assert!(Instant::now() < deadline, "never saw success");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        first_success.x_cache(),
        "miss",
        "a final status first reaches a client through an upstream read"
    );
    assert_eq!(first_success.json()["data"]["consumed"], "0.37000000");
    let reads = upstream_reads(&fake, &task);
    assert!(reads >= 1);

    // 200 pollers at once: all from the cache, none reaches the upstream.
    let requests: Vec<(&'static str, Option<String>)> =
        (0..200).map(|_| (DESIGN_KEY, Some(task.clone()))).collect();
    let replies = gateway.api.concurrently(&requests).await;
    assert_eq!(statuses(&replies), HashMap::from([(200, 200)]));
    assert_eq!(x_caches(&replies), HashMap::from([("hit".to_owned(), 200)]));
    for reply in &replies {
        assert_eq!(
            reply.text, first_success.text,
            "the cached answer, unchanged"
        );
    }
    assert_eq!(upstream_reads(&fake, &task), reads);

    // A final status outlives the TTL of running ones.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..20 {
        let reply = gateway.api.query(DESIGN_KEY, &task).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.x_cache(), "hit", "a final status stays until evicted");
        assert_eq!(reply.text, first_success.text);
    }
    assert_eq!(upstream_reads(&fake, &task), reads);

    // Settled exactly once, at what the task consumed.
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", "0.37000000", ZERO, 0)
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Ownership comes before the cache
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_task_is_still_not_found_for_another_team() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_secs(60)).await;
    let gateway = Gateway::start(&config(&fake.base_url()).cache(r#"status_ttl = "60s""#));
    let task = gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    let first = gateway.api.query(DESIGN_KEY, &task).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.x_cache(), "miss");
    let second = gateway.api.query(DESIGN_KEY, &task).await;
    assert_eq!(second.x_cache(), "hit");
    assert_eq!(
        second.header("ratelimit-limit").as_deref(),
        Some("100000"),
        "a cache hit still carries the team's RateLimit headers"
    );
    assert_eq!(second.text, first.text);
    assert_eq!(upstream_reads(&fake, &task), 1);

    // Ads asks for design's cached task: the same 404 as for an id that does not exist, and
    // nothing that tells it the task is cached.
    for _ in 0..3 {
        let foreign = gateway.api.query(ADS_KEY, &task).await;
        assert_eq!(foreign.status, 404, "{}", foreign.text);
        assert_eq!(
            foreign.json(),
            serde_json::from_str::<Value>(TASK_NOT_FOUND).unwrap()
        );
        assert_eq!(
            foreign.header("x-cache"),
            None,
            "a 404 says nothing about the cache"
        );
    }
    let unknown = gateway.api.query(ADS_KEY, "ta-no-such-task").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(
        unknown.json(),
        serde_json::from_str::<Value>(TASK_NOT_FOUND).unwrap()
    );
    assert_eq!(
        upstream_reads(&fake, &task),
        1,
        "ads never reached the upstream"
    );
    assert_eq!(fake.stats().query_requests, 1);

    // The owner is still served from the cache.
    let again = gateway.api.query(DESIGN_KEY, &task).await;
    assert_eq!(again.x_cache(), "hit");
    assert_eq!(upstream_reads(&fake, &task), 1);
}

// ---------------------------------------------------------------------------------------------
// 3. Errors are not cached
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn upstream_errors_and_timeouts_are_not_cached() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_secs(60)).await;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .cache(r#"status_ttl = "60s""#)
            .upstream(r#"timeout = "500ms""#),
    );
    let task = gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id();

    // Two 500s: the first try and its one retry (query_retries = 1).
    fake.faults().inject_query(Fault::Status500, 2);
    let failed = gateway.api.query(DESIGN_KEY, &task).await;
    assert_eq!(failed.status, 500, "{}", failed.text);
    assert_eq!(
        failed.json(),
        json!({"code": 1, "message": "internal server error"})
    );
    assert_eq!(failed.x_cache(), "miss");
    assert_eq!(fake.stats().query_requests, 2, "one try and one retry");
    assert_eq!(upstream_reads(&fake, &task), 0);

    // The next poll goes upstream again and its status is cached.
    let ok = gateway.api.query(DESIGN_KEY, &task).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.x_cache(), "miss");
    assert_eq!(upstream_reads(&fake, &task), 1);
    assert_eq!(fake.stats().query_requests, 3);
    let cached = gateway.api.query(DESIGN_KEY, &task).await;
    assert_eq!(cached.x_cache(), "hit");
    assert_eq!(upstream_reads(&fake, &task), 1);

    // A timeout is not cached either (a second task, so nothing is cached for it yet).
    let slow_task = gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    fake.faults()
        .inject_query(Fault::Slow(Duration::from_secs(2)), 1);
    let timed_out = gateway.api.query(DESIGN_KEY, &slow_task).await;
    assert_eq!(timed_out.status, 504, "{}", timed_out.text);
    assert_eq!(timed_out.json()["message"], "upstream timeout");
    assert_eq!(upstream_reads(&fake, &slow_task), 1);
    let after = gateway.api.query(DESIGN_KEY, &slow_task).await;
    assert_eq!(after.status, 200, "{}", after.text);
    assert_eq!(after.x_cache(), "miss");
    assert_eq!(upstream_reads(&fake, &slow_task), 2);
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().expect("timestamp")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_404_is_cached_as_pending_only_while_the_task_is_young() {
    let _serial = serial().await;
    // The fake does not know its tasks for an hour; the gateway's clock moves only when told.
    let mut fake = fake_config();
    fake.unknown_for = Duration::from_secs(3600);
    let fake = ketchup_fake_upstream::start(fake)
        .await
        .expect("fake starts");
    let clock = ManualClock::new(at("2026-11-23T12:00:00Z"));
    let gw = InProcess::start(
        &config(&fake.base_url())
            .cache(r#"status_ttl = "60s""#)
            .upstream(r#"new_task_grace = "30s""#)
            .reconciler(r#"settle_after = "10h""#),
        clock.clone(),
    )
    .await;
    let api = &gw.api;

    // Young: the gateway answers pending, and caches it like any running status.
    let young = api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    let first = api.query(DESIGN_KEY, &young).await;
    assert_eq!(first.task_status(), "pending");
    assert_eq!(first.x_cache(), "miss");
    let second = api.query(DESIGN_KEY, &young).await;
    assert_eq!(second.task_status(), "pending");
    assert_eq!(second.x_cache(), "hit");
    assert_eq!(upstream_reads(&fake, &young), 1);

    // Past the grace period, the upstream's 404 passes through and is never cached.
    let old = api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    clock.advance(Duration::from_secs(3600));
    for read in 1..=3 {
        let reply = api.query(DESIGN_KEY, &old).await;
        assert_eq!(reply.status, 404, "{}", reply.text);
        assert_eq!(
            reply.json(),
            serde_json::from_str::<Value>(TASK_NOT_FOUND).unwrap()
        );
        assert_eq!(reply.x_cache(), "miss");
        assert_eq!(
            upstream_reads(&fake, &old),
            read,
            "every read reaches the upstream"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. The size bound, and the cache turned off
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_holds_at_most_max_entries() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_millis(50)).await;
    let gateway = Gateway::start(&config(&fake.base_url()).cache("max_entries = 50"));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let requests: Vec<(&'static str, Option<String>)> =
            (0..20).map(|_| (DESIGN_KEY, None)).collect();
        for reply in gateway.api.concurrently(&requests).await {
            tasks.push(reply.task_id());
        }
    }
    assert_eq!(tasks.len(), 200);
    // Final statuses: without the size bound they would stay cached for good.
    wait_until_final(&fake, &tasks).await;

    for task in &tasks {
        let reply = gateway.api.query(DESIGN_KEY, task).await;
        assert_eq!(reply.task_status(), "success", "{}", reply.text);
        assert_eq!(reply.x_cache(), "miss");
    }
    let reads_before: u64 = fake.stats().queries_by_task.values().sum();
    assert_eq!(reads_before, 200);

    let mut served: HashMap<String, u64> = HashMap::new();
    for task in &tasks {
        let reply = gateway.api.query(DESIGN_KEY, task).await;
        assert_eq!(reply.task_status(), "success", "{}", reply.text);
        *served.entry(reply.x_cache()).or_default() += 1;
    }
    let hits = served.get("hit").copied().unwrap_or(0);
    let misses = served.get("miss").copied().unwrap_or(0);
    eprintln!("second pass over 200 tasks with max_entries = 50: {served:?}");
    assert_eq!(hits + misses, 200, "{served:?}");
    let reads_after: u64 = fake.stats().queries_by_task.values().sum();
    assert_eq!(reads_after - reads_before, misses, "{served:?}");
    assert!(
        hits <= 100 && misses >= 100,
        "a cache of 50 entries cannot have kept most of 200 tasks: {served:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn max_entries_zero_sends_every_read_upstream() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_secs(60)).await;
    let gateway = Gateway::start(&config(&fake.base_url()).cache("max_entries = 0"));
    let task = gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    for read in 1..=5 {
        let reply = gateway.api.query(DESIGN_KEY, &task).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.x_cache(), "miss");
        assert_eq!(upstream_reads(&fake, &task), read);
    }
}

// ---------------------------------------------------------------------------------------------
// 5-7. Team limits
// ---------------------------------------------------------------------------------------------

/// The number of seconds in a detail ending "retry in N s".
fn retry_in(detail: &str, prefix: &str) -> u64 {
    let rest = detail
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{detail:?} does not start with {prefix:?}"));
    let seconds = rest
        .strip_suffix(" s")
        .unwrap_or_else(|| panic!("{detail:?} does not end with \" s\""));
    seconds
        .parse()
        .unwrap_or_else(|_| panic!("{detail:?}: {seconds:?} is not a number"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_team_over_its_generation_limit_gets_429_and_costs_nothing() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_secs(60)).await;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .limits("design", r#"{ generate = "60/min", generate_burst = 3 }"#)
            .budget("design", r#"{ credits = "100.00", period = "lifetime" }"#),
    );
    let started = Instant::now();
    for (remaining, reset) in [("2", "1"), ("1", "2"), ("0", "3")] {
        let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.rate_limit(), limit_headers("3", remaining, reset));
        assert_eq!(reply.header("retry-after"), None);
    }
    let refused = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(900),
        "the four requests took {elapsed:?}: the limit (one per second) refilled meanwhile"
    );
    assert_eq!(refused.status, 429, "{}", refused.text);
    let body = refused.json();
    let detail = body["detail"].as_str().expect("a detail").to_owned();
    assert_eq!(body, rate_limited(&detail));
    assert_eq!(
        retry_in(
            &detail,
            "team 'design' may start 60 tasks per minute; retry in "
        ),
        1,
        "{detail}"
    );
    assert_eq!(refused.header("retry-after").as_deref(), Some("1"));
    assert_eq!(refused.rate_limit(), limit_headers("3", "0", "1"));
    assert_eq!(
        refused.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(refused.header("x-budget-remaining"), None);

    let stats = fake.stats();
    assert_eq!(stats.generate_requests, 3, "the refused one never left");
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("100.00000000", ZERO, "1.50000000", 3),
        "three reservations, none for the refused request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn generation_and_status_limits_are_independent() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_secs(60)).await;
    let limits = r#"{ generate = "60/min", generate_burst = 2, query = "1/min", query_burst = 2 }"#;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .limits("design", limits)
            .limits("ads", limits),
    );

    // Design spends its generations; its status reads are untouched.
    let first = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(first.rate_limit(), limit_headers("2", "1", "1"));
    let task = first.task_id();
    let second = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(second.rate_limit(), limit_headers("2", "0", "2"));
    let refused = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(refused.status, 429, "{}", refused.text);
    let query = gateway.api.query(DESIGN_KEY, &task).await;
    assert_eq!(query.status, 200, "{}", query.text);
    assert_eq!(query.rate_limit(), limit_headers("2", "1", "60"));

    // Ads spends its status reads; its generations are untouched.
    let started = Instant::now();
    let first = gateway.api.generate(ADS_KEY, GEMPIX).await;
    assert_eq!(first.rate_limit(), limit_headers("2", "1", "1"));
    let task = first.task_id();
    let read = gateway.api.query(ADS_KEY, &task).await;
    assert_eq!(read.status, 200, "{}", read.text);
    assert_eq!(read.rate_limit(), limit_headers("2", "1", "60"));
    let read = gateway.api.query(ADS_KEY, &task).await;
    assert_eq!(read.status, 200, "{}", read.text);
    assert_eq!(read.rate_limit(), limit_headers("2", "0", "120"));
    let refused = gateway.api.query(ADS_KEY, &task).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(refused.status, 429, "{}", refused.text);
    assert_eq!(
        refused.json(),
        rate_limited("team 'ads' may read the status of 1 task per minute; retry in 60 s")
    );
    assert_eq!(refused.header("retry-after").as_deref(), Some("60"));
    assert_eq!(refused.rate_limit(), limit_headers("2", "0", "60"));
    assert_eq!(refused.header("x-cache"), None);
    let reads = upstream_reads(&fake, &task);

    let generated = gateway.api.generate(ADS_KEY, GEMPIX).await;
    assert_eq!(generated.status, 200, "{}", generated.text);
    assert_eq!(generated.rate_limit(), limit_headers("2", "0", "2"));
    assert_eq!(fake.stats().generate_requests, 4);
    assert_eq!(
        upstream_reads(&fake, &task),
        reads,
        "the refused read never left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_limit_counts_on_its_own_routes_and_no_other() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_secs(60)).await;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .text_model("openai/gpt-5.2", "1.50", "6.00", "max_output_tokens = 1000")
            .text_model(
                "gemini-3.1-pro-preview",
                "0.50",
                "2.50",
                "max_output_tokens = 1000",
            )
            .limits("design", r#"{ text = "1/min", text_burst = 2 }"#),
    );
    let chat =
        r#"{"model":"openai/gpt-5.2","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
    let gemini = r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#;
    let gemini_path = "/api/v1beta/models/gemini-3.1-pro-preview:generateContent";

    // One text limit over the dialects, the templated Gemini route included.
    let first = gateway
        .api
        .submit(DESIGN_KEY, "/api/v1/chat/completions", chat)
        .await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.rate_limit(), limit_headers("2", "1", "60"));
    let second = gateway.api.submit(DESIGN_KEY, gemini_path, gemini).await;
    assert_eq!(second.status, 200, "{}", second.text);
    assert_eq!(second.rate_limit(), limit_headers("2", "0", "120"));
    let refused = gateway.api.submit(DESIGN_KEY, gemini_path, gemini).await;
    assert_eq!(refused.status, 429, "{}", refused.text);
    assert_eq!(
        refused.json(),
        rate_limited("team 'design' may send 1 text request per minute; retry in 60 s")
    );
    assert_eq!(fake.stats().text_requests, 2, "the refused one never left");

    // The generation and status limits are the defaults', untouched by the text requests.
    let generated = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(generated.status, 200, "{}", generated.text);
    assert_eq!(generated.rate_limit(), limit_headers("1000", "999", "1"));
    let read = gateway.api.query(DESIGN_KEY, &generated.task_id()).await;
    assert_eq!(read.status, 200, "{}", read.text);
    assert_eq!(read.rate_limit(), limit_headers("1000", "999", "1"));

    // A route no limit applies to answers without the headers of any.
    let budget = gateway
        .api
        .get("/gateway/v1/budget", Some(DESIGN_KEY))
        .await;
    assert_eq!(budget.status, 200, "{}", budget.text);
    assert_eq!(budget.rate_limit(), (None, None, None));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_teams_flood_does_not_touch_another_team() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_secs(60)).await;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .limits("design", r#"{ generate = "60/min", generate_burst = 2 }"#)
            .limits("ads", r#"{ generate = "10/min", generate_burst = 5 }"#),
    );
    let flood: Vec<(&'static str, Option<String>)> = (0..12).map(|_| (DESIGN_KEY, None)).collect();
    let replies = gateway.api.concurrently(&flood).await;
    assert_eq!(statuses(&replies), HashMap::from([(200, 2), (429, 10)]));
    for reply in replies.iter().filter(|r| r.status == 429) {
        let detail = reply.json()["detail"].as_str().unwrap().to_owned();
        retry_in(
            &detail,
            "team 'design' may start 60 tasks per minute; retry in ",
        );
        assert_eq!(reply.header("ratelimit-limit").as_deref(), Some("2"));
    }

    let ads = gateway.api.generate(ADS_KEY, GEMPIX).await;
    assert_eq!(ads.status, 200, "{}", ads.text);
    assert_eq!(ads.rate_limit(), limit_headers("5", "4", "6"));
    let ads = gateway.api.generate(ADS_KEY, GEMPIX).await;
    assert_eq!(ads.status, 200, "{}", ads.text);
    assert_eq!(ads.rate_limit(), limit_headers("5", "3", "12"));
    assert_eq!(gateway.api.generate(DESIGN_KEY, GEMPIX).await.status, 429);
    assert_eq!(fake.stats().generate_requests, 4);
}

// ---------------------------------------------------------------------------------------------
// 8. The upstream account's limit
// ---------------------------------------------------------------------------------------------

/// The most requests a limit of `rate` per second with a burst of `rate` lets through in
/// `window`.
fn global_allowance(rate: u32, window: Duration) -> usize {
    (u128::from(rate) + window.as_millis() * u128::from(rate) / 1000) as usize
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_accounts_limit_caps_all_teams_but_not_cache_hits() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_millis(100)).await;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .upstream("max_requests_per_second = 3")
            .budget("design", r#"{ credits = "100.00", period = "lifetime" }"#),
    );
    gateway.api.warm_up(20).await;

    // Ten generations from each team at once.
    let burst: Vec<(&'static str, Option<String>)> = (0..20)
        .map(|i| (if i % 2 == 0 { DESIGN_KEY } else { ADS_KEY }, None))
        .collect();
    let started = Instant::now();
    let replies = gateway.api.concurrently(&burst).await;
    let window = started.elapsed();
    eprintln!("global burst: {:?} within {window:?}", statuses(&replies));
    let accepted: Vec<(&'static str, String)> = burst
        .iter()
        .zip(&replies)
        .filter(|(_, r)| r.status == 200)
        .map(|((key, _), r)| (*key, r.task_id()))
        .collect();
    assert!(
        accepted.len() >= 3 && accepted.len() <= global_allowance(3, window),
        "{} accepted within {window:?}: {:?}",
        accepted.len(),
        statuses(&replies)
    );
    if window < Duration::from_millis(333) {
        assert_eq!(
            accepted.len(),
            3,
            "a burst within one interval gets exactly the burst"
        );
    }
    for reply in replies.iter().filter(|r| r.status != 200) {
        assert_eq!(reply.status, 429, "{}", reply.text);
        assert_eq!(reply.json(), rate_limited(&global_detail(3)));
        assert_eq!(reply.header("retry-after").as_deref(), Some("1"));
        assert_eq!(reply.rate_limit(), limit_headers("3", "0", "1"));
    }
    assert_eq!(
        fake.stats().generate_requests,
        accepted.len() as u64,
        "only the accepted ones reached the upstream"
    );
    let design_accepted = accepted.iter().filter(|(k, _)| *k == DESIGN_KEY).count();
    let reserved = "0.50"
        .parse::<Credits>()
        .unwrap()
        .checked_mul(design_accepted as i64)
        .unwrap()
        .format_places(8);
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("100.00000000", ZERO, &reserved, design_accepted as u64),
        "refused generations reserved nothing"
    );

    // Cache hits do not count: one read of a finished task, then 20 hits at once.
    let (key, task) = accepted[0].clone();
    let mut unread: Vec<(&'static str, String)> = accepted[1..].to_vec();
    wait_until_final(&fake, std::slice::from_ref(&task)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let read = gateway.api.query(key, &task).await;
    assert_eq!(read.task_status(), "success");
    assert_eq!(read.x_cache(), "miss");
    let polls: Vec<(&'static str, Option<String>)> =
        (0..20).map(|_| (key, Some(task.clone()))).collect();
    let replies = gateway.api.concurrently(&polls).await;
    assert_eq!(
        statuses(&replies),
        HashMap::from([(200, 20)]),
        "{:?}",
        replies.iter().find(|r| r.status != 200)
    );
    assert_eq!(x_caches(&replies), HashMap::from([("hit".to_owned(), 20)]));
    assert_eq!(upstream_reads(&fake, &task), 1);

    // Reads that miss do count: more unread tasks than the limit allows at once.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
        unread.push((DESIGN_KEY, reply.task_id()));
    }
    let unread_ids: Vec<String> = unread.iter().map(|(_, t)| t.clone()).collect();
    wait_until_final(&fake, &unread_ids).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reads: Vec<(&'static str, Option<String>)> = unread
        .iter()
        .map(|(key, task)| (*key, Some(task.clone())))
        .collect();
    let started = Instant::now();
    let replies = gateway.api.concurrently(&reads).await;
    let window = started.elapsed();
    let passed = replies.iter().filter(|r| r.status == 200).count();
    assert!(
        passed >= 3 && passed <= global_allowance(3, window).min(unread.len()),
        "{passed} of {} reads passed within {window:?}",
        unread.len()
    );
    if window < Duration::from_millis(333) {
        assert_eq!(passed, 3, "{:?}", statuses(&replies));
    }
    for reply in &replies {
        if reply.status == 200 {
            assert_eq!(reply.x_cache(), "miss");
        } else {
            assert_eq!(reply.status, 429, "{}", reply.text);
            assert_eq!(reply.json(), rate_limited(&global_detail(3)));
            assert_eq!(reply.header("retry-after").as_deref(), Some("1"));
            assert_eq!(reply.rate_limit(), limit_headers("3", "0", "1"));
        }
    }
    let upstream: u64 = unread_ids.iter().map(|t| upstream_reads(&fake, t)).sum();
    assert_eq!(
        upstream, passed as u64,
        "refused reads never reached the upstream"
    );
}

// ---------------------------------------------------------------------------------------------
// Waiters on a read that is passed on but not cached
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn waiters_on_an_uncached_answer_are_not_counted_as_misses() {
    let _serial = serial().await;
    let mut fake = fake_config();
    fake.unknown_for = Duration::from_secs(3600);
    let fake = ketchup_fake_upstream::start(fake)
        .await
        .expect("fake starts");
    let clock = ManualClock::new(at("2026-11-23T12:00:00Z"));
    let gw = InProcess::start(
        &config(&fake.base_url())
            .upstream(r#"new_task_grace = "30s""#)
            .reconciler(r#"settle_after = "10h""#),
        clock.clone(),
    )
    .await;
    let api = &gw.api;
    let task = api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    clock.advance(Duration::from_secs(3600));
    api.warm_up(10).await;

    // The upstream's 404 for an old task is passed on, not cached; ten polls arrive while the
    // one read is under way.
    fake.faults()
        .inject_query(Fault::Slow(Duration::from_millis(500)), 1);
    let polls: Vec<(&'static str, Option<String>)> =
        (0..10).map(|_| (DESIGN_KEY, Some(task.clone()))).collect();
    let replies = api.concurrently(&polls).await;
    assert_eq!(statuses(&replies), HashMap::from([(404, 10)]));
    let served = x_caches(&replies);
    let reads = upstream_reads(&fake, &task);
    assert!(
        reads < 10,
        "the polls shared a read: {reads} reads, {served:?}"
    );
    assert_eq!(
        served.get("miss").copied().unwrap_or(0) as u64,
        reads,
        "X-Cache says miss for a request that made no upstream read of its own (it waited for \
         another's read, which is what `coalesced` means): {served:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Limits after a reload (SIGHUP)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_applies_changed_team_limits_and_keeps_the_state_of_unchanged_ones() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_secs(60)).await;
    let one_per_hour = r#"{ generate = "1/h", generate_burst = 1 }"#;
    let config = config(&fake.base_url())
        .limits("design", one_per_hour)
        .limits("ads", one_per_hour);
    let mut gateway = Gateway::start(&config);
    for key in [DESIGN_KEY, ADS_KEY] {
        assert_eq!(gateway.api.generate(key, GEMPIX).await.status, 200);
        assert_eq!(gateway.api.generate(key, GEMPIX).await.status, 429);
    }

    gateway
        .reload(config.limits("ads", r#"{ generate = "1/h", generate_burst = 3 }"#))
        .await;

    // Design's limit did not change: its spent burst stays spent.
    let design = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(design.status, 429, "{}", design.text);
    let detail = design.json()["detail"].as_str().unwrap().to_owned();
    let wait = retry_in(
        &detail,
        "team 'design' may start 1 task per hour; retry in ",
    );
    assert!((3500..=3600).contains(&wait), "{detail}");
    // Ads's did: the new burst applies.
    let ads = gateway.api.generate(ADS_KEY, GEMPIX).await;
    assert_eq!(ads.status, 200, "{}", ads.text);
    assert_eq!(ads.rate_limit(), limit_headers("3", "2", "3600"));
    assert_eq!(fake.stats().generate_requests, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_applies_a_changed_upstream_account_limit() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_secs(60)).await;
    let config = config(&fake.base_url()).upstream("max_requests_per_second = 1000");
    let mut gateway = Gateway::start(&config);
    gateway
        .reload(config.upstream("max_requests_per_second = 2"))
        .await;
    assert!(
        !gateway.logs().contains("change only on restart"),
        "the gateway did not say the new limit needs a restart"
    );

    gateway.api.warm_up(8).await;
    let burst: Vec<(&'static str, Option<String>)> = (0..8).map(|_| (DESIGN_KEY, None)).collect();
    let started = Instant::now();
    let replies = gateway.api.concurrently(&burst).await;
    let window = started.elapsed();
    let accepted = replies.iter().filter(|r| r.status == 200).count();
    assert!(
        accepted <= global_allowance(2, window),
        "max_requests_per_second is 2 since the reload, yet {accepted} of 8 generations passed \
         within {window:?}: {:?}",
        statuses(&replies)
    );
    for reply in replies.iter().filter(|r| r.status != 200) {
        assert_eq!(reply.json(), rate_limited(&global_detail(2)));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_changes_the_cache_says_it_needs_a_restart() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_secs(60)).await;
    let config = config(&fake.base_url()).cache("max_entries = 0");
    let mut gateway = Gateway::start(&config);
    let task = gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    assert_eq!(gateway.api.query(DESIGN_KEY, &task).await.x_cache(), "miss");

    // The cache is built once at start: a reload says so, and the running cache stays as it was.
    gateway
        .reload(config.cache("max_entries = 100000\nstatus_ttl = \"60s\""))
        .await;
    assert!(
        gateway.logs().contains("[cache]") && gateway.logs().contains("change only on restart"),
        "the gateway must say that the cache settings need a restart; log:\n{}",
        gateway.logs()
    );
    assert_eq!(gateway.api.query(DESIGN_KEY, &task).await.x_cache(), "miss");
    assert_eq!(gateway.api.query(DESIGN_KEY, &task).await.x_cache(), "miss");
    assert_eq!(upstream_reads(&fake, &task), 3);
}

// ---------------------------------------------------------------------------------------------
// Retries and the upstream account's limit
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn retried_status_reads_stay_within_the_upstream_accounts_limit() {
    let _serial = serial().await;
    let fake = start_fake_with_phase(Duration::from_secs(60)).await;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .upstream("max_requests_per_second = 2")
            .upstream("query_retries = 2"),
    );
    // Two tasks, started a second apart so each generation finds the limit whole.
    let mut tasks = Vec::new();
    for _ in 0..2 {
        tasks.push(gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id());
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    gateway.api.warm_up(2).await;

    // The upstream fails every read; each client read is tried 1 + query_retries times.
    fake.faults().inject_query(Fault::Status500, 1000);
    let reads: Vec<(&'static str, Option<String>)> = tasks
        .iter()
        .map(|t| (DESIGN_KEY, Some(t.clone())))
        .collect();
    let started = Instant::now();
    let replies = gateway.api.concurrently(&reads).await;
    let window = started.elapsed();
    // Each read ends in the upstream's 500 after its retries, or in a 429 when the other read's
    // retries took the account's limit before it arrived (which the machine's load decides).
    let answered = statuses(&replies);
    assert!(
        answered.get(&500).is_some_and(|n| *n >= 1)
            && answered.keys().all(|status| [500, 429].contains(status)),
        "{answered:?}"
    );
    let sent = fake.stats().query_requests;
    assert!(
        sent as usize <= global_allowance(2, window),
        "max_requests_per_second = 2, yet the upstream got {sent} status reads within \
         {window:?}: retries are upstream requests too"
    );
}
