//! Callbacks confirmed before they settle, through the real binary: a callback's claim is checked
//! against a status read of the upstream before anything is settled or delivered; the task
//! settles at the upstream's `consumed`, the team receives the upstream's own state, and a
//! callback's body is read as it streams in, never held whole.
//!
//! The gateway's `public_url` names a port where nothing listens, so the fake's own callbacks go
//! nowhere: the only callbacks the gateway sees are the ones each test sends, with the token the
//! fake was given, as anyone who saw that token could.

use std::time::{Duration, Instant};

use ketchup_fake_upstream::Fault;
use ketchup_testkit::webhooks::{Receiver, verify};
use ketchup_testkit::{
    DESIGN_KEY, Env, GatewayConfig, Reply, fake_config, free_port, upstream_reads, wait_until_final,
};
use serde_json::{Value, json};

/// A gateway whose callback URLs lead nowhere, in front of a fake whose tasks spend
/// `in_progress` rendering (after 200 ms pending and submitted). `webhooks` holds lines of the
/// `[webhooks]` table.
async fn start(in_progress: Duration, webhooks: &str) -> Env {
    let mut fake = fake_config();
    fake.in_progress_for = in_progress;
    let config = GatewayConfig::new()
        .server(&format!(
            "public_url = \"http://127.0.0.1:{}\"",
            free_port()
        ))
        .webhooks("first_retry = \"200ms\"\nmax_retry_delay = \"400ms\"")
        .webhooks(webhooks)
        .admin()
        .signed_webhooks("design")
        .callback_hosts("design", &["127.0.0.1"])
        .signed_webhooks("ads");
    Env::start_with(fake, config).await
}

/// Starts a render of one 0.50 image whose callback goes to `receiver_port`; its task id, and
/// the gateway's callback URL for it (the one the upstream was given).
async fn start_task(env: &Env, receiver_port: u16) -> (String, String) {
    let body = json!({"model": "google/gempix2", "prompt": "a tomato",
                      "callback_url": format!("http://127.0.0.1:{receiver_port}/hook")});
    let task_id = env
        .api()
        .generate(DESIGN_KEY, &body.to_string())
        .await
        .task_id();
    let bodies = env.fake.stats().generate_bodies;
    let given = bodies.last().expect("a generation reached the upstream")["callback_url"]
        .as_str()
        .expect("the gateway's callback URL")
        .to_owned();
    let token = given.rsplit('/').next().expect("a token");
    (task_id, env.gateway.url(&format!("/callbacks/{token}")))
}

/// A callback payload claiming `status` and `consumed`, with `image` as its one result.
fn claim(task_id: &str, status: &str, consumed: &str, image: &str) -> String {
    json!({"result": [{"image": image}], "status": status, "task_id": task_id,
           "consumed": consumed, "status_reason": {"message": null}})
    .to_string()
}

async fn post_callback(env: &Env, url: &str, body: impl Into<reqwest::Body>) -> Reply {
    let api = env.api();
    api.send(
        api.http
            .post(url)
            .header("content-type", "application/json")
            .body(body),
    )
    .await
}

async fn callbacks_counted(env: &Env, outcome: &str) -> f64 {
    env.api()
        .metric(&format!(
            "ketchup_gateway_callbacks_total{{outcome=\"{outcome}\"}}"
        ))
        .await
}

/// Nothing settled, queued or sent: design still holds its one reservation.
async fn nothing_changed(env: &Env, receiver: &Receiver) {
    let budget = env.api().budget(DESIGN_KEY).await;
    assert_eq!(budget["spent"], "0.00000000", "{budget}");
    assert_eq!(budget["reserved"], "0.50000000", "{budget}");
    let pending = env.api().admin("/admin/webhooks?state=pending").await;
    assert_eq!(pending["webhooks"], json!([]), "{pending}");
    assert!(receiver.seen().is_empty());
}

async fn wait_for_spent(env: &Env, spent: &str) {
    env.api()
        .wait_for_budget(DESIGN_KEY, &format!("design to have spent {spent}"), |b| {
            b["spent"] == spent && b["reserved"] == "0.00000000"
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_callback_changes_nothing_and_the_upstream_sets_the_charge() {
    // Final some 2 s after it starts: the first forgery comes while the upstream still renders.
    let env = start(Duration::from_secs(2), "").await;
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let (task_id, url) = start_task(&env, listening.port).await;
    let forged = claim(
        &task_id,
        "success",
        "0.000000",
        "https://forger.example/x.png",
    );

    // Still rendering upstream: refused, and the upstream may come back once it is final.
    let early = post_callback(&env, &url, forged.clone()).await;
    assert_eq!(early.status, 503, "{}", early.text);
    assert_eq!(early.header("retry-after").as_deref(), Some("1"));
    assert_eq!(early.json()["message"], "retry later", "{}", early.text);
    nothing_changed(&env, &receiver).await;

    // Final upstream at 0.50: a claim of zero, or of a failure, is contradicted.
    wait_until_final(&env.fake, std::slice::from_ref(&task_id)).await;
    for lie in [
        forged.clone(),
        claim(
            &task_id,
            "failed",
            "0.000000",
            "https://forger.example/x.png",
        ),
    ] {
        let refused = post_callback(&env, &url, lie).await;
        assert_eq!(refused.status, 409, "{}", refused.text);
        assert_eq!(
            refused.json(),
            json!({"code": 1, "message": "callback contradicted",
                   "detail": "the upstream's own status of this task does not agree with this callback; nothing was changed"})
        );
    }
    nothing_changed(&env, &receiver).await;

    // The upstream's own callback (six places) agrees: settled at the upstream's amount, and the
    // team gets the upstream's state, not the bytes the callback carried.
    let genuine = claim(
        &task_id,
        "success",
        "0.500000",
        "https://forger.example/x.png",
    );
    let confirmed = post_callback(&env, &url, genuine).await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.text);
    receiver
        .wait_for("the delivery", |r| r.delivered().len() == 1)
        .await;
    let (headers, delivered) = receiver.delivered().remove(0);
    verify(&headers, &delivered);
    let payload: Value = serde_json::from_slice(&delivered).unwrap();
    let read = env.api().query(DESIGN_KEY, &task_id).await;
    assert_eq!(
        read.x_cache(),
        "hit",
        "the confirming read filled the cache"
    );
    assert_eq!(payload, read.json()["data"], "the upstream's task state");
    assert_eq!(payload["consumed"], "0.50000000");
    assert!(!String::from_utf8_lossy(&delivered).contains("forger"));
    wait_for_spent(&env, "0.50000000").await;

    // Settled: a forgery is refused still, and nothing is delivered again.
    let late = post_callback(&env, &url, forged).await;
    assert_eq!(late.status, 409, "{}", late.text);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.seen().len(), 1);
    wait_for_spent(&env, "0.50000000").await;

    assert_eq!(callbacks_counted(&env, "not_final").await, 1.0);
    assert_eq!(callbacks_counted(&env, "contradicted").await, 3.0);
    assert_eq!(callbacks_counted(&env, "settled").await, 1.0);
    let warned = env
        .gateway
        .log_events("callback contradicted by the upstream");
    assert_eq!(warned.len(), 3, "{warned:?}");
    assert_eq!(warned[0]["task_id"], task_id.as_str(), "{warned:?}");
    let token = url.rsplit('/').next().unwrap();
    assert!(!env.gateway.logs().contains(token), "the token was logged");
    drop(listening);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_the_upstream_cannot_confirm_now_is_refused_until_it_can() {
    let env = start(Duration::from_millis(100), "").await;
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let (task_id, url) = start_task(&env, listening.port).await;
    wait_until_final(&env.fake, std::slice::from_ref(&task_id)).await;
    let genuine = claim(&task_id, "success", "0.500000", "https://x/1.png");

    // The confirming read breaks off, then meets a 5xx on each of its two attempts.
    env.fake.faults().inject_query(Fault::DropConnection, 1);
    env.fake.faults().inject_query(Fault::Status500, 2);
    for _ in 0..2 {
        let refused = post_callback(&env, &url, genuine.clone()).await;
        assert_eq!(refused.status, 503, "{}", refused.text);
        assert_eq!(refused.header("retry-after").as_deref(), Some("1"));
        assert_eq!(refused.json()["message"], "retry later", "{}", refused.text);
        nothing_changed(&env, &receiver).await;
    }
    assert_eq!(callbacks_counted(&env, "unconfirmed").await, 2.0);

    // The upstream's retry finds it answering.
    let confirmed = post_callback(&env, &url, genuine).await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.text);
    receiver
        .wait_for("the delivery", |r| r.delivered().len() == 1)
        .await;
    wait_for_spent(&env, "0.50000000").await;
    assert_eq!(callbacks_counted(&env, "settled").await, 1.0);
    drop(listening);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirming_read_joins_a_pollers_read_of_the_task() {
    const SLOW: Duration = Duration::from_millis(1500);
    let env = start(Duration::from_millis(100), "").await;
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let (task_id, url) = start_task(&env, listening.port).await;
    wait_until_final(&env.fake, std::slice::from_ref(&task_id)).await;

    // A poller's read is on its way when the callback comes.
    env.fake.faults().inject_query(Fault::Slow(SLOW), 1);
    let poller = {
        let (api, task_id) = (env.api().clone(), task_id.clone());
        tokio::spawn(async move { api.query(DESIGN_KEY, &task_id).await })
    };
    let deadline = Instant::now() + SLOW / 2;
    while upstream_reads(&env.fake, &task_id) == 0 {
        assert!(Instant::now() < deadline, "the poller's read never came");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent = Instant::now();
    let genuine = claim(&task_id, "success", "0.500000", "https://x/1.png");
    let confirmed = post_callback(&env, &url, genuine).await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.text);
    assert!(
        sent.elapsed() >= SLOW / 4,
        "answered after {:?}, without waiting for the read",
        sent.elapsed()
    );
    let polled = poller.await.unwrap();
    assert_eq!(polled.x_cache(), "miss");
    assert_eq!(polled.task_status(), "success");
    assert_eq!(upstream_reads(&env.fake, &task_id), 1, "one read for both");
    receiver
        .wait_for("the delivery", |r| r.delivered().len() == 1)
        .await;
    wait_for_spent(&env, "0.50000000").await;
    drop(listening);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_with_data_uri_images_are_accepted_up_to_their_own_cap() {
    let cap = 4 << 20;
    let env = start(
        Duration::from_millis(100),
        &format!("max_callback_bytes = {cap}"),
    )
    .await;
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let (task_id, url) = start_task(&env, listening.port).await;
    let callback = |image_len: usize| {
        let image = format!("data:image/png;base64,{}", "iVBORw0K".repeat(image_len / 8));
        claim(&task_id, "success", "0.500000", &image)
    };

    let over = post_callback(&env, &url, callback(cap)).await;
    assert_eq!(over.status, 413, "{}", over.text);
    assert_eq!(
        over.json(),
        json!({"code": 1, "message": "payload too large",
               "detail": format!("request body exceeds {cap} bytes")})
    );
    assert_eq!(over.headers["connection"], "close");
    nothing_changed(&env, &receiver).await;

    // Three times server.max_body_bytes, which still bounds what teams send.
    let body = callback(3 << 20);
    assert!(body.len() > 3 << 20);
    let too_big_a_request = env
        .api()
        .generate(
            DESIGN_KEY,
            &json!({"model": "google/gempix2", "prompt": body}).to_string(),
        )
        .await;
    assert_eq!(too_big_a_request.status, 413, "{}", too_big_a_request.text);
    wait_until_final(&env.fake, std::slice::from_ref(&task_id)).await;
    let accepted = post_callback(&env, &url, body).await;
    assert_eq!(accepted.status, 200, "{}", accepted.text);
    receiver
        .wait_for("the delivery", |r| r.delivered().len() == 1)
        .await;
    let (headers, delivered) = receiver.delivered().remove(0);
    verify(&headers, &delivered);
    // The upstream's state, with its result's URLs: none of the callback's megabytes.
    let payload: Value = serde_json::from_slice(&delivered).unwrap();
    assert_eq!(payload["task_id"], task_id.as_str());
    assert!(delivered.len() < 4096, "{} bytes", delivered.len());
    wait_for_spent(&env, "0.50000000").await;
    assert_eq!(
        receiver.seen().len(),
        1,
        "the refused callback sent nothing"
    );
    drop(listening);
}

/// The review's experiment: eight 31 MiB callbacks at once. Each is read as it arrives and
/// dropped; only its task id, status and `consumed` are kept, so the gateway's peak memory grows
/// by far less than one of them (holding each whole a few times over, it grew by some 350 MiB).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_callbacks_are_read_as_they_stream_in_never_held_whole() {
    const CALLBACKS: usize = 8;
    const IMAGE_BYTES: usize = 31 << 20;
    /// Far above what streaming costs (buffers, threads), far below one callback per request.
    const MOST_GROWTH_KIB: u64 = 96 << 10;
    let kib = |pid: u32, field: &str| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|line| {
                let value = line.strip_prefix(field)?.strip_prefix(':')?;
                value.trim().strip_suffix("kB")?.trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    };

    let env = start(Duration::from_millis(100), "").await;
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let mut tasks = Vec::new();
    for _ in 0..CALLBACKS {
        tasks.push(start_task(&env, listening.port).await);
    }
    let ids: Vec<String> = tasks.iter().map(|(id, _)| id.clone()).collect();
    wait_until_final(&env.fake, &ids).await;
    let pid = env.gateway.pid();
    let before = kib(pid, "VmRSS");

    let image = format!(
        "data:image/png;base64,{}",
        "iVBORw0K".repeat(IMAGE_BYTES / 8)
    );
    let mut sending = tokio::task::JoinSet::new();
    for (task_id, url) in &tasks {
        let body = claim(task_id, "success", "0.500000", &image);
        assert!(body.len() > IMAGE_BYTES);
        let (api, url) = (env.api().clone(), url.clone());
        sending.spawn(async move {
            api.send(
                api.http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body),
            )
            .await
        });
    }
    drop(image);
    while let Some(reply) = sending.join_next().await {
        let reply = reply.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    receiver
        .wait_for("every delivery", |r| r.delivered().len() == CALLBACKS)
        .await;
    let (peak, after) = (kib(pid, "VmHWM"), kib(pid, "VmRSS"));
    eprintln!(
        "gateway RSS: {} MiB before, peak {} MiB, {} MiB after {CALLBACKS} callbacks of {} MiB",
        before >> 10,
        peak >> 10,
        after >> 10,
        IMAGE_BYTES >> 20
    );
    assert!(
        peak.saturating_sub(before) < MOST_GROWTH_KIB,
        "peak RSS grew by {} MiB",
        peak.saturating_sub(before) >> 10
    );
    for (_, delivered) in receiver.delivered() {
        assert!(
            delivered.len() < 4096,
            "a delivery of {} bytes",
            delivered.len()
        );
    }
    wait_for_spent(&env, "4.00000000").await;
    drop(listening);
}
