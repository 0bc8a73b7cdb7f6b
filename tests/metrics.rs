//! Prometheus metrics (issue 5), end to end: exact values after a scripted workload through the
//! real binary, promtool on a real scrape and on the shipped Prometheus configuration, the
//! separate metrics listener, and the one log line per request.
//!
//! Every number asserted here is computed from what the test itself sent and saw (status codes,
//! `X-Cache` headers), never from timing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ketchup_testkit::prometheus::{Labels, Scrape, labels};
use ketchup_testkit::{
    ADS_KEY, DEADLINE, DESIGN_KEY, Env, GatewayConfig, Reply, UPSTREAM_TOKEN, digest, free_port,
    rendering_at,
};
use serde_json::{Value, json};

const GEN: &str = "/api/image/gen";
const QUERY: &str = "/api/task/query";
const MODEL: &str = "google/gempix2";
/// A prompt distinctive enough to be found if it ever leaked into a label.
const PROMPT: &str = "a ketchup bottle prompt-7f3a9c";

fn gempix_body() -> String {
    json!({"model": MODEL, "prompt": PROMPT}).to_string()
}

/// The gateway's config: `design` with a lifetime budget of 2.00 and a generate burst of 5 (at
/// one per hour afterwards), `ads` without budget, `google/gempix2` reserving 0.50, `server`
/// lines added to `[server]`. The reconciler waits 10 minutes before reading a task, so within a
/// test only the test's own reads settle tasks and fill the cache.
fn config(server: &str) -> GatewayConfig {
    GatewayConfig::new()
        .server(server)
        .cache(r#"status_ttl = "50ms""#)
        .reconciler(r#"settle_after = "10m""#)
        .only_model(MODEL, "0.50")
        .budget("design", r#"{ credits = "2.00", period = "lifetime" }"#)
        .limits(
            "design",
            r#"{ generate = "1/h", generate_burst = 5, query = "1000/s", query_burst = 1000 }"#,
        )
}

/// [`config`] in front of a fake upstream whose phases last 50 ms each and whose
/// `google/gempix2` images consume 0.37.
async fn start(server: &str) -> Env {
    Env::start_with(
        rendering_at(Duration::from_millis(50), "0.37"),
        config(server),
    )
    .await
}

/// A generation of [`gempix_body`], with `key` and `request_id` if any.
async fn generate(env: &Env, key: Option<&str>, request_id: Option<&str>) -> Reply {
    let mut request = env
        .api()
        .http
        .post(env.gateway.url(GEN))
        .header("content-type", "application/json")
        .body(gempix_body());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(id) = request_id {
        request = request.header("x-request-id", id);
    }
    env.api().send(request).await
}

/// Requests the test sent, by (team, route, status), as requests_total should count them.
#[derive(Default)]
struct Tally(BTreeMap<(String, String, String), u64>);

impl Tally {
    fn count(&mut self, team: &str, route: &str, status: u16) {
        *self
            .0
            .entry((team.to_owned(), route.to_owned(), status.to_string()))
            .or_default() += 1;
    }

    fn expected_series(&self) -> BTreeMap<Labels, f64> {
        self.0
            .iter()
            .map(|((team, route, status), n)| {
                (
                    labels(&[("team", team), ("route", route), ("status", status)]),
                    *n as f64,
                )
            })
            .collect()
    }

    fn per_route(&self, route: &str) -> u64 {
        self.0
            .iter()
            .filter(|((_, r, _), _)| r == route)
            .map(|(_, n)| n)
            .sum()
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Exact values after a scripted workload
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_scripted_workload_gives_exact_metric_values() {
    let env = start("").await;
    let mut requests = Tally::default();
    let mut cache: BTreeMap<String, u64> = BTreeMap::new();

    // design: a budget of 2.00 holds four reservations of 0.50; the fifth is refused for the
    // budget, the sixth by the generate limit (burst of 5, all five counted).
    let mut design_tasks = Vec::new();
    for i in 0..5 {
        let reply = generate(&env, Some(DESIGN_KEY), None).await;
        requests.count("design", GEN, reply.status);
        if i < 4 {
            design_tasks.push(reply.task_id());
        } else {
            assert_eq!(reply.status, 402, "{}", reply.text);
            assert_eq!(reply.json()["message"], "budget exhausted");
        }
    }
    let limited = generate(&env, Some(DESIGN_KEY), None).await;
    requests.count("design", GEN, limited.status);
    assert_eq!(limited.status, 429, "{}", limited.text);
    assert_eq!(limited.json()["message"], "rate limited");

    // ads: no budget, two renders.
    let mut ads_tasks = Vec::new();
    for _ in 0..2 {
        let reply = generate(&env, Some(ADS_KEY), None).await;
        requests.count("ads", GEN, reply.status);
        ads_tasks.push(reply.task_id());
    }

    // No key.
    let anonymous = generate(&env, None, None).await;
    requests.count("unknown", GEN, anonymous.status);
    assert_eq!(anonymous.status, 401, "{}", anonymous.text);

    // Poll every design task to the end: the first read of the final state settles it.
    for task_id in &design_tasks {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let reply = env.api().query(DESIGN_KEY, task_id).await;
            requests.count("design", QUERY, reply.status);
            let served = reply
                .header("x-cache")
                .unwrap_or_else(|| panic!("no X-Cache: {} {}", reply.status, reply.text));
            *cache.entry(served.clone()).or_default() += 1;
            match reply.task_status().as_str() {
                "success" => {
                    assert_eq!(served, "miss", "the first final state comes from upstream");
                    assert_eq!(reply.json()["data"]["consumed"], "0.37000000");
                    break;
                }
                "failed" => panic!("task failed: {}", reply.text),
                _ => {}
            }
            assert!(Instant::now() < deadline, "task {task_id} never finished");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A finished task stays in the cache: three more reads are hits.
    for _ in 0..3 {
        let reply = env.api().query(DESIGN_KEY, &design_tasks[0]).await;
        requests.count("design", QUERY, reply.status);
        assert_eq!(reply.task_status(), "success");
        assert_eq!(reply.header("x-cache").as_deref(), Some("hit"));
        *cache.entry("hit".into()).or_default() += 1;
    }
    let misses = cache.get("miss").copied().unwrap_or(0);
    assert!(misses >= 4, "{cache:?}");

    let m = env.api().scrape().await;

    // --- Requests, by team, route and status: exactly what was sent, nothing else (this scrape
    // is counted once it has been answered).
    m.assert_series(
        "ketchup_gateway_requests_total",
        &requests.expected_series(),
    );
    m.assert_eq(
        "ketchup_gateway_requests_total",
        &[("route", GEN), ("status", "200"), ("team", "design")],
        4.0,
    );
    m.assert_eq(
        "ketchup_gateway_requests_total",
        &[("route", GEN), ("status", "402"), ("team", "design")],
        1.0,
    );
    m.assert_eq(
        "ketchup_gateway_requests_total",
        &[("route", GEN), ("status", "429"), ("team", "design")],
        1.0,
    );
    m.assert_eq(
        "ketchup_gateway_requests_total",
        &[("route", GEN), ("status", "200"), ("team", "ads")],
        2.0,
    );
    m.assert_eq(
        "ketchup_gateway_requests_total",
        &[("route", GEN), ("status", "401"), ("team", "unknown")],
        1.0,
    );
    for route in [GEN, QUERY] {
        let n = requests.per_route(route) as f64;
        m.assert_eq(
            "ketchup_gateway_request_duration_seconds_count",
            &[("route", route)],
            n,
        );
        m.assert_eq(
            "ketchup_gateway_overhead_seconds_count",
            &[("route", route)],
            n,
        );
        m.assert_eq(
            "ketchup_gateway_request_duration_seconds_bucket",
            &[("route", route), ("le", "+Inf")],
            n,
        );
    }

    // --- Upstream: six accepted generations, one read per cache miss, no errors or retries.
    m.assert_series(
        "ketchup_gateway_upstream_requests_total",
        &BTreeMap::from([
            (labels(&[("route", "generate"), ("status", "200")]), 6.0),
            (
                labels(&[("route", "query"), ("status", "200")]),
                misses as f64,
            ),
        ]),
    );
    m.assert_eq(
        "ketchup_gateway_upstream_request_duration_seconds_count",
        &[("route", "generate")],
        6.0,
    );
    m.assert_eq(
        "ketchup_gateway_upstream_request_duration_seconds_count",
        &[("route", "query")],
        misses as f64,
    );
    let mut no_errors = BTreeMap::new();
    for route in ["generate", "query", "text"] {
        for kind in ["connect", "timeout", "broken", "5xx"] {
            no_errors.insert(labels(&[("route", route), ("kind", kind)]), 0.0);
        }
    }
    m.assert_series("ketchup_gateway_upstream_errors_total", &no_errors);
    m.assert_series("ketchup_gateway_upstream_retries_total", &BTreeMap::new());

    // --- Refusals: one for the budget, one for the generate limit; every other one at zero.
    let mut rejections = BTreeMap::new();
    let mut rate_limited = BTreeMap::new();
    for team in ["design", "ads"] {
        for reason in ["budget", "in_flight", "model_not_allowed"] {
            let n = if (team, reason) == ("design", "budget") {
                1.0
            } else {
                0.0
            };
            rejections.insert(labels(&[("team", team), ("reason", reason)]), n);
        }
        for limit in ["generate", "query", "text", "global"] {
            let n = if (team, limit) == ("design", "generate") {
                1.0
            } else {
                0.0
            };
            rate_limited.insert(labels(&[("team", team), ("limit", limit)]), n);
        }
    }
    m.assert_series("ketchup_gateway_budget_rejections_total", &rejections);
    m.assert_series("ketchup_gateway_rate_limited_total", &rate_limited);
    m.assert_eq(
        "ketchup_gateway_budget_rejections_total",
        &[("reason", "budget"), ("team", "design")],
        1.0,
    );
    m.assert_eq(
        "ketchup_gateway_rate_limited_total",
        &[("limit", "generate"), ("team", "design")],
        1.0,
    );

    // --- Tasks: started, finished, what they cost.
    m.assert_series(
        "ketchup_gateway_tasks_started_total",
        &BTreeMap::from([
            (
                labels(&[("team", "design"), ("family", "image"), ("model", MODEL)]),
                4.0,
            ),
            (
                labels(&[("team", "ads"), ("family", "image"), ("model", MODEL)]),
                2.0,
            ),
        ]),
    );
    m.assert_series(
        "ketchup_gateway_tasks_finished_total",
        &BTreeMap::from([(
            labels(&[("team", "design"), ("model", MODEL), ("status", "success")]),
            4.0,
        )]),
    );
    m.assert_close(
        "ketchup_gateway_credits_consumed_total",
        &[("model", MODEL), ("team", "design")],
        1.48,
    );
    assert_eq!(
        m.series("ketchup_gateway_credits_consumed_total").len(),
        1,
        "only design's tasks settled"
    );
    let no_consumed_problems: BTreeMap<Labels, f64> = ["design", "ads"]
        .iter()
        .flat_map(|team| {
            ["missing", "malformed"]
                .map(|reason| (labels(&[("team", team), ("reason", reason)]), 0.0))
        })
        .collect();
    m.assert_series(
        "ketchup_gateway_settlements_without_consumed_total",
        &no_consumed_problems,
    );

    // consumed − reserved = 0.37 − 0.50 = −0.13 for each of the four settled tasks.
    let model = [("model", MODEL)];
    m.assert_eq(
        "ketchup_gateway_reservation_error_credits_count",
        &model,
        4.0,
    );
    m.assert_close(
        "ketchup_gateway_reservation_error_credits_sum",
        &model,
        -0.52,
    );
    for (le, n) in [("-0.25", 0.0), ("-0.1", 4.0), ("0", 4.0), ("+Inf", 4.0)] {
        m.assert_eq(
            "ketchup_gateway_reservation_error_credits_bucket",
            &[("model", MODEL), ("le", le)],
            n,
        );
    }

    // --- Budget gauges, read from the ledger at scrape time.
    let design = [("team", "design")];
    let ads = [("team", "ads")];
    m.assert_close("ketchup_gateway_budget_spent_credits", &design, 1.48);
    m.assert_close("ketchup_gateway_budget_reserved_credits", &design, 0.0);
    m.assert_close("ketchup_gateway_budget_limit_credits", &design, 2.0);
    m.assert_close("ketchup_gateway_budget_remaining_credits", &design, 0.52);
    m.assert_eq("ketchup_gateway_tasks_in_flight", &design, 0.0);
    // ads has no budget: spent and reserved, but no limit and no remaining.
    m.assert_close("ketchup_gateway_budget_spent_credits", &ads, 0.0);
    m.assert_close("ketchup_gateway_budget_reserved_credits", &ads, 1.0);
    m.assert_eq("ketchup_gateway_tasks_in_flight", &ads, 2.0);
    assert_eq!(m.find("ketchup_gateway_budget_limit_credits", &ads), None);
    assert_eq!(
        m.find("ketchup_gateway_budget_remaining_credits", &ads),
        None
    );

    // --- Cache: the metric agrees with the X-Cache headers, result by result.
    for result in ["hit", "miss", "coalesced"] {
        let seen = cache.get(result).copied().unwrap_or(0) as f64;
        let counted = m
            .find(
                "ketchup_gateway_cache_requests_total",
                &[("result", result)],
            )
            .unwrap_or(0.0);
        assert_eq!(
            counted, seen,
            "cache_requests_total{{result={result:?}}} vs X-Cache headers seen {cache:?}"
        );
    }
    assert!(cache.get("hit").copied().unwrap_or(0) >= 3, "{cache:?}");
    // The four finished design tasks; ads was never read.
    m.assert_eq("ketchup_gateway_cache_entries", &[], 4.0);
    m.assert_eq("ketchup_gateway_cache_evictions_total", &[], 0.0);

    // --- Ownership: every task was recorded when it started, so no read asked the ledger.
    let reads = cache.values().sum::<u64>() as f64;
    m.assert_eq(
        "ketchup_gateway_ownership_lookups_total",
        &[("source", "memory")],
        reads,
    );
    m.assert_eq(
        "ketchup_gateway_ownership_lookups_total",
        &[("source", "ledger")],
        0.0,
    );
    m.assert_eq("ketchup_gateway_owners_in_memory", &[], 6.0);

    // --- Reconciler: had nothing to do.
    for name in [
        "ketchup_gateway_reconciler_settlements_total",
        "ketchup_gateway_reconciler_expirations_total",
        "ketchup_gateway_reconciler_abandoned_total",
        "ketchup_gateway_reconciler_released_total",
        "ketchup_gateway_reconciler_backlog",
    ] {
        m.assert_eq(name, &[], 0.0);
    }

    // --- Build info and process metrics.
    let build = m.series("ketchup_gateway_build_info");
    assert_eq!(build.len(), 1, "{build:?}");
    assert_eq!(build[0].value, 1.0);
    assert_eq!(build[0].labels["version"], "0.1.0");
    assert!(!build[0].labels["git_commit"].is_empty(), "{build:?}");
    assert_eq!(
        build[0].labels.keys().collect::<Vec<_>>(),
        ["git_commit", "version"]
    );
    assert!(m.get("process_resident_memory_bytes", &[]) > 0.0);
    // Webhook deliveries start at zero for every team, so alerts see the first dead letter.
    for team in ["design", "ads"] {
        for outcome in ["delivered", "failed", "dead"] {
            assert_eq!(
                m.get(
                    "ketchup_gateway_webhook_deliveries_total",
                    &[("team", team), ("outcome", outcome)]
                ),
                0.0
            );
        }
    }

    // --- Bounded labels: nothing secret or per-request anywhere in the text.
    let mut secrets: Vec<String> = vec![
        DESIGN_KEY.into(),
        ADS_KEY.into(),
        UPSTREAM_TOKEN.into(),
        digest(DESIGN_KEY),
        digest(ADS_KEY),
        PROMPT.into(),
        env.fake.base_url(),
        env.fake.addr().to_string(),
    ];
    secrets.extend(design_tasks.iter().cloned());
    secrets.extend(ads_tasks.iter().cloned());
    for secret in &secrets {
        assert!(
            !m.text.contains(secret.as_str()),
            "the scrape contains {secret:?}:\n{}",
            m.text
        );
    }
    // And the label names are the bounded ones only.
    let label_names: BTreeSet<&str> = m
        .samples
        .iter()
        .filter(|s| s.name.starts_with("ketchup_gateway_"))
        .flat_map(|s| s.labels.keys().map(String::as_str))
        .collect();
    let allowed: BTreeSet<&str> = [
        "team",
        "route",
        "status",
        "model",
        "reason",
        "limit",
        "kind",
        "result",
        "outcome",
        "le",
        "version",
        "git_commit",
        "worker",
        "source",
        "family",
        // A key's label from the configuration, never the key.
        "key",
        // An upstream account's name from the configuration, never its token.
        "account",
    ]
    .into();
    assert!(
        label_names.is_subset(&allowed),
        "unexpected label names: {:?}",
        label_names.difference(&allowed).collect::<Vec<_>>()
    );

    // The first scrape is counted after it was answered: the second one sees it, unauthenticated.
    let again = env.api().scrape().await;
    again.assert_eq(
        "ketchup_gateway_requests_total",
        &[
            ("route", "/metrics"),
            ("status", "200"),
            ("team", "unknown"),
        ],
        1.0,
    );
}

#[tokio::test]
async fn connections_are_dealt_to_the_workers_in_turn() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = start("workers = 3").await;
    let accepted = |scrape: &Scrape| -> Vec<f64> {
        (0..3)
            .map(|worker| {
                scrape
                    .find(
                        "ketchup_gateway_connections_accepted_total",
                        &[("worker", &worker.to_string())],
                    )
                    .expect("a series per worker")
            })
            .collect()
    };
    let before = accepted(&env.api().scrape().await);

    // Six connections, each kept open with one request answered on it.
    let mut open = Vec::new();
    for _ in 0..6 {
        let mut connection = tokio::net::TcpStream::connect(env.gateway.addr)
            .await
            .expect("connects");
        connection
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
            .await
            .expect("request written");
        let mut answer = [0u8; 12];
        connection
            .read_exact(&mut answer)
            .await
            .expect("answer read");
        assert_eq!(&answer, b"HTTP/1.1 200");
        open.push(connection);
    }
    // A new client, so the scrape is a seventh connection.
    let after =
        accepted(&Scrape::fetch(&reqwest::Client::new(), &env.gateway.url("/metrics")).await);

    let mut added: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    added.sort_by(f64::total_cmp);
    assert_eq!(added, [2.0, 2.0, 3.0], "before {before:?}, after {after:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. promtool
// ---------------------------------------------------------------------------------------------

/// promtool's path, or `None` when it is missing and not required (`KETCHUP_REQUIRE_PROMTOOL=1`
/// makes a missing promtool a failure).
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("promtool"))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        assert_ne!(
            std::env::var("KETCHUP_REQUIRE_PROMTOOL").as_deref(),
            Ok("1"),
            "promtool is not installed but KETCHUP_REQUIRE_PROMTOOL=1 (Debian: apt-get install prometheus)"
        );
        eprintln!(
            "\n==========\nSKIPPED: promtool not installed (Debian package `prometheus`); \
             set KETCHUP_REQUIRE_PROMTOOL=1 to make this a failure\n==========\n"
        );
    }
    found
}

fn prometheus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prometheus")
}

/// Runs promtool with `args` in `dir`, `stdin` piped in; asserts exit 0, showing its output.
fn run_promtool(promtool: &Path, args: &[&str], dir: &Path, stdin: Option<&str>) {
    let mut child = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(text.as_bytes()).expect("promtool reads");
    }
    let output = child.wait_with_output().expect("promtool finishes");
    assert!(
        output.status.success(),
        "promtool {args:?} exited with {}\nstdout:\n{}\nstderr:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        stdin.map(|t| format!("input:\n{t}")).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn promtool_accepts_a_real_scrape() {
    let Some(promtool) = promtool() else { return };
    let env = start("").await;
    // Some of everything: an accepted render read to the end, a budget refusal, a rate-limit
    // refusal, a 401, so that every kind of series is present.
    let task = generate(&env, Some(DESIGN_KEY), None).await.task_id();
    let read = env.api().wait_for_final(DESIGN_KEY, &task).await;
    assert_eq!(read.task_status(), "success", "{}", read.text);
    env.api().query(DESIGN_KEY, &task).await;
    generate(&env, Some(ADS_KEY), None).await.task_id();
    assert_eq!(generate(&env, None, None).await.status, 401);
    let scrape = env.api().scrape().await;
    assert!(scrape.text.contains("ketchup_gateway_tasks_finished_total"));
    run_promtool(
        &promtool,
        &["check", "metrics"],
        &prometheus_dir(),
        Some(&scrape.text),
    );
}

#[test]
fn promtool_accepts_the_prometheus_config() {
    let Some(promtool) = promtool() else { return };
    run_promtool(
        &promtool,
        &["check", "config", "prometheus.yml"],
        &prometheus_dir(),
        None,
    );
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let Some(promtool) = promtool() else { return };
    run_promtool(
        &promtool,
        &["check", "rules", "alerts.yml"],
        &prometheus_dir(),
        None,
    );
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    run_promtool(
        &promtool,
        &["test", "rules", "alerts_test.yml", "alerts_days_test.yml"],
        &prometheus_dir(),
        None,
    );
}

// ---------------------------------------------------------------------------------------------
// 3. The separate metrics listener
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn with_metrics_listen_metrics_are_served_only_there() {
    let port = free_port();
    let env = start(&format!("metrics_listen = \"127.0.0.1:{port}\"")).await;
    env.gateway.wait_for_log("metrics listening").await;
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");

    // The main listener has no /metrics: it is a public path, so no key is asked for, and the
    // router answers "no such endpoint" in the envelope.
    let main = env
        .api()
        .send(env.api().http.get(env.gateway.url("/metrics")))
        .await;
    assert_eq!(main.status, 404, "{}", main.text);
    assert_eq!(
        main.json(),
        json!({"code": 1, "message": "not found", "detail": "no such endpoint: GET /metrics"})
    );
    assert!(!main.text.contains("ketchup_gateway_"), "{}", main.text);
    // With a key it is no different.
    let keyed = env
        .api()
        .send(
            env.api()
                .http
                .get(env.gateway.url("/metrics"))
                .bearer_auth(DESIGN_KEY),
        )
        .await;
    assert_eq!(keyed.status, 404, "{}", keyed.text);
    assert!(!keyed.text.contains("ketchup_gateway_"), "{}", keyed.text);

    // Traffic on the main listener shows up on the metrics listener.
    let task = generate(&env, Some(DESIGN_KEY), None).await.task_id();
    let m = Scrape::fetch(&env.api().http, &metrics_url).await;
    m.assert_eq(
        "ketchup_gateway_build_info",
        &[
            ("version", "0.1.0"),
            (
                "git_commit",
                m.series("ketchup_gateway_build_info")[0].labels["git_commit"].as_str(),
            ),
        ],
        1.0,
    );
    m.assert_eq(
        "ketchup_gateway_tasks_started_total",
        &[("family", "image"), ("model", MODEL), ("team", "design")],
        1.0,
    );
    m.assert_eq(
        "ketchup_gateway_requests_total",
        &[("route", GEN), ("status", "200"), ("team", "design")],
        1.0,
    );
    let not_found: f64 = m
        .series("ketchup_gateway_requests_total")
        .iter()
        .filter(|s| s.labels["status"] == "404")
        .map(|s| s.value)
        .sum();
    assert_eq!(not_found, 2.0, "the two GET /metrics on the main listener");
    assert!(!m.text.contains(&task));

    // The metrics listener serves nothing of the API (the probes are there too: see
    // tests/connections.rs).
    for path in [GEN, QUERY] {
        let reply = env
            .api()
            .send(
                env.api()
                    .http
                    .get(format!("http://127.0.0.1:{port}{path}"))
                    .bearer_auth(DESIGN_KEY),
            )
            .await;
        assert_eq!(reply.status, 404, "{path} on the metrics listener");
    }
    let post = env
        .api()
        .send(
            env.api()
                .http
                .post(format!("http://127.0.0.1:{port}{GEN}"))
                .bearer_auth(DESIGN_KEY)
                .body(gempix_body()),
        )
        .await;
    assert_eq!(post.status, 404, "{}", post.text);
    // Nothing reached the upstream through the metrics listener.
    let m = Scrape::fetch(&env.api().http, &metrics_url).await;
    m.assert_eq(
        "ketchup_gateway_upstream_requests_total",
        &[("route", "generate"), ("status", "200")],
        1.0,
    );
}

// ---------------------------------------------------------------------------------------------
// 4. One log line per request
// ---------------------------------------------------------------------------------------------

/// Nobody reads the gateway's stderr for a while (a log shipper stalled), long enough for the
/// request lines to fill the pipe many times over: requests are still answered, and once the
/// log is read again every line arrives, whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_log_reader_does_not_stall_requests_and_loses_no_line() {
    let env = start("").await;
    env.gateway.pause_log_reading();
    // About 300 bytes a line: a pipe holds 64 KiB, so 2,000 lines are ten pipes' worth.
    const REQUESTS: usize = 2000;
    for n in 0..REQUESTS {
        let request = env
            .api()
            .http
            .get(env.gateway.url("/api/user"))
            .bearer_auth(DESIGN_KEY)
            .header("x-request-id", format!("stalled-log-{n}"))
            .timeout(DEADLINE);
        assert_eq!(env.api().send(request).await.status, 200, "request {n}");
    }
    env.gateway.resume_log_reading();

    let deadline = Instant::now() + DEADLINE;
    let ids = loop {
        let logs = env.gateway.logs();
        let ids: BTreeSet<String> = logs
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).expect("a whole JSON line"))
            .filter(|event| event["message"] == "request finished")
            .filter_map(|event| event["request_id"].as_str().map(str::to_owned))
            .filter(|id| id.starts_with("stalled-log-"))
            .collect();
        if ids.len() == REQUESTS || Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(ids.len(), REQUESTS, "every request's line arrives");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_request_ends_with_one_log_line_with_its_facts() {
    let env = start("").await;
    let reply = generate(&env, Some(DESIGN_KEY), Some("metrics-test-1")).await;
    let task_id = reply.task_id();
    assert_eq!(
        reply.header("x-request-id").as_deref(),
        Some("metrics-test-1")
    );

    let finished = |logs: &str| -> Vec<Value> {
        logs.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|event| {
                event["message"] == "request finished" && event["request_id"] == "metrics-test-1"
            })
            .collect()
    };
    let deadline = Instant::now() + DEADLINE;
    let lines = loop {
        let lines = finished(&env.gateway.logs());
        if !lines.is_empty() || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(
        lines.len(),
        1,
        "exactly one closing line for the request; log:\n{}",
        env.gateway.logs()
    );
    let line = &lines[0];
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert!(
        line["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{line}"
    );
    assert_eq!(line["request_id"], "metrics-test-1", "{line}");
    assert_eq!(line["method"], "POST", "{line}");
    assert_eq!(line["route"], GEN, "{line}");
    assert_eq!(line["team"], "design", "{line}");
    assert_eq!(line["key"], "design-test", "{line}");
    assert_eq!(line["task_id"], task_id.as_str(), "{line}");
    let upstream_ms = line["upstream_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("no upstream_ms: {line}"));
    assert!(upstream_ms >= 0.0, "{line}");
    assert_eq!(line.get("error"), None, "a success has no error: {line}");

    // A refused request has its line too, with the error kind and without a team.
    let anonymous = generate(&env, None, Some("metrics-test-2")).await;
    assert_eq!(anonymous.status, 401);
    let deadline = Instant::now() + DEADLINE;
    let refused = loop {
        let found = env
            .gateway
            .logs()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|e| e["message"] == "request finished" && e["request_id"] == "metrics-test-2");
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no line for metrics-test-2");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(refused["status"], 401, "{refused}");
    assert_eq!(refused["error"], "invalid_api_key", "{refused}");
    assert_eq!(refused.get("team"), None, "{refused}");

    // Keys and the upstream token never reach the log.
    let logs = env.gateway.logs();
    for secret in [DESIGN_KEY, ADS_KEY, UPSTREAM_TOKEN] {
        assert!(
            !logs.contains(secret),
            "the log contains {secret:?}:\n{logs}"
        );
    }
}

/// Budget gauges of a team that a reload removed, or whose budget it removed, disappear instead
/// of freezing at their last values (which would keep budget alerts firing).
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_drops_the_budget_gauges_it_made_meaningless() {
    let mut env = start("").await;
    let has = |scrape: &Scrape, name: &str, team: &str| {
        scrape
            .samples
            .iter()
            .any(|s| s.name == name && s.labels.get("team").map(String::as_str) == Some(team))
    };
    let before = env.api().scrape().await;
    assert!(has(
        &before,
        "ketchup_gateway_budget_limit_credits",
        "design"
    ));
    assert!(has(
        &before,
        "ketchup_gateway_budget_remaining_credits",
        "design"
    ));
    assert!(has(&before, "ketchup_gateway_budget_spent_credits", "ads"));

    // design loses its budget; ads is removed.
    let reduced = env
        .gateway
        .config()
        .clone()
        .without_budget("design")
        .without_team("ads");
    env.gateway.reload(reduced).await;

    let after = env.api().scrape().await;
    assert!(!has(
        &after,
        "ketchup_gateway_budget_limit_credits",
        "design"
    ));
    assert!(!has(
        &after,
        "ketchup_gateway_budget_remaining_credits",
        "design"
    ));
    assert!(has(
        &after,
        "ketchup_gateway_budget_spent_credits",
        "design"
    ));
    for gauge in [
        "ketchup_gateway_budget_spent_credits",
        "ketchup_gateway_budget_reserved_credits",
        "ketchup_gateway_tasks_in_flight",
    ] {
        assert!(!has(&after, gauge, "ads"), "{gauge} of a removed team");
    }
}
