//! Credit budgets (issue 3), end to end: reservations before the upstream call, settlement at
//! `consumed` exactly once, the reconciler, the budget and admin APIs, and period rollover.
//!
//! Most tests run the real binary in front of the fake upstream; the malformed-`consumed` test
//! uses a tiny stub upstream, and the rollover tests run the gateway in-process on a manual clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use axum::response::IntoResponse;
use chrono::{DateTime, NaiveDate, Utc};
use ketchup_domain::clock::{ManualClock, SharedClock};
use ketchup_domain::credits::Credits;
use ketchup_fake_upstream::{FakeHandle, Fault, TaskStatus};
use ketchup_testkit::api::statuses;
use ketchup_testkit::{
    ADMIN_TOKEN, ADS_KEY, DEADLINE, DESIGN_KEY, GEMPIX, Gateway, GatewayConfig, InProcess, Reply,
    fake_config, free_port, rendering_at, until_a_generation_reached, upstream_reads, wait_until,
    wait_until_final,
};
use serde_json::{Value, json};

const GEMPIX_FAILS: &str = r#"{"model":"google/gempix2","prompt":"a tomato [fail]"}"#;
const INVALID_KEY: &str = r#"{"code":1,"message":"Invalid API key"}"#;
const ZERO: &str = "0.00000000";

/// A fake whose tasks finish within 300 ms and whose `google/gempix2` images each consume
/// `consumed` credits.
async fn start_fake(consumed: &str) -> FakeHandle {
    start_fake_with(consumed, Duration::from_millis(100)).await
}

async fn start_fake_with(consumed: &str, phase: Duration) -> FakeHandle {
    ketchup_testkit::start_fake(rendering_at(phase, consumed)).await
}

/// The base config, in front of `upstream`. Rate limits are high enough never to answer 429
/// themselves; without a `[reconciler]` table its defaults (settle_after 30 s, far longer than
/// any test waits) keep it out of the way.
fn config(upstream: &str) -> GatewayConfig {
    GatewayConfig::new().upstream_url(upstream)
}

fn assert_content_type_json(reply: &Reply) {
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json"),
        "{}",
        reply.text
    );
}

// ---------------------------------------------------------------------------------------------
// Expected values
// ---------------------------------------------------------------------------------------------

fn budget_exhausted(detail: &str) -> Value {
    json!({"code": 1, "message": "budget exhausted", "detail": detail})
}

fn too_many_in_flight(team: &str, in_flight: u32) -> Value {
    json!({
        "code": 1,
        "message": "too many tasks in flight",
        "detail": format!(
            "team '{team}' has {in_flight} unfinished tasks, the most it may have at once; \
             retry when one finishes"
        ),
    })
}

/// `amount` × `times`, as the API writes amounts (eight decimals).
fn times(amount: &str, times: i64) -> String {
    amount
        .parse::<Credits>()
        .expect("amount")
        .checked_mul(times)
        .expect("no overflow")
        .format_places(8)
}

/// The budget object of `design` with a lifetime budget.
fn lifetime_budget(
    credits: &str,
    spent: &str,
    reserved: &str,
    remaining: &str,
    in_flight: u64,
    max_in_flight: Option<u64>,
) -> Value {
    json!({
        "team": "design",
        "period": "lifetime",
        "period_key": "lifetime",
        "credits": credits,
        "spent": spent,
        "reserved": reserved,
        "remaining": remaining,
        "in_flight": in_flight,
        "max_in_flight": max_in_flight,
        "resets_at": null,
    })
}

/// The budget object of a team without a budget.
fn unbudgeted(team: &str, spent: &str, reserved: &str, in_flight: u64) -> Value {
    json!({
        "team": team,
        "period": "lifetime",
        "period_key": "lifetime",
        "credits": null,
        "spent": spent,
        "reserved": reserved,
        "remaining": null,
        "in_flight": in_flight,
        "max_in_flight": null,
        "resets_at": null,
    })
}

/// Tests that name today's date wait out the last seconds of a UTC day, so that the date cannot
/// change while they run.
async fn avoid_midnight() -> NaiveDate {
    let now = Utc::now();
    let tomorrow = now.date_naive().succ_opt().expect("a tomorrow");
    let midnight = tomorrow.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let left = (midnight - now).to_std().unwrap_or_default();
    if left < Duration::from_secs(90) {
        tokio::time::sleep(left + Duration::from_secs(1)).await;
    }
    Utc::now().date_naive()
}

fn rfc3339_midnight(day: NaiveDate) -> String {
    format!("{}T00:00:00Z", day.format("%Y-%m-%d"))
}

// ---------------------------------------------------------------------------------------------
// 1. Concurrency: the budget admits exactly what it covers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_generations_get_exactly_the_ten_the_budget_covers() {
    let fake = start_fake("0.50").await;
    let gateway = Gateway::start(
        &config(&fake.base_url()).budget("design", r#"{ credits = "5.00", period = "lifetime" }"#),
    );

    let replies = gateway
        .api
        .generate_concurrently(DESIGN_KEY, GEMPIX, 200)
        .await;
    let counts = statuses(&replies);
    assert_eq!(
        counts,
        HashMap::from([(200, 10), (402, 190)]),
        "statuses of 200 concurrent generations"
    );

    let exhausted = budget_exhausted(
        "team 'design' has 0.00 of 5.00 credits left in total; this request needs 0.50",
    );
    for reply in replies.iter().filter(|r| r.status == 402) {
        assert_eq!(reply.json(), exhausted);
        assert_content_type_json(reply);
    }

    // Each success saw the budget as its own reservation left it: every step from 4.50 to 0.00
    // exactly once. A lifetime budget never resets, so there is no reset header.
    let accepted: Vec<&Reply> = replies.iter().filter(|r| r.status == 200).collect();
    let mut remaining: Vec<String> = accepted
        .iter()
        .map(|r| r.header("x-budget-remaining").expect("X-Budget-Remaining"))
        .collect();
    remaining.sort();
    let expected: Vec<String> = (0..10).map(|i| times("0.50", i)).collect();
    assert_eq!(remaining, expected);
    for reply in &accepted {
        assert_eq!(reply.header("x-budget-reset"), None, "lifetime budget");
    }
    let mut task_ids: Vec<String> = accepted.iter().map(|r| r.task_id()).collect();
    task_ids.sort();
    task_ids.dedup();
    assert_eq!(task_ids.len(), 10, "ten distinct tasks");

    let stats = fake.stats();
    assert_eq!(
        stats.generate_requests, 10,
        "only the reserved ones reach the upstream"
    );
    assert_eq!(stats.generate_accepted, 10);

    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", ZERO, "5.00000000", ZERO, 10, None)
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Settlement at `consumed`, and usage that agrees
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn polled_tasks_settle_at_what_they_consumed_and_usage_agrees() {
    let today = avoid_midnight().await;
    let fake = start_fake("0.37").await;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
            .admin(),
    );

    let replies = gateway
        .api
        .generate_concurrently(DESIGN_KEY, GEMPIX, 10)
        .await;
    assert_eq!(statuses(&replies), HashMap::from([(200, 10)]));
    let tasks: Vec<String> = replies.iter().map(Reply::task_id).collect();
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", ZERO, "5.00000000", ZERO, 10, None)
    );

    wait_until_final(&fake, &tasks).await;
    for task in &tasks {
        let reply = gateway.api.query(DESIGN_KEY, task).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let body = reply.json();
        assert_eq!(body["data"]["status"], "success", "{body}");
        assert_eq!(body["data"]["consumed"], "0.37000000", "{body}");
    }

    // 10 × 0.37, not 10 × 0.50: each reservation was replaced by what its task consumed.
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", "3.70000000", ZERO, "1.30000000", 0, None)
    );

    let day = today.format("%Y-%m-%d").to_string();
    let from = day.clone();
    let to = today.succ_opt().unwrap().format("%Y-%m-%d").to_string();
    let row = json!({
        "day": day,
        "team": "design",
        "key": "design-test",
        "family": "image",
        "model": "google/gempix2",
        "tasks": 10,
        "succeeded": 10,
        "failed": 0,
        "unsettled": 0,
        "credits": "3.70000000",
    });
    let usage = json!({"from": from, "to": to, "rows": [row]});
    assert_eq!(
        gateway
            .api
            .admin(&format!("/admin/usage?team=design&from={from}&to={to}"))
            .await,
        usage
    );
    // Without `team`, every team: ads has no tasks, so no row.
    assert_eq!(
        gateway
            .api
            .admin(&format!("/admin/usage?from={from}&to={to}"))
            .await,
        usage
    );
    // A range that ends where the tasks' day starts holds nothing.
    let yesterday = today.pred_opt().unwrap().format("%Y-%m-%d").to_string();
    assert_eq!(
        gateway
            .api
            .admin(&format!(
                "/admin/usage?team=design&from={yesterday}&to={from}"
            ))
            .await,
        json!({"from": yesterday, "to": from, "rows": []})
    );
    // The same rows as CSV.
    let csv = gateway
        .api
        .send(
            gateway
                .api
                .http
                .get(format!(
                    "{}/admin/usage?team=design&from={from}&to={to}",
                    gateway.api.base
                ))
                .bearer_auth(ADMIN_TOKEN)
                .header("accept", "text/csv"),
        )
        .await;
    assert_eq!(csv.status, 200, "{}", csv.text);
    let content_type = csv.header("content-type").unwrap_or_default();
    assert_eq!(
        content_type.split(';').next().map(str::trim),
        Some("text/csv"),
        "{content_type}"
    );
    assert_eq!(
        csv.text.lines().collect::<Vec<_>>(),
        vec![
            "day,team,key,family,model,tasks,succeeded,failed,unsettled,credits".to_owned(),
            format!("{day},design,design-test,image,google/gempix2,10,10,0,0,3.70000000"),
        ]
    );

    // What is left (1.30) is what the next requests can reserve.
    let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.header("x-budget-remaining").as_deref(),
        Some("0.80000000")
    );
    let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.header("x-budget-remaining").as_deref(),
        Some("0.30000000")
    );
    let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 402, "{}", reply.text);
    assert_eq!(
        reply.json(),
        budget_exhausted(
            "team 'design' has 0.30 of 5.00 credits left in total; this request needs 0.50"
        )
    );
    // `n` images reserve n × the model's reserve.
    let reply = gateway
        .api
        .generate(
            DESIGN_KEY,
            r#"{"model":"google/gempix2","prompt":"a tomato","n":2}"#,
        )
        .await;
    assert_eq!(reply.status, 402, "{}", reply.text);
    assert_eq!(
        reply.json(),
        budget_exhausted(
            "team 'design' has 0.30 of 5.00 credits left in total; this request needs 1.00"
        )
    );
    // The cheaper model still fits (0.25 of 0.30).
    let reply = gateway
        .api
        .generate(
            DESIGN_KEY,
            r#"{"model":"google/gemini-2.5-flash-image","prompt":"a tomato"}"#,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.header("x-budget-remaining").as_deref(),
        Some("0.05000000")
    );
    assert_eq!(fake.stats().generate_requests, 13);
}

// ---------------------------------------------------------------------------------------------
// 3. Upstream refusals release the reservation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_refusal_releases_the_reservation() {
    let fake = start_fake("0.50").await;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
            .admin(),
    );
    let untouched = lifetime_budget("5.00000000", ZERO, ZERO, "5.00000000", 0, None);

    // A 500 is passed through (a generation is never retried once sent).
    fake.faults().inject_generate(Fault::Status500, 1);
    let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 500, "{}", reply.text);
    assert_eq!(
        reply.json(),
        json!({"code": 1, "message": "internal server error"})
    );
    assert_eq!(reply.header("x-budget-remaining"), None);
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        untouched,
        "after a 500"
    );

    // A 400 the gateway does not check itself (the fake allows n up to 4): 5 × 0.50 reserved,
    // then released.
    let reply = gateway
        .api
        .generate(
            DESIGN_KEY,
            r#"{"model":"google/gempix2","prompt":"a tomato","n":5}"#,
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(
        reply.json(),
        json!({"code": 1, "message": "failed", "detail": "n must be an integer from 1 to 4"})
    );
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        untouched,
        "after a 400"
    );

    let stats = fake.stats();
    assert_eq!(stats.generate_requests, 2);
    assert_eq!(stats.generate_accepted, 0);
    assert_eq!(
        gateway
            .api
            .admin("/admin/reservations?state=unknown_outcome")
            .await,
        json!({"reservations": []}),
        "a refusal is not an unknown outcome"
    );

    // Nothing leaked: the whole budget is still there.
    let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.header("x-budget-remaining").as_deref(),
        Some("4.50000000")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_releases_the_reservation() {
    let gateway = Gateway::start(
        &config(&format!("http://127.0.0.1:{}", free_port()))
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#),
    );
    let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert_eq!(reply.json()["code"], 1, "{}", reply.text);
    assert_eq!(
        reply.json()["message"],
        "upstream unavailable",
        "{}",
        reply.text
    );
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", ZERO, ZERO, "5.00000000", 0, None)
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Many pollers, one settlement
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pollers_of_a_finished_task_settle_it_once() {
    let fake = start_fake("0.37").await;
    let gateway = Gateway::start(
        &config(&fake.base_url()).budget("design", r#"{ credits = "5.00", period = "lifetime" }"#),
    );
    let task = gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    wait_until_final(&fake, std::slice::from_ref(&task)).await;

    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let api = gateway.api.clone();
        let task = task.clone();
        set.spawn(async move { api.query(DESIGN_KEY, &task).await });
    }
    while let Some(reply) = set.join_next().await {
        let reply = reply.expect("request task");
        assert_eq!(reply.status, 200, "{}", reply.text);
        let body = reply.json();
        assert_eq!(body["data"]["status"], "success", "{body}");
        assert_eq!(body["data"]["consumed"], "0.37000000", "{body}");
    }

    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", "0.37000000", ZERO, "4.63000000", 0, None)
    );
    // Later reads change nothing either.
    let reply = gateway.api.query(DESIGN_KEY, &task).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", "0.37000000", ZERO, "4.63000000", 0, None)
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The reconciler settles what nobody polls
// ---------------------------------------------------------------------------------------------

const FAST_RECONCILER: &str = r#"interval = "100ms"
settle_after = "1s"
max_reads_per_second = 50"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_reconciler_settles_tasks_nobody_polls() {
    let today = avoid_midnight().await;
    let fake = start_fake("0.37").await;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
            .reconciler(FAST_RECONCILER)
            .admin(),
    );
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id());
    }
    tasks.push(
        gateway
            .api
            .generate(DESIGN_KEY, GEMPIX_FAILS)
            .await
            .task_id(),
    );

    let settled = gateway
        .api
        .wait_for_budget(DESIGN_KEY, "the reconciler to settle all five tasks", |b| {
            b["reserved"] == ZERO && b["in_flight"] == 0
        })
        .await;
    // Four successes at 0.37, one failure at zero.
    assert_eq!(
        settled,
        lifetime_budget("5.00000000", "1.48000000", ZERO, "3.52000000", 0, None)
    );

    let stats = fake.stats();
    for task in &tasks {
        let reads = stats.queries_by_task.get(task).copied().unwrap_or(0);
        assert!(reads >= 1, "task {task} was never read upstream: {stats:?}");
    }

    let from = today.format("%Y-%m-%d").to_string();
    let to = today.succ_opt().unwrap().format("%Y-%m-%d").to_string();
    assert_eq!(
        gateway
            .api
            .admin(&format!("/admin/usage?team=design&from={from}&to={to}"))
            .await,
        json!({"from": from, "to": to, "rows": [{
            "day": from,
            "team": "design",
            "key": "design-test",
            "family": "image",
            "model": "google/gempix2",
            "tasks": 5,
            "succeeded": 4,
            "failed": 1,
            "unsettled": 0,
            "credits": "1.48000000",
        }]})
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Crash: the reconciler picks up after a SIGKILL
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn after_a_sigkill_the_reconciler_settles_the_tasks_left_open() {
    // Three seconds per task: they are all still rendering when the gateway dies.
    let fake = start_fake_with("0.37", Duration::from_secs(1)).await;
    let mut gateway = Gateway::start(
        &config(&fake.base_url())
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
            .reconciler(FAST_RECONCILER),
    );
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id());
    }
    tasks.push(
        gateway
            .api
            .generate(DESIGN_KEY, GEMPIX_FAILS)
            .await
            .task_id(),
    );
    gateway.restart_after_kill();

    let settled = gateway
        .api
        .wait_for_budget(DESIGN_KEY, "the restarted reconciler to settle", |b| {
            b["reserved"] == ZERO && b["in_flight"] == 0
        })
        .await;
    assert_eq!(
        settled,
        lifetime_budget("5.00000000", "1.11000000", ZERO, "3.89000000", 0, None)
    );
    let stats = fake.stats();
    for task in &tasks {
        assert_eq!(
            stats.tasks.get(task).map(|t| t.status),
            Some(if task == &tasks[3] {
                TaskStatus::Failed
            } else {
                TaskStatus::Success
            })
        );
        assert!(stats.queries_by_task.get(task).copied().unwrap_or(0) >= 1);
    }
    // The owners still see their tasks, and reading them again charges nothing more.
    for task in &tasks {
        let reply = gateway.api.query(DESIGN_KEY, task).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", "1.11000000", ZERO, "3.89000000", 0, None)
    );
}

// ---------------------------------------------------------------------------------------------
// 7. max_in_flight
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn max_in_flight_caps_unsettled_tasks_until_they_settle() {
    let fake = start_fake("0.50").await;
    let gateway = Gateway::start(&config(&fake.base_url()).budget(
        "design",
        r#"{ credits = "100.00", period = "lifetime", max_in_flight = 2 }"#,
    ));

    let replies = gateway
        .api
        .generate_concurrently(DESIGN_KEY, GEMPIX, 10)
        .await;
    assert_eq!(statuses(&replies), HashMap::from([(200, 2), (429, 8)]));
    for reply in replies.iter().filter(|r| r.status == 429) {
        assert_eq!(reply.json(), too_many_in_flight("design", 2));
    }
    let tasks: Vec<String> = replies
        .iter()
        .filter(|r| r.status == 200)
        .map(Reply::task_id)
        .collect();
    assert_eq!(
        fake.stats().generate_requests,
        2,
        "a 429 never reaches the upstream"
    );
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget(
            "100.00000000",
            ZERO,
            "1.00000000",
            "99.00000000",
            2,
            Some(2)
        )
    );

    // Finished upstream is not settled: until someone reads the result, the cap holds.
    wait_until_final(&fake, &tasks).await;
    let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 429, "{}", reply.text);
    assert_eq!(reply.json(), too_many_in_flight("design", 2));

    // One settles: one more may start, and then the cap holds again.
    assert_eq!(gateway.api.query(DESIGN_KEY, &tasks[0]).await.status, 200);
    assert_eq!(gateway.api.budget(DESIGN_KEY).await["in_flight"], 1);
    let third = gateway.api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 429, "{}", reply.text);
    assert_eq!(reply.json(), too_many_in_flight("design", 2));

    // All settle: generation is allowed again.
    wait_until_final(&fake, std::slice::from_ref(&third)).await;
    assert_eq!(gateway.api.query(DESIGN_KEY, &tasks[1]).await.status, 200);
    assert_eq!(gateway.api.query(DESIGN_KEY, &third).await.status, 200);
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget(
            "100.00000000",
            "1.50000000",
            ZERO,
            "98.50000000",
            0,
            Some(2)
        )
    );
    let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(fake.stats().generate_requests, 4);
}

// ---------------------------------------------------------------------------------------------
// 8. A malformed or missing `consumed` settles at the reservation
// ---------------------------------------------------------------------------------------------

/// A stub upstream: a generation's `prompt` is the JSON `data` (without `task_id`) that queries
/// of the task it creates will answer with.
#[derive(Default)]
struct Stub {
    next: AtomicU64,
    tasks: Mutex<HashMap<String, Value>>,
}

async fn stub_generate(
    State(stub): State<Arc<Stub>>,
    body: axum::body::Bytes,
) -> axum::Json<Value> {
    let request: Value = serde_json::from_slice(&body).expect("generation body");
    let data: Value = serde_json::from_str(request["prompt"].as_str().expect("prompt"))
        .expect("prompt is the task's data");
    let n = stub.next.fetch_add(1, Ordering::Relaxed);
    let task_id = format!("ta{n:06}-0000-4000-8000-000000000000");
    stub.tasks.lock().unwrap().insert(task_id.clone(), data);
    axum::Json(json!({"code": 0, "message": "ok", "data": {"task_id": task_id}}))
}

async fn stub_query(
    State(stub): State<Arc<Stub>>,
    RawQuery(query): RawQuery,
) -> axum::response::Response {
    let task_id = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "task_id")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    match stub.tasks.lock().unwrap().get(&task_id) {
        Some(data) => {
            let mut data = data.clone();
            data["task_id"] = json!(task_id);
            axum::Json(json!({"code": 0, "message": "ok", "data": data})).into_response()
        }
        None => (
            http::StatusCode::NOT_FOUND,
            axum::Json(json!({"code": 1, "message": "task not found"})),
        )
            .into_response(),
    }
}

async fn start_stub() -> String {
    let router = axum::Router::new()
        .route("/api/image/gen", axum::routing::post(stub_generate))
        .route("/api/task/query", axum::routing::get(stub_query))
        .with_state(Arc::new(Stub::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_or_missing_consumed_settles_at_the_reservation() {
    let stub = start_stub().await;
    let gateway = Gateway::start(
        &config(&stub).budget("design", r#"{ credits = "100.00", period = "lifetime" }"#),
    );
    // (what the upstream's final answer carries, what the task is charged)
    let cases: Vec<(Value, &str)> = vec![
        // Controls: well-formed amounts are charged exactly, in both upstream forms.
        (
            json!({"status": "success", "consumed": "0.37000000"}),
            "0.37",
        ),
        (json!({"status": "success", "consumed": "0.120000"}), "0.12"),
        (json!({"status": "failed", "consumed": "0.00000000"}), "0"),
        // Malformed: the reservation (0.50) is charged.
        (json!({"status": "success", "consumed": "-1"}), "0.50"),
        (
            json!({"status": "success", "consumed": "0.123456789"}),
            "0.50",
        ),
        (json!({"status": "success", "consumed": "abc"}), "0.50"),
        (json!({"status": "success", "consumed": ""}), "0.50"),
        (json!({"status": "success", "consumed": null}), "0.50"),
        // A number, not the decimal string the contract specifies: not trusted either.
        (json!({"status": "success", "consumed": 0.37}), "0.50"),
        (json!({"status": "success"}), "0.50"),
        (json!({"status": "failed"}), "0.50"),
    ];
    let mut spent = Credits::ZERO;
    for (data, charged) in cases {
        let body = json!({"model": "google/gempix2", "prompt": data.to_string()}).to_string();
        let task = gateway.api.generate(DESIGN_KEY, &body).await.task_id();
        let reply = gateway.api.query(DESIGN_KEY, &task).await;
        assert_eq!(reply.status, 200, "{data}: {}", reply.text);
        let mut expected = data.clone();
        expected["task_id"] = json!(task);
        assert_eq!(
            reply.json(),
            json!({"code": 0, "message": "ok", "data": expected}),
            "the final answer passes through untouched"
        );
        spent = spent
            .checked_add(charged.parse().unwrap())
            .expect("no overflow");
        let remaining = "100"
            .parse::<Credits>()
            .unwrap()
            .checked_sub(spent)
            .unwrap();
        let want = lifetime_budget(
            "100.00000000",
            &spent.format_places(8),
            ZERO,
            &remaining.format_places(8),
            0,
            None,
        );
        assert_eq!(gateway.api.budget(DESIGN_KEY).await, want, "after {data}");
        // A second read settles nothing again.
        assert_eq!(gateway.api.query(DESIGN_KEY, &task).await.status, 200);
        assert_eq!(
            gateway.api.budget(DESIGN_KEY).await,
            want,
            "after re-reading {data}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Timeouts: unknown outcome, counted as spent until an admin releases it
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_generation_timeout_is_an_unknown_outcome_until_an_admin_releases_it() {
    let fake = start_fake("0.50").await;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
            .upstream(r#"timeout = "300ms""#)
            .admin(),
    );

    fake.faults()
        .inject_generate(Fault::Slow(Duration::from_secs(2)), 1);
    let before = Utc::now();
    let reply = gateway
        .api
        .send(
            gateway
                .api
                .http
                .post(format!("{}/api/image/gen", gateway.api.base))
                .bearer_auth(DESIGN_KEY)
                .header("content-type", "application/json")
                .header("x-request-id", "budget-timeout-0001")
                .body(GEMPIX),
        )
        .await;
    let after = Utc::now();
    assert_eq!(reply.status, 504, "{}", reply.text);
    assert_eq!(reply.json()["code"], 1, "{}", reply.text);
    assert_eq!(
        reply.json()["message"],
        "upstream timeout",
        "{}",
        reply.text
    );
    assert_eq!(fake.stats().generate_requests, 1, "never retried once sent");

    // Counted as spent: the upstream may well have started (and will charge) the render.
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", "0.50000000", ZERO, "4.50000000", 0, None)
    );

    let listed = gateway
        .api
        .admin("/admin/reservations?state=unknown_outcome")
        .await;
    let reservations = listed["reservations"].as_array().expect("reservations");
    assert_eq!(reservations.len(), 1, "{listed}");
    let reservation = &reservations[0];
    let id = reservation["id"].as_str().expect("id").to_owned();
    assert!(!id.is_empty());
    let created_at: DateTime<Utc> = reservation["created_at"]
        .as_str()
        .expect("created_at")
        .parse()
        .expect("RFC 3339");
    assert!(
        before.timestamp_millis() <= created_at.timestamp_millis()
            && created_at.timestamp_millis() <= after.timestamp_millis(),
        "{created_at} not within {before}..{after}"
    );
    assert_eq!(
        reservation,
        &json!({
            "id": id,
            "task_id": null,
            "team": "design",
            "model": "google/gempix2",
            "period": "lifetime",
            "reserved": "0.50000000",
            "state": "unknown_outcome",
            "reason": "upstream_timeout",
            "dispatched_at": reservation["dispatched_at"],
            "idempotency_key": null,
            "retry_of": null,
            "resolved_by": null,
            "request_id": "budget-timeout-0001",
            "created_at": reservation["created_at"],
        })
    );
    // Sent: the admin knows the upstream may have started it.
    let dispatched_at: DateTime<Utc> = reservation["dispatched_at"]
        .as_str()
        .expect("dispatched_at")
        .parse()
        .expect("RFC 3339");
    assert!(created_at <= dispatched_at && dispatched_at <= after);

    // Only an admin may release it.
    let path = format!("/admin/reservations/{id}/release");
    let reply = gateway.api.post(&path, Some(DESIGN_KEY)).await;
    assert_eq!((reply.status, reply.text.as_str()), (401, INVALID_KEY));
    assert_eq!(gateway.api.budget(DESIGN_KEY).await["spent"], "0.50000000");

    let reply = gateway.api.post(&path, Some(ADMIN_TOKEN)).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json(), json!({"released": id}));
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", ZERO, ZERO, "5.00000000", 0, None)
    );
    assert_eq!(
        gateway
            .api
            .admin("/admin/reservations?state=unknown_outcome")
            .await,
        json!({"reservations": []})
    );

    // Twice is a conflict, and changes nothing.
    let reply = gateway.api.post(&path, Some(ADMIN_TOKEN)).await;
    assert_eq!(reply.status, 409, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["code"], 1, "{body}");
    assert_eq!(body["message"], "conflict", "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    assert_eq!(body.as_object().map(|o| o.len()), Some(3), "{body}");
    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", ZERO, ZERO, "5.00000000", 0, None)
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Headers, /api/user, /gateway/v1/budget, admin authentication
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn budget_headers_user_balance_budget_and_admin_views() {
    let today = avoid_midnight().await;
    let tomorrow = today.succ_opt().unwrap();
    let fake = start_fake("0.50").await;
    let gateway = Gateway::start(
        &config(&fake.base_url())
            .budget(
                "design",
                r#"{ credits = "5.00", period = "daily", max_in_flight = 2 }"#,
            )
            .admin(),
    );
    let design = |spent: &str, reserved: &str, remaining: &str, in_flight: u64| {
        json!({
            "team": "design",
            "period": "daily",
            "period_key": today.format("%Y-%m-%d").to_string(),
            "credits": "5.00000000",
            "spent": spent,
            "reserved": reserved,
            "remaining": remaining,
            "in_flight": in_flight,
            "max_in_flight": 2,
            "resets_at": rfc3339_midnight(tomorrow),
        })
    };

    assert_eq!(
        gateway.api.budget(DESIGN_KEY).await,
        design(ZERO, ZERO, "5.00000000", 0)
    );
    let user = gateway.api.get("/api/user", Some(DESIGN_KEY)).await;
    assert_eq!(user.status, 200, "{}", user.text);
    assert_eq!(
        user.json(),
        json!({"code": 0, "message": "ok", "data": {"credit": "5.00000000"}})
    );

    // A model that is not configured costs nothing and never reaches the upstream.
    let reply = gateway
        .api
        .generate(DESIGN_KEY, r#"{"model":"acme/x","prompt":"a tomato"}"#)
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(
        reply.json(),
        json!({"code": 1, "message": "failed", "detail":
            "model \"acme/x\" is not offered; choose one of: google/gemini-2.5-flash-image, google/gempix2"})
    );

    let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.header("x-budget-remaining").as_deref(),
        Some("4.50000000")
    );
    assert_eq!(
        reply.header("x-budget-reset"),
        Some(rfc3339_midnight(tomorrow))
    );
    let reply = gateway
        .api
        .generate(
            DESIGN_KEY,
            r#"{"model":"google/gempix2","prompt":"two tomatoes","n":2}"#,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.header("x-budget-remaining").as_deref(),
        Some("3.50000000")
    );
    assert_eq!(
        reply.header("x-budget-reset"),
        Some(rfc3339_midnight(tomorrow))
    );
    let reply = gateway.api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 429, "{}", reply.text);
    assert_eq!(reply.json(), too_many_in_flight("design", 2));

    let design_now = design(ZERO, "1.50000000", "3.50000000", 2);
    assert_eq!(gateway.api.budget(DESIGN_KEY).await, design_now);
    let user = gateway.api.get("/api/user", Some(DESIGN_KEY)).await;
    assert_eq!(user.status, 200, "{}", user.text);
    assert_eq!(
        user.json(),
        json!({"code": 0, "message": "ok", "data": {"credit": "3.50000000"}})
    );
    assert_ne!(user.json()["data"]["credit"], "100.50000000");

    // A team without a budget: no headers, nulls where a budget would be.
    assert_eq!(
        gateway.api.budget(ADS_KEY).await,
        unbudgeted("ads", ZERO, ZERO, 0)
    );
    let reply = gateway.api.generate(ADS_KEY, GEMPIX).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.header("x-budget-remaining"), None);
    assert_eq!(reply.header("x-budget-reset"), None);
    let ads_now = unbudgeted("ads", ZERO, "0.50000000", 1);
    assert_eq!(gateway.api.budget(ADS_KEY).await, ads_now);
    let user = gateway.api.get("/api/user", Some(ADS_KEY)).await;
    assert_eq!(user.status, 200, "{}", user.text);
    assert_eq!(
        user.json(),
        json!({"code": 0, "message": "ok", "data": {"credit": null}})
    );
    assert_eq!(
        fake.stats().user_requests,
        0,
        "the upstream account's balance is never asked for"
    );

    // Admin views.
    let mut teams = gateway.api.admin("/admin/teams").await;
    let list = teams["teams"].as_array_mut().expect("teams");
    list.sort_by(|a, b| a["team"].as_str().cmp(&b["team"].as_str()));
    assert_eq!(teams, json!({"teams": [ads_now, design_now]}));

    // Authentication: the budget needs a team key; /admin/* needs the admin token.
    for (path, token) in [
        ("/gateway/v1/budget", None),
        ("/gateway/v1/budget", Some("kgw_not_a_key")),
        ("/gateway/v1/budget", Some(ADMIN_TOKEN)),
        ("/api/user", None),
        ("/admin/teams", None),
        ("/admin/teams", Some(DESIGN_KEY)),
        ("/admin/teams", Some("kgw-admin-test-token-wrong")),
        ("/admin/usage?from=2026-11-01&to=2026-12-01", Some(ADS_KEY)),
        (
            "/admin/reservations?state=unknown_outcome",
            Some(DESIGN_KEY),
        ),
        ("/admin/reservations?state=unknown_outcome", None),
    ] {
        let reply = gateway.api.get(path, token).await;
        assert_eq!(
            (reply.status, reply.text.as_str()),
            (401, INVALID_KEY),
            "{path} with {token:?}"
        );
    }
    assert_eq!(
        fake.stats().generate_requests,
        3,
        "two of design's generations and one of ads' reached the upstream"
    );

    // Without [admin], there is no admin API.
    let bare = Gateway::start(
        &config(&fake.base_url()).budget("design", r#"{ credits = "5.00", period = "daily" }"#),
    );
    for token in [ADMIN_TOKEN, DESIGN_KEY] {
        for path in [
            "/admin/teams",
            "/admin/usage?from=2026-11-01&to=2026-12-01",
            "/admin/reservations?state=unknown_outcome",
        ] {
            let reply = bare.api.get(path, Some(token)).await;
            assert_eq!(reply.status, 404, "{path}: {}", reply.text);
            assert_eq!(reply.json()["code"], 1, "{path}: {}", reply.text);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 11. Period rollover on a manual clock (gateway in-process)
// ---------------------------------------------------------------------------------------------

/// The gateway in this process on `clock`, in front of `upstream`, with design's `budget` and a
/// reconciler that leaves tasks alone (the manual clock jumps).
async fn start_in_process(upstream: &str, design_budget: &str, clock: SharedClock) -> InProcess {
    let config = config(upstream)
        .budget("design", design_budget)
        .reconciler(r#"settle_after = "1h""#)
        .admin();
    InProcess::start(&config, clock).await
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().expect("timestamp")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daily_budget_rolls_over_at_midnight_and_costs_stay_in_their_day() {
    let fake = start_fake("0.37").await;
    let clock = ManualClock::new(at("2026-11-23T23:59:00Z"));
    let shared: SharedClock = clock.clone();
    let gw = start_in_process(
        &fake.base_url(),
        r#"{ credits = "1.00", period = "daily" }"#,
        shared,
    )
    .await;
    let api = &gw.api;
    let daily =
        |key: &str, spent: &str, reserved: &str, remaining: &str, in_flight: u64, resets: &str| {
            json!({
                "team": "design",
                "period": "daily",
                "period_key": key,
                "credits": "1.00000000",
                "spent": spent,
                "reserved": reserved,
                "remaining": remaining,
                "in_flight": in_flight,
                "max_in_flight": null,
                "resets_at": resets,
            })
        };

    let mut yesterday = Vec::new();
    for remaining in ["0.50000000", ZERO] {
        let reply = api.generate(DESIGN_KEY, GEMPIX).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(
            reply.header("x-budget-remaining").as_deref(),
            Some(remaining)
        );
        assert_eq!(
            reply.header("x-budget-reset").as_deref(),
            Some("2026-11-24T00:00:00Z")
        );
        yesterday.push(reply.task_id());
    }
    let reply = api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 402, "{}", reply.text);
    assert_eq!(
        reply.json(),
        budget_exhausted(
            "team 'design' has 0.00 of 1.00 credits left today (resets 2026-11-24T00:00:00Z); \
             this request needs 0.50"
        )
    );
    assert_eq!(
        api.budget(DESIGN_KEY).await,
        daily(
            "2026-11-23",
            ZERO,
            "1.00000000",
            ZERO,
            2,
            "2026-11-24T00:00:00Z"
        )
    );

    // Past midnight: a new period with nothing spent, no reset job involved.
    clock.set(at("2026-11-24T00:00:30Z"));
    assert_eq!(
        api.budget(DESIGN_KEY).await,
        daily(
            "2026-11-24",
            ZERO,
            ZERO,
            "1.00000000",
            2,
            "2026-11-25T00:00:00Z"
        )
    );
    let reply = api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.header("x-budget-remaining").as_deref(),
        Some("0.50000000")
    );
    assert_eq!(
        reply.header("x-budget-reset").as_deref(),
        Some("2026-11-25T00:00:00Z")
    );
    reply.task_id();

    // Yesterday's tasks settle today, but their cost stays in yesterday's period.
    wait_until_final(&fake, &yesterday).await;
    for task in &yesterday {
        let reply = api.query(DESIGN_KEY, task).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.json()["data"]["consumed"], "0.37000000");
    }
    assert_eq!(
        api.budget(DESIGN_KEY).await,
        daily(
            "2026-11-24",
            ZERO,
            "0.50000000",
            "0.50000000",
            1,
            "2026-11-25T00:00:00Z"
        )
    );
    let row = |day: &str, tasks: u64, succeeded: u64, unsettled: u64, credits: &str| {
        json!({
            "day": day,
            "team": "design",
            "key": "design-test",
            "family": "image",
            "model": "google/gempix2",
            "tasks": tasks,
            "succeeded": succeeded,
            "failed": 0,
            "unsettled": unsettled,
            "credits": credits,
        })
    };
    assert_eq!(
        api.admin("/admin/usage?team=design&from=2026-11-23&to=2026-11-25")
            .await,
        json!({
            "from": "2026-11-23",
            "to": "2026-11-25",
            "rows": [
                row("2026-11-23", 2, 2, 0, "0.74000000"),
                row("2026-11-24", 1, 0, 1, ZERO),
            ],
        })
    );
    assert_eq!(
        api.admin("/admin/usage?team=design&from=2026-11-24&to=2026-11-25")
            .await,
        json!({
            "from": "2026-11-24",
            "to": "2026-11-25",
            "rows": [row("2026-11-24", 1, 0, 1, ZERO)],
        })
    );

    // Today's budget runs out on its own.
    let reply = api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.header("x-budget-remaining").as_deref(), Some(ZERO));
    let reply = api.generate(DESIGN_KEY, GEMPIX).await;
    assert_eq!(reply.status, 402, "{}", reply.text);
    assert_eq!(
        reply.json(),
        budget_exhausted(
            "team 'design' has 0.00 of 1.00 credits left today (resets 2026-11-25T00:00:00Z); \
             this request needs 0.50"
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn weekly_and_monthly_budgets_name_their_period_and_reset() {
    // 2026-11-23 is a Monday: the week ends at Monday 2026-11-30, the month at 2026-12-01.
    let fake = start_fake("0.50").await;
    for (budget, key, detail, reset) in [
        (
            r#"{ credits = "1.005", period = "weekly" }"#,
            "2026-W48",
            "team 'design' has 0.005 of 1.005 credits left this week \
             (resets 2026-11-30T00:00:00Z); this request needs 0.50",
            "2026-11-30T00:00:00Z",
        ),
        (
            r#"{ credits = "1.005", period = "monthly" }"#,
            "2026-11",
            "team 'design' has 0.005 of 1.005 credits left this month \
             (resets 2026-12-01T00:00:00Z); this request needs 0.50",
            "2026-12-01T00:00:00Z",
        ),
    ] {
        let clock = ManualClock::new(at("2026-11-23T12:00:00Z"));
        let gw = start_in_process(&fake.base_url(), budget, clock.clone()).await;
        for remaining in ["0.50500000", "0.00500000"] {
            let reply = gw.api.generate(DESIGN_KEY, GEMPIX).await;
            assert_eq!(reply.status, 200, "{budget}: {}", reply.text);
            assert_eq!(
                reply.header("x-budget-remaining").as_deref(),
                Some(remaining)
            );
            assert_eq!(reply.header("x-budget-reset").as_deref(), Some(reset));
        }
        let reply = gw.api.generate(DESIGN_KEY, GEMPIX).await;
        assert_eq!(reply.status, 402, "{budget}: {}", reply.text);
        assert_eq!(reply.json(), budget_exhausted(detail), "{budget}");
        let budget_now = gw.api.budget(DESIGN_KEY).await;
        assert_eq!(budget_now["period_key"], key, "{budget_now}");
        assert_eq!(budget_now["resets_at"], reset, "{budget_now}");
        assert_eq!(budget_now["credits"], "1.00500000", "{budget_now}");
        assert_eq!(budget_now["remaining"], "0.00500000", "{budget_now}");
    }
}

// ---------------------------------------------------------------------------------------------
// Reconciler details: client reads count, failed reads, expiry, abandoned reservations
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_task_its_client_keeps_reading_is_left_to_the_client() {
    // Gateway and fake share one manual clock: the task renders for 30 s of it.
    let clock = ManualClock::new(at("2026-11-23T12:00:00Z"));
    let mut fake = fake_config();
    fake.clock = clock.clone();
    fake.pending_for = Duration::from_secs(10);
    fake.submitted_for = Duration::from_secs(10);
    fake.in_progress_for = Duration::from_secs(10);
    fake.consumed
        .insert("google/gempix2".into(), "0.37".parse().unwrap());
    let fake = ketchup_fake_upstream::start(fake)
        .await
        .expect("fake starts");
    let gw = InProcess::start(
        &config(&fake.base_url())
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
            .reconciler(FAST_RECONCILER)
            .cache("max_entries = 0"),
        clock.clone(),
    )
    .await;
    let task = gw.api.generate(DESIGN_KEY, GEMPIX).await.task_id();

    // The client reads the task every 0.9 s: it is never unread for settle_after (1 s), so the
    // reconciler, passing every 100 ms, has nothing to do.
    for round in 1..=5u64 {
        clock.advance(Duration::from_millis(900));
        let reply = gw.api.query(DESIGN_KEY, &task).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_ne!(reply.json()["data"]["status"], "success");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            upstream_reads(&fake, &task),
            round,
            "only the client's {round} reads reached the upstream"
        );
    }

    // Positive control: once the client stops reading, the reconciler reads and settles.
    clock.advance(Duration::from_secs(30));
    let settled = gw
        .api
        .wait_for_budget(DESIGN_KEY, "the reconciler to settle", |b| {
            b["in_flight"] == 0
        })
        .await;
    assert_eq!(
        settled,
        lifetime_budget("5.00000000", "0.37000000", ZERO, "4.63000000", 0, None)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_reconciler_read_is_not_repeated_before_settle_after() {
    // The gateway's clock stands still: a task the reconciler has just tried to read is not due
    // again until settle_after passes on it, however its read ended.
    let clock = ManualClock::new(at("2026-11-23T12:00:00Z"));
    let fake = start_fake_with("0.37", Duration::from_secs(3600)).await;
    let gw = InProcess::start(
        &config(&fake.base_url())
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
            .reconciler(FAST_RECONCILER)
            .upstream(r#"timeout = "300ms""#),
        clock.clone(),
    )
    .await;
    let task = gw.api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    fake.faults()
        .inject_query(Fault::Slow(Duration::from_secs(2)), 1000);
    clock.advance(Duration::from_secs(2));

    let deadline = Instant::now() + DEADLINE;
    while upstream_reads(&fake, &task) == 0 {
        assert!(
            Instant::now() < deadline,
            "the reconciler never read the task"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Ample time for a dozen passes of the reconciler.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        upstream_reads(&fake, &task),
        1,
        "a timed-out read must not be retried every interval (the vendor asks for at most one \
         status read per task per second; settle_after is that spacing)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_older_than_max_task_age_expires_at_its_reservation() {
    let clock = ManualClock::new(at("2026-11-23T12:00:00Z"));
    // Renders for three hours of real time: never final during the test.
    let fake = start_fake_with("0.37", Duration::from_secs(3600)).await;
    let gw = InProcess::start(
        &config(&fake.base_url())
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
            .reconciler(
                r#"interval = "100ms"
settle_after = "1s"
max_task_age = "24h""#,
            )
            .admin(),
        clock.clone(),
    )
    .await;
    let task = gw.api.generate(DESIGN_KEY, GEMPIX).await.task_id();
    assert_eq!(
        gw.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", ZERO, "0.50000000", "4.50000000", 1, None)
    );

    clock.advance(Duration::from_secs(25 * 3600));
    let expired = gw
        .api
        .wait_for_budget(DESIGN_KEY, "the task to expire", |b| b["in_flight"] == 0)
        .await;
    assert_eq!(
        expired,
        lifetime_budget("5.00000000", "0.50000000", ZERO, "4.50000000", 0, None)
    );

    let listed = gw.api.admin("/admin/reservations?state=expired").await;
    let reservations = listed["reservations"].as_array().expect("reservations");
    assert_eq!(reservations.len(), 1, "{listed}");
    let r = &reservations[0];
    assert_eq!(r["task_id"], task.as_str(), "{listed}");
    assert_eq!(r["team"], "design", "{listed}");
    assert_eq!(r["reserved"], "0.50000000", "{listed}");
    assert_eq!(r["state"], "expired", "{listed}");
    assert_eq!(r["period"], "lifetime", "{listed}");
    assert_eq!(
        gw.api
            .admin("/admin/usage?team=design&from=2026-11-23&to=2026-11-24")
            .await,
        json!({"from": "2026-11-23", "to": "2026-11-24", "rows": [{
            "day": "2026-11-23",
            "team": "design",
            "key": "design-test",
            "family": "image",
            "model": "google/gempix2",
            "tasks": 1,
            "succeeded": 0,
            "failed": 0,
            "unsettled": 0,
            "credits": "0.50000000",
        }]})
    );

    // The client can still read it; an expired task is closed and charged once.
    let reply = gw.api.query(DESIGN_KEY, &task).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        gw.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", "0.50000000", ZERO, "4.50000000", 0, None)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reservation_left_by_a_killed_gateway_becomes_unknown_outcome() {
    let fake = start_fake("0.50").await;
    let mut gateway = Gateway::start(
        &config(&fake.base_url())
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
            .reconciler(
                r#"interval = "100ms"
settle_after = "1s"
abandon_after = "4s""#,
            )
            .upstream("timeout = \"3s\"\nconnect_timeout = \"200ms\"")
            .admin(),
    );
    // The upstream takes its time; the gateway dies while it waits.
    fake.faults()
        .inject_generate(Fault::Slow(Duration::from_secs(30)), 1);
    let request = gateway
        .api
        .http
        .post(format!("{}/api/image/gen", gateway.api.base))
        .bearer_auth(DESIGN_KEY)
        .header("content-type", "application/json")
        .header("x-request-id", "budget-abandoned-0001")
        .body(GEMPIX)
        .send();
    let client = tokio::spawn(request);
    until_a_generation_reached(&fake).await;
    gateway.restart_after_kill();
    let answer = client.await.expect("client task");
    assert!(
        answer.is_err(),
        "the gateway must have died before its 3 s upstream timeout: {answer:?}"
    );

    let abandoned = gateway
        .api
        .wait_for_budget(DESIGN_KEY, "the reservation to be given up", |b| {
            b["reserved"] == ZERO
        })
        .await;
    assert_eq!(
        abandoned,
        lifetime_budget("5.00000000", "0.50000000", ZERO, "4.50000000", 0, None)
    );
    let listed = gateway
        .api
        .admin("/admin/reservations?state=unknown_outcome")
        .await;
    let reservations = listed["reservations"].as_array().expect("reservations");
    assert_eq!(reservations.len(), 1, "{listed}");
    let r = &reservations[0];
    assert_eq!(r["task_id"], Value::Null, "{listed}");
    assert_eq!(r["request_id"], "budget-abandoned-0001", "{listed}");
    assert_eq!(r["reserved"], "0.50000000", "{listed}");
    assert_eq!(r["state"], "unknown_outcome", "{listed}");
    assert_eq!(r["reason"], "no_answer_recorded", "{listed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_after_the_reconciler_gave_the_reservation_up_is_still_recorded() {
    // A slow ledger (a stalled fsync, a Redis restart) can hold a generation past abandon_after,
    // and the reconciler then gives its reservation up as unknown_outcome while the request still
    // waits. Here the gateway's clock jumps past abandon_after instead. An answer that comes
    // after that makes the task the team's all the same, and a timeout is still a 504.
    let clock = ManualClock::new(at("2026-11-23T12:00:00Z"));
    let fake = start_fake("0.37").await;
    let gw = InProcess::start(
        &config(&fake.base_url())
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
            .upstream("timeout = \"5s\"\nconnect_timeout = \"200ms\"")
            .reconciler("interval = \"100ms\"\nsettle_after = \"1h\"\nabandon_after = \"10s\"")
            .admin(),
        clock.clone(),
    )
    .await;
    // The first generation is answered after 3 s, the second never within the 5 s timeout.
    fake.faults()
        .inject_generate(Fault::Slow(Duration::from_secs(3)), 1);
    fake.faults()
        .inject_generate(Fault::Slow(Duration::from_secs(60)), 1);
    let answered = tokio::spawn({
        let api = gw.api.clone();
        async move { api.generate(DESIGN_KEY, GEMPIX).await }
    });
    until_a_generation_reached(&fake).await;
    let timed_out = tokio::spawn({
        let api = gw.api.clone();
        async move { api.generate(DESIGN_KEY, GEMPIX).await }
    });
    wait_until("both generations to reach the upstream", || {
        fake.stats().generate_requests == 2
    })
    .await;

    clock.advance(Duration::from_secs(11));
    let given_up = gw
        .api
        .wait_for_budget(DESIGN_KEY, "both reservations to be given up", |b| {
            b["reserved"] == ZERO
        })
        .await;
    assert!(
        !answered.is_finished(),
        "the upstream answered before the reservation was given up: the test proves nothing"
    );
    assert_eq!(
        given_up,
        lifetime_budget("5.00000000", "1.00000000", ZERO, "4.00000000", 0, None)
    );

    let reply = answered.await.expect("client task");
    let task = reply.task_id();
    let reply = timed_out.await.expect("client task");
    assert_eq!(reply.status, 504, "{}", reply.text);
    assert_eq!(
        reply.json()["message"],
        "upstream timeout",
        "{}",
        reply.text
    );
    // The answered one is held again, the other stays an unknown outcome.
    assert_eq!(
        gw.api.budget(DESIGN_KEY).await,
        lifetime_budget(
            "5.00000000",
            "0.50000000",
            "0.50000000",
            "4.00000000",
            1,
            None
        )
    );
    let unknown = gw
        .api
        .admin("/admin/reservations?state=unknown_outcome")
        .await;
    assert_eq!(unknown["reservations"].as_array().map(Vec::len), Some(1));
    assert_eq!(unknown["reservations"][0]["task_id"], Value::Null);

    // The team reads its task, another team does not, and it settles at what it consumed.
    assert_eq!(gw.api.query(ADS_KEY, &task).await.status, 404);
    let reply = gw.api.wait_for_final(DESIGN_KEY, &task).await;
    assert_eq!(reply.json()["data"]["consumed"], "0.37000000");
    assert_eq!(
        gw.api.budget(DESIGN_KEY).await,
        lifetime_budget("5.00000000", "0.87000000", ZERO, "4.13000000", 0, None)
    );
}
