//! Several gateway processes on one Redis behave as one gateway: one budget, one view of task
//! ownership, one settlement per task; and a Redis outage costs fast 503s, never credits.

mod common;

use std::time::{Duration, Instant};

use common::redis_server::{self, PrivateRedis};
use common::{DESIGN_KEY, Gateway, fake_config};
use ketchup_gateway::fake_upstream::{self, FakeHandle};
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "admin-test-token-0123456789";
const DEADLINE: Duration = Duration::from_secs(30);

/// A config for a replica on the Redis at `url`, under a key prefix of its own test run.
/// `design` may spend 5.00 credits in all: ten reservations of 0.50. `ads` has no budget but may
/// start 10 tasks a second, burst 10.
fn write_config(
    dir: &std::path::Path,
    upstream: &str,
    url: &str,
    prefix: &str,
) -> std::path::PathBuf {
    let ledger = dir.join("unused.db");
    let admin = dir.join("admin_token");
    std::fs::write(&admin, ADMIN_TOKEN).unwrap();
    let text = common::config_text(
        upstream,
        &ledger,
        &format!("\n[admin]\ntoken_file = \"{}\"\n", admin.display()),
        "",
    )
    .replace(
        &format!("path = \"{}\"", ledger.display()),
        &format!("kind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\ncommand_timeout = \"250ms\""),
    )
    .replace(
        "label = \"design-test\" }]",
        "label = \"design-test\" }]\nbudget = { credits = \"5.00\", period = \"lifetime\" }",
    )
    .replace(
        "label = \"ads-test\" }]",
        "label = \"ads-test\" }]\nlimits = { generate = \"10/s\", generate_burst = 10 }",
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn unique_prefix() -> String {
    format!("test-{}:", uuid::Uuid::now_v7().simple())
}

async fn generate(http: &reqwest::Client, gateway: &Gateway) -> (u16, Value) {
    let response = http
        .post(gateway.url("/api/image/gen"))
        .bearer_auth(DESIGN_KEY)
        .json(&json!({"model": "google/gempix2", "prompt": "a tomato"}))
        .send()
        .await
        .expect("gateway answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

async fn get(http: &reqwest::Client, gateway: &Gateway, path: &str, key: &str) -> (u16, Value) {
    let response = http
        .get(gateway.url(path))
        .bearer_auth(key)
        .send()
        .await
        .expect("gateway answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn wait_until_settled(http: &reqwest::Client, gateway: &Gateway, spent: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, budget) = get(http, gateway, "/gateway/v1/budget", DESIGN_KEY).await;
        if budget["spent"] == spent && budget["reserved"] == "0.00000000" {
            return;
        }
        assert!(Instant::now() < deadline, "never settled: {budget}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Replicas {
    fake: FakeHandle,
    a: Gateway,
    b: Gateway,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn two_replicas(url: &str) -> Replicas {
    let fake = fake_upstream::start(fake_config()).await.unwrap();
    let prefix = unique_prefix();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Gateway::start(write_config(dir_a.path(), &fake.base_url(), url, &prefix));
    let b = Gateway::start(write_config(dir_b.path(), &fake.base_url(), url, &prefix));
    Replicas {
        fake,
        a,
        b,
        _dirs: (dir_a, dir_b),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_one_budget_and_one_view_of_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let Some((url, _server)) = redis_server::url(dir.path()) else {
        return;
    };
    let env = two_replicas(&url).await;
    let http = reqwest::Client::new();

    // 200 requests at once, half through each replica, for a budget of exactly 10.
    let attempts: Vec<_> = (0..200)
        .map(|i| {
            let http = http.clone();
            let gateway = if i % 2 == 0 { &env.a } else { &env.b };
            let url = gateway.url("");
            tokio::spawn(async move {
                let response = http
                    .post(format!("{url}/api/image/gen"))
                    .bearer_auth(DESIGN_KEY)
                    .json(&json!({"model": "google/gempix2", "prompt": "a tomato"}))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                (status, response.json::<Value>().await.unwrap())
            })
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
                &http,
                gateway,
                &format!("/api/task/query?task_id={task_id}"),
                DESIGN_KEY,
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
        let (status, _) = get(
            &http,
            &env.b,
            &format!("/api/task/query?task_id={task_id}"),
            common::ADS_KEY,
        )
        .await;
        assert_eq!(status, 404);
    }
    // Polled through both until final: settled once each, at the fake's 0.50.
    let deadline = Instant::now() + DEADLINE;
    for task_id in &accepted {
        loop {
            let (_, a) = get(
                &http,
                &env.a,
                &format!("/api/task/query?task_id={task_id}"),
                DESIGN_KEY,
            )
            .await;
            let (_, b) = get(
                &http,
                &env.b,
                &format!("/api/task/query?task_id={task_id}"),
                DESIGN_KEY,
            )
            .await;
            if a["data"]["status"] == "success" && b["data"]["status"] == "success" {
                break;
            }
            assert!(Instant::now() < deadline, "task never finished: {a} {b}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    wait_until_settled(&http, &env.a, "5.00000000").await;
    let (_, usage) = get(&http, &env.b, "/admin/usage", ADMIN_TOKEN).await;
    assert_eq!(usage["rows"][0]["tasks"], 10, "{usage}");
    assert_eq!(usage["rows"][0]["succeeded"], 10, "{usage}");
    assert_eq!(usage["rows"][0]["credits"], "5.00000000", "{usage}");
    let (status, refused) = generate(&http, &env.b).await;
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
    let fake = fake_upstream::start(fake_config()).await.unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(write_config(
        config_dir.path(),
        &fake.base_url(),
        &redis.url(),
        &unique_prefix(),
    ));
    let http = reqwest::Client::new();

    // One task finished and cached, one still running, before the outage.
    let (status, body) = generate(&http, &gateway).await;
    assert_eq!(status, 200, "{body}");
    let finished = body["data"]["task_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, read) = get(
            &http,
            &gateway,
            &format!("/api/task/query?task_id={finished}"),
            DESIGN_KEY,
        )
        .await;
        if read["data"]["status"] == "success" {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until_settled(&http, &gateway, "0.50000000").await;
    let (status, body) = generate(&http, &gateway).await;
    assert_eq!(status, 200, "{body}");
    let running = body["data"]["task_id"].as_str().unwrap().to_owned();

    redis.kill();
    let started = Instant::now();
    for _ in 0..10 {
        let (status, body) = generate(&http, &gateway).await;
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
    let (status, _) = get(&http, &gateway, "/readyz", "").await;
    assert_eq!(status, 503);
    // A cached final status is still served.
    let (status, read) = get(
        &http,
        &gateway,
        &format!("/api/task/query?task_id={finished}"),
        DESIGN_KEY,
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
        let (status, _) = get(&http, &gateway, "/readyz", "").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each Redis client's breaker probes on its own schedule: generations resume within seconds.
    let after = loop {
        let (status, body) = generate(&http, &gateway).await;
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
                &http,
                &gateway,
                &format!("/api/task/query?task_id={task_id}"),
                DESIGN_KEY,
            )
            .await;
            if read["data"]["status"] == "success" {
                break;
            }
            assert!(Instant::now() < deadline, "{read}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    wait_until_settled(&http, &gateway, "1.50000000").await;
    assert!(
        !gateway.logs().contains("panicked"),
        "no panic during the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_holds_across_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let Some((url, _server)) = redis_server::url(dir.path()) else {
        return;
    };
    let env = two_replicas(&url).await;
    let http = reqwest::Client::new();
    // 40 generations at once, alternating replicas, against ads's 10 a second (burst 10): each
    // replica alone would let 10 through, 20 in all.
    let started = Instant::now();
    let attempts: Vec<_> = (0..40)
        .map(|i| {
            let http = http.clone();
            let url = if i % 2 == 0 {
                env.a.url("")
            } else {
                env.b.url("")
            };
            tokio::spawn(async move {
                let response = http
                    .post(format!("{url}/api/image/gen"))
                    .bearer_auth(common::ADS_KEY)
                    .json(&json!({"model": "google/gempix2", "prompt": "a tomato"}))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let retry_after = response.headers().get("retry-after").cloned();
                (status, retry_after, response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut accepted = 0u64;
    let mut limited = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            (200, _, _) => accepted += 1,
            (429, retry_after, body) => {
                assert_eq!(body["message"], "rate limited", "{body}");
                assert!(retry_after.is_some());
                limited += 1;
            }
            (status, _, body) => panic!("unexpected {status}: {body}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The burst, plus what refilled (10 a second) while the requests were arriving.
    let most = 10 + (10.0 * elapsed).ceil() as u64;
    assert!(
        (10..=most).contains(&accepted),
        "{accepted} accepted in {elapsed:.2} s (at most {most}), {limited} limited"
    );
    assert_eq!(env.fake.stats().generate_requests, accepted);
}
