//! Chaos under load, and a soak.
//!
//! Chaos: four teams send generations at a steady rate over seven routes and poll their tasks,
//! while the fake upstream answers a fifth of generations and status reads with a 500, a dropped
//! connection or a slow answer (slower than the gateway waits, every other stretch of a few
//! seconds) and fails some tasks; the gateway is SIGKILLed and started again on its ledger every
//! `CHAOS_KILL_EVERY` seconds; with the Redis store, Redis itself is SIGKILLed and started again
//! every `CHAOS_REDIS_EVERY` seconds. Redis runs with `appendfsync always`: a Redis that loses
//! acknowledged writes when it restarts cannot keep credits or ownership, and running it so is a
//! deployment requirement (README), not something a gateway can make up for. Afterwards the
//! faults stop, the reconciler closes every reservation, and [`audit`] checks the books to the
//! credit unit.
//!
//! Soak (`--ignored`): the same clients without faults or kills for `SOAK_SECS`, the gateway's
//! RSS sampled; it must be flat after the warm-up, and the books exact.
//!
//! `cargo test` runs the quick form of the chaos test against SQLite and Redis; `bench/chaos`
//! runs the long form and the soak and writes their figures to `bench/RESULTS.md`. Settings
//! (seconds and rates) come from the environment; with `CHAOS_REPORT_DIR` set, each test also
//! writes its figures there as JSON.

mod audit;
mod load;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ketchup_fake_upstream::{FakeConfig, FakeHandle, FaultRates};
use ketchup_test_redis::PrivateRedis;
use ketchup_testkit::{Api, Gateway, GatewayConfig, fake_config, start_fake};
use serde_json::{Value, json};

use load::{Load, Record, Target};

/// A setting from the environment, or its quick default.
fn setting(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

/// The gateway of both tests: the four teams, the admin API, an upstream that may take 1.5 s
/// to answer, and a reconciler that settles what nobody polls a second after its last read and
/// turns a reservation its gateway died holding into `unknown_outcome` after six.
fn config(fake: &FakeHandle) -> GatewayConfig {
    load::with_teams(
        GatewayConfig::new()
            .upstream_url(&fake.base_url())
            .admin()
            .upstream("timeout = \"1500ms\"\nconnect_timeout = \"200ms\"")
            .reconciler(
                "interval = \"200ms\"\nsettle_after = \"1s\"\nabandon_after = \"6s\"\n\
                 max_reads_per_second = 1000",
            ),
    )
}

/// Tasks render in 600 ms: 200 in each of pending, submitted and in_progress.
fn fake() -> FakeConfig {
    let mut fake = fake_config();
    let phase = Duration::from_millis(200);
    (fake.pending_for, fake.submitted_for, fake.in_progress_for) = (phase, phase, phase);
    fake
}

/// One in five requests faulted: 10 % answered 500, 5 % dropped, 5 % slow; and 5 % of the
/// tasks fail. A slow answer takes `slow_for_ms`.
fn faults(slow_for_ms: u64) -> FaultRates {
    FaultRates {
        status_500: 0.10,
        drop_connection: 0.05,
        slow: 0.05,
        slow_for_ms,
        fail_task: 0.05,
    }
}

/// The clients' HTTP client: no request of theirs can take long, as the gateway waits 1.5 s for
/// the upstream.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_with_the_sqlite_ledger() {
    chaos("chaos-sqlite", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_with_the_redis_ledger() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(redis) = PrivateRedis::start(dir.path()) else {
        return;
    };
    chaos("chaos-redis", Some(redis)).await;
}

async fn chaos(name: &str, mut redis: Option<PrivateRedis>) {
    let secs = setting("CHAOS_SECS", 40.0);
    let kill_every = setting("CHAOS_KILL_EVERY", 12.0);
    let redis_every = setting("CHAOS_REDIS_EVERY", 20.0);
    let rate = setting("CHAOS_RATE", 16.0);

    let fake = start_fake(fake()).await;
    let mut config = config(&fake);
    if let Some(redis) = &redis {
        config = config
            .redis(&redis.url(), "chaos:")
            .store("command_timeout = \"2s\"");
    }
    let mut gateway = start_like_a_supervisor(&config).await;
    let target = Arc::new(Target::new(Api::with_client(
        client(),
        gateway.api.base.clone(),
    )));
    let mut slow_for_ms = 300;
    fake.faults().set_rates(faults(slow_for_ms));
    let load = Load::start(target.clone(), rate);
    let sampler = tokio::spawn(watch_budgets(target.clone(), load.record.clone()));

    // Kills at every `kill_every` seconds, a fifth either way; Redis restarts in between.
    let started = Instant::now();
    let at = |secs: f64| started + Duration::from_secs_f64(secs);
    let jitter = || kill_every * (rand::random::<f64>() - 0.5) * 0.4;
    let (mut next_kill, mut next_redis_restart) =
        (at(kill_every + jitter()), at(redis_every / 3.0));
    let mut next_flip = at(5.0);
    let (mut kills, mut redis_restarts) = (0u32, 0u32);
    let (mut down_ms, mut restart_ms, mut refused_starts) = (Vec::new(), Vec::new(), 0u32);
    while started.elapsed() < Duration::from_secs_f64(secs) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        if now >= next_kill {
            let down = Instant::now();
            tokio::task::block_in_place(|| gateway.kill());
            // Down a moment longer now and then: clients meet refused connections too.
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..800))).await;
            let restart = Instant::now();
            restart_like_a_supervisor(&mut gateway, &mut refused_starts).await;
            target.moved_to(gateway.api.base.clone());
            down_ms.push(down.elapsed().as_millis());
            restart_ms.push(restart.elapsed().as_millis());
            kills += 1;
            next_kill = now + Duration::from_secs_f64(kill_every + jitter());
        }
        if let Some(redis) = redis.as_mut()
            && now >= next_redis_restart
        {
            tokio::task::block_in_place(|| redis.kill());
            tokio::time::sleep(Duration::from_secs(1)).await;
            tokio::task::block_in_place(|| redis.restart());
            redis_restarts += 1;
            next_redis_restart = now + Duration::from_secs_f64(redis_every);
        }
        if now >= next_flip {
            // Slow answers alternate between late (300 ms) and too late (past the 1.5 s the
            // gateway waits: an unknown outcome when it is a generation).
            slow_for_ms = if slow_for_ms == 300 { 2500 } else { 300 };
            fake.faults().set_rates(faults(slow_for_ms));
            next_flip = now + Duration::from_secs(5);
        }
    }
    let loaded_for = started.elapsed();
    let record = load.finish().await;
    fake.faults().set_rates(FaultRates::default());
    sampler.abort();

    let stats = fake.stats();
    // The audit runs as a task of its own, so that the gateway's log is kept however it ends.
    let audit = tokio::spawn(audit::run(target.api(), stats.clone(), record.clone())).await;
    keep_log(name, &gateway);
    let summary = audit.unwrap_or_else(|failed| std::panic::resume_unwind(failed.into_panic()));
    let report = json!({
        "test": name,
        "store": if redis.is_some() { "redis" } else { "sqlite" },
        "seconds": loaded_for.as_secs_f64(),
        "rate": rate,
        "kill_every": kill_every,
        "redis_every": if redis.is_some() { json!(redis_every) } else { Value::Null },
        "kills": kills,
        "gateway_down_ms": down_ms,
        "gateway_restart_ms": restart_ms,
        "gateway_refused_starts": refused_starts,
        "redis_restarts": redis_restarts,
        "clients": clients(&record),
        "upstream": {
            "generate_requests": stats.generate_requests,
            "generate_accepted": stats.generate_accepted,
            "query_requests": stats.query_requests,
            "faults": stats.faults,
            "faults_total": stats.faults.total(),
        },
        "audit": summary,
    });
    publish(name, &report);
    assert!(
        !gateway.logs().contains("panicked"),
        "the gateway panicked: {}",
        gateway.logs()
    );
    assert_clean(&record, &summary.violations);
    assert!(kills >= 1, "the run was too short to kill the gateway");
    assert!(
        stats.faults.total() > 0 && summary.owned_tasks > 0,
        "{report}"
    );
}

/// Starts the gateway again until it listens, as systemd or Kubernetes would: a start that
/// meets Redis restarting (or too slow to answer on a loaded machine) refuses to run without its
/// ledger, and is counted in `refused`.
async fn restart_like_a_supervisor(gateway: &mut Gateway, refused: &mut u32) {
    for _ in 0..20 {
        match tokio::task::block_in_place(|| gateway.try_restart()) {
            Ok(()) => return,
            Err(log) => refused_start(&log, refused).await,
        }
    }
    panic!("the gateway refused to start 20 times in a row");
}

/// The first start, as [`restart_like_a_supervisor`] does it.
async fn start_like_a_supervisor(config: &GatewayConfig) -> Gateway {
    let mut refused = 0;
    for _ in 0..20 {
        match tokio::task::block_in_place(|| Gateway::try_start(config)) {
            Ok(gateway) => return gateway,
            Err(log) => refused_start(&log, &mut refused).await,
        }
    }
    panic!("the gateway refused to start 20 times in a row");
}

/// A start that ended before listening must have been for want of its ledger; the supervisor
/// waits half a second before the next.
async fn refused_start(log: &str, refused: &mut u32) {
    assert!(
        log.contains("ledger store unavailable"),
        "the gateway did not start: {log}"
    );
    *refused += 1;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Every half second, each team's standing: spent and reserved together never pass a budget.
async fn watch_budgets(target: Arc<Target>, record: Arc<Record>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let api = target.api();
        let Ok(reply) = api
            .try_send(
                api.http
                    .get(api.url("/admin/teams"))
                    .bearer_auth(ketchup_testkit::ADMIN_TOKEN),
            )
            .await
        else {
            continue;
        };
        let Ok(teams) = serde_json::from_str::<Value>(&reply.text) else {
            continue;
        };
        for team in teams["teams"].as_array().into_iter().flatten() {
            if let Some(credits) = team["credits"].as_str() {
                let held = audit::units(&team["spent"]) + audit::units(&team["reserved"]);
                if held > audit::units(&json!(credits)) {
                    record.violation(format!("a budget passed: {team}"));
                }
            }
        }
    }
}

/// What the clients did, for the report.
fn clients(record: &Record) -> Value {
    json!({
        "generations": record.requests.lock().unwrap().len(),
        "generation_outcomes": record.outcomes(),
        "polls": record.polls.load(Ordering::Relaxed),
        "polls_failed": record.polls_failed.load(Ordering::Relaxed),
        "finals_read": record.finals.lock().unwrap().len(),
        "ticks_skipped": record.skipped.load(Ordering::Relaxed),
    })
}

/// Prints the report, and writes it to `CHAOS_REPORT_DIR/{name}.json` when that is set.
fn publish(name: &str, report: &Value) {
    let text = serde_json::to_string_pretty(report).expect("JSON");
    eprintln!("{name}: {text}");
    if let Ok(dir) = std::env::var("CHAOS_REPORT_DIR") {
        std::fs::write(format!("{dir}/{name}.json"), text).expect("report written");
    }
}

/// Writes the log of the gateway's last process to `CHAOS_REPORT_DIR/{name}-gateway.log`, when
/// that is set.
fn keep_log(name: &str, gateway: &Gateway) {
    if let Ok(dir) = std::env::var("CHAOS_REPORT_DIR") {
        std::fs::write(format!("{dir}/{name}-gateway.log"), gateway.logs()).expect("log written");
    }
}

fn assert_clean(record: &Record, audit: &[String]) {
    let seen = record.violations.lock().unwrap().clone();
    assert!(
        seen.is_empty() && audit.is_empty(),
        "during the run: {seen:#?}\naudit: {audit:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "ten minutes by default: bench/chaos --soak runs it"]
async fn soak() {
    let secs = setting("SOAK_SECS", 600.0);
    let rate = setting("SOAK_RATE", 40.0);
    let every = Duration::from_secs_f64(setting("SOAK_SAMPLE_EVERY", 5.0));

    let fake = start_fake(fake()).await;
    // Everything the gateway keeps of its own accord (final statuses, owners) bounded well
    // below what the warm-up fills, so growth after it could only be a leak.
    let config = config(&fake).cache("max_entries = 2000\nmax_owners = 2000");
    let gateway = Gateway::start(&config);
    let target = Arc::new(Target::new(Api::with_client(
        client(),
        gateway.api.base.clone(),
    )));
    let load = Load::start(target.clone(), rate);
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs_f64(secs) {
        tokio::time::sleep(every).await;
        let memory = memory_of(gateway.pid());
        samples.push(json!({
            "s": started.elapsed().as_secs(),
            "rss_kib": memory["VmRSS"],
            "anon_kib": memory["RssAnon"],
        }));
    }
    let record = load.finish().await;
    // The samples first: they stand whatever the audit finds.
    publish("soak-rss", &json!({ "samples": samples }));
    let stats = fake.stats();
    let summary = audit::run(target.api(), stats.clone(), record.clone()).await;
    let rss: Vec<f64> = samples
        .iter()
        .map(|s| s["rss_kib"].as_f64().expect("a sample"))
        .collect();
    let third = rss.len() / 3;
    let mean = |part: &[f64]| part.iter().sum::<f64>() / part.len().max(1) as f64;
    let (second, last) = (mean(&rss[third..2 * third]), mean(&rss[2 * third..]));
    let report = json!({
        "test": "soak",
        "seconds": secs,
        "rate": rate,
        "sample_every_s": every.as_secs_f64(),
        "samples": samples,
        "second_third_mean_kib": second,
        "last_third_mean_kib": last,
        "growth_percent": (last / second - 1.0) * 100.0,
        "peak_kib": memory_of(gateway.pid())["VmHWM"],
        "clients": clients(&record),
        "upstream": {
            "generate_requests": stats.generate_requests,
            "query_requests": stats.query_requests,
        },
        "audit": summary,
    });
    publish("soak", &report);
    assert_clean(&record, &summary.violations);
    assert!(third > 0, "too few samples: {report}");
    assert!(
        last <= second * 1.05,
        "RSS grew after the warm-up: last third {last:.0} KiB against {second:.0} KiB"
    );
}

/// `/proc/{pid}/status`'s memory lines (VmRSS, RssAnon, VmHWM, …) in KiB.
fn memory_of(pid: u32) -> BTreeMap<String, u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            let kib = value.trim().strip_suffix(" kB")?.parse().ok()?;
            Some((key.to_owned(), kib))
        })
        .collect()
}
