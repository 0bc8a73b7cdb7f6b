//! Several gateway processes on one Redis behave as one gateway: one budget, one view of task
//! ownership, one settlement per task, one delivery per webhook; a replica killed under load
//! loses and double counts no credit; and a Redis outage costs fast 503s, never credits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ketchup_domain::credits::Credits;
use ketchup_fake_upstream::{FakeHandle, Fault, TaskStatus};
use ketchup_test_redis::PrivateRedis;
use ketchup_testkit::pki::TestPki;
use ketchup_testkit::webhooks::{Receiver, verify};
use ketchup_testkit::{
    ADMIN_TOKEN, ADS_KEY, Api, DEADLINE, DESIGN_KEY, GEMPIX, Gateway, GatewayConfig,
    GatewayProcess, Launch, fake_config, start_fake, until_a_generation_reached,
};
use serde_json::{Value, json};

/// A replica's config, on the Redis at `url` under `prefix`, in front of `upstream`. `design`
/// may spend 5.00 credits in all: ten reservations of 0.50. `ads` has no budget but may start
/// 10 tasks an hour, burst 10: within a test, 10 in all. Every Redis call may take 2 s, which is
/// generous: a loaded CI machine must not turn a slow Redis reply into an outage.
fn replica_config(upstream: &str, url: &str, prefix: &str) -> GatewayConfig {
    GatewayConfig::new()
        .upstream_url(upstream)
        .redis(url, prefix)
        .store(r#"command_timeout = "2s""#)
        .admin()
        .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
        .limits("ads", r#"{ generate = "10/h", generate_burst = 10 }"#)
}

/// Each replica listens on a port of its own and names it as its `public_url`; `design` takes
/// webhooks on loopback; both teams sign them.
fn with_webhooks(config: GatewayConfig) -> GatewayConfig {
    config
        .public_url_on_own_port()
        .signed_webhooks("design")
        .callback_hosts("design", &["127.0.0.1"])
        .signed_webhooks("ads")
}

/// One gateway on the Redis at `url` in front of `fake`, under a key prefix of its own, its
/// [`replica_config`] changed by `change`.
fn one_gateway(
    fake: &FakeHandle,
    url: &str,
    change: impl Fn(GatewayConfig) -> GatewayConfig,
) -> Gateway {
    Gateway::start(&change(replica_config(
        &fake.base_url(),
        url,
        &unique_prefix(),
    )))
}

fn unique_prefix() -> String {
    format!("test-{}:", uuid::Uuid::now_v7().simple())
}

/// A generation of `body` for `design` through `api`; an error when the gateway could not be
/// reached or did not answer in full.
async fn try_generate(api: &Api, body: &str) -> reqwest::Result<(u16, Value)> {
    let reply = api.try_send(api.generate_request(DESIGN_KEY, body)).await?;
    Ok(reply.status_json())
}

async fn generate(gateway: &Gateway) -> (u16, Value) {
    gateway.api.generate(DESIGN_KEY, GEMPIX).await.status_json()
}

/// `GET path` with `key`, if any: the status, and the body if it is JSON.
async fn get(gateway: &Gateway, path: &str, key: Option<&str>) -> (u16, Value) {
    let reply = gateway.api.get(path, key).await;
    (
        reply.status,
        serde_json::from_str(&reply.text).unwrap_or(Value::Null),
    )
}

/// `design`'s budget once nothing is reserved any more: every task it started has settled.
async fn settled_budget(gateway: &Gateway) -> Value {
    gateway
        .api
        .wait_for_budget(DESIGN_KEY, "every task to settle", |budget| {
            budget["reserved"] == "0.00000000"
        })
        .await
}

async fn wait_until_settled(gateway: &Gateway, spent: &str) {
    let budget = settled_budget(gateway).await;
    assert_eq!(budget["spent"], spent, "{budget}");
}

/// An admin listing: `path`'s `field` array, which must not have been cut at its limit.
async fn admin_list(gateway: &Gateway, path: &str, field: &str) -> Vec<Value> {
    let body = gateway.api.admin(path).await;
    let list = body[field]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .clone();
    assert!(
        list.len() < 1000,
        "{path} lists its limit: the test made too many"
    );
    list
}

/// Credits as exact units (1e-8 credit).
fn units(credits: &Value) -> i64 {
    let text = credits
        .as_str()
        .unwrap_or_else(|| panic!("credits: {credits}"));
    text.parse::<Credits>().expect("credits").units()
}

struct Replicas {
    fake: FakeHandle,
    a: Gateway,
    b: Gateway,
}

/// Two replicas on the Redis at `url`, their [`replica_config`] changed by `change`.
async fn two_replicas(url: &str, change: impl Fn(GatewayConfig) -> GatewayConfig) -> Replicas {
    let prefix = unique_prefix();
    two_gateways(url, change, [&prefix, &prefix]).await
}

/// Two gateways on one Redis, each under its own key prefix: what two replicas would be if
/// they shared nothing.
async fn two_gateways(
    url: &str,
    change: impl Fn(GatewayConfig) -> GatewayConfig,
    prefixes: [&str; 2],
) -> Replicas {
    let fake = start_fake(fake_config()).await;
    let start =
        |prefix: &str| Gateway::start(&change(replica_config(&fake.base_url(), url, prefix)));
    let (a, b) = (start(prefixes[0]), start(prefixes[1]));
    Replicas { fake, a, b }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_one_budget_and_one_view_of_tasks() {
    let Some(url) = ketchup_test_redis::url() else {
        return;
    };
    let env = two_replicas(&url, std::convert::identity).await;

    // 200 requests at once, half through each replica, for a budget of exactly 10.
    let attempts: Vec<_> = (0..200)
        .map(|i| {
            let gateway = if i % 2 == 0 { &env.a } else { &env.b };
            let api = gateway.api.clone();
            tokio::spawn(async move { api.generate(DESIGN_KEY, GEMPIX).await.status_json() })
        })
        .collect();
    let mut accepted = Vec::new();
    for attempt in attempts {
        let (status, body) = attempt.await.unwrap();
        match status {
            200 => accepted.push(body["data"]["task_id"].as_str().unwrap().to_owned()),
            402 => assert_eq!(body["message"], "budget exhausted", "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(accepted.len(), 10, "exactly the budget's ten reservations");
    assert_eq!(env.fake.stats().generate_requests, 10);

    // Every task is readable through either replica, and through neither by another team.
    for task_id in &accepted {
        for gateway in [&env.a, &env.b] {
            let (status, body) = get(
                gateway,
                &format!("/api/task/query?task_id={task_id}"),
                Some(DESIGN_KEY),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
        let (status, _) = get(
            &env.b,
            &format!("/api/task/query?task_id={task_id}"),
            Some(ADS_KEY),
        )
        .await;
        assert_eq!(status, 404);
    }
    // Polled through both until final: settled once each, at the fake's 0.50.
    let deadline = Instant::now() + DEADLINE;
    for task_id in &accepted {
        loop {
            let (_, a) = get(
                &env.a,
                &format!("/api/task/query?task_id={task_id}"),
                Some(DESIGN_KEY),
            )
            .await;
            let (_, b) = get(
                &env.b,
                &format!("/api/task/query?task_id={task_id}"),
                Some(DESIGN_KEY),
            )
            .await;
            if a["data"]["status"] == "success" && b["data"]["status"] == "success" {
                break;
            }
            assert!(Instant::now() < deadline, "task never finished: {a} {b}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    wait_until_settled(&env.a, "5.00000000").await;
    let (_, usage) = get(&env.b, "/admin/usage", Some(ADMIN_TOKEN)).await;
    assert_eq!(usage["rows"][0]["tasks"], 10, "{usage}");
    assert_eq!(usage["rows"][0]["succeeded"], 10, "{usage}");
    assert_eq!(usage["rows"][0]["credits"], "5.00000000", "{usage}");
    let (status, refused) = generate(&env.b).await;
    assert_eq!(
        (status, refused["message"].as_str()),
        (402, Some("budget exhausted"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_costs_fast_503s_and_no_credits_and_heals_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    // This test stops and starts Redis, so it needs its own server, whatever REDIS_URL says.
    let Some(mut redis) = PrivateRedis::start(dir.path()) else {
        return;
    };
    let fake = ketchup_fake_upstream::start(fake_config()).await.unwrap();
    let gateway = one_gateway(&fake, &redis.url(), |config| {
        config.store(r#"command_timeout = "500ms""#)
    });

    // One task finished and cached, one still running, before the outage.
    let finished = a_settled_task(&gateway).await;
    let (status, body) = generate(&gateway).await;
    assert_eq!(status, 200, "{body}");
    let running = body["data"]["task_id"].as_str().unwrap().to_owned();

    redis.kill();
    let started = Instant::now();
    for _ in 0..10 {
        let (status, body) = generate(&gateway).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(
            (&body["code"], &body["message"]),
            (&json!(1), &json!("ledger unavailable"))
        );
    }
    // Ten refusals cost about the timeout a few times, then nothing: the breaker is open.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refusals were slow: {:?}",
        started.elapsed()
    );
    let (status, _) = get(&gateway, "/readyz", None).await;
    assert_eq!(status, 503);
    // A cached final status is still served.
    let (status, read) = get(
        &gateway,
        &format!("/api/task/query?task_id={finished}"),
        Some(DESIGN_KEY),
    )
    .await;
    assert_eq!((status, &read["data"]["status"]), (200, &json!("success")));
    assert_eq!(
        fake.stats().generate_requests,
        2,
        "no generation passed without a ledger"
    );

    // Redis comes back with what it had: the gateway recovers without a restart.
    redis.restart();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, _) = get(&gateway, "/readyz", None).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each Redis client's breaker probes on its own schedule: generations resume within seconds.
    let after = loop {
        let (status, body) = generate(&gateway).await;
        if status == 200 {
            break body["data"]["task_id"].as_str().unwrap().to_owned();
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "generations never resumed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Nothing was lost: every accepted task settles, the totals exact.
    let deadline = Instant::now() + DEADLINE;
    for task_id in [&running, &after] {
        loop {
            let (_, read) = get(
                &gateway,
                &format!("/api/task/query?task_id={task_id}"),
                Some(DESIGN_KEY),
            )
            .await;
            if read["data"]["status"] == "success" {
                break;
            }
            assert!(Instant::now() < deadline, "{read}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    wait_until_settled(&gateway, "1.50000000").await;
    assert!(
        !gateway.logs().contains("panicked"),
        "no panic during the outage"
    );
}

/// How a replica configured to refuse answers while it cannot consult the shared rate limits.
fn limits_unavailable() -> Value {
    json!({
        "code": 1,
        "message": "ledger unavailable",
        "detail": "the rate limits shared by the gateway's replicas cannot be checked",
    })
}

/// How the ledger's refusal to reserve without Redis reads: no detail, unlike the limiter's.
fn ledger_unavailable() -> Value {
    json!({"code": 1, "message": "ledger unavailable"})
}

/// A task of `design`'s, started and read until it finished, with the budget settled at its
/// 0.50 (the only task of the test so far): it is in the gateway's status cache.
async fn a_settled_task(gateway: &Gateway) -> String {
    let (status, body) = generate(gateway).await;
    assert_eq!(status, 200, "{body}");
    let task_id = body["data"]["task_id"].as_str().unwrap().to_owned();
    let read = gateway.api.wait_for_final(DESIGN_KEY, &task_id).await;
    assert_eq!(read.task_status(), "success", "{}", read.text);
    wait_until_settled(gateway, "0.50000000").await;
    task_id
}

/// A status read through `gateway`: its status, `X-Cache` header and body.
async fn read_status(gateway: &Gateway, task_id: &str) -> (u16, Option<String>, Value) {
    let reply = gateway.api.query(DESIGN_KEY, task_id).await;
    (reply.status, reply.header("x-cache"), reply.json())
}

/// Reads `task_id` through `gateway` until the answer is not a local cache hit, and returns it.
async fn read_past_the_local_cache(
    gateway: &Gateway,
    task_id: &str,
) -> (u16, Option<String>, Value) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let read = read_status(gateway, task_id).await;
        if read.1.as_deref() != Some("hit") {
            return read;
        }
        assert!(Instant::now() < deadline, "always a hit: {read:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_rate_limits_refuse_or_allow_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    // This test stops Redis, so it needs its own server, whatever REDIS_URL says.
    let Some(mut redis) = PrivateRedis::start(dir.path()) else {
        return;
    };
    let mut fake = fake_config();
    // Still running through the test, so its status is never final and always read upstream.
    fake.in_progress_for = Duration::from_secs(600);
    let fake = ketchup_fake_upstream::start(fake).await.unwrap();
    let prefix = unique_prefix();
    let replica = |store: &str| {
        Gateway::start(
            &replica_config(&fake.base_url(), &redis.url(), &prefix)
                .store(r#"command_timeout = "500ms""#)
                .store(store)
                // A running status stays in the local cache for 100 ms only.
                .cache(r#"status_ttl = "100ms""#),
        )
    };
    let refusing = replica("");
    let allowing = replica("rate_limits_when_unavailable = \"allow\"");

    // A running task through each, read once, so each replica knows its owner without Redis.
    let mut running = Vec::new();
    for gateway in [&refusing, &allowing] {
        let (status, body) = generate(gateway).await;
        assert_eq!(status, 200, "{body}");
        let task_id = body["data"]["task_id"].as_str().unwrap().to_owned();
        let (status, _, read) = read_status(gateway, &task_id).await;
        assert_eq!(status, 200, "{read}");
        running.push(task_id);
    }

    redis.kill();
    let started = Instant::now();
    for _ in 0..5 {
        // Refused by the limiter, before anything else.
        let (status, body) = generate(&refusing).await;
        assert_eq!((status, body), (503, limits_unavailable()));
        // Past the limits (each replica's own stand in), refused by the ledger's reservation.
        let (status, body) = generate(&allowing).await;
        assert_eq!((status, body), (503, ledger_unavailable()));
    }
    // Redis refuses connections at once: ten refusals cost a few timeouts at most.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refusals were slow: {:?}",
        started.elapsed()
    );
    assert_eq!(
        fake.stats().generate_requests,
        2,
        "no generation without a ledger"
    );

    // A status read the local cache cannot answer needs an upstream read, which counts against
    // the upstream account's limit: refused by one replica, served by the other.
    let queries = fake.stats().query_requests;
    let (status, _, body) = read_past_the_local_cache(&refusing, &running[0]).await;
    assert_eq!((status, body), (503, limits_unavailable()));
    assert_eq!(
        fake.stats().query_requests,
        queries,
        "refused before the upstream"
    );
    let (status, cache, body) = read_past_the_local_cache(&allowing, &running[1]).await;
    assert_eq!((status, cache.as_deref()), (200, Some("miss")), "{body}");
    assert_eq!(body["data"]["task_id"], running[1].as_str(), "{body}");
    assert_eq!(
        fake.stats().query_requests,
        queries + 1,
        "read from the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_each_request_a_few_timeouts_then_nothing_and_heals_by_itself() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let dir = tempfile::tempdir().unwrap();
    // This test stops Redis, so it needs its own server, whatever REDIS_URL says.
    let Some(redis) = PrivateRedis::start(dir.path()) else {
        return;
    };
    let fake = ketchup_fake_upstream::start(fake_config()).await.unwrap();
    // Rate limits fall back to the replica's own, so generations reach the ledger.
    let gateway = one_gateway(&fake, &redis.url(), |config| {
        config
            .store(r#"command_timeout = "1s""#)
            .store("rate_limits_when_unavailable = \"allow\"")
    });

    // One task finished, settled and cached before Redis hangs.
    let finished = a_settled_task(&gateway).await;

    redis.pause();
    // Until five in a row come back fast: every breaker in front of Redis is open by then.
    let mut took = Vec::new();
    while took.iter().rev().take_while(|t| **t < TIMEOUT / 2).count() < 5 {
        assert!(took.len() < 20, "the breakers never opened: {took:?}");
        let started = Instant::now();
        let (status, body) = generate(&gateway).await;
        took.push(started.elapsed());
        assert_eq!((status, body), (503, ledger_unavailable()));
    }
    // The first waited for Redis, no longer than its three calls (the team's and the account's
    // limits, then the reservation) may each take.
    assert!(took[0] >= TIMEOUT, "{took:?}");
    assert!(
        took.iter()
            .all(|t| *t < 3 * TIMEOUT + Duration::from_secs(2)),
        "{took:?}"
    );
    let (status, _) = get(&gateway, "/readyz", None).await;
    assert_eq!(status, 503);
    let (status, cache, read) = read_status(&gateway, &finished).await;
    assert_eq!((status, cache.as_deref()), (200, Some("hit")), "{read}");
    assert_eq!(read["data"]["status"], "success");
    assert_eq!(
        fake.stats().generate_requests,
        1,
        "nothing reached the upstream"
    );

    // Redis goes on, answering what it was sent meanwhile: the gateway recovers by itself.
    redis.resume();
    let deadline = Instant::now() + DEADLINE;
    let after = loop {
        let (status, body) = generate(&gateway).await;
        if status == 200 {
            break body["data"]["task_id"].as_str().unwrap().to_owned();
        }
        assert_eq!((status, body), (503, ledger_unavailable()));
        assert!(Instant::now() < deadline, "generations never resumed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (status, _) = get(&gateway, "/readyz", None).await;
    assert_eq!(status, 200);
    while read_status(&gateway, &after).await.2["data"]["status"] != "success" {
        assert!(Instant::now() < deadline, "never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Exact totals: the two tasks, and none of the reservations refused during the hang.
    wait_until_settled(&gateway, "1.00000000").await;
    assert!(!gateway.logs().contains("panicked"));
}

/// Redis hangs while the upstream renders, so the task the upstream accepts cannot be recorded.
/// The client still learns its id (in a 503), the gateway records it as the team's once Redis is
/// back, and the team can poll it and is charged exactly what it consumed, not the reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_accepted_while_redis_hangs_is_recorded_once_redis_is_back() {
    let dir = tempfile::tempdir().unwrap();
    // This test stops Redis, so it needs its own server, whatever REDIS_URL says.
    let Some(redis) = PrivateRedis::start(dir.path()) else {
        return;
    };
    let fake = ketchup_fake_upstream::start(fake_config()).await.unwrap();
    fake.faults()
        .inject_generate(Fault::Slow(Duration::from_secs(2)), 1);
    let gateway = one_gateway(&fake, &redis.url(), |config| {
        config.store(r#"command_timeout = "1s""#)
    });

    let generation = tokio::spawn({
        let api = gateway.api.clone();
        async move { try_generate(&api, GEMPIX).await }
    });
    // Reserved, and now waiting on the upstream: Redis hangs before the task can be recorded.
    until_a_generation_reached(&fake).await;
    redis.pause();
    let (status, body) = generation.await.unwrap().expect("gateway answers");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["message"], "ledger unavailable", "{body}");
    let detail = body["detail"].as_str().expect("a detail");
    let task_id = detail
        .strip_prefix("the upstream accepted task ")
        .and_then(|rest| rest.split_once(','))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_else(|| panic!("no task id in {detail:?}"));
    assert_eq!(
        fake.stats().generate_accepted,
        1,
        "the upstream started the render"
    );

    redis.resume();
    let deadline = Instant::now() + DEADLINE;
    let final_read = loop {
        let (status, _, read) = read_status(&gateway, &task_id).await;
        if status == 200 && read["data"]["status"] == "success" {
            break read;
        }
        assert!(
            matches!(status, 200 | 404 | 503),
            "unexpected answer while recovering: {status} {read}"
        );
        assert!(
            Instant::now() < deadline,
            "the task never became the team's: {read}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(final_read["data"]["task_id"], task_id.as_str());
    // Settled at what the upstream says it consumed, once.
    wait_until_settled(&gateway, "0.50000000").await;
    assert_eq!(fake.stats().generate_requests, 1);
    assert!(!gateway.logs().contains("panicked"));
}

/// A Redis that takes only clients with a password: the gateway reads it from `password_file`
/// (the config holds no secret) and serves. With a wrong one it refuses to start, saying why,
/// rather than run without its ledger. Neither password is ever printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_password_comes_from_password_file_and_stays_secret() {
    const PASSWORD: &str = "redis-pass-0123456789abcdef";
    const WRONG: &str = "wrong-pass-fedcba9876543210";
    let dir = tempfile::tempdir().unwrap();
    let Some(redis) = PrivateRedis::start_with_password(dir.path(), PASSWORD) else {
        return;
    };
    let fake = ketchup_fake_upstream::start(fake_config()).await.unwrap();
    let config = |password: &str| {
        let file = dir.path().join(format!("password-{password}"));
        std::fs::write(&file, format!("{password}\n")).unwrap();
        replica_config(&fake.base_url(), &redis.url(), &unique_prefix())
            .store(&format!("password_file = \"{}\"", file.display()))
    };

    let gateway = Gateway::start(&config(PASSWORD));
    starts_and_reads_a_task(&gateway).await;
    assert!(!gateway.logs().contains(PASSWORD), "{}", gateway.logs());

    let said = refused_at_start(&config(WRONG));
    assert!(said.contains("Password authentication failed"), "{said}");
    assert!(!said.contains(WRONG) && !said.contains(PASSWORD), "{said}");
    assert_eq!(fake.stats().generate_requests, 1);
}

/// The gateway is ready, starts a task and reads its status back.
async fn starts_and_reads_a_task(gateway: &Gateway) {
    assert_eq!(get(gateway, "/readyz", None).await.0, 200);
    let (status, body) = generate(gateway).await;
    assert_eq!(status, 200, "{body}");
    let task_id = body["data"]["task_id"].as_str().unwrap().to_owned();
    let (status, _, read) = read_status(gateway, &task_id).await;
    assert_eq!(status, 200, "{read}");
}

/// What a gateway started on `config` says on stderr as it refuses to start.
fn refused_at_start(config: &GatewayConfig) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = config.write(dir.path());
    tokio::task::block_in_place(|| {
        let mut refused = GatewayProcess::spawn(&path, Launch::default());
        let status = refused.wait_exit();
        let said = refused.logs();
        assert!(!status.success(), "{said}");
        said
    })
}

/// A Redis that speaks only TLS, with a certificate from a private CA, and takes only clients
/// with a certificate of that CA: the gateway trusts the CA from `ca_file`, presents
/// `client_cert_file`, and serves with its ledger there. Without either it refuses to start,
/// saying why; the key's contents never show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_over_tls_with_a_private_ca_and_client_certificates_holds_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let Some(redis) = PrivateRedis::start_with_tls(dir.path(), pki.redis_tls()) else {
        return;
    };
    let fake = ketchup_fake_upstream::start(fake_config()).await.unwrap();
    let config =
        |store: &str| replica_config(&fake.base_url(), &redis.url(), &unique_prefix()).store(store);
    let ca = format!("ca_file = \"{}\"\n", pki.ca.display());
    let client = format!(
        "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        pki.client_cert.display(),
        pki.client_key.display()
    );

    let gateway = Gateway::start(&config(&format!("{ca}{client}")));
    starts_and_reads_a_task(&gateway).await;
    let budget = get(&gateway, "/gateway/v1/budget", Some(DESIGN_KEY))
        .await
        .1;
    assert_eq!(budget["reserved"], "0.50000000", "{budget}");

    let key = std::fs::read_to_string(&pki.client_key).unwrap();
    let key_body = key.lines().nth(1).unwrap();
    let said = refused_at_start(&config(&client));
    assert!(said.contains("UnknownIssuer"), "{said}");
    assert!(!said.contains(key_body), "{said}");
    let said = refused_at_start(&config(&ca));
    assert!(said.contains("CertificateRequired"), "{said}");
    let missing = format!(
        "{ca}client_cert_file = \"/nonexistent/client.pem\"\nclient_key_file = \"{}\"\n",
        pki.client_key.display()
    );
    let said = refused_at_start(&config(&missing));
    assert!(
        said.contains("cannot read [store] client_cert_file /nonexistent/client.pem"),
        "{said}"
    );
    assert_eq!(fake.stats().generate_requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_status_one_replica_read_serves_the_other_without_the_upstream() {
    let Some(url) = ketchup_test_redis::url() else {
        return;
    };
    let prefix = unique_prefix();
    let env = two_gateways(&url, std::convert::identity, [&prefix, &prefix]).await;

    // A starts a task and polls it to its final state; B has never read it.
    let (status, body) = generate(&env.a).await;
    assert_eq!(status, 200, "{body}");
    let task_id = body["data"]["task_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + DEADLINE;
    let final_read = loop {
        let (status, cache, read) = read_status(&env.a, &task_id).await;
        assert_eq!(status, 200, "{read}");
        if read["data"]["status"] == "success" {
            assert_eq!(
                cache.as_deref(),
                Some("miss"),
                "the final status came from upstream"
            );
            break read;
        }
        assert!(Instant::now() < deadline, "never finished: {read}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A writes it to the shared layer after answering: wait until Redis holds it.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{prefix}status:{task_id}");
    loop {
        let kept: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("final")
            .query_async(&mut redis)
            .await
            .unwrap();
        if kept.as_deref() == Some("1") {
            break;
        }
        assert!(Instant::now() < deadline, "A never shared the final status");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let queries = env.fake.stats().query_requests;
    for _ in 0..3 {
        let (status, cache, read) = read_status(&env.b, &task_id).await;
        assert_eq!((status, cache.as_deref()), (200, Some("hit")), "{read}");
        assert_eq!(read, final_read);
    }
    assert_eq!(
        env.fake.stats().query_requests,
        queries,
        "B asked the upstream"
    );
}

/// 40 generations for `ads` at once, alternating between the two gateways: how many each
/// accepted. Every other answer must be a 429 with `Retry-After`.
async fn generation_burst(env: &Replicas) -> [u64; 2] {
    let attempts: Vec<_> = (0..40)
        .map(|i| {
            let gateway = if i % 2 == 0 { &env.a } else { &env.b };
            let api = gateway.api.clone();
            tokio::spawn(async move {
                let reply = api.generate(ADS_KEY, GEMPIX).await;
                (
                    i % 2,
                    reply.status,
                    reply.header("retry-after"),
                    reply.json(),
                )
            })
        })
        .collect();
    let mut accepted = [0; 2];
    for attempt in attempts {
        match attempt.await.unwrap() {
            (replica, 200, _, _) => accepted[replica] += 1,
            (_, 429, retry_after, body) => {
                assert_eq!(body["message"], "rate limited", "{body}");
                assert!(retry_after.is_some());
            }
            (_, status, _, body) => panic!("unexpected {status}: {body}"),
        }
    }
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_holds_across_replicas() {
    let Some(url) = ketchup_test_redis::url() else {
        return;
    };
    // ads may start 10 an hour, burst 10: nothing refills while the test runs, so the count is
    // exact whatever the machine's speed.
    let env = two_replicas(&url, std::convert::identity).await;
    let [by_a, by_b] = generation_burst(&env).await;
    assert_eq!(by_a + by_b, 10, "ten in all: {by_a} by A, {by_b} by B");
    assert_eq!(env.fake.stats().generate_requests, 10);

    // The same burst at two gateways that share nothing lets each take its own ten: the count
    // above could not come from replicas limiting each on its own.
    let apart = two_gateways(
        &url,
        std::convert::identity,
        [&unique_prefix(), &unique_prefix()],
    )
    .await;
    assert_eq!(generation_burst(&apart).await, [10, 10]);
    assert_eq!(apart.fake.stats().generate_requests, 20);
}

/// Client loops in the kill test, each with at most one generation in flight: the first half
/// send to A, the others to B.
const LOOPS: usize = 8;
/// What a loop's `busy_since` holds between requests.
const IDLE: u64 = u64::MAX;

/// What one client loop of the kill test saw.
#[derive(Default)]
struct LoopTally {
    /// Task ids of the generations each replica accepted.
    accepted_by_a: Vec<String>,
    accepted_by_b: Vec<String>,
    /// B's accepted generations sent after A's kill began.
    accepted_by_b_after_kill: usize,
    /// Generations sent to A that failed at the connection level once A was being killed.
    lost_with_a: usize,
    /// Anything else: an error or a non-200 answer, from either replica.
    unexpected: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_loses_and_double_counts_no_credit() {
    let Some(url) = ketchup_test_redis::url() else {
        return;
    };
    // A budget no run reaches, and Redis calls that may be slow on a loaded machine: this test
    // is not about outages. The reconciler settles what nobody polls a second after it
    // starts, and turns a reservation left waiting for the upstream (its replica died
    // mid-request) into unknown_outcome after six, longer than any upstream call may take.
    let mut env = two_replicas(&url, |config| {
        config
            .budget(
                "design",
                r#"{ credits = "100000.00", period = "lifetime" }"#,
            )
            .upstream("timeout = \"5s\"\nconnect_timeout = \"200ms\"")
            .store(r#"command_timeout = "2s""#)
            .reconciler(
                "interval = \"200ms\"\nsettle_after = \"1s\"\n\
                     abandon_after = \"6s\"\nmax_reads_per_second = 1000\n",
            )
    })
    .await;
    let http = reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .unwrap();

    // A steady stream, each loop sending at most every 40 ms (so well under the listings' limit
    // of 1000 in all) until told to stop, and showing since when its request is in flight.
    let origin = Instant::now();
    let killing = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let busy_since: Arc<Vec<AtomicU64>> =
        Arc::new((0..LOOPS).map(|_| AtomicU64::new(IDLE)).collect());
    let loops: Vec<_> = (0..LOOPS)
        .map(|i| {
            let (killing, stop) = (killing.clone(), stop.clone());
            let busy_since = busy_since.clone();
            let to_b = i >= LOOPS / 2;
            let replica = if to_b { &env.b } else { &env.a };
            let api = Api::with_client(http.clone(), replica.api.base.clone());
            tokio::spawn(async move {
                let mut tally = LoopTally::default();
                while !stop.load(Ordering::SeqCst) {
                    let sent_after_kill = killing.load(Ordering::SeqCst);
                    busy_since[i].store(origin.elapsed().as_millis() as u64, Ordering::SeqCst);
                    let result = try_generate(&api, GEMPIX).await;
                    busy_since[i].store(IDLE, Ordering::SeqCst);
                    match (to_b, result) {
                        (false, Ok((200, body))) => tally
                            .accepted_by_a
                            .push(body["data"]["task_id"].as_str().unwrap().to_owned()),
                        (true, Ok((200, body))) => {
                            tally
                                .accepted_by_b
                                .push(body["data"]["task_id"].as_str().unwrap().to_owned());
                            tally.accepted_by_b_after_kill += usize::from(sent_after_kill);
                        }
                        (false, Err(_)) if killing.load(Ordering::SeqCst) => {
                            tally.lost_with_a += 1;
                        }
                        (to_b, Ok((status, body))) => {
                            tally.unexpected.push(format!("b={to_b}: {status} {body}"));
                        }
                        (to_b, Err(e)) => tally.unexpected.push(format!("b={to_b}: {e:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
                tally
            })
        })
        .collect();

    // After a second and a fair share of the load, the upstream takes 2 s to answer the next
    // generation of each loop (having created its task at once). A is killed while every one
    // of its loops waits for such an answer, so the kill falls between reserving and recording.
    let deadline = Instant::now() + DEADLINE;
    while origin.elapsed() < Duration::from_secs(1) || env.fake.stats().generate_accepted < 40 {
        assert!(Instant::now() < deadline, "the load never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.fake
        .faults()
        .inject_generate(Fault::Slow(Duration::from_secs(2)), LOOPS);
    let a_loops_waiting = || {
        let now = origin.elapsed().as_millis() as u64;
        busy_since[..LOOPS / 2]
            .iter()
            .all(|since| now.saturating_sub(since.load(Ordering::SeqCst)) >= 250)
    };
    while !a_loops_waiting() {
        assert!(Instant::now() < deadline, "A's requests were never slow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    killing.store(true, Ordering::SeqCst);
    env.a.kill();
    // B goes on alone for a second and some fifty generations.
    let killed = Instant::now();
    let at_kill = env.fake.stats().generate_accepted;
    while killed.elapsed() < Duration::from_secs(1)
        || env.fake.stats().generate_accepted < at_kill + 50
    {
        assert!(Instant::now() < deadline, "B stopped taking generations");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut tally = LoopTally::default();
    for one in loops {
        let one = one.await.unwrap();
        tally.accepted_by_a.extend(one.accepted_by_a);
        tally.accepted_by_b.extend(one.accepted_by_b);
        tally.accepted_by_b_after_kill += one.accepted_by_b_after_kill;
        tally.lost_with_a += one.lost_with_a;
        tally.unexpected.extend(one.unexpected);
    }
    assert!(
        tally.unexpected.is_empty(),
        "only A's requests once it was killed may fail: {:#?}",
        tally.unexpected
    );
    assert!(!tally.accepted_by_a.is_empty(), "A served before the kill");
    assert!(
        tally.lost_with_a > LOOPS / 2,
        "requests kept going to A after the kill"
    );
    assert!(
        tally.accepted_by_b_after_kill > 0,
        "B served after the kill"
    );

    // Every reservation closes, with nobody polling: open tasks are settled by B's reconciler,
    // and those A left waiting for the upstream become unknown_outcome.
    let budget = settled_budget(&env.b).await;
    let listing = |state: &str| format!("/admin/reservations?state={state}");
    let settled = admin_list(&env.b, &listing("settled"), "reservations").await;
    let unknown = admin_list(&env.b, &listing("unknown_outcome"), "reservations").await;
    for state in ["reserved", "open", "released", "expired"] {
        let left = admin_list(&env.b, &listing(state), "reservations").await;
        assert!(left.is_empty(), "{state}: {left:?}");
    }
    let stats = env.fake.stats();
    assert_eq!(stats.generate_accepted as usize, stats.tasks.len());
    assert_eq!(stats.request_ids_dropped, 0);

    // Each settled reservation is a task the upstream created, settled once, at what it consumed.
    let mut settled_tasks = BTreeSet::new();
    let mut expected_spent = 0;
    for reservation in &settled {
        let task_id = reservation["task_id"].as_str().expect("a settled task id");
        assert!(settled_tasks.insert(task_id), "{task_id} settled twice");
        let task = stats
            .tasks
            .get(task_id)
            .expect("a task the upstream created");
        assert_eq!(task.status, TaskStatus::Success, "{task_id}");
        expected_spent += units(&json!(task.consumed));
    }
    let answered: Vec<&String> = tally
        .accepted_by_a
        .iter()
        .chain(&tally.accepted_by_b)
        .collect();
    for task_id in &answered {
        assert!(
            settled_tasks.contains(task_id.as_str()),
            "{task_id} never settled"
        );
    }
    // Every unknown outcome is a request A took and never answered, counted at its reservation.
    let arrived: BTreeSet<&str> = stats.request_ids.iter().map(String::as_str).collect();
    let mut unknown_that_arrived = 0;
    for reservation in &unknown {
        assert_eq!(reservation["task_id"], Value::Null, "{reservation}");
        assert_eq!(reservation["team"], "design", "{reservation}");
        expected_spent += units(&reservation["reserved"]);
        unknown_that_arrived +=
            usize::from(arrived.contains(reservation["request_id"].as_str().unwrap()));
    }
    // The upstream's tasks the ledger never learned of are exactly the unknown outcomes whose
    // request reached it (up to a request cut off before it could create a task).
    let unrecorded = stats
        .tasks
        .keys()
        .filter(|task_id| !settled_tasks.contains(task_id.as_str()))
        .count();
    let cut_off = (stats.generate_requests - stats.generate_accepted) as usize;
    assert!(
        (unrecorded..=unrecorded + cut_off).contains(&unknown_that_arrived),
        "{unrecorded} unrecorded tasks, {unknown_that_arrived} of {} unknown outcomes arrived",
        unknown.len()
    );
    // Only the requests in flight to A at the kill, one per A loop, are in doubt; and the kill
    // fell between the upstream's answer and A's record of it (usually for all of them).
    let unanswered = settled.len() - answered.len();
    assert!(
        unanswered + unknown.len() <= LOOPS / 2 && unrecorded > 0,
        "{unanswered} settled tasks never answered, {} unknown outcomes, {unrecorded} tasks \
         the ledger never learned of",
        unknown.len()
    );

    eprintln!(
        "kill test: {} answered by A, {} by B ({} after the kill), {} lost with A; \
         {} settled, {} unknown outcomes, {} upstream tasks",
        tally.accepted_by_a.len(),
        tally.accepted_by_b.len(),
        tally.accepted_by_b_after_kill,
        tally.lost_with_a,
        settled.len(),
        unknown.len(),
        stats.tasks.len()
    );
    // No credit lost, none counted twice: spent is the upstream's charges plus the unknown
    // outcomes' reservations, and the usage report agrees.
    assert_eq!(units(&budget["spent"]), expected_spent, "{budget}");
    let (_, usage) = get(&env.b, "/admin/usage", Some(ADMIN_TOKEN)).await;
    let row = &usage["rows"][0];
    assert_eq!(usage["rows"].as_array().unwrap().len(), 1, "{usage}");
    assert_eq!(row["tasks"], settled.len() + unknown.len(), "{usage}");
    assert_eq!(row["succeeded"], settled.len(), "{usage}");
    assert_eq!(row["unsettled"], 0, "{usage}");
    assert_eq!(row["credits"], budget["spent"], "{usage}");
    assert!(!env.b.logs().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_is_delivered_by_exactly_one_replica() {
    let Some(url) = ketchup_test_redis::url() else {
        return;
    };
    // Quick retries; and a worker attempts one delivery at a time, so each claim takes one
    // delivery and the two replicas' workers keep claiming from the same due retries (with the
    // default, the first worker to poll would claim all ten at once).
    let env = two_replicas(&url, |config| {
        with_webhooks(config)
            .store(r#"command_timeout = "2s""#)
            .webhooks(
                "first_retry = \"200ms\"\nmax_retry_delay = \"400ms\"\n\
                     max_concurrent_deliveries = 1\n",
            )
    })
    .await;
    // Every delivery fails its first attempt, so each goes through the outbox's retries, which
    // both replicas' workers race to claim.
    let receiver = Receiver::failing_each_first_attempt();
    let listening = receiver.listen(0).await;
    let hook = format!("http://127.0.0.1:{}/hook", listening.port);

    let mut tasks = BTreeSet::new();
    for i in 0..10 {
        let gateway = if i % 2 == 0 { &env.a } else { &env.b };
        let mut body: Value = serde_json::from_str(GEMPIX).unwrap();
        body["callback_url"] = json!(hook);
        let (status, body) = try_generate(&gateway.api, &body.to_string())
            .await
            .expect("gateway answers");
        assert_eq!(status, 200, "{body}");
        tasks.insert(body["data"]["task_id"].as_str().unwrap().to_owned());
    }
    // The upstream calls back whichever replica started the task.
    let callbacks: Vec<String> = env
        .fake
        .stats()
        .generate_bodies
        .iter()
        .map(|body| {
            body["callback_url"]
                .as_str()
                .expect("the gateway's callback")
                .to_owned()
        })
        .collect();
    for (gateway, share) in [(&env.a, 0), (&env.b, 1)] {
        let own = format!("{}/callbacks/", gateway.url(""));
        let given = callbacks.iter().skip(share).step_by(2);
        assert!(
            given.clone().all(|url| url.starts_with(&own)),
            "{callbacks:?}"
        );
    }

    receiver
        .wait_for("a delivery per task", |r| r.delivered().len() >= 10)
        .await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let delivered = admin_list(&env.b, "/admin/webhooks?state=delivered", "webhooks").await;
        if delivered.len() >= 10 {
            break;
        }
        assert!(Instant::now() < deadline, "never recorded: {delivered:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Long enough for a second claim of any retry to show: past the workers' one-second poll.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let seen = receiver.seen();
    let mut attempts: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    let mut delivered_tasks = BTreeSet::new();
    for (headers, body, status) in &seen {
        verify(headers, body);
        let id = headers["webhook-id"].to_str().unwrap().to_owned();
        attempts.entry(id).or_default().push(*status);
        if *status == 200 {
            let payload: Value = serde_json::from_slice(body).unwrap();
            let task_id = payload["task_id"].as_str().unwrap().to_owned();
            assert!(
                delivered_tasks.insert(task_id),
                "delivered twice: {payload}"
            );
        }
    }
    assert_eq!(delivered_tasks, tasks, "one delivery per task");
    assert_eq!(attempts.len(), 10, "{attempts:?}");
    assert!(
        attempts.values().all(|statuses| statuses == &[500, 200]),
        "each delivery failed once, then was delivered once: {attempts:?}"
    );
    assert_eq!(receiver.delivered().len(), 10);
    // The ledger agrees, and only one replica recorded each delivery.
    let delivered = admin_list(&env.a, "/admin/webhooks?state=delivered", "webhooks").await;
    assert_eq!(delivered.len(), 10, "{delivered:?}");
    for delivery in &delivered {
        assert_eq!(delivery["attempts"], 2, "{delivery}");
        assert!(
            attempts.contains_key(delivery["id"].as_str().unwrap()),
            "{delivery}"
        );
    }
    for state in ["pending", "dead"] {
        let path = format!("/admin/webhooks?state={state}");
        assert!(admin_list(&env.a, &path, "webhooks").await.is_empty());
    }
    let delivered_by = |gateway: &Gateway| -> Vec<String> {
        gateway
            .logs()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|event| event["message"] == "webhook delivered")
            .map(|event| event["webhook_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (by_a, by_b) = (delivered_by(&env.a), delivered_by(&env.b));
    eprintln!(
        "webhook test: {} delivered by A, {} by B",
        by_a.len(),
        by_b.len()
    );
    let mut logged = [by_a, by_b].concat();
    logged.sort();
    assert_eq!(
        logged,
        attempts.keys().cloned().collect::<Vec<_>>(),
        "each delivery was made by one replica"
    );
    // The callbacks settled each task once.
    wait_until_settled(&env.b, "5.00000000").await;
}
