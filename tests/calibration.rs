//! Reservations against what tasks cost: `GET /admin/models`, the metric of tasks that cost more
//! than they reserved, `check-config --against` and their survival across a restart and across
//! replicas, through the real binary in front of the fake upstream, whose tasks cost what their
//! prompt's `[charge:…]` says.

use std::process::{Command, Output, Stdio};

use ketchup_testkit::gateway::binary;
use ketchup_testkit::{
    ADMIN_TOKEN, Api, DESIGN_KEY, Env, Gateway, GatewayConfig, fake_config, start_fake,
};
use serde_json::{Value, json};

const SORA: &str = r#"{ by = "duration", prices = { "10" = "1.00", "15" = "1.50" } }"#;

fn config() -> GatewayConfig {
    GatewayConfig::new().admin().model_reserve("sora-2", SORA)
}

/// Runs a generation on `path` whose task costs `charge`, and reads it until it settled.
async fn settle(api: &Api, path: &str, mut body: Value, charge: &str) {
    body["prompt"] = json!(format!("a tomato [charge:{charge}]"));
    let accepted = api.submit(DESIGN_KEY, path, &body.to_string()).await;
    assert_eq!(accepted.status, 200, "{}", accepted.text);
    let done = api.wait_for_final(DESIGN_KEY, &accepted.task_id()).await;
    assert_eq!(done.task_status(), "success", "{}", done.text);
}

async fn sora(api: &Api, duration: &str, charge: &str) {
    let body = json!({"model": "sora-2", "duration": duration});
    settle(api, "/api/sora2/gen", body, charge).await;
}

async fn gempix(api: &Api, n: u32, charge: &str) {
    let body = json!({"model": "google/gempix2", "n": n});
    settle(api, "/api/image/gen", body, charge).await;
}

/// The table's lines, by model and value.
async fn lines(api: &Api) -> Vec<Value> {
    let table = api.admin("/admin/models").await;
    assert_eq!(table["window_days"], 30, "{table}");
    table["models"].as_array().expect("models").clone()
}

fn line<'a>(lines: &'a [Value], model: &str, value: Value) -> &'a Value {
    lines
        .iter()
        .find(|l| l["model"] == model && l["value"] == value)
        .unwrap_or_else(|| panic!("no line for {model} {value} in {lines:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_table_shows_settled_costs_exactly_and_a_restart_keeps_them() {
    let mut env = Env::start_with(fake_config(), config()).await;
    for charge in ["0.90", "1.00", "0.95", "1.20"] {
        sora(env.api(), "10", charge).await;
    }
    // Two images for 0.90: 0.45 each against 0.50 an image; one at a price with eight digits.
    gempix(env.api(), 2, "0.90").await;
    gempix(env.api(), 1, "0.12345678").await;

    let table = lines(env.api()).await;
    assert_eq!(
        *line(&table, "sora-2", json!("10")),
        json!({
            "model": "sora-2", "field": "duration", "value": "10",
            "reservation": "1.00000000", "settled": 4, "over_reservation": 1,
            "p50": "0.95000000", "p99": "1.20000000", "max": "1.20000000",
            "fit": "below_p99", "exceeds_reservation": true,
        })
    );
    assert_eq!(
        *line(&table, "sora-2", json!("15")),
        json!({
            "model": "sora-2", "field": "duration", "value": "15",
            "reservation": "1.50000000", "settled": 0, "over_reservation": 0,
            "p50": null, "p99": null, "max": null,
            "fit": "no_data", "exceeds_reservation": false,
        })
    );
    // The p50 is its bucket's bound, three significant digits rounded up: 0.124 for 0.12345678.
    assert_eq!(
        *line(&table, "google/gempix2", Value::Null),
        json!({
            "model": "google/gempix2", "field": null, "value": null,
            "reservation": "0.50000000", "settled": 2, "over_reservation": 0,
            "p50": "0.12400000", "p99": "0.45000000", "max": "0.45000000",
            "fit": "covers", "exceeds_reservation": false,
        })
    );
    assert_eq!(
        line(&table, "google/gemini-2.5-flash-image", Value::Null)["fit"],
        "no_data"
    );
    assert_eq!(table.len(), 4, "{table:?}");
    assert_eq!(
        env.api()
            .metric(r#"ketchup_gateway_settled_over_reservation_total{model="sora-2"}"#)
            .await,
        1.0
    );
    assert_eq!(
        env.api()
            .metric(r#"ketchup_gateway_settled_over_reservation_total{model="google/gempix2"}"#)
            .await,
        0.0
    );

    // Killed and started again on the same ledger: the same table, and it goes on adding up.
    env.gateway.restart_after_kill();
    assert_eq!(lines(env.api()).await, table);
    sora(env.api(), "10", "0.80").await;
    let after = lines(env.api()).await;
    let ten = line(&after, "sora-2", json!("10"));
    assert_eq!(
        (&ten["settled"], &ten["p50"], &ten["max"]),
        (&json!(5), &json!("0.95000000"), &json!("1.20000000"))
    );

    // The table needs the admin token.
    let refused = env.api().get("/admin/models", Some(DESIGN_KEY)).await;
    assert_eq!(refused.status, 401, "{}", refused.text);
}

/// Runs `check-config` on `config` against `url`, with `token` (if any) in the environment.
fn check_against(
    dir: &std::path::Path,
    config: &GatewayConfig,
    url: &str,
    token: Option<&str>,
) -> Output {
    let path = config.clone().upstream_url("http://127.0.0.1:9").write(dir);
    let mut command = Command::new(binary());
    command
        .args(["check-config", path.to_str().unwrap(), "--against", url])
        .env_remove("KETCHUP_ADMIN_TOKEN")
        .stdin(Stdio::null());
    if let Some(token) = token {
        command.env("KETCHUP_ADMIN_TOKEN", token);
    }
    command.output().expect("binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_config_sets_new_reservations_against_the_running_gateway() {
    let env = Env::start_with(fake_config(), config()).await;
    for charge in ["1.00", "1.10", "1.30"] {
        sora(env.api(), "10", charge).await;
    }
    gempix(env.api(), 1, "0.40").await;
    let url = env.gateway.url("");
    let dir = tempfile::tempdir().unwrap();

    // Raised for 10 seconds but not to the max; gempix2 lowered below what it cost.
    let lower = config()
        .model_reserve(
            "sora-2",
            r#"{ by = "duration", prices = { "10" = "1.20", "15" = "1.50" } }"#,
        )
        .model("google/gempix2", "0.30");
    let output = check_against(dir.path(), &lower, &url, Some(ADMIN_TOKEN));
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{stdout}{}",
        text(&output.stderr)
    );
    let table: Vec<Vec<&str>> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("model"))
        .take_while(|l| !l.contains("reservation(s) below"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        table,
        [
            vec![
                "model", "value", "reserve", "settled", "over", "p50", "p99", "max", "fit"
            ],
            vec![
                "google/gemini-2.5-flash-image",
                "-",
                "0.25",
                "0",
                "0",
                "-",
                "-",
                "-",
                "no",
                "data"
            ],
            vec![
                "google/gempix2",
                "-",
                "0.30",
                "1",
                "0",
                "0.40",
                "0.40",
                "0.40",
                "below",
                "p99"
            ],
            vec![
                "sora-2",
                "duration=10",
                "1.20",
                "3",
                "2",
                "1.10",
                "1.30",
                "1.30",
                "below",
                "p99"
            ],
            vec![
                "sora-2",
                "duration=15",
                "1.50",
                "0",
                "0",
                "-",
                "-",
                "-",
                "no",
                "data"
            ],
        ],
        "{stdout}"
    );
    assert!(
        stdout.contains("2 reservation(s) below the costs settled for them"),
        "{stdout}"
    );
    assert!(!stdout.contains(ADMIN_TOKEN) && !text(&output.stderr).contains(ADMIN_TOKEN));

    // Every reservation at least the max: valid, exit 0.
    let enough = config().model_reserve(
        "sora-2",
        r#"{ by = "duration", prices = { "10" = "1.30", "15" = "1.50" } }"#,
    );
    let output = check_against(dir.path(), &enough, &url, Some(ADMIN_TOKEN));
    assert!(output.status.success(), "{}", text(&output.stdout));
    let stdout = text(&output.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "sora-2",
                    "duration=10",
                    "1.30",
                    "3",
                    "2",
                    "1.10",
                    "1.30",
                    "1.30",
                    "ok"
                ]),
        "{stdout}"
    );
    assert!(!stdout.contains("below"), "{stdout}");

    // No token, or a wrong one: exit 1 with why, the token never shown.
    let output = check_against(dir.path(), &enough, &url, None);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("KETCHUP_ADMIN_TOKEN"),
        "{}",
        text(&output.stderr)
    );
    let output = check_against(dir.path(), &enough, &url, Some("kgw-wrong-token"));
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("401") && !stderr.contains("kgw-wrong-token"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_on_one_redis_share_one_distribution() {
    let Some(url) = ketchup_test_redis::url() else {
        return;
    };
    let fake = start_fake(fake_config()).await;
    let prefix = format!("ketchup-test:{}:", uuid::Uuid::new_v4().simple());
    let start = || Gateway::start(&config().upstream_url(&fake.base_url()).redis(&url, &prefix));
    let (a, b) = (start(), start());
    sora(&a.api, "15", "1.40").await;
    sora(&b.api, "15", "1.60").await;
    for gateway in [&a, &b] {
        let table = lines(&gateway.api).await;
        let fifteen = line(&table, "sora-2", json!("15"));
        assert_eq!(
            (
                &fifteen["settled"],
                &fifteen["over_reservation"],
                &fifteen["max"],
                &fifteen["fit"]
            ),
            (
                &json!(2),
                &json!(1),
                &json!("1.60000000"),
                &json!("below_p99")
            )
        );
    }
}
