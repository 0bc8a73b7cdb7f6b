//! Webhooks through the real binary: the upstream's callbacks reach the gateway at its
//! `public_url`, settle credits without any status poll, and are delivered, signed, to the teams'
//! receivers (real HTTP servers on loopback) from the durable outbox.

use std::time::{Duration, Instant};

use ketchup_testkit::webhooks::{Receiver, verify};
use ketchup_testkit::{
    ADS_KEY, DEADLINE, DESIGN_KEY, Env, GatewayConfig, Reply, fake_config, free_port,
    upstream_reads, wait_until_final,
};
use serde_json::{Value, json};

/// A gateway with `public_url` pointing at itself, both teams signing webhooks (which
/// `public_url` requires), `design` allowed to receive them on loopback, quick retries and an
/// admin API. `webhooks` holds lines of the `[webhooks]` table.
fn config(webhooks: &str) -> GatewayConfig {
    GatewayConfig::new()
        .public_url_on_own_port()
        .webhooks("first_retry = \"200ms\"\nmax_retry_delay = \"400ms\"")
        .webhooks(webhooks)
        .admin()
        .signed_webhooks("design")
        .callback_hosts("design", &["127.0.0.1"])
        .signed_webhooks("ads")
}

async fn start(webhooks: &str) -> Env {
    Env::start_with(fake_config(), config(webhooks)).await
}

/// [`start`], with a fake that renders for ten minutes: its own callback stays out of the way,
/// and the only callbacks are the ones the test sends.
async fn start_long_render(webhooks: &str) -> Env {
    let mut fake = fake_config();
    fake.in_progress_for = Duration::from_secs(600);
    Env::start_with(fake, config(webhooks)).await
}

async fn generate(env: &Env, key: &str, body: Value) -> Reply {
    env.api().generate(key, &body.to_string()).await
}

/// Starts a render whose callback goes to `receiver_port`; returns its task id.
async fn start_task(env: &Env, receiver_port: u16) -> String {
    generate(
        env,
        DESIGN_KEY,
        json!({"model": "google/gempix2", "prompt": "a tomato",
               "callback_url": format!("http://127.0.0.1:{receiver_port}/hook")}),
    )
    .await
    .task_id()
}

/// The callback URL the upstream was given for the most recent generation.
fn callback_url_given_upstream(env: &Env) -> String {
    let bodies = env.fake.stats().generate_bodies;
    bodies.last().expect("a generation reached the upstream")["callback_url"]
        .as_str()
        .expect("a callback_url")
        .to_owned()
}

/// `GET /admin/webhooks?state=dead` once it lists a delivery.
async fn wait_for_dead(env: &Env) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let dead = env.api().admin("/admin/webhooks?state=dead").await;
        if dead["webhooks"].as_array().is_some_and(|d| !d.is_empty()) {
            return dead;
        }
        assert!(Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn post_callback(env: &Env, url: &str, body: impl Into<reqwest::Body>) -> Reply {
    env.api()
        .send(
            env.api()
                .http
                .post(url)
                .header("content-type", "application/json")
                .body(body),
        )
        .await
}

/// Waits until design has spent `spent` and has nothing reserved.
async fn wait_for_spent(env: &Env, spent: &str) {
    env.api()
        .wait_for_budget(DESIGN_KEY, &format!("design to have spent {spent}"), |b| {
            b["spent"] == spent && b["reserved"] == "0.00000000"
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_settles_without_polling_and_is_delivered_once_signed() {
    let env = start("").await;
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let task_id = start_task(&env, listening.port).await;

    // The upstream was given the gateway's callback, never the team's URL.
    let given = callback_url_given_upstream(&env);
    assert!(
        given.starts_with(&format!("{}/callbacks/", env.gateway.url(""))),
        "{given}"
    );
    assert!(!given.contains("/hook"), "{given}");

    receiver
        .wait_for("one delivery", |r| r.delivered().len() == 1)
        .await;
    let (headers, body) = receiver.delivered().remove(0);
    verify(&headers, &body);
    let payload: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(payload["task_id"], task_id);
    assert_eq!(payload["status"], "success");
    // The task's state as the upstream confirmed it (its task query's eight places).
    assert_eq!(payload["consumed"], "0.50000000");
    assert!(headers["webhook-id"].to_str().unwrap().starts_with("msg_"));

    wait_for_spent(&env, "0.50000000").await;
    assert_eq!(
        env.fake.stats().query_requests,
        1,
        "settled by the callback and the one read that confirmed it"
    );

    // That read's final status is in the cache: a read costs the upstream nothing.
    let reply = env.api().query(DESIGN_KEY, &task_id).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-cache").as_deref(), Some("hit"));
    assert_eq!(reply.json()["data"], payload);
    assert_eq!(env.fake.stats().query_requests, 1);

    // Nothing more arrives later.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(receiver.seen().len(), 1);
    assert_eq!(
        env.api()
            .metric(
                "ketchup_gateway_webhook_deliveries_total{outcome=\"delivered\",team=\"design\"}"
            )
            .await,
        1.0
    );
    let delivered = env.api().admin("/admin/webhooks?state=delivered").await;
    assert_eq!(delivered["webhooks"][0]["task_id"], task_id);
    assert_eq!(delivered["webhooks"][0]["attempts"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_webhooks_are_listed_for_keep_finished_then_deleted_and_pending_ones_kept() {
    let env = start("keep_finished = \"3s\"").await;
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let delivered_task = start_task(&env, listening.port).await;
    receiver
        .wait_for("one delivery", |r| r.delivered().len() == 1)
        .await;
    let delivered_at = Instant::now();
    // Nobody listens here: this one stays pending, retried, for the whole test.
    let pending_task = start_task(&env, free_port()).await;

    let listed = |state: &'static str| {
        let env = &env;
        async move {
            let page = env
                .api()
                .admin(&format!("/admin/webhooks?state={state}"))
                .await;
            page["webhooks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["task_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let deadline = Instant::now() + DEADLINE;
    while listed("delivered").await == [delivered_task.clone()] {
        assert!(
            Instant::now() < deadline,
            "the delivered webhook was never deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(listed("delivered").await.is_empty());
    assert!(
        delivered_at.elapsed() >= Duration::from_secs(2),
        "deleted {:?} after it was delivered, before keep_finished had passed",
        delivered_at.elapsed()
    );
    assert_eq!(
        env.api()
            .metric("ketchup_gateway_webhook_deliveries_deleted_total")
            .await,
        1.0
    );

    // The pending delivery is still there, and still tried.
    assert_eq!(listed("pending").await, [pending_task]);
    let page = env.api().admin("/admin/webhooks?state=pending").await;
    assert!(
        page["webhooks"][0]["attempts"].as_u64().unwrap() > 1,
        "{page}"
    );
    assert_eq!(receiver.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_callback_thrice_settles_once_and_delivers_the_upstreams_state_once() {
    let env = start("").await;
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    // Ours twice at once, in a form no serializer would produce, and the fake's own about when
    // the task is final: each is confirmed, one settles, one delivery goes out.
    let task_id = start_task(&env, listening.port).await;
    let url = callback_url_given_upstream(&env);
    wait_until_final(&env.fake, std::slice::from_ref(&task_id)).await;
    let odd = format!(
        "{{ \"task_id\" : \"{task_id}\",\n  \"status\":\"success\", \"consumed\":\"0.500000\", \"result\":[{{\"image\":\"https://x/1.png\"}}] ,\"status_reason\":{{\"message\":null}} }}"
    );
    let (first, second) = tokio::join!(
        post_callback(&env, &url, odd.clone()),
        post_callback(&env, &url, odd.clone())
    );
    assert_eq!((first.status, second.status), (200, 200), "{}", first.text);

    receiver
        .wait_for("the delivery", |r| !r.delivered().is_empty())
        .await;
    // Let the fake's own callback arrive too.
    let deadline = Instant::now() + DEADLINE;
    while env.fake.stats().callbacks_sent == 0 {
        assert!(Instant::now() < deadline, "the fake never called back");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let delivered = receiver.delivered();
    assert_eq!(delivered.len(), 1, "one delivery for one task");
    verify(&delivered[0].0, &delivered[0].1);
    let read = env.api().query(DESIGN_KEY, &task_id).await;
    assert_eq!(read.x_cache(), "hit");
    let payload: Value = serde_json::from_slice(&delivered[0].1).unwrap();
    assert_eq!(
        payload,
        read.json()["data"],
        "the upstream's state, not ours"
    );
    assert_eq!(
        upstream_reads(&env.fake, &task_id),
        1,
        "one confirming read"
    );
    // Settled once, at the upstream's amount.
    wait_for_spent(&env, "0.50000000").await;
    assert_eq!(
        env.api()
            .metric("ketchup_gateway_callbacks_total{outcome=\"settled\"}")
            .await,
        1.0
    );
    assert_eq!(
        env.api()
            .metric("ketchup_gateway_callbacks_total{outcome=\"repeated\"}")
            .await,
        2.0
    );
    let usage = env.api().admin("/admin/usage").await;
    assert_eq!(usage["rows"][0]["tasks"], 1, "{usage}");
    assert_eq!(usage["rows"][0]["credits"], "0.50000000", "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_the_delivery_once_it_recovers_even_across_a_sigkill() {
    let mut env = start("").await;
    // First a 500, then nobody listening, then the gateway is killed and restarted, then the
    // receiver is back.
    let receiver = Receiver::answering(&[500]);
    let listening = receiver.listen(0).await;
    start_task(&env, listening.port).await;
    receiver
        .wait_for("the first attempt", |r| r.seen().len() == 1)
        .await;
    let port = listening.stop();
    // Killed only once the ledger holds the failed attempt (the log line comes just before it):
    // a kill in between would leave the attempt's lease standing past this test's deadline.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let pending = env.api().admin("/admin/webhooks?state=pending").await;
        let recorded = pending["webhooks"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("could not reach the receiver"));
        if recorded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed attempt recorded: {pending}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    env.gateway.restart_after_kill();
    let listening = receiver.listen(port).await;
    receiver
        .wait_for("the delivery", |r| r.delivered().len() == 1)
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(receiver.delivered().len(), 1, "delivered once");
    let seen = receiver.seen();
    assert_eq!(seen[0].2, 500);
    // Every attempt carried the same id, so a receiver can tell repeats apart.
    let ids: Vec<_> = seen
        .iter()
        .map(|(h, _, _)| h["webhook-id"].clone())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
    verify(&seen.last().unwrap().0, &seen.last().unwrap().1);
    let delivered = env.api().admin("/admin/webhooks?state=delivered").await;
    assert!(
        delivered["webhooks"][0]["attempts"].as_u64().unwrap() >= 3,
        "{delivered}"
    );
    drop(listening);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_recovers_is_dead_lettered_at_the_deadline() {
    let env = start("delivery_deadline = \"3s\"").await;
    let receiver = Receiver::answering(&[500; 100]);
    let listening = receiver.listen(0).await;
    let task_id = start_task(&env, listening.port).await;
    let dead = wait_for_dead(&env).await;
    let entry = &dead["webhooks"][0];
    assert_eq!(entry["task_id"], task_id);
    assert_eq!(entry["team"], "design");
    assert_eq!(
        entry["url"],
        format!("http://127.0.0.1:{}/hook", listening.port)
    );
    assert!(entry["attempts"].as_u64().unwrap() >= 2, "{entry}");
    assert!(
        entry["last_error"]
            .as_str()
            .unwrap()
            .contains("answered 500 Internal Server Error; the delivery deadline passed"),
        "{entry}"
    );
    assert_eq!(
        env.api()
            .metric("ketchup_gateway_webhook_deliveries_total{outcome=\"dead\",team=\"design\"}")
            .await,
        1.0
    );
    // The credits settled regardless.
    wait_for_spent(&env, "0.50000000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_callbacks_change_nothing() {
    let env = start_long_render("").await;
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    let task_id = start_task(&env, listening.port).await;
    let url = callback_url_given_upstream(&env);
    let token_less = format!("{}/callbacks/", env.gateway.url(""));
    let payload =
        json!({"task_id": task_id, "status": "success", "consumed": "0.100000"}).to_string();

    let unknown = post_callback(
        &env,
        &format!("{token_less}{}", "0".repeat(64)),
        payload.clone(),
    )
    .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(
        unknown.json(),
        json!({"code": 1, "message": "callback not found"})
    );
    let huge_token = post_callback(
        &env,
        &format!("{token_less}{}", "x".repeat(5000)),
        payload.clone(),
    )
    .await;
    assert_eq!(huge_token.status, 404);

    let malformed = post_callback(&env, &url, "{\"task_id\": ").await;
    assert_eq!(malformed.status, 400, "{}", malformed.text);
    assert_eq!(malformed.json()["code"], 1);
    let not_final = post_callback(
        &env,
        &url,
        json!({"task_id": task_id, "status": "in_progress"}).to_string(),
    )
    .await;
    assert_eq!(not_final.status, 400);
    let other_task = post_callback(
        &env,
        &url,
        json!({"task_id": "ta-someone-else", "status": "success", "consumed": "0.1"}).to_string(),
    )
    .await;
    assert_eq!(other_task.status, 400);
    assert!(
        other_task.json()["detail"]
            .as_str()
            .unwrap()
            .contains("does not match")
    );

    // Nothing was settled or sent.
    let budget = env.api().budget(DESIGN_KEY).await;
    assert_eq!(budget["spent"], "0.00000000", "{budget}");
    assert_eq!(budget["reserved"], "0.50000000", "{budget}");
    assert!(receiver.seen().is_empty());
    assert!(
        env.api().admin("/admin/webhooks?state=pending").await["webhooks"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // No token ever reaches the log.
    let token = url.rsplit('/').next().unwrap();
    assert!(!env.gateway.logs().contains(token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_urls_to_internal_addresses_are_refused_before_anything_is_spent() {
    let env = start("").await;
    for url in [
        // `ads` has no callback_hosts: loopback is off limits.
        format!("http://127.0.0.1:{}/hook", free_port()),
        "http://localhost/hook".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[::1]:8080/hook".to_owned(),
    ] {
        let reply = generate(
            &env,
            ADS_KEY,
            json!({"model": "google/gempix2", "prompt": "x", "callback_url": url}),
        )
        .await;
        assert_eq!(reply.status, 400, "{url}: {}", reply.text);
        assert!(
            reply.json()["detail"]
                .as_str()
                .unwrap()
                .contains("callback_hosts"),
            "{}",
            reply.text
        );
    }
    // Even design's allow-list opens only the hosts it names.
    let metadata = generate(
        &env,
        DESIGN_KEY,
        json!({"model": "google/gempix2", "prompt": "x",
                   "callback_url": "http://169.254.169.254/"}),
    )
    .await;
    assert_eq!(metadata.status, 400);
    assert_eq!(env.fake.stats().generate_requests, 0);
    assert_eq!(env.api().budget(DESIGN_KEY).await["reserved"], "0.00000000");
}

/// Internal addresses in the forms that carry an IPv4 address inside an IPv6 one
/// (IPv4-compatible, NAT64, 6to4), and in 0.0.0.0/8, "this network".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_urls_to_internal_addresses_in_other_forms_are_refused() {
    let env = start("").await;
    for (url, reason) in [
        ("http://[::7f00:1]/hook", "loopback"),
        ("http://[64:ff9b::7f00:1]/hook", "loopback"),
        ("http://[64:ff9b::a9fe:a9fe]/latest/meta-data/", "metadata"),
        ("http://[2002:7f00:1::]/hook", "loopback"),
        ("http://0.1.2.3/hook", "this network"),
    ] {
        let reply = generate(
            &env,
            ADS_KEY,
            json!({"model": "google/gempix2", "prompt": "x", "callback_url": url}),
        )
        .await;
        assert_eq!(reply.status, 400, "{url}: {}", reply.text);
        let detail = reply.json()["detail"].as_str().unwrap().to_owned();
        assert!(
            detail.contains("callback_url host") && detail.contains(reason),
            "{url}: {detail}"
        );
    }
    assert_eq!(env.fake.stats().generate_requests, 0);
    assert_eq!(env.api().budget(ADS_KEY).await["reserved"], "0.00000000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_intercept_settles_tasks_that_gave_no_callback() {
    let env = start("always_intercept = true").await;
    let reply = generate(
        &env,
        DESIGN_KEY,
        json!({"model": "google/gempix2", "prompt": "a tomato"}),
    )
    .await;
    reply.task_id();
    assert!(callback_url_given_upstream(&env).contains("/callbacks/"));
    wait_for_spent(&env, "0.50000000").await;
    assert_eq!(env.fake.stats().query_requests, 1, "the confirming read");
    // Nothing to deliver: the team asked for no webhook.
    assert!(
        env.api().admin("/admin/webhooks?state=pending").await["webhooks"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_intercept_adds_a_callback_only_where_the_route_takes_one() {
    let config = config("always_intercept = true").model_reserve(
        "sora-2",
        r#"{ by = "duration", prices = { "10" = "1.00" } }"#,
    );
    let env = Env::start_with(fake_config(), config).await;
    // Sora is not known to take callback_url: the body goes as the client wrote it.
    let video = env
        .api()
        .submit(
            DESIGN_KEY,
            "/api/sora2/gen",
            r#"{"model":"sora-2","prompt":"a tomato","duration":"10"}"#,
        )
        .await;
    video.task_id();
    let bodies = env.fake.stats().generate_bodies;
    assert_eq!(bodies.len(), 1);
    assert!(bodies[0].get("callback_url").is_none(), "{}", bodies[0]);
    // A callback the client asked for is still taken over, on any route.
    let asked = env
        .api()
        .submit(
            DESIGN_KEY,
            "/api/sora2/gen",
            r#"{"model":"sora-2","prompt":"a tomato","duration":"10","callback_url":"http://127.0.0.1:9/hook"}"#,
        )
        .await;
    asked.task_id();
    assert!(callback_url_given_upstream(&env).contains("/callbacks/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_holds_up_no_other_delivery() {
    let env = start("attempt_timeout = \"30s\"").await;
    // Accepts connections and reads nothing, answers nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        loop {
            let (socket, _) = silent.accept().await.unwrap();
            connections.push(socket);
        }
    });
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;

    start_task(&env, silent_port).await;
    // Its delivery is under way, held by the silent receiver, before the other task starts.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let pending = env.api().admin("/admin/webhooks?state=pending").await;
        if pending["webhooks"][0]["attempts"]
            .as_u64()
            .is_some_and(|attempts| attempts >= 1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the silent receiver's delivery never started: {pending}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let started = Instant::now();
    let task_id = start_task(&env, listening.port).await;
    receiver
        .wait_for("the other team's delivery", |r| r.delivered().len() == 1)
        .await;
    // Well within the silent receiver's 30 s attempt: it held one delivery slot, nothing more.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let payload: Value = serde_json::from_slice(&receiver.delivered()[0].1).unwrap();
    assert_eq!(payload["task_id"], task_id);
    // Only the silent receiver's delivery is pending (the other one may not be recorded as
    // delivered yet when its receiver has it).
    let pending = env.api().admin("/admin/webhooks?state=pending").await;
    let waiting: Vec<_> = pending["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["task_id"] != task_id)
        .collect();
    assert_eq!(waiting.len(), 1, "{pending}");
    assert_eq!(
        waiting[0]["url"],
        format!("http://127.0.0.1:{silent_port}/hook"),
        "{pending}"
    );
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_teams_silent_receiver_takes_only_its_share_of_the_delivery_slots() {
    let env = Env::start_with(
        fake_config(),
        config(
            "attempt_timeout = \"30s\"\nmax_concurrent_deliveries = 4\n\
             max_concurrent_deliveries_per_team = 2",
        )
        .callback_hosts("ads", &["127.0.0.1"]),
    )
    .await;
    // Accepts connections, counts them, reads nothing and answers nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        loop {
            let (socket, _) = silent.accept().await.unwrap();
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            connections.push(socket);
        }
    });
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;

    // More of design's deliveries to the silent receiver than there are slots in all, every one
    // queued before ads has anything to deliver.
    for _ in 0..6 {
        start_task(&env, silent_port).await;
    }
    let deadline = Instant::now() + DEADLINE;
    while env.api().admin("/admin/webhooks?state=pending").await["webhooks"]
        .as_array()
        .unwrap()
        .len()
        < 6
    {
        assert!(Instant::now() < deadline, "design's callbacks never came");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let started = Instant::now();
    let task_id = generate(
        &env,
        ADS_KEY,
        json!({"model": "google/gempix2", "prompt": "a tomato",
                   "callback_url": format!("http://127.0.0.1:{}/hook", listening.port)}),
    )
    .await
    .task_id();
    receiver
        .wait_for("ads' delivery", |r| r.delivered().len() == 1)
        .await;
    // Well within the silent receiver's 30 s attempts, which would hold every slot uncapped.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let (headers, body) = receiver.delivered().remove(0);
    verify(&headers, &body);
    let payload: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(payload["task_id"], task_id);

    // design holds its two slots; its other deliveries wait unattempted.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    // (ads' delivery may still be pending here: recorded just after its receiver answered.)
    let pending = env.api().admin("/admin/webhooks?state=pending").await;
    let mut attempts: Vec<u64> = pending["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["team"] == "design")
        .map(|d| d["attempts"].as_u64().unwrap())
        .collect();
    attempts.sort();
    assert_eq!(attempts, [0, 0, 0, 0, 1, 1], "{pending}");
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_a_reload_takes_off_callback_hosts_is_refused_at_delivery() {
    // The only callback is the one this test sends, after the reload.
    let mut env = Env::start_with(
        fake_config(),
        config("").server(&format!(
            "public_url = \"http://127.0.0.1:{}\"",
            free_port()
        )),
    )
    .await;
    let receiver = Receiver::answering(&[]);
    let listening = receiver.listen(0).await;
    // Allowed when the generation came in.
    let task_id = start_task(&env, listening.port).await;
    let given = callback_url_given_upstream(&env);
    let token = given.rsplit('/').next().unwrap();

    let without = env.gateway.config().clone().callback_hosts("design", &[]);
    env.gateway.reload(without).await;

    wait_until_final(&env.fake, std::slice::from_ref(&task_id)).await;
    let payload = json!({"task_id": task_id, "status": "success", "consumed": "0.500000",
                         "result": [{"image": "https://x/1.png"}]});
    let url = env.gateway.url(&format!("/callbacks/{token}"));
    let reply = post_callback(&env, &url, payload.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let dead = wait_for_dead(&env).await;
    let entry = &dead["webhooks"][0];
    assert_eq!(entry["task_id"], task_id, "{entry}");
    // Dead at the first attempt: no retry can make the address allowed.
    assert_eq!(entry["attempts"], 1, "{entry}");
    let error = entry["last_error"].as_str().unwrap();
    assert!(
        error.contains("host 127.0.0.1 is a loopback address"),
        "{entry}"
    );
    assert!(receiver.seen().is_empty(), "the receiver got nothing");
    // The credits settled regardless.
    wait_for_spent(&env, "0.50000000").await;
    drop(listening);
}
