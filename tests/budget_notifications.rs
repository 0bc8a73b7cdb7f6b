//! Budget notifications through the real gateway: a team's spent plus reserved credits reaching
//! a percentage of its budget that `budget.notify_at` lists sends one signed notification to its
//! `notify_url` (a real receiver on loopback), once per threshold and period, whatever repeats,
//! restarts or replicas racing to send it.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ketchup_domain::clock::{ManualClock, SharedClock};
use ketchup_testkit::webhooks::{Receiver, verify};
use ketchup_testkit::{
    DESIGN_KEY, GEMPIX, Gateway, GatewayConfig, InProcess, fake_config, start_fake,
};
use serde_json::Value;

/// Long enough for several sweeps (every 200 ms) and the delivery worker's one-second poll:
/// anything sent twice would have been by then.
const QUIET: Duration = Duration::from_millis(1500);

/// Design notified at `notify_at` of a `budget` (its other keys, as written) at the receiver on
/// `port`, signing with its secret, allowed to send to loopback; quick retries and sweeps, and an
/// admin API.
fn notified(budget: &str, notify_at: &str, port: u16) -> GatewayConfig {
    GatewayConfig::new()
        .admin()
        .reconciler("interval = \"200ms\"")
        .webhooks("first_retry = \"200ms\"\nmax_retry_delay = \"400ms\"")
        .signed_webhooks("design")
        .callback_hosts("design", &["127.0.0.1"])
        .budget(
            "design",
            &format!("{{ {budget}, notify_at = {notify_at} }}"),
        )
        .team_lines(
            "design",
            &format!("notify_url = \"http://127.0.0.1:{port}/hook\""),
        )
}

/// Each delivery the receiver accepted, checked to be signed with design's secret, by its
/// threshold; two of one threshold fail the test.
fn by_threshold(receiver: &Receiver) -> BTreeMap<u64, Value> {
    let mut notices = BTreeMap::new();
    for (headers, body) in receiver.delivered() {
        verify(&headers, &body);
        let payload: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(payload["type"], "budget.threshold", "{payload}");
        let percent = payload["data"]["threshold_percent"].as_u64().unwrap();
        if let Some(before) = notices.insert(percent, payload.clone()) {
            panic!("{percent} % notified twice: {before} and {payload}");
        }
    }
    notices
}

async fn generate(gateway: &Gateway) -> u16 {
    gateway.api.generate(DESIGN_KEY, GEMPIX).await.status
}

fn month(at: DateTime<Utc>) -> String {
    at.format("%Y-%m").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_threshold_crossed_sends_one_signed_notification() {
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let fake = start_fake(fake_config()).await;
    let gateway = Gateway::start(
        &notified(
            r#"credits = "2.50", period = "monthly""#,
            "[50, 80]",
            listening.port,
        )
        .upstream_url(&fake.base_url()),
    );
    assert_eq!(gateway.api.metric(NOTIFIED_50).await, 0.0);

    // 0.50 each: 20 %, 40 %, then 60 % crosses 50.
    let started = Utc::now();
    for _ in 0..3 {
        assert_eq!(generate(&gateway).await, 200);
    }
    receiver
        .wait_for("the 50 % notification", |r| r.delivered().len() == 1)
        .await;
    // 80 % crosses 80; 100 % and a refused request past the budget cross nothing listed.
    assert_eq!(generate(&gateway).await, 200);
    assert_eq!(generate(&gateway).await, 200);
    assert_eq!(generate(&gateway).await, 402);
    receiver
        .wait_for("the 80 % notification", |r| r.delivered().len() == 2)
        .await;
    tokio::time::sleep(QUIET).await;

    let notices = by_threshold(&receiver);
    assert_eq!(receiver.seen().len(), 2, "nothing sent twice");
    assert_eq!(notices.keys().copied().collect::<Vec<_>>(), [50, 80]);
    let period = month(started);
    for (percent, reserved) in [(50, "1.50000000"), (80, "2.00000000")] {
        let data = &notices[&percent]["data"];
        assert_eq!(data["team"], "design");
        assert_eq!(data["period"], period.as_str());
        assert_eq!(data["budget"], "2.50000000");
        assert_eq!(data["spent"], "0.00000000", "nothing settled yet: {data}");
        assert_eq!(
            data["reserved"], reserved,
            "as the crossing reserved it: {data}"
        );
        let resets: DateTime<Utc> = data["resets_at"].as_str().unwrap().parse().unwrap();
        assert!(resets > started, "{data}");
        let sent: DateTime<Utc> = notices[&percent]["timestamp"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(sent >= started - chrono::Duration::seconds(1), "{data}");
    }

    // Admins see them as deliveries, named by their claim; the metric counts them.
    let delivered = gateway.api.admin("/admin/webhooks?state=delivered").await;
    let mut subjects: Vec<&str> = delivered["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["task_id"].as_str().unwrap())
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            format!("budget:design:{period}:50"),
            format!("budget:design:{period}:80")
        ]
    );
    assert_eq!(gateway.api.metric(NOTIFIED_50).await, 1.0);
    assert_eq!(
        gateway
            .api
            .metric(r#"ketchup_gateway_budget_notifications_total{team="design",threshold="80"}"#)
            .await,
        1.0
    );
}

const NOTIFIED_50: &str =
    r#"ketchup_gateway_budget_notifications_total{team="design",threshold="50"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_notify_again() {
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let fake = start_fake(fake_config()).await;
    let mut gateway = Gateway::start(
        &notified(
            r#"credits = "2.50", period = "monthly""#,
            "[50, 80]",
            listening.port,
        )
        .upstream_url(&fake.base_url()),
    );
    for _ in 0..3 {
        assert_eq!(generate(&gateway).await, 200);
    }
    receiver
        .wait_for("the 50 % notification", |r| r.delivered().len() == 1)
        .await;

    // Killed and started again, it sweeps over a standing past 50 %: claimed already.
    gateway.restart_after_kill();
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.seen().len(), 1, "not sent again after the restart");
    // The next threshold is still sent, once.
    assert_eq!(generate(&gateway).await, 200);
    receiver
        .wait_for("the 80 % notification", |r| r.delivered().len() == 2)
        .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        by_threshold(&receiver).keys().copied().collect::<Vec<_>>(),
        [50, 80]
    );
    assert_eq!(receiver.seen().len(), 2);
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().expect("timestamp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_period_notifies_again() {
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let fake = start_fake(fake_config()).await;
    let clock = ManualClock::new(at("2026-11-23T12:00:00Z"));
    let shared: SharedClock = clock.clone();
    let gateway = InProcess::start(
        &notified(
            r#"credits = "1.00", period = "daily""#,
            "[50]",
            listening.port,
        )
        .upstream_url(&fake.base_url()),
        shared,
    )
    .await;
    let generate = || async { gateway.api.generate(DESIGN_KEY, GEMPIX).await.status };

    // 50 %, then 100 %: one notification.
    assert_eq!(generate().await, 200);
    assert_eq!(generate().await, 200);
    receiver
        .wait_for("the first day's notification", |r| r.delivered().len() == 1)
        .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.seen().len(), 1);

    // The next day starts from nothing, and 50 % of it is notified again.
    clock.set(at("2026-11-24T00:00:30Z"));
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.seen().len(), 1, "a new day has spent nothing yet");
    assert_eq!(generate().await, 200);
    receiver
        .wait_for("the second day's notification", |r| {
            r.delivered().len() == 2
        })
        .await;
    tokio::time::sleep(QUIET).await;
    let periods: Vec<String> = receiver
        .delivered()
        .iter()
        .map(|(_, body)| {
            // Signed at the manual clock's time, which a verifier's tolerance for the sending
            // time would refuse; the other tests verify signatures.
            let payload: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(payload["data"]["threshold_percent"], 50, "{payload}");
            payload["data"]["period"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(periods, ["2026-11-23", "2026-11-24"]);
    assert_eq!(receiver.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_racing_across_a_threshold_send_one_notification() {
    let Some(url) = ketchup_test_redis::url() else {
        return;
    };
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let fake = start_fake(fake_config()).await;
    let prefix = format!("test-{}:", uuid::Uuid::now_v7().simple());
    let config = notified(
        r#"credits = "5.00", period = "lifetime""#,
        "[50]",
        listening.port,
    )
    .upstream_url(&fake.base_url())
    .redis(&url, &prefix)
    .store(r#"command_timeout = "2s""#);
    let (a, b) = (Gateway::start(&config), Gateway::start(&config));

    // Ten reservations of 0.50 at once, five through each replica: every one from the fifth on
    // sees 50 % reached, on either replica, and both replicas' sweeps see it too.
    let (from_a, from_b) = tokio::join!(
        a.api.generate_concurrently(DESIGN_KEY, GEMPIX, 5),
        b.api.generate_concurrently(DESIGN_KEY, GEMPIX, 5),
    );
    for reply in from_a.iter().chain(&from_b) {
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    receiver
        .wait_for("the notification", |r| r.delivered().len() == 1)
        .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.seen().len(), 1, "one notification between them");
    let notices = by_threshold(&receiver);
    assert_eq!(notices[&50]["data"]["period"], "lifetime");
    assert_eq!(notices[&50]["data"]["resets_at"], Value::Null);
    let queued = a.api.metric(NOTIFIED_50).await + b.api.metric(NOTIFIED_50).await;
    assert_eq!(queued, 1.0, "queued by one replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_url_the_ssrf_guard_refuses_is_dead_lettered_unsent() {
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let fake = start_fake(fake_config()).await;
    // Loopback, and no callback_hosts to allow it.
    let gateway = Gateway::start(
        &notified(
            r#"credits = "1.00", period = "monthly""#,
            "[50]",
            listening.port,
        )
        .callback_hosts("design", &[])
        .upstream_url(&fake.base_url()),
    );
    assert_eq!(generate(&gateway).await, 200);

    let deadline = std::time::Instant::now() + ketchup_testkit::DEADLINE;
    let dead = loop {
        let dead = gateway.api.admin("/admin/webhooks?state=dead").await;
        if dead["webhooks"].as_array().is_some_and(|d| !d.is_empty()) {
            break dead;
        }
        assert!(std::time::Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let delivery = &dead["webhooks"][0];
    let period = month(Utc::now());
    assert_eq!(delivery["task_id"], format!("budget:design:{period}:50"));
    let error = delivery["last_error"].as_str().unwrap();
    assert!(error.contains("loopback"), "{error}");
    tokio::time::sleep(QUIET).await;
    assert!(receiver.seen().is_empty(), "nothing reached the receiver");
}
