//! Several upstream accounts through the real binary: new generations go to the accounts in
//! rotation, a refused token fails over to the next account, a task is always read with the
//! token of the account that started it (after a restart, and from another replica too), the
//! balance floor takes an account out and back in, and a generation that may have reached the
//! upstream is never sent again with another account.

use std::time::Duration;

use ketchup_fake_upstream::{FakeAccount, FakeConfig, FakeHandle, Fault};
use ketchup_testkit::{
    DESIGN_KEY, Env, GEMPIX, Gateway, GatewayConfig, UPSTREAM_TOKEN, fake_config, start_fake,
    wait_until_final,
};
use serde_json::{Value, json};

const SPARE_TOKEN: &str = "dk-spare-account-0123456789abcdef";

/// The gateway's accounts: `main` is the fake's default account, `spare` its account `spare`.
const ACCOUNTS: [(&str, &str); 2] = [("main", UPSTREAM_TOKEN), ("spare", SPARE_TOKEN)];

/// The fake's name of each gateway account.
fn fake_name(account: &str) -> &'static str {
    match account {
        "main" => "default",
        "spare" => "spare",
        other => panic!("no account {other}"),
    }
}

/// [`fake_config`] with the account `spare` holding `balance`.
fn two_account_fake(balance: &str) -> FakeConfig {
    let mut fake = fake_config();
    fake.accounts.push(FakeAccount {
        name: "spare".into(),
        token: SPARE_TOKEN.into(),
        initial_balance: balance.parse().expect("amount"),
    });
    fake
}

fn two_accounts() -> GatewayConfig {
    GatewayConfig::new().admin().upstream_accounts(&ACCOUNTS)
}

/// Which of the fake's accounts created `task`.
fn creator(fake: &FakeHandle, task: &str) -> String {
    fake.stats().tasks[task].account.clone()
}

/// Reads each of `tasks` through `gateway` and checks that the fake answered each read with
/// the token of the account that created it: every read reached the task, none another account.
async fn read_each_with_its_own_token(fake: &FakeHandle, gateway: &Gateway, tasks: &[String]) {
    for task in tasks {
        let before = fake.stats().queries_by_task.get(task).copied().unwrap_or(0);
        let reply = gateway.api.query(DESIGN_KEY, task).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.json()["data"]["task_id"], task.as_str());
        let after = fake.stats().queries_by_task.get(task).copied().unwrap_or(0);
        assert!(
            after > before,
            "{task} was not read upstream with its own token"
        );
    }
    assert_eq!(
        fake.stats().foreign_queries,
        0,
        "a task read with another account's token"
    );
}

async fn account_view(gateway: &Gateway, name: &str) -> Value {
    let accounts = gateway.api.admin("/admin/upstream").await;
    accounts["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .find(|account| account["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no account {name}: {accounts}"))
}

/// Waits until `/admin/upstream` shows account `name` as `check` holds.
async fn wait_for_account(gateway: &Gateway, name: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + ketchup_testkit::DEADLINE;
    loop {
        let view = account_view(gateway, name).await;
        if check(&view) {
            return view;
        }
        assert!(std::time::Instant::now() < deadline, "{name} stays {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_revoked_account_fails_over_and_its_tasks_keep_their_own_token_across_a_restart() {
    let mut env = Env::start_with(two_account_fake("50.00"), two_accounts()).await;
    let first = env.api().start_task(DESIGN_KEY).await;
    let second = env.api().start_task(DESIGN_KEY).await;
    // Round robin: one each.
    assert_eq!(creator(&env.fake, &first), "default");
    assert_eq!(creator(&env.fake, &second), "spare");

    env.fake.revoke("default");
    // The next in turn is main: refused, so the same generation goes to spare, charged once.
    let third = env.api().start_task(DESIGN_KEY).await;
    assert_eq!(creator(&env.fake, &third), "spare");
    let stats = env.fake.stats();
    assert_eq!((stats.generate_requests, stats.generate_accepted), (4, 3));
    assert_eq!(stats.unauthorized, 1);
    // Out of rotation: the next generations go to spare without trying main.
    let fourth = env.api().start_task(DESIGN_KEY).await;
    assert_eq!(creator(&env.fake, &fourth), "spare");
    assert_eq!(env.fake.stats().generate_requests, 5);
    let main = account_view(&env.gateway, "main").await;
    assert_eq!(main["in_rotation"], false, "{main}");
    assert_eq!(main["out_reason"], "unauthorized", "{main}");
    assert!(!main.to_string().contains(UPSTREAM_TOKEN));
    env.gateway
        .wait_for_log("upstream account out of rotation")
        .await;
    assert!(!env.gateway.logs().contains(UPSTREAM_TOKEN));
    assert!(!env.gateway.logs().contains(SPARE_TOKEN));
    let scrape = env.api().scrape().await;
    let out = |account: &str, reason: &str| {
        scrape.get(
            "ketchup_gateway_upstream_account_out_of_rotation",
            &[("account", account), ("reason", reason)],
        )
    };
    assert_eq!(out("main", "unauthorized"), 1.0);
    assert_eq!(out("spare", "unauthorized"), 0.0);
    assert_eq!(
        scrape.get(
            "ketchup_gateway_upstream_account_removals_total",
            &[("account", "main"), ("reason", "unauthorized")]
        ),
        1.0
    );
    assert_eq!(
        scrape.get("ketchup_gateway_upstream_accounts_in_rotation", &[]),
        1.0
    );

    // main's task can be read with main's token only: while the upstream refuses it, the team
    // hears that, not that its own key is wrong.
    let refused = env.api().query(DESIGN_KEY, &first).await;
    let (status, body) = refused.status_json();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["message"], "upstream account unavailable", "{body}");
    assert_eq!(env.fake.stats().foreign_queries, 0);

    // main's own task is read with main's token, whatever its rotation (the upstream takes the
    // token again here), spare's with spare's.
    env.fake.restore("default");
    let tasks = [first, second, third, fourth];
    read_each_with_its_own_token(&env.fake, &env.gateway, &tasks).await;

    // After a restart the ledger says which account started each task.
    env.gateway.restart_after_kill();
    read_each_with_its_own_token(&env.fake, &env.gateway, &tasks).await;
    wait_until_final(&env.fake, &tasks).await;
    for task in &tasks {
        let reply = env.api().wait_for_final(DESIGN_KEY, task).await;
        assert_eq!(reply.task_status(), "success", "{}", reply.text);
    }
    assert_eq!(env.fake.stats().foreign_queries, 0);
}

#[tokio::test]
async fn with_every_account_out_a_generation_gets_a_503_and_nothing_is_sent() {
    let env = Env::start_with(two_account_fake("50.00"), two_accounts()).await;
    env.fake.revoke("default");
    env.fake.revoke("spare");
    let refused = env.api().generate(DESIGN_KEY, GEMPIX).await;
    let (status, body) = refused.status_json();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], 1);
    assert_eq!(body["message"], "upstream account unavailable");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("no upstream account"),
        "{body}"
    );
    // Each account was asked once, and refused.
    assert_eq!(env.fake.stats().generate_requests, 2);
    // From now on nothing is sent at all.
    let again = env.api().generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(again.status, 503, "{}", again.text);
    assert_eq!(env.fake.stats().generate_requests, 2);
    assert_eq!(env.fake.stats().generate_accepted, 0);
    // Nothing stays reserved.
    let reserved = env.api().admin("/admin/reservations?state=reserved").await;
    assert_eq!(reserved["reservations"], json!([]), "{reserved}");
}

#[tokio::test]
async fn a_5xx_or_a_timeout_on_a_generation_does_not_fail_over() {
    let config = two_accounts().upstream("timeout = \"1s\"\nquery_retries = 0");
    let env = Env::start_with(two_account_fake("50.00"), config).await;
    env.fake.faults().inject_generate(Fault::Status500, 1);
    let failed = env.api().generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(failed.status, 500, "{}", failed.text);
    assert_eq!(
        env.fake.stats().generate_requests,
        1,
        "sent again with another account"
    );

    // The task starts upstream, then the answer is too late: it may be charged, so it is not
    // sent again with the other account.
    env.fake
        .faults()
        .inject_generate(Fault::Slow(Duration::from_secs(3)), 1);
    let late = env.api().generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(late.status, 504, "{}", late.text);
    let stats = env.fake.stats();
    assert_eq!((stats.generate_requests, stats.generate_accepted), (2, 1));
    assert_eq!(stats.unauthorized, 0);
    for name in ["main", "spare"] {
        let view = account_view(&env.gateway, name).await;
        assert_eq!(view["in_rotation"], true, "{view}");
    }
}

#[tokio::test]
async fn an_account_at_the_floor_leaves_rotation_and_returns_after_a_top_up() {
    let config = two_accounts().upstream("balance_check = \"1s\"\nbalance_floor = \"5.00\"");
    let env = Env::start_with(two_account_fake("5.00"), config).await;
    let spare = wait_for_account(&env.gateway, "spare", |view| view["state"] == "ok").await;
    assert_eq!(spare["in_rotation"], false, "{spare}");
    assert_eq!(spare["out_reason"], "below_floor", "{spare}");
    assert_eq!(spare["credit"], "5.00000000");
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let task = env.api().start_task(DESIGN_KEY).await;
        assert_eq!(creator(&env.fake, &task), "default");
        tasks.push(task);
    }
    let scrape = env.api().scrape().await;
    assert_eq!(
        scrape.get(
            "ketchup_gateway_upstream_account_out_of_rotation",
            &[("account", "spare"), ("reason", "below_floor")]
        ),
        1.0
    );

    env.fake.top_up("spare", "10.00".parse().unwrap());
    wait_for_account(&env.gateway, "spare", |view| view["in_rotation"] == true).await;
    env.gateway
        .wait_for_log("upstream account back in rotation")
        .await;
    let mut creators = Vec::new();
    for _ in 0..2 {
        let task = env.api().start_task(DESIGN_KEY).await;
        creators.push(creator(&env.fake, &task));
        tasks.push(task);
    }
    creators.sort();
    assert_eq!(creators, ["default", "spare"]);

    // After the run, each account's credit metric is what the fake says it has left.
    wait_until_final(&env.fake, &tasks).await;
    let balances = env.fake.stats().accounts;
    for (name, _) in ACCOUNTS {
        let balance = balances[fake_name(name)].balance.clone();
        let view = wait_for_account(&env.gateway, name, |view| {
            view["credit"] == balance.as_str()
        })
        .await;
        assert_eq!(view["in_rotation"], true, "{view}");
        let metric = env
            .api()
            .scrape()
            .await
            .get("ketchup_gateway_upstream_credit", &[("account", name)]);
        assert_eq!(metric, balance.parse::<f64>().unwrap(), "{name}");
    }
    assert!(balances["spare"].spent != "0.00000000", "{balances:?}");
    assert_eq!(env.fake.stats().foreign_queries, 0);
}

#[tokio::test]
async fn replicas_on_one_redis_read_each_task_with_the_account_that_started_it() {
    let Some(url) = ketchup_test_redis::url() else {
        return;
    };
    let prefix = format!("test-{}:", uuid::Uuid::now_v7().simple());
    let fake = start_fake(two_account_fake("50.00")).await;
    let config = two_accounts()
        .upstream_url(&fake.base_url())
        .redis(&url, &prefix);
    let first = Gateway::start(&config);
    let second = Gateway::start(&config);
    let mut tasks = Vec::new();
    for _ in 0..2 {
        tasks.push(first.api.start_task(DESIGN_KEY).await);
    }
    let mut creators: Vec<String> = tasks.iter().map(|task| creator(&fake, task)).collect();
    creators.sort();
    assert_eq!(creators, ["default", "spare"]);
    // The other replica never saw these tasks start: the ledger tells it each one's account.
    read_each_with_its_own_token(&fake, &second, &tasks).await;
    wait_until_final(&fake, &tasks).await;
    for task in &tasks {
        let reply = second.api.wait_for_final(DESIGN_KEY, task).await;
        assert_eq!(reply.task_status(), "success", "{}", reply.text);
    }
    assert_eq!(fake.stats().foreign_queries, 0);
}
