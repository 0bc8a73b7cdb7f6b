//! What a platform team uses to run the gateway for months, through the real binary: keys with a
//! validity window, the models each team may use, and the upstream account's balance.

use chrono::{Duration, SecondsFormat, Utc};
use ketchup_fake_upstream::FakeConfig;
use ketchup_testkit::{
    ADS_KEY, DESIGN_KEY, Env, GEMPIX, GatewayConfig, digest, fake_config, rendering_at, wait_until,
};
use serde_json::json;

const EXPIRED_KEY: &str = "kgw_design_expired_key_000000000";
const EARLY_KEY: &str = "kgw_design_early_key_00000000000";
const CONTRACTOR_KEY: &str = "kgw_design_contractor_key_000000";

const GEMINI: &str = r#"{"model":"google/gemini-2.5-flash-image","prompt":"a tomato"}"#;

/// `now` moved by `by`, as a key's window is written.
fn instant(by: Duration) -> String {
    (Utc::now() + by).to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[tokio::test]
async fn a_key_opens_the_gateway_only_inside_its_window() {
    let contractor_ends = Utc::now() + Duration::days(7);
    let config = GatewayConfig::new()
        .key_entry(
            "design",
            &format!(
                "{{ sha256 = \"{}\", label = \"expired\", expires_at = \"{}\" }}",
                digest(EXPIRED_KEY),
                instant(Duration::hours(-1))
            ),
        )
        .key_entry(
            "design",
            &format!(
                "{{ sha256 = \"{}\", label = \"early\", not_before = \"{}\" }}",
                digest(EARLY_KEY),
                instant(Duration::hours(1))
            ),
        )
        .key_entry(
            "design",
            &format!(
                "{{ sha256 = \"{}\", label = \"contractor\", not_before = \"{}\", expires_at = \"{}\" }}",
                digest(CONTRACTOR_KEY),
                instant(Duration::hours(-1)),
                contractor_ends.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
        );
    let env = Env::start_with(fake_config(), config).await;
    let api = env.api();

    // Outside its window a key is refused as an unknown one is, before anything else happens.
    for key in [EXPIRED_KEY, EARLY_KEY] {
        let reply = api.generate(key, GEMPIX).await;
        assert_eq!(
            reply.status_json(),
            (401, json!({"code": 1, "message": "Invalid API key"})),
            "{key}"
        );
        let reply = api.get("/api/user", Some(key)).await;
        assert_eq!(reply.status, 401, "{key}: {}", reply.text);
    }
    assert_eq!(env.fake.stats().generate_requests, 0);

    // Inside it, the key is the team's like any other.
    let task = api.start_task(CONTRACTOR_KEY).await;
    let reply = api.query(DESIGN_KEY, &task).await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    let scrape = api.scrape().await;
    let refusals = "ketchup_gateway_key_refusals_total";
    scrape.assert_eq(
        refusals,
        &[
            ("team", "design"),
            ("key", "expired"),
            ("reason", "expired"),
        ],
        2.0,
    );
    scrape.assert_eq(
        refusals,
        &[
            ("team", "design"),
            ("key", "early"),
            ("reason", "not_yet_valid"),
        ],
        2.0,
    );
    let expiry = "ketchup_gateway_key_expiry_timestamp_seconds";
    scrape.assert_eq(
        expiry,
        &[("team", "design"), ("key", "contractor")],
        contractor_ends.timestamp() as f64,
    );
    assert_eq!(
        scrape.series(expiry).len(),
        2,
        "only keys with an expires_at"
    );
    let last_used = "ketchup_gateway_key_last_used_timestamp_seconds";
    let contractor_used = scrape.get(last_used, &[("team", "design"), ("key", "contractor")]);
    assert!(
        (contractor_used - Utc::now().timestamp() as f64).abs() < 120.0,
        "{contractor_used}"
    );
    // A refused key was not used; a key nobody presented has no series.
    assert_eq!(scrape.find(last_used, &[("key", "expired")]), None);
    assert_eq!(scrape.find(last_used, &[("team", "ads")]), None);
}

#[tokio::test]
async fn a_model_outside_the_team_allow_list_is_refused_and_reserves_nothing() {
    let config = GatewayConfig::new()
        .admin()
        .text_model("openai/gpt-5.2", "2.00", "10.00", "")
        .team_lines("design", r#"models = ["google/gempix*"]"#);
    let env = Env::start_with(fake_config(), config).await;
    let api = env.api();

    let reply = api.generate(DESIGN_KEY, GEMINI).await;
    assert_eq!(
        reply.status_json(),
        (
            403,
            json!({
                "code": 1,
                "message": "model not allowed",
                "detail": "team 'design' may use google/gempix*"
            })
        )
    );
    assert_eq!(env.fake.stats().generate_requests, 0);
    let budget = api.budget(DESIGN_KEY).await;
    assert_eq!(budget["reserved"], "0.00000000", "{budget}");
    assert_eq!(budget["in_flight"], 0, "{budget}");
    // A text model is held to the same list.
    let chat = json!({"model": "openai/gpt-5.2", "messages": [{"role": "user", "content": "hi"}]});
    let reply = api
        .send(
            api.http
                .post(env.gateway.url("/api/v1/chat/completions"))
                .bearer_auth(DESIGN_KEY)
                .json(&chat),
        )
        .await;
    assert_eq!(reply.status, 403, "{}", reply.text);
    assert_eq!(reply.json()["message"], "model not allowed");
    assert_eq!(env.fake.stats().text_requests, 0);
    let budget = api.budget(DESIGN_KEY).await;
    assert_eq!(budget["reserved"], "0.00000000", "{budget}");
    api.scrape().await.assert_eq(
        "ketchup_gateway_budget_rejections_total",
        &[("team", "design"), ("reason", "model_not_allowed")],
        2.0,
    );

    // What the globs match is served; a team without a list may use every configured model.
    api.start_task(DESIGN_KEY).await;
    let reply = api.generate(ADS_KEY, GEMINI).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(env.fake.stats().generate_accepted, 2);
}

/// The fake's `/api/user` balance as the gateway exports it.
const CREDIT: &str = "ketchup_gateway_upstream_credit";

#[tokio::test]
async fn the_account_balance_is_watched_for_admins_and_never_shown_to_a_team() {
    let config = GatewayConfig::new()
        .admin()
        .upstream("balance_check = \"1s\"");
    let fake = rendering_at(std::time::Duration::from_millis(50), "0.40");
    let env = Env::start_with(fake, config).await;
    let api = env.api();
    let account = [("account", "default")];

    let first = wait_for_credit(&env, "100.50000000").await;
    assert_eq!(first["name"], "default");
    assert_eq!(first["state"], "ok");
    assert_eq!(first["last_error"], json!(null));
    assert!(first["checked_at"].is_string(), "{first}");

    // A task the upstream charges 0.40 lowers the account; the next check sees it.
    let task = api.start_task(DESIGN_KEY).await;
    api.wait_for_final(DESIGN_KEY, &task).await;
    wait_for_credit(&env, "100.10000000").await;
    let scrape = api.scrape().await;
    scrape.assert_close(CREDIT, &account, 100.1);
    scrape.assert_close(
        "ketchup_gateway_upstream_credit_consumed_total",
        &account,
        0.4,
    );
    assert!(
        scrape.get(
            "ketchup_gateway_upstream_balance_checks_total",
            &[("account", "default"), ("outcome", "ok")]
        ) >= 2.0
    );

    // A team's /api/user is its own budget: the account's credit is an admin's.
    let user = api.get("/api/user", Some(ADS_KEY)).await;
    assert_eq!(
        user.json(),
        json!({"code": 0, "message": "ok", "data": {"credit": null}})
    );
    let refused = api.get("/admin/upstream", Some(DESIGN_KEY)).await;
    assert_eq!(refused.status, 401, "{}", refused.text);
}

#[tokio::test]
async fn a_token_the_upstream_refuses_shows_as_unauthorized() {
    let config = GatewayConfig::new()
        .admin()
        .upstream("balance_check = \"1s\"");
    let env = Env::start_with(FakeConfig::new("a-token-the-gateway-does-not-have"), config).await;
    let api = env.api();
    wait_until("the balance check to be refused", || {
        env.fake.stats().unauthorized >= 1
    })
    .await;
    env.gateway
        .wait_for_log("the upstream refused the account's token")
        .await;
    let accounts = api.admin("/admin/upstream").await;
    let account = &accounts["accounts"][0];
    assert_eq!(account["state"], "unauthorized", "{accounts}");
    assert_eq!(account["credit"], json!(null));
    assert!(
        !accounts
            .to_string()
            .contains(ketchup_testkit::UPSTREAM_TOKEN),
        "{accounts}"
    );
    let scrape = api.scrape().await;
    let refusals = scrape.get(
        "ketchup_gateway_upstream_balance_checks_total",
        &[("account", "default"), ("outcome", "unauthorized")],
    );
    assert!(refusals >= 1.0, "{refusals}");
    assert_eq!(scrape.find(CREDIT, &[("account", "default")]), None);
}

/// Waits until `/admin/upstream` shows the default account at `credit`; returns its entry.
async fn wait_for_credit(env: &Env, credit: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + ketchup_testkit::DEADLINE;
    loop {
        let accounts = env.api().admin("/admin/upstream").await;
        let account = accounts["accounts"][0].clone();
        if account["credit"] == credit {
            return account;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the account never showed {credit}: {accounts}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
