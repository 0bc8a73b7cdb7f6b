//! What admins did and who spent what, through the real binary: the audit trail of admin actions
//! (who by label, what, on which target, answered how), and spend split by team key in the usage
//! report and the metrics.

use std::time::Duration;

use chrono::{DateTime, Utc};
use ketchup_domain::credits::Credits;
use ketchup_domain::pricing::TextPrices;
use ketchup_fake_upstream::Fault;
use ketchup_testkit::{
    ADMIN_TOKEN, DEADLINE, DESIGN_KEY, Env, GEMPIX, GatewayConfig, Reply, digest, rendering_at,
};
use serde_json::{Value, json};

const ALICE_TOKEN: &str = "kgw-admin-alice-token-0123456789";
const CI_KEY: &str = "kgw_design_ci_key_00000000000000";
const RELEASE: &str = "POST /admin/reservations/{id}/release";
const OPENAI: &str = "openai/gpt-5.2";

/// `POST path` with `token` and a request id of our choosing.
async fn post_as(env: &Env, path: &str, token: &str, request_id: &str) -> Reply {
    let api = env.api();
    api.send(
        api.http
            .post(api.url(path))
            .bearer_auth(token)
            .header("x-request-id", request_id),
    )
    .await
}

/// `GET /admin/audit{query}` with alice's token; must answer 200.
async fn trail(env: &Env, query: &str) -> Value {
    let reply = env
        .api()
        .get(&format!("/admin/audit{query}"), Some(ALICE_TOKEN))
        .await;
    assert_eq!(reply.status, 200, "{query}: {}", reply.text);
    assert!(
        !reply.text.contains(ALICE_TOKEN) && !reply.text.contains(ADMIN_TOKEN),
        "a token in {}",
        reply.text
    );
    reply.json()
}

/// The trail's actions without their ids and times, which the test checks apart.
fn without_ids(actions: &Value) -> Vec<Value> {
    actions
        .as_array()
        .expect("actions")
        .iter()
        .map(|action| {
            let mut action = action.clone();
            let fields = action.as_object_mut().expect("an action");
            fields.remove("id");
            fields.remove("at");
            action
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_admin_change_is_in_the_audit_trail_with_who_and_what_and_survives_a_restart() {
    audit_trail_on(GatewayConfig::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_trail_in_redis_survives_a_restart_too() {
    let Some(url) = ketchup_test_redis::url() else {
        return;
    };
    let prefix = format!("test-{}:", uuid::Uuid::now_v7().simple());
    audit_trail_on(GatewayConfig::new().redis(&url, &prefix)).await;
}

/// Releases, refused attempts and reads by two admins on a gateway whose store `base` sets, then
/// the trail as listed, paged and filtered, before and after a restart.
async fn audit_trail_on(base: GatewayConfig) {
    let config = base
        .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
        .upstream(r#"timeout = "300ms""#)
        .admin()
        .admin_lines(&format!(
            "tokens = [{{ sha256 = \"{}\", label = \"alice\" }}]",
            digest(ALICE_TOKEN)
        ));
    let mut env = Env::start_with(rendering_at(Duration::from_millis(100), "0.50"), config).await;

    // A generation the upstream never answers in time: an unknown outcome for an admin.
    env.fake
        .faults()
        .inject_generate(Fault::Slow(Duration::from_secs(2)), 1);
    let timed_out = env.api().generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(timed_out.status, 504, "{}", timed_out.text);
    let listed = env.api().admin("/admin/reservations").await;
    let id = listed["reservations"][0]["id"]
        .as_str()
        .expect("an unknown outcome")
        .to_owned();
    let path = format!("/admin/reservations/{id}/release");

    // Reads, and calls no admin token opens, are not actions.
    assert_eq!(
        trail(&env, "").await,
        json!({"actions": [], "next_before": null})
    );
    env.api().admin("/admin/teams").await;
    for token in [DESIGN_KEY, "kgw-not-an-admin-token"] {
        assert_eq!(
            post_as(&env, &path, token, "audit-nobody").await.status,
            401
        );
    }

    let started = Utc::now();
    let released = post_as(&env, &path, ALICE_TOKEN, "audit-release-1").await;
    assert_eq!(released.status, 200, "{}", released.text);
    // Refused attempts are recorded too, under the admin who made them.
    let again = post_as(&env, &path, ADMIN_TOKEN, "audit-release-2").await;
    assert_eq!(again.status, 409, "{}", again.text);
    let malformed = post_as(
        &env,
        "/admin/reservations/not-a-uuid/release",
        ALICE_TOKEN,
        "audit-release-3",
    )
    .await;
    assert_eq!(malformed.status, 400, "{}", malformed.text);
    let ended = Utc::now();

    let expected = vec![
        json!({"admin": "alice", "action": RELEASE, "target": "not-a-uuid", "status": 400,
               "request_id": "audit-release-3"}),
        json!({"admin": "admin", "action": RELEASE, "target": id, "status": 409,
               "request_id": "audit-release-2"}),
        json!({"admin": "alice", "action": RELEASE, "target": id, "status": 200,
               "request_id": "audit-release-1"}),
    ];
    let listed = trail(&env, "").await;
    assert_eq!(without_ids(&listed["actions"]), expected, "{listed}");
    assert_eq!(listed["next_before"], Value::Null);
    let ids: Vec<u64> = listed["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_u64().expect("an id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
    for action in listed["actions"].as_array().unwrap() {
        let at: DateTime<Utc> = action["at"].as_str().unwrap().parse().unwrap();
        assert!(
            started.timestamp_millis() <= at.timestamp_millis()
                && at.timestamp_millis() <= ended.timestamp_millis(),
            "{at} not within {started}..{ended}"
        );
    }

    // A page at a time, each starting below the last one.
    let first = trail(&env, "?limit=2").await;
    assert_eq!(without_ids(&first["actions"]), expected[..2]);
    assert_eq!(first["next_before"], ids[1]);
    let second = trail(&env, &format!("?limit=2&before={}", ids[1])).await;
    assert_eq!(without_ids(&second["actions"]), expected[2..]);
    assert_eq!(second["next_before"], Value::Null);
    // Filtered by admin, and by time.
    let alice = trail(&env, "?admin=alice").await;
    assert_eq!(
        without_ids(&alice["actions"]),
        [expected[0].clone(), expected[2].clone()]
    );
    let later = (ended + chrono::Duration::seconds(1)).to_rfc3339();
    let none = trail(&env, &format!("?since={}", later.replace('+', "%2B"))).await;
    assert_eq!(none["actions"], json!([]));
    for (bad, named) in [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?before=x", "before"),
        ("?since=yesterday", "since"),
    ] {
        let reply = env
            .api()
            .get(&format!("/admin/audit{bad}"), Some(ADMIN_TOKEN))
            .await;
        assert_eq!(reply.status, 400, "{bad}: {}", reply.text);
        let body = reply.json();
        assert_eq!(body["code"], 1, "{bad}: {body}");
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with(named)),
            "{bad}: {body}"
        );
    }

    // In the ledger: a restart keeps it.
    env.gateway.restart();
    let after = trail(&env, "").await;
    assert_eq!(after, listed);
}

/// The text price the gateway charges, as configured below.
fn text_prices() -> TextPrices {
    TextPrices {
        input_per_million: "1.50".parse().unwrap(),
        output_per_million: "6.00".parse().unwrap(),
        max_output_tokens: 1000,
        max_input_tokens: None,
    }
}

fn amount(value: &Value) -> Credits {
    value.as_str().expect("an amount").parse().expect("amount")
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_and_the_spend_metric_split_a_teams_spend_between_its_keys() {
    let config = GatewayConfig::new()
        .admin()
        .text_model(OPENAI, "1.50", "6.00", "max_output_tokens = 1000")
        .key_entry(
            "design",
            &format!("{{ sha256 = \"{}\", label = \"ci\" }}", digest(CI_KEY)),
        );
    let env = Env::start_with(
        rendering_at(Duration::from_millis(50), "0.12345678"),
        config,
    )
    .await;
    let api = env.api();

    // Two renders by the CI key, one by the team's other key, each polled to its end.
    for key in [CI_KEY, CI_KEY, DESIGN_KEY] {
        let task = api.start_task(key).await;
        let done = api.wait_for_final(key, &task).await;
        assert_eq!(done.task_status(), "success", "{}", done.text);
    }
    // And a text answer by the CI key, settled without a task.
    let chat = api
        .send(
            api.http
                .post(api.url("/api/v1/chat/completions"))
                .bearer_auth(CI_KEY)
                .json(&json!({"model": OPENAI, "max_tokens": 100,
                              "messages": [{"role": "user", "content": "ketchup?"}]})),
        )
        .await;
    assert_eq!(chat.status, 200, "{}", chat.text);
    let exchange = env.fake.text_exchanges().pop().expect("the text request");
    let text_cost = text_prices()
        .cost(exchange.input_tokens, exchange.output_tokens)
        .unwrap();
    assert!(text_cost > Credits::ZERO);

    let deadline = tokio::time::Instant::now() + DEADLINE;
    let usage = loop {
        let usage = api.admin("/admin/usage?team=design").await;
        let rows = usage["rows"].as_array().unwrap();
        if rows.len() == 3 && rows.iter().all(|row| row["unsettled"] == 0) {
            break usage;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled: {usage}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let render = "0.12345678".parse::<Credits>().unwrap();
    let spend: Vec<(&str, &str, u64, Credits)> = usage["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["key"].as_str().unwrap(),
                row["family"].as_str().unwrap(),
                row["tasks"].as_u64().unwrap(),
                amount(&row["credits"]),
            )
        })
        .collect();
    assert_eq!(
        spend,
        [
            ("ci", "image", 2, render.checked_add(render).unwrap()),
            ("ci", "text", 1, text_cost),
            ("design-test", "image", 1, render),
        ]
    );
    // The CSV names the key in the same place.
    let csv = api
        .send(
            api.http
                .get(api.url("/admin/usage?team=design"))
                .bearer_auth(ADMIN_TOKEN)
                .header("accept", "text/csv"),
        )
        .await;
    let lines: Vec<&str> = csv.text.lines().collect();
    assert_eq!(lines.len(), 4, "{}", csv.text);
    assert!(
        lines[3].contains(",design,design-test,image,google/gempix2,1,1,0,0,0.12345678"),
        "{}",
        csv.text
    );

    let scrape = api.scrape().await;
    let spent = "ketchup_gateway_credits_spent_total";
    let ci = render
        .checked_add(render)
        .and_then(|c| c.checked_add(text_cost))
        .unwrap();
    scrape.assert_close(
        spent,
        &[("team", "design"), ("key", "ci")],
        ci.as_f64_for_metrics(),
    );
    scrape.assert_close(
        spent,
        &[("team", "design"), ("key", "design-test")],
        render.as_f64_for_metrics(),
    );
    // Every configured key has its series from the start, the ones that spent nothing at zero.
    scrape.assert_eq(spent, &[("team", "ads"), ("key", "ads-test")], 0.0);
    assert_eq!(scrape.series(spent).len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reconciler_deletes_admin_actions_once_keep_audit_has_passed() {
    let config = GatewayConfig::new()
        .admin()
        .admin_lines(r#"keep_audit = "1s""#)
        .reconciler(r#"interval = "100ms""#);
    let env = Env::start_with(rendering_at(Duration::from_millis(100), "0.50"), config).await;
    let path = "/admin/reservations/0191c6f6-0000-7000-8000-000000000000/release";
    let refused = post_as(&env, path, ADMIN_TOKEN, "audit-kept-1").await;
    assert_eq!(refused.status, 409, "{}", refused.text);
    let listed = env.api().admin("/admin/audit").await;
    assert_eq!(
        listed["actions"][0]["request_id"], "audit-kept-1",
        "{listed}"
    );

    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let listed = env.api().admin("/admin/audit").await;
        if listed["actions"] == json!([]) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "kept: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.gateway
        .wait_for_log("admin actions past [admin] keep_audit deleted")
        .await;
}
