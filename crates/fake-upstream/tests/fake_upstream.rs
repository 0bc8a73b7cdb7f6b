//! The fake upstream through real sockets: exact contract bodies, the clock-driven render
//! schedule, faults, callbacks, counters and the `/_fake/*` control API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use chrono::{DateTime, Utc};
use http::StatusCode;
use ketchup_domain::clock::ManualClock;
use ketchup_domain::credits::Credits;
use ketchup_fake_upstream::{
    self, FakeAccount, FakeConfig, FakeHandle, FakeTaskView, Fault, FaultCounts, FaultRates,
    TaskStatus,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const TOKEN: &str = "dk-1234567890abcdef";
const CREATED_AT: &str = "2025-09-10T10:22:20.010Z";

/// A fake on a manual clock with phases of 1 s, 2 s and 3 s (final after 6 s).
async fn fake(adjust: impl FnOnce(&mut FakeConfig)) -> (FakeHandle, Arc<ManualClock>) {
    let start: DateTime<Utc> = CREATED_AT.parse().expect("valid start time");
    let clock = ManualClock::new(start);
    let mut config = FakeConfig::new(TOKEN);
    config.clock = clock.clone();
    config.pending_for = Duration::from_secs(1);
    config.submitted_for = Duration::from_secs(2);
    config.in_progress_for = Duration::from_secs(3);
    adjust(&mut config);
    let handle = ketchup_fake_upstream::start(config)
        .await
        .expect("fake starts");
    (handle, clock)
}

/// Sends a request and returns its status and body text, so bodies are compared byte for byte.
async fn send(request: reqwest::RequestBuilder) -> (StatusCode, String) {
    let response = request.send().await.expect("fake answers");
    let status = response.status();
    (status, response.text().await.expect("body is text"))
}

fn generate(client: &reqwest::Client, fake: &FakeHandle, body: &Value) -> reqwest::RequestBuilder {
    client
        .post(format!("{}/api/image/gen", fake.base_url()))
        .bearer_auth(TOKEN)
        .json(body)
}

fn query(client: &reqwest::Client, fake: &FakeHandle, task_id: &str) -> reqwest::RequestBuilder {
    client
        .get(format!(
            "{}/api/task/query?task_id={task_id}",
            fake.base_url()
        ))
        .bearer_auth(TOKEN)
}

/// Creates a task and returns its id.
async fn create(client: &reqwest::Client, fake: &FakeHandle, body: Value) -> String {
    let (status, text) = send(generate(client, fake, &body)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let reply: Value = serde_json::from_str(&text).expect("JSON reply");
    assert_eq!(reply["code"], 0);
    assert_eq!(reply["message"], "ok");
    reply["data"]["task_id"]
        .as_str()
        .expect("task id")
        .to_owned()
}

fn prompt(text: &str) -> Value {
    json!({"model": "google/gempix2", "prompt": text})
}

#[tokio::test]
async fn unauthorized_requests_get_each_endpoints_exact_401() {
    let (fake, _clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    let base = fake.base_url();

    let (status, body) = send(
        client
            .post(format!("{base}/api/image/gen"))
            .json(&prompt("x")),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"code":1,"message":"Invalid API key"}"#);

    let wrong = client
        .post(format!("{base}/api/image/gen"))
        .bearer_auth("dk-wrong")
        .json(&prompt("x"));
    assert_eq!(
        send(wrong).await,
        (
            StatusCode::UNAUTHORIZED,
            r#"{"code":1,"message":"Invalid API key"}"#.to_owned()
        )
    );

    let wrong = client
        .get(format!("{base}/api/task/query?task_id=ta1"))
        .bearer_auth("dk-wrong");
    assert_eq!(
        send(wrong).await,
        (
            StatusCode::UNAUTHORIZED,
            r#"{"code":401,"message":"Invalid API key"}"#.to_owned()
        )
    );

    let wrong = client
        .get(format!("{base}/api/user"))
        .bearer_auth("dk-wrong");
    assert_eq!(
        send(wrong).await,
        (
            StatusCode::UNAUTHORIZED,
            r#"{"code":1,"message":"Invalid API key"}"#.to_owned()
        )
    );

    let stats = fake.stats();
    assert_eq!(stats.unauthorized, 4);
    assert_eq!(stats.generate_requests, 2);
    assert_eq!(stats.generate_accepted, 0);
    assert_eq!(stats.query_requests, 1);
    assert_eq!(stats.user_requests, 1);
    assert_eq!(stats.authorization_headers, vec!["Bearer dk-wrong"]);
    assert!(stats.tasks.is_empty());
}

#[tokio::test]
async fn invalid_generations_get_400_with_a_detail_and_create_nothing() {
    let (fake, _clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    let six_images = vec!["https://example.com/a.png"; 6];
    let cases = [
        (
            json!(["not", "an", "object"]),
            "request body must be a JSON object",
        ),
        (json!({"model": "google/gempix2"}), "prompt is required"),
        (
            json!({"model": "google/gempix2", "prompt": ""}),
            "prompt is required",
        ),
        (
            json!({"model": "google/gempix2", "prompt": null}),
            "prompt is required",
        ),
        (
            json!({"model": "google/gempix2", "prompt": 7}),
            "prompt must be a string",
        ),
        (json!({"prompt": "a cat"}), "model is required"),
        (
            json!({"model": 3, "prompt": "a cat"}),
            "model must be a string",
        ),
        (
            json!({"model": "google/nano-banana-9", "prompt": "a cat"}),
            "unsupported model: google/nano-banana-9",
        ),
        (
            json!({"model": "google/gempix2", "prompt": "a cat", "images": six_images}),
            "images allows at most 5 reference images",
        ),
        (
            json!({"model": "google/gempix2", "prompt": "a cat", "images": "a.png"}),
            "images must be an array of image URLs",
        ),
        (
            json!({"model": "google/gempix2", "prompt": "a cat", "n": 0}),
            "n must be an integer from 1 to 4",
        ),
        (
            json!({"model": "google/gempix2", "prompt": "a cat", "n": 5}),
            "n must be an integer from 1 to 4",
        ),
        (
            json!({"model": "google/gempix2", "prompt": "a cat", "n": "2"}),
            "n must be an integer from 1 to 4",
        ),
        (
            json!({"model": "google/gempix2", "prompt": "a cat", "callback_url": "/hook"}),
            "callback_url must be an absolute http(s) URL",
        ),
    ];
    for (body, detail) in &cases {
        let (status, text) = send(generate(&client, &fake, body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(
            text,
            format!(r#"{{"code":1,"message":"failed","detail":"{detail}"}}"#),
            "{body}"
        );
    }
    let malformed = client
        .post(format!("{}/api/image/gen", fake.base_url()))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{\"model\":");
    assert_eq!(
        send(malformed).await,
        (
            StatusCode::BAD_REQUEST,
            r#"{"code":1,"message":"failed","detail":"invalid JSON body"}"#.to_owned()
        )
    );

    let five_images = json!({
        "model": "google/gempix2", "prompt": "a cat", "images": vec!["https://example.com/a.png"; 5]
    });
    create(&client, &fake, five_images).await;

    let stats = fake.stats();
    assert_eq!(stats.generate_requests, cases.len() as u64 + 2);
    assert_eq!(stats.generate_accepted, 1);
    assert_eq!(stats.tasks.len(), 1);
    // Every body that parsed was recorded, the malformed one could not be.
    assert_eq!(stats.generate_bodies.len(), cases.len() + 1);
    assert_eq!(stats.generate_bodies[0], cases[0].0);
}

#[tokio::test]
async fn a_task_moves_through_every_status_on_the_clock() {
    let (fake, clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    let body = json!({
        "model": "google/gempix2", "prompt": "two cats", "n": 2,
        "aspect_ratio": "16:9", "image_size": "2k", "x-unknown": {"nested": [1, 2]}
    });
    let id = create(&client, &fake, body.clone()).await;
    assert_eq!(id.len(), 36);
    assert!(id.starts_with("ta"));
    assert_eq!(id.as_bytes()[8], b'-');
    assert_eq!(id.as_bytes()[14], b'4', "a v4 uuid underneath");

    let not_final = |status: &str| {
        format!(
            r#"{{"code":0,"message":"ok","data":{{"result":null,"status":"{status}","task_id":"{id}","created_at":"{CREATED_AT}","status_reason":{{"message":null}}}}}}"#
        )
    };
    assert_eq!(
        send(query(&client, &fake, &id)).await,
        (StatusCode::OK, not_final("pending"))
    );
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        send(query(&client, &fake, &id)).await,
        (StatusCode::OK, not_final("submitted"))
    );
    clock.advance(Duration::from_secs(2));
    assert_eq!(
        send(query(&client, &fake, &id)).await,
        (StatusCode::OK, not_final("in_progress"))
    );
    clock.advance(Duration::from_millis(2_999));
    assert_eq!(
        send(query(&client, &fake, &id)).await,
        (StatusCode::OK, not_final("in_progress"))
    );
    clock.advance(Duration::from_millis(1));
    let files = format!("{}/_fake/files", fake.base_url());
    let success = format!(
        r#"{{"code":0,"message":"ok","data":{{"result":[{{"image":"{files}/images/{id}/0.png"}},{{"image":"{files}/images/{id}/1.png"}}],"status":"success","task_id":"{id}","consumed":"1.00000000","created_at":"{CREATED_AT}","status_reason":{{"message":null}}}}}}"#
    );
    assert_eq!(
        send(query(&client, &fake, &id)).await,
        (StatusCode::OK, success)
    );

    let stats = fake.stats();
    assert_eq!(stats.query_requests, 5);
    assert_eq!(stats.queries_by_task.get(&id), Some(&5));
    assert_eq!(
        stats.generate_bodies,
        vec![body],
        "unknown fields arrive untouched"
    );
    assert_eq!(
        stats.tasks.get(&id),
        Some(&FakeTaskView {
            account: "default".into(),
            model: "google/gempix2".into(),
            status: TaskStatus::Success,
            consumed: Some("1.00000000".into()),
            request_id: None,
        })
    );
}

#[tokio::test]
async fn a_new_task_is_unknown_to_queries_for_a_while() {
    let (fake, clock) = fake(|config| config.unknown_for = Duration::from_secs(2)).await;
    let client = reqwest::Client::new();
    let id = create(&client, &fake, prompt("a cat")).await;
    let not_found = (
        StatusCode::NOT_FOUND,
        r#"{"code":1,"message":"task not found"}"#.to_owned(),
    );

    assert_eq!(send(query(&client, &fake, &id)).await, not_found);
    clock.advance(Duration::from_millis(1_999));
    assert_eq!(send(query(&client, &fake, &id)).await, not_found);
    clock.advance(Duration::from_millis(1));
    let (status, text) = send(query(&client, &fake, &id)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains(r#""status":"submitted""#), "{text}");

    let unknown = "ta000000-0000-4000-8000-000000000000";
    assert_eq!(send(query(&client, &fake, unknown)).await, not_found);
    let missing = client
        .get(format!("{}/api/task/query", fake.base_url()))
        .bearer_auth(TOKEN);
    assert_eq!(
        send(missing).await,
        (
            StatusCode::BAD_REQUEST,
            r#"{"code":1,"message":"failed","detail":"task_id is required"}"#.to_owned()
        )
    );
    let stats = fake.stats();
    assert_eq!(stats.query_requests, 5);
    assert_eq!(
        stats.queries_by_task.len(),
        1,
        "only existing tasks are counted per id"
    );
    assert_eq!(stats.queries_by_task.get(&id), Some(&3));
}

#[tokio::test]
async fn fail_task_fault_and_fail_marker_end_failed_at_no_cost() {
    let (fake, clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    fake.faults().inject_generate(Fault::FailTask, 1);
    let injected = create(&client, &fake, prompt("a cat")).await;
    let marked = create(&client, &fake, prompt("a cat [fail] please")).await;
    let fine = create(&client, &fake, prompt("a cat")).await;
    clock.advance(Duration::from_secs(6));

    for id in [&injected, &marked] {
        let failed = format!(
            r#"{{"code":0,"message":"ok","data":{{"result":null,"status":"failed","task_id":"{id}","consumed":"0.00000000","created_at":"{CREATED_AT}","status_reason":{{"message":"content policy violation"}}}}}}"#
        );
        assert_eq!(
            send(query(&client, &fake, id)).await,
            (StatusCode::OK, failed)
        );
    }
    let (_, text) = send(query(&client, &fake, &fine)).await;
    assert!(text.contains(r#""status":"success""#), "{text}");

    let user = client
        .get(format!("{}/api/user", fake.base_url()))
        .bearer_auth(TOKEN);
    assert_eq!(
        send(user).await,
        (
            StatusCode::OK,
            r#"{"code":0,"message":"ok","data":{"credit":"100.00000000"}}"#.to_owned()
        )
    );
}

#[tokio::test]
async fn the_balance_drops_as_tasks_finish() {
    let (fake, clock) = fake(|config| {
        config.consumed.insert(
            "google/gemini-2.5-flash-image".into(),
            "0.25".parse().expect("amount"),
        );
    })
    .await;
    let client = reqwest::Client::new();
    let balance = || {
        let user = client
            .get(format!("{}/api/user", fake.base_url()))
            .bearer_auth(TOKEN);
        async move {
            let (status, text) = send(user).await;
            assert_eq!(status, StatusCode::OK);
            text
        }
    };
    let credit =
        |amount: &str| format!(r#"{{"code":0,"message":"ok","data":{{"credit":"{amount}"}}}}"#);

    assert_eq!(balance().await, credit("100.50000000"));
    create(&client, &fake, prompt("one")).await;
    clock.advance(Duration::from_secs(3));
    let body = json!({"model": "google/gemini-2.5-flash-image", "prompt": "three", "n": 3});
    create(&client, &fake, body).await;
    assert_eq!(balance().await, credit("100.50000000"), "nothing final yet");
    clock.advance(Duration::from_secs(3));
    assert_eq!(balance().await, credit("100.00000000"));
    clock.advance(Duration::from_secs(3));
    assert_eq!(balance().await, credit("99.25000000"));
    assert_eq!(fake.stats().user_requests, 4);
}

#[tokio::test]
async fn each_account_has_its_own_token_balance_and_tasks() {
    const SPARE: &str = "dk-spare-0123456789";
    let (fake, clock) = fake(|config| {
        config.accounts.push(FakeAccount {
            name: "spare".into(),
            token: SPARE.into(),
            initial_balance: "10.00".parse().expect("amount"),
        });
    })
    .await;
    let client = reqwest::Client::new();
    let user = |token: &'static str| {
        send(
            client
                .get(format!("{}/api/user", fake.base_url()))
                .bearer_auth(token),
        )
    };
    let credit =
        |amount: &str| format!(r#"{{"code":0,"message":"ok","data":{{"credit":"{amount}"}}}}"#);
    let (status, text) = send(
        client
            .post(format!("{}/api/image/gen", fake.base_url()))
            .bearer_auth(SPARE)
            .json(&prompt("spare's")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let reply: Value = serde_json::from_str(&text).expect("JSON reply");
    let spares = reply["data"]["task_id"]
        .as_str()
        .expect("task id")
        .to_owned();
    let defaults = create(&client, &fake, prompt("default's")).await;
    clock.advance(Duration::from_secs(6));
    // Only the account that created a task can read it.
    let read = |task: &str, token: &'static str| {
        send(
            client
                .get(format!("{}/api/task/query?task_id={task}", fake.base_url()))
                .bearer_auth(token),
        )
    };
    assert_eq!(read(&spares, SPARE).await.0, StatusCode::OK);
    assert_eq!(read(&spares, TOKEN).await.0, StatusCode::NOT_FOUND);
    assert_eq!(read(&defaults, SPARE).await.0, StatusCode::NOT_FOUND);
    assert_eq!(user(SPARE).await.1, credit("9.50000000"));
    assert_eq!(user(TOKEN).await.1, credit("100.00000000"));
    let stats = fake.stats();
    assert_eq!(stats.foreign_queries, 2);
    assert_eq!(stats.tasks[&spares].account, "spare");
    assert_eq!(stats.tasks[&defaults].account, "default");
    assert_eq!(stats.accounts["spare"].spent, "0.50000000");
    assert_eq!(stats.accounts["spare"].tasks, 1);
    // A revoked token is refused everywhere until restored; a top-up raises the balance.
    fake.revoke("spare");
    assert_eq!(user(SPARE).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(read(&spares, SPARE).await.0, StatusCode::UNAUTHORIZED);
    assert!(fake.stats().accounts["spare"].revoked);
    fake.restore("spare");
    fake.top_up("spare", "1.25".parse().expect("amount"));
    assert_eq!(user(SPARE).await.1, credit("10.75000000"));
    assert_eq!(user(TOKEN).await.1, credit("100.00000000"));
}

#[tokio::test]
async fn status_500_fault_answers_500_and_creates_no_task() {
    let (fake, _clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    let internal = (
        StatusCode::INTERNAL_SERVER_ERROR,
        r#"{"code":1,"message":"internal server error"}"#.to_owned(),
    );

    fake.faults().inject_generate(Fault::Status500, 2);
    assert_eq!(send(generate(&client, &fake, &prompt("a"))).await, internal);
    assert_eq!(send(generate(&client, &fake, &prompt("a"))).await, internal);
    assert!(fake.stats().tasks.is_empty());
    let id = create(&client, &fake, prompt("a")).await;

    fake.faults().inject_query(Fault::Status500, 1);
    assert_eq!(send(query(&client, &fake, &id)).await, internal);
    assert_eq!(send(query(&client, &fake, &id)).await.0, StatusCode::OK);

    let stats = fake.stats();
    assert_eq!(stats.generate_requests, 3);
    assert_eq!(stats.generate_accepted, 1);
    assert_eq!(stats.query_requests, 2);
    assert_eq!(stats.tasks.len(), 1);
    assert_eq!(
        stats.faults,
        FaultCounts {
            generate_500: 2,
            query_500: 1,
            ..FaultCounts::default()
        }
    );
}

#[tokio::test]
async fn drop_connection_fault_closes_without_a_response_and_creates_no_task() {
    let (fake, _clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();

    fake.faults().inject_generate(Fault::DropConnection, 1);
    let error = generate(&client, &fake, &prompt("a"))
        .send()
        .await
        .expect_err("the connection is dropped, no response");
    assert!(!error.is_timeout() && !error.is_status(), "{error:?}");
    let stats = fake.stats();
    assert_eq!(stats.generate_requests, 1);
    assert_eq!(stats.generate_accepted, 0);
    assert!(stats.tasks.is_empty());

    let id = create(&client, &fake, prompt("a")).await;
    fake.faults().inject_query(Fault::DropConnection, 1);
    query(&client, &fake, &id)
        .send()
        .await
        .expect_err("the connection is dropped, no response");
    assert_eq!(send(query(&client, &fake, &id)).await.0, StatusCode::OK);
    assert_eq!(fake.stats().query_requests, 2);
}

#[tokio::test]
async fn slow_fault_delays_the_answer_but_a_generation_still_creates_its_task() {
    let (fake, _clock) = fake(|_| {}).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .expect("client");

    fake.faults()
        .inject_generate(Fault::Slow(Duration::from_millis(400)), 1);
    let error = generate(&impatient, &fake, &prompt("a"))
        .send()
        .await
        .expect_err("times out");
    assert!(error.is_timeout(), "{error:?}");
    let stats = fake.stats();
    assert_eq!(
        stats.generate_accepted, 1,
        "the outcome is unknown to the client, not absent"
    );
    let id = stats.tasks.keys().next().expect("one task").clone();

    let client = reqwest::Client::new();
    fake.faults()
        .inject_query(Fault::Slow(Duration::from_millis(300)), 1);
    let started = Instant::now();
    let (status, text) = send(query(&client, &fake, &id)).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains(r#""status":"pending""#), "{text}");
}

/// A webhook receiver on 127.0.0.1:0 that answers `statuses` in turn (then 200) and forwards
/// every body it gets.
async fn receiver(statuses: Vec<StatusCode>) -> (String, mpsc::UnboundedReceiver<String>) {
    struct Hook {
        statuses: std::sync::Mutex<std::vec::IntoIter<StatusCode>>,
        bodies: mpsc::UnboundedSender<String>,
    }
    async fn hook(State(hook): State<Arc<Hook>>, body: String) -> StatusCode {
        hook.bodies.send(body).expect("test is listening");
        let next = hook.statuses.lock().expect("lock").next();
        next.unwrap_or(StatusCode::OK)
    }
    let (bodies, received) = mpsc::unbounded_channel();
    let state = Arc::new(Hook {
        statuses: std::sync::Mutex::new(statuses.into_iter()),
        bodies,
    });
    let app = Router::new().route("/hook", post(hook)).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

async fn next_callback(received: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(5), received.recv())
        .await
        .expect("callback arrives in time")
        .expect("receiver alive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_is_posted_once_when_the_task_is_final() {
    let (fake, clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    let (url, mut received) = receiver(vec![]).await;
    let body = json!({"model": "google/gempix2", "prompt": "a cat", "callback_url": url});
    let id = create(&client, &fake, body).await;

    clock.advance(Duration::from_millis(5_999));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        received.try_recv().is_err(),
        "no callback before the task is final"
    );

    clock.advance(Duration::from_millis(1));
    let files = format!("{}/_fake/files", fake.base_url());
    let expected = format!(
        r#"{{"result":[{{"image":"{files}/images/{id}/0.png"}}],"status":"success","task_id":"{id}","consumed":"0.500000","status_reason":{{"message":null}}}}"#
    );
    assert_eq!(next_callback(&mut received).await, expected);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(received.try_recv().is_err(), "delivered once");
    let stats = fake.stats();
    assert_eq!((stats.callbacks_sent, stats.callbacks_failed), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_and_an_unreachable_one_given_up_on() {
    let (fake, clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    let (url, mut received) = receiver(vec![StatusCode::INTERNAL_SERVER_ERROR]).await;
    fake.faults().inject_generate(Fault::FailTask, 1);
    let body = json!({"model": "google/gempix2", "prompt": "a cat", "callback_url": url});
    let id = create(&client, &fake, body).await;
    clock.advance(Duration::from_secs(6));

    let expected = format!(
        r#"{{"result":null,"status":"failed","task_id":"{id}","consumed":"0.000000","status_reason":{{"message":"content policy violation"}}}}"#
    );
    assert_eq!(
        next_callback(&mut received).await,
        expected,
        "first attempt"
    );
    assert_eq!(
        next_callback(&mut received).await,
        expected,
        "retried after a 500"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(received.try_recv().is_err(), "no attempt after a 2xx");
    assert_eq!(fake.stats().callbacks_sent, 1);

    // Nobody listens on this port any more: every attempt fails.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}/hook", listener.local_addr().expect("addr"))
    };
    let body = json!({"model": "google/gempix2", "prompt": "a dog", "callback_url": closed});
    create(&client, &fake, body).await;
    clock.advance(Duration::from_secs(6));
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.stats().callbacks_failed == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = fake.stats();
    assert_eq!((stats.callbacks_sent, stats.callbacks_failed), (1, 1));
}

#[tokio::test]
async fn unknown_routes_and_methods_are_404() {
    let (fake, _clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    let not_found = (
        StatusCode::NOT_FOUND,
        r#"{"code":1,"message":"not found"}"#.to_owned(),
    );
    assert_eq!(
        send(client.get(format!("{}/api/nope", fake.base_url()))).await,
        not_found
    );
    assert_eq!(
        send(client.get(format!("{}/api/image/gen", fake.base_url()))).await,
        not_found
    );
}

#[tokio::test]
async fn headers_are_recorded_distinctly() {
    let (fake, _clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    for request_id in ["req-1", "req-2", "req-1"] {
        let request = generate(&client, &fake, &prompt("a")).header("x-request-id", request_id);
        assert_eq!(send(request).await.0, StatusCode::OK);
    }
    let other = client
        .get(format!("{}/api/user", fake.base_url()))
        .bearer_auth("team-key");
    send(other).await;
    let stats = fake.stats();
    assert_eq!(stats.request_ids, vec!["req-1", "req-2"]);
    let mut task_request_ids: Vec<Option<String>> =
        stats.tasks.values().map(|t| t.request_id.clone()).collect();
    task_request_ids.sort();
    assert_eq!(
        task_request_ids,
        ["req-1", "req-1", "req-2"].map(|id| Some(id.to_owned())),
        "each task keeps the request id of the generation that created it"
    );
    assert_eq!(
        stats.authorization_headers,
        vec![format!("Bearer {TOKEN}"), "Bearer team-key".to_owned()]
    );
    assert_eq!(
        (
            stats.request_ids_dropped,
            stats.authorization_headers_dropped
        ),
        (0, 0)
    );
    fake.reset_stats();
    let stats = fake.stats();
    assert!(stats.request_ids.is_empty() && stats.authorization_headers.is_empty());
    assert_eq!(stats.generate_requests, 0);
}

#[tokio::test]
async fn the_control_api_reports_sets_faults_and_resets() {
    let (fake, clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    let base = fake.base_url();
    let id = create(&client, &fake, prompt("a cat")).await;
    clock.advance(Duration::from_secs(6));
    send(query(&client, &fake, &id)).await;

    let stats: Value = client
        .get(format!("{base}/_fake/stats"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("JSON stats");
    assert_eq!(stats["generate_requests"], 1);
    assert_eq!(stats["generate_accepted"], 1);
    assert_eq!(stats["query_requests"], 1);
    assert_eq!(stats["queries_by_task"], json!({ id.clone(): 1 }));
    assert_eq!(
        stats["tasks"],
        json!({ id.clone(): {"account": "default", "model": "google/gempix2", "status": "success", "consumed": "0.50000000", "request_id": null} })
    );
    assert_eq!(stats["generate_bodies"], json!([prompt("a cat")]));

    let summary: Value = client
        .get(format!("{base}/_fake/stats?summary=true"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("JSON stats");
    assert_eq!(summary["generate_requests"], 1);
    assert_eq!(summary["tasks"], json!({}));
    assert_eq!(summary["generate_bodies"], json!([]));

    let rates = json!({"status_500": 1.0});
    let (status, text) = send(client.post(format!("{base}/_fake/faults")).json(&rates)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        text,
        r#"{"code":0,"message":"ok","data":{"status_500":1.0,"drop_connection":0.0,"slow":0.0,"slow_for_ms":0,"fail_task":0.0}}"#
    );
    assert_eq!(
        fake.faults().rates(),
        FaultRates {
            status_500: 1.0,
            ..FaultRates::default()
        }
    );
    assert_eq!(
        send(generate(&client, &fake, &prompt("a"))).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let (status, text) = send(
        client
            .post(format!("{base}/_fake/faults"))
            .json(&json!({"status500": 1})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "unknown fields are refused: {text}"
    );
    fake.faults().set_rates(FaultRates::default());
    assert_eq!(send(client.get(format!("{base}/_fake/faults"))).await.1, {
        r#"{"code":0,"message":"ok","data":{"status_500":0.0,"drop_connection":0.0,"slow":0.0,"slow_for_ms":0,"fail_task":0.0}}"#
    });

    assert_eq!(
        send(client.post(format!("{base}/_fake/reset"))).await,
        (StatusCode::OK, r#"{"code":0,"message":"ok"}"#.to_owned())
    );
    let stats = fake.stats();
    assert_eq!(stats.generate_requests, 0);
    assert_eq!(stats.query_requests, 0);
    assert!(stats.generate_bodies.is_empty() && stats.authorization_headers.is_empty());
    assert!(stats.queries_by_task.is_empty());
    assert_eq!(stats.tasks.len(), 1, "tasks are state, not statistics");
    assert_eq!(send(query(&client, &fake, &id)).await.0, StatusCode::OK);
}

#[tokio::test]
async fn shutting_down_closes_the_port() {
    let (fake, _clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    create(&client, &fake, prompt("a")).await;
    let base = fake.base_url();
    fake.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let error = reqwest::Client::new()
        .get(format!("{base}/api/user"))
        .send()
        .await
        .expect_err("nobody listens");
    assert!(error.is_connect(), "{error:?}");
}

#[tokio::test]
async fn defaults_match_the_guides() {
    let config = FakeConfig::new(TOKEN);
    assert_eq!(config.token, TOKEN);
    let half: Credits = "0.50".parse().expect("amount");
    assert_eq!(config.consumed.get("google/gempix2"), Some(&half));
    assert_eq!(
        config.consumed.get("google/gemini-2.5-flash-image"),
        Some(&half)
    );
    for model in ["sora-2", "seedance-2.0", "midjourney/imagine", "chirp-v4-5"] {
        assert!(config.consumed.contains_key(model), "{model} is priced");
    }
    assert_eq!(
        config.pending_for + config.submitted_for + config.in_progress_for,
        Duration::from_secs(3)
    );
    assert_eq!(config.unknown_for, Duration::ZERO);
    assert_eq!(config.initial_balance.format_places(8), "100.50000000");
}

#[tokio::test]
async fn hostile_requests_get_answers_not_panics() {
    let (fake, _clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    let base = fake.base_url();

    let huge = client
        .post(format!("{base}/api/image/gen"))
        .bearer_auth(TOKEN)
        .body(vec![b' '; 5 * 1024 * 1024]);
    assert_eq!(
        send(huge).await,
        (
            StatusCode::BAD_REQUEST,
            r#"{"code":1,"message":"failed","detail":"request body is unreadable or larger than 4 MiB"}"#
                .to_owned()
        )
    );

    let garbage_id = client
        .get(format!("{base}/api/task/query?task_id=%FF%FE&task_id=x"))
        .bearer_auth(TOKEN);
    assert_eq!(send(garbage_id).await.0, StatusCode::NOT_FOUND);

    let binary_key = http::HeaderValue::from_bytes(b"Bearer \xff").expect("opaque header value");
    let binary = client
        .get(format!("{base}/api/user"))
        .header("authorization", binary_key);
    assert_eq!(send(binary).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        fake.stats().authorization_headers,
        vec![format!("Bearer {TOKEN}"), "Bearer \u{fffd}".to_owned()]
    );

    let rates = client
        .post(format!("{base}/_fake/faults"))
        .body(r#"{"status_500": -1e308, "slow": 1e308, "slow_for_ms": 0}"#);
    assert_eq!(send(rates).await.0, StatusCode::OK);
    let (status, text) = send(client.get(format!("{base}/api/user")).bearer_auth(TOKEN)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "user is not subject to faults: {text}"
    );
    let (status, _) = send(generate(&client, &fake, &prompt("a"))).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a certain zero-length slow fault answers normally"
    );
}

/// Every asynchronous endpoint of the contract: a task is created, polled to success with the
/// endpoint's own result shape, and charges its own cost (video by the second).
#[tokio::test]
async fn every_asynchronous_endpoint_renders_with_its_own_result_and_cost() {
    let (fake, clock) = fake(|_| {}).await;
    let client = reqwest::Client::new();
    let cases = [
        (
            "/api/image/gen",
            json!({"model": "google/nano-banana-pro", "prompt": "x", "n": 2, "image_size": "2k"}),
            "/result/1/image",
            "0.60000000",
        ),
        (
            "/api/gpt-image/gen",
            json!({"model": "openai/gpt-image-2", "prompt": "x"}),
            "/result/0/image",
            "0.10000000",
        ),
        (
            "/api/wan-image/gen",
            json!({"model": "wan-2.7-image", "prompt": "x"}),
            "/result/image",
            "0.05000000",
        ),
        (
            "/api/midjourney/imagine",
            json!({"prompt": "x", "speed": "fast"}),
            "/result/big_image_url",
            "0.20000000",
        ),
        (
            "/api/midjourney/edits",
            json!({"prompt": "x", "image": "https://a/b.png"}),
            "/result/big_image_url",
            "0.25000000",
        ),
        (
            "/api/sora2/gen",
            json!({"model": "sora-2-hd", "prompt": "x", "duration": "25"}),
            "/result/video",
            "5.00000000",
        ),
        (
            "/api/grok-imagine-video/gen",
            json!({"model": "grok-imagine-video", "prompt": "x", "duration": "15"}),
            "/result/video",
            "1.20000000",
        ),
        (
            "/api/video/seedance/gen",
            json!({"model": "seedance-2.0", "duration": 10, "content": [{"type": "text", "text": "x"}]}),
            "/result/video",
            "1.20000000",
        ),
        (
            "/api/google/veo/generate",
            json!({"model": "google/veo3.1-fast", "prompt": "x"}),
            "/result/video_url",
            "1.50000000",
        ),
        (
            "/api/suno/generate",
            json!({"mv": "chirp-v4-5", "prompt": "x"}),
            "/result/0/audio_url",
            "0.10000000",
        ),
    ];
    let mut ids = Vec::new();
    for (path, body, _, _) in &cases {
        let (status, text) = send(
            client
                .post(format!("{}{path}", fake.base_url()))
                .bearer_auth(TOKEN)
                .json(body),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{path}: {text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        ids.push(answer["data"]["task_id"].as_str().unwrap().to_owned());
    }
    clock.advance(Duration::from_secs(6));
    for ((path, _, pointer, consumed), id) in cases.iter().zip(&ids) {
        let (status, text) = send(query(&client, &fake, id)).await;
        assert_eq!(status, StatusCode::OK);
        let data: Value = serde_json::from_str::<Value>(&text).unwrap()["data"].clone();
        assert_eq!(data["status"], "success", "{path}");
        assert!(
            data.pointer(pointer).is_some_and(Value::is_string),
            "{path}: {data}"
        );
        assert_eq!(data["consumed"], *consumed, "{path}");
        // What a task returns can be downloaded, as clients do.
        let url = data.pointer(pointer).and_then(Value::as_str).unwrap();
        let file = client
            .get(url)
            .send()
            .await
            .expect("the fake serves its files");
        assert_eq!(file.status(), StatusCode::OK, "{url}");
        assert!(!file.bytes().await.unwrap().is_empty(), "{url}");
    }
    let (status, text) = send(
        client
            .post(format!("{}/api/sora2/gen", fake.base_url()))
            .bearer_auth(TOKEN)
            .json(&json!({"model": "sora-2", "prompt": "x", "duration": 10})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("duration must be one of"), "{text}");
}
