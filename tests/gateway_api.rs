//! The gateway's HTTP API, end to end: the real binary in front of the fake upstream.

use std::time::Duration;

use ketchup_fake_upstream::Fault;
use ketchup_testkit::{
    ADS_KEY, DESIGN_KEY, Env, Gateway, GatewayConfig, UPSTREAM_TOKEN, digest, fake_config,
    free_port,
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn a_task_is_started_and_followed_to_success() {
    let env = Env::start().await;
    let (status, body) = env
        .api()
        .generate(
            DESIGN_KEY,
            r#"{"model":"google/gempix2","prompt":"a tomato"}"#,
        )
        .await
        .status_json();
    assert_eq!(status, 200);
    assert_eq!(body["code"], 0);
    assert_eq!(body["message"], "ok");
    let task_id = body["data"]["task_id"].as_str().unwrap().to_owned();
    assert!(task_id.starts_with("ta"), "{task_id}");

    let mut seen = Vec::new();
    for _ in 0..100 {
        let (status, body) = env.api().query(DESIGN_KEY, &task_id).await.status_json();
        assert_eq!(status, 200, "{body}");
        let state = body["data"]["status"].as_str().unwrap().to_owned();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if state == "success" {
            assert_eq!(body["data"]["consumed"], "0.50000000");
            assert_eq!(body["data"]["task_id"], task_id.as_str());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.last().map(String::as_str), Some("success"), "{seen:?}");

    // Once final, the gateway's answer is the upstream's, byte for byte.
    let direct = env
        .api()
        .http
        .get(format!("{}/api/task/query", env.fake.base_url()))
        .query(&[("task_id", &task_id)])
        .bearer_auth(UPSTREAM_TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let through = env
        .api()
        .http
        .get(env.gateway.url("/api/task/query"))
        .query(&[("task_id", &task_id)])
        .bearer_auth(DESIGN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        through.headers()["content-type"],
        "application/json",
        "content type passes through"
    );
    assert_eq!(through.bytes().await.unwrap(), direct);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_sees_its_token_and_the_request_untouched() {
    let env = Env::start().await;
    let sent = json!({
        "model": "google/gempix2",
        "prompt": "two tomatoes",
        "images": ["https://cdn.example.com/a.png"],
        "callback_url": "https://hooks.example.com/done",
        "aspect_ratio": "16:9",
        "image_size": "2k",
        "n": 2,
        "some_future_field": {"nested": [1, 2, 3]}
    });
    let (status, body) = env
        .api()
        .generate(DESIGN_KEY, &sent.to_string())
        .await
        .status_json();
    assert_eq!(status, 200, "{body}");
    let task_id = body["data"]["task_id"].as_str().unwrap().to_owned();
    let (status, _) = env.api().query(DESIGN_KEY, &task_id).await.status_json();
    assert_eq!(status, 200);

    let stats = env.fake.stats();
    assert_eq!(stats.generate_bodies, vec![sent]);
    assert_eq!(
        stats.authorization_headers,
        vec![format!("Bearer {UPSTREAM_TOKEN}")],
        "the upstream only ever sees the upstream token"
    );
    assert_eq!(stats.unauthorized, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_team_sees_only_its_own_tasks() {
    let env = Env::start().await;
    let design_task = env.api().start_task(DESIGN_KEY).await;
    let not_found = json!({"code": 1, "message": "task not found"});

    let (status, body) = env.api().query(ADS_KEY, &design_task).await.status_json();
    assert_eq!((status, &body), (404, &not_found), "another team's task");
    let (status, body) = env
        .api()
        .query(ADS_KEY, "ta00000000-0000-0000-0000-000000000000")
        .await
        .status_json();
    assert_eq!((status, &body), (404, &not_found), "a task nobody created");
    let (status, body) = env
        .api()
        .query(ADS_KEY, &"x".repeat(10_000))
        .await
        .status_json();
    assert_eq!((status, &body), (404, &not_found), "an absurd id");

    // None of these reached the upstream; the owner's read does.
    assert_eq!(env.fake.stats().query_requests, 0);
    let (status, _) = env
        .api()
        .query(DESIGN_KEY, &design_task)
        .await
        .status_json();
    assert_eq!(status, 200);
    assert_eq!(env.fake.stats().query_requests, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_restart_the_newest_owners_come_from_memory_and_older_ones_from_the_ledger() {
    // Room for the owners of four tasks; the cache off, so every read checks ownership afresh.
    let mut env = Env::start_with(
        fake_config(),
        GatewayConfig::new().cache("max_entries = 0\nmax_owners = 4"),
    )
    .await;
    let mut design = Vec::new();
    for _ in 0..5 {
        design.push(env.api().start_task(DESIGN_KEY).await);
    }
    let ads = env.api().start_task(ADS_KEY).await;
    env.gateway.restart_after_kill();
    env.gateway
        .wait_for_log("ownership index filled from the ledger")
        .await;
    let from = |source: &'static str| {
        let api = env.api();
        async move {
            let series = format!("ketchup_gateway_ownership_lookups_total{{source=\"{source}\"}}");
            api.metric(&series).await
        }
    };
    let held = "ketchup_gateway_owners_in_memory";
    assert_eq!(env.api().metric(held).await, 4.0);

    // The four newest tasks: their owners are known without the ledger, a stranger refused.
    assert_eq!(
        env.api()
            .query(DESIGN_KEY, &design[4])
            .await
            .status_json()
            .0,
        200
    );
    assert_eq!(env.api().query(ADS_KEY, &ads).await.status_json().0, 200);
    assert_eq!(env.api().query(DESIGN_KEY, &ads).await.status_json().0, 404);
    assert_eq!(
        env.api().query(ADS_KEY, &design[2]).await.status_json().0,
        404
    );
    assert_eq!((from("memory").await, from("ledger").await), (4.0, 0.0));

    // An older task is read from the ledger once, then known; still nobody else's.
    assert_eq!(
        env.api()
            .query(DESIGN_KEY, &design[0])
            .await
            .status_json()
            .0,
        200
    );
    assert_eq!((from("memory").await, from("ledger").await), (4.0, 1.0));
    assert_eq!(
        env.api().query(ADS_KEY, &design[0]).await.status_json().0,
        404
    );
    assert_eq!(
        env.api()
            .query(DESIGN_KEY, &design[0])
            .await
            .status_json()
            .0,
        200
    );
    assert_eq!((from("memory").await, from("ledger").await), (6.0, 1.0));
    assert!(env.api().metric(held).await <= 4.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_requests_get_the_upstream_envelope_and_never_reach_it() {
    let env = Env::start().await;
    let cases: &[(&str, &str)] = &[
        (
            "{",
            "request body is not valid JSON: EOF while parsing an object at line 1 column 1",
        ),
        ("[]", "request body must be a JSON object"),
        (r#"{"prompt":"x"}"#, "model is required"),
        (
            r#"{"model":["google/gempix2"],"prompt":"x"}"#,
            "model must be a string",
        ),
        (
            r#"{"model":"acme/other","prompt":"x"}"#,
            r#"model "acme/other" is not offered; choose one of: google/gemini-2.5-flash-image, google/gempix2"#,
        ),
        (r#"{"model":"google/gempix2"}"#, "prompt is required"),
        (
            r#"{"model":"google/gempix2","prompt":""}"#,
            "prompt is required",
        ),
        (
            r#"{"model":"google/gempix2","prompt":{"text":"x"}}"#,
            "prompt must be a string",
        ),
        (
            r#"{"model":"google/gempix2","prompt":"x","images":["http://a/1","http://a/2","http://a/3","http://a/4","http://a/5"]}"#,
            "at most 4 reference images are allowed in images, got 5",
        ),
        (
            r#"{"model":"google/gempix2","prompt":"x","images":["http://a/1","file:///etc/passwd"]}"#,
            "images[1] must be an http(s) URL or a data URI",
        ),
        (
            r#"{"model":"google/gempix2","prompt":"x","images":{"a":1}}"#,
            "images must be http(s) URLs or data URIs",
        ),
        (
            r#"{"model":"google/gempix2","prompt":"x","callback_url":"not a url"}"#,
            "callback_url must be an http(s) URL",
        ),
        (
            r#"{"model":"google/gempix2","prompt":"x","n":-1}"#,
            "n must be a positive whole number",
        ),
    ];
    for (body, detail) in cases {
        let (status, answer) = env.api().generate(DESIGN_KEY, body).await.status_json();
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            answer,
            json!({"code": 1, "message": "failed", "detail": detail}),
            "{body}"
        );
    }

    let missing = env
        .api()
        .http
        .get(env.gateway.url("/api/task/query"))
        .bearer_auth(DESIGN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 400);
    assert_eq!(
        missing.json::<Value>().await.unwrap(),
        json!({"code": 1, "message": "failed", "detail": "task_id is required"})
    );
    assert_eq!(env.fake.stats().generate_requests, 0);
    assert_eq!(env.fake.stats().query_requests, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_required_except_for_probes() {
    let env = Env::start().await;
    let invalid = json!({"code": 1, "message": "Invalid API key"});
    for key in [None, Some("kgw_unknown"), Some("")] {
        let mut request = env
            .api()
            .http
            .post(env.gateway.url("/api/image/gen"))
            .body(r#"{"model":"google/gempix2","prompt":"x"}"#);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(response.json::<Value>().await.unwrap(), invalid);
    }
    // Unknown paths are not revealed to callers without a key either.
    let response = env
        .api()
        .http
        .get(env.gateway.url("/api/internal"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // Without an admin token in the config, the admin API does not exist for anyone.
    let response = env
        .api()
        .http
        .get(env.gateway.url("/admin/teams"))
        .bearer_auth(DESIGN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    for probe in ["/healthz", "/readyz"] {
        let response = env
            .api()
            .http
            .get(env.gateway.url(probe))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{probe}");
    }
    assert_eq!(env.fake.stats().generate_requests, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_routes_and_methods_answer_in_the_envelope() {
    let env = Env::start().await;
    let response = env
        .api()
        .http
        .get(env.gateway.url("/api/nothing"))
        .bearer_auth(DESIGN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"code": 1, "message": "not found", "detail": "no such endpoint: GET /api/nothing"})
    );
    let response = env
        .api()
        .http
        .get(env.gateway.url("/api/image/gen"))
        .bearer_auth(DESIGN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"code": 1, "message": "method not allowed", "detail": "GET is not allowed on /api/image/gen"})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_are_refused_with_413() {
    let env = Env::start_with(
        fake_config(),
        GatewayConfig::new().server("max_body_bytes = 1024"),
    )
    .await;
    let prompt = "x".repeat(2000);
    let (status, body) = env
        .api()
        .generate(
            DESIGN_KEY,
            &json!({"model": "google/gempix2", "prompt": prompt}).to_string(),
        )
        .await
        .status_json();
    assert_eq!(status, 413);
    assert_eq!(
        body,
        json!({"code": 1, "message": "payload too large", "detail": "request body exceeds 1024 bytes"})
    );
    // A chunked body, with no Content-Length to go by, is cut off as soon as it passes the limit.
    let answer = raw_exchange(env.gateway.addr, |stream| {
        use std::io::Write;
        write!(
            stream,
            "POST /api/image/gen HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {DESIGN_KEY}\r\n\
             transfer-encoding: chunked\r\n\r\n"
        )?;
        for _ in 0..64 {
            write!(stream, "400\r\n{}\r\n", "x".repeat(1024))?;
        }
        stream.write_all(b"0\r\n\r\n")
    });
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // The unread rest of the body makes the connection unusable, and the client is told so.
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains(r#"{"code":1,"message":"payload too large""#),
        "{answer}"
    );
    assert_eq!(env.fake.stats().generate_requests, 0);
    // The gateway is still fine.
    assert!(env.api().start_task(DESIGN_KEY).await.starts_with("ta"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declared_length_over_the_limit_is_refused_before_the_body_arrives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::start().await;
    let mut stream = tokio::net::TcpStream::connect(env.gateway.addr)
        .await
        .unwrap();
    // 2,000,000 bytes declared, 8 sent: the gateway must not wait for the rest.
    let head = format!(
        "POST /api/image/gen HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {DESIGN_KEY}\r\n\
         content-type: application/json\r\ncontent-length: 2000000\r\n\r\n{{\"model\""
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer))
        .await
        .expect("answered at once, not after the request timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains(r#"{"code":1,"message":"payload too large","detail":"request body exceeds 1048576 bytes"}"#),
        "{answer}"
    );
    assert_eq!(env.fake.stats().generate_requests, 0);
    assert!(env.api().start_task(DESIGN_KEY).await.starts_with("ta"));
}

/// Writes raw bytes to the gateway and returns what it answered (the write may be cut short by
/// the gateway closing the connection, which is fine).
fn raw_exchange(
    addr: std::net::SocketAddr,
    write: impl FnOnce(&mut std::net::TcpStream) -> std::io::Result<()>,
) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = write(&mut stream);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_bytes_get_an_answer_not_a_crash() {
    let env = Env::start().await;
    let garbage = raw_exchange(env.gateway.addr, |stream| {
        use std::io::Write;
        stream.write_all(b"\x00\xff\xfe NOT HTTP AT ALL\r\n\r\n")
    });
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage}"
    );
    let bad_utf8 = raw_exchange(env.gateway.addr, |stream| {
        use std::io::Write;
        let body = b"{\"model\":\"google/gempix2\",\"prompt\":\"\xff\xfe\"}";
        write!(
            stream,
            "POST /api/image/gen HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {DESIGN_KEY}\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )?;
        stream.write_all(body)
    });
    assert!(bad_utf8.starts_with("HTTP/1.1 400"), "{bad_utf8}");
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let (status, body) = env.api().generate(DESIGN_KEY, &deep).await.status_json();
    assert_eq!(status, 400);
    assert_eq!(body["message"], "failed");
    let (status, _) = env
        .api()
        .generate(DESIGN_KEY, r#"{"model":"google/gempix2","prompt":"x"}"#)
        .await
        .status_json();
    assert_eq!(status, 200, "still serving");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_errors_pass_through_unchanged() {
    // The upstream refuses more than five images; the gateway is configured to allow six.
    let env = Env::start_with(
        fake_config(),
        GatewayConfig::new()
            .cache("max_entries = 0")
            .upstream("max_reference_images = 6"),
    )
    .await;
    let six: Vec<String> = (0..6)
        .map(|i| format!("https://cdn.example.com/{i}.png"))
        .collect();
    let (status, body) = env
        .api()
        .generate(
            DESIGN_KEY,
            &json!({"model": "google/gempix2", "prompt": "x", "images": six}).to_string(),
        )
        .await
        .status_json();
    assert_eq!(status, 400);
    assert_eq!(body["code"], 1);
    assert_eq!(body["message"], "failed");
    assert_eq!(env.fake.stats().generate_requests, 1);

    env.fake.faults().inject_generate(Fault::Status500, 1);
    let (status, body) = env
        .api()
        .generate(DESIGN_KEY, r#"{"model":"google/gempix2","prompt":"x"}"#)
        .await
        .status_json();
    assert_eq!(
        (status, body),
        (500, json!({"code": 1, "message": "internal server error"}))
    );
    assert_eq!(
        env.fake.stats().generate_requests,
        2,
        "a generation that reached the upstream is never retried"
    );

    // Status reads are retried once (query_retries = 1): one 500 is absorbed, two pass through.
    let task_id = env.api().start_task(DESIGN_KEY).await;
    env.fake.faults().inject_query(Fault::Status500, 1);
    let (status, _) = env.api().query(DESIGN_KEY, &task_id).await.status_json();
    assert_eq!(status, 200);
    env.fake.faults().inject_query(Fault::Status500, 2);
    let (status, body) = env.api().query(DESIGN_KEY, &task_id).await.status_json();
    assert_eq!(
        (status, body),
        (500, json!({"code": 1, "message": "internal server error"}))
    );
    assert_eq!(env.fake.stats().query_requests, 4);
}

/// The upstream refusing the gateway's own token is not the team's key being wrong: the one
/// account leaves rotation and the team hears that no account can take its request.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_rejects_the_token_is_a_503_not_the_teams_401() {
    let mut fake = fake_config();
    fake.token = "dk-some-other-token".into();
    let env = Env::start_with(fake, GatewayConfig::new()).await;
    for sent in [1, 1] {
        let (status, body) = env
            .api()
            .generate(DESIGN_KEY, r#"{"model":"google/gempix2","prompt":"x"}"#)
            .await
            .status_json();
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["message"], "upstream account unavailable", "{body}");
        assert_eq!(env.fake.stats().generate_requests, sent);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_young_task_unknown_upstream_reads_as_pending_and_an_old_one_as_not_found() {
    let mut fake = fake_config();
    fake.unknown_for = Duration::from_secs(3600);
    let env = Env::start_with(fake, GatewayConfig::new()).await;
    let task_id = env.api().start_task(DESIGN_KEY).await;
    let (status, body) = env.api().query(DESIGN_KEY, &task_id).await.status_json();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["code"], 0);
    assert_eq!(body["data"]["status"], "pending");
    assert_eq!(body["data"]["task_id"], task_id.as_str());
    assert_eq!(body["data"]["result"], Value::Null);

    let mut fake = fake_config();
    fake.unknown_for = Duration::from_secs(3600);
    let env = Env::start_with(
        fake,
        GatewayConfig::new().upstream("new_task_grace = \"0s\""),
    )
    .await;
    let task_id = env.api().start_task(DESIGN_KEY).await;
    let (status, body) = env.api().query(DESIGN_KEY, &task_id).await.status_json();
    assert_eq!(
        (status, body),
        (404, json!({"code": 1, "message": "task not found"}))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_gives_502_quickly() {
    // A gateway in front of a port where nothing listens.
    let down = Gateway::start(
        &GatewayConfig::new().upstream_url(&format!("http://127.0.0.1:{}", free_port())),
    );
    let response = down
        .api
        .http
        .post(down.url("/api/image/gen"))
        .bearer_auth(DESIGN_KEY)
        .body(r#"{"model":"google/gempix2","prompt":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], 1);
    assert_eq!(body["message"], "upstream unavailable");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .starts_with("upstream unreachable: cannot connect")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_or_broken_upstream_gives_504_or_502() {
    let env = Env::start_with(
        fake_config(),
        GatewayConfig::new().upstream("timeout = \"300ms\""),
    )
    .await;
    env.fake
        .faults()
        .inject_generate(Fault::Slow(Duration::from_secs(2)), 1);
    let (status, body) = env
        .api()
        .generate(DESIGN_KEY, r#"{"model":"google/gempix2","prompt":"x"}"#)
        .await
        .status_json();
    assert_eq!(status, 504);
    assert_eq!(
        body,
        json!({"code": 1, "message": "upstream timeout",
               "detail": "upstream did not answer in time: no answer from the upstream within 300ms"})
    );

    env.fake.faults().inject_generate(Fault::DropConnection, 1);
    let (status, body) = env
        .api()
        .generate(DESIGN_KEY, r#"{"model":"google/gempix2","prompt":"x"}"#)
        .await
        .status_json();
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["message"], "upstream unavailable");

    let task_id = env.api().start_task(DESIGN_KEY).await;
    env.fake
        .faults()
        .inject_query(Fault::Slow(Duration::from_secs(2)), 1);
    let (status, body) = env.api().query(DESIGN_KEY, &task_id).await.status_json();
    assert_eq!(
        (status, body["message"].as_str()),
        (504, Some("upstream timeout"))
    );
    // The gateway keeps serving.
    let (status, _) = env.api().query(DESIGN_KEY, &task_id).await.status_json();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn request_ids_round_trip_and_reach_the_upstream() {
    let env = Env::start().await;
    let response = env
        .api()
        .http
        .post(env.gateway.url("/api/image/gen"))
        .bearer_auth(DESIGN_KEY)
        .header("x-request-id", "trace-abc-123")
        .body(r#"{"model":"google/gempix2","prompt":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-abc-123");
    assert_eq!(
        env.fake.stats().request_ids,
        vec!["trace-abc-123".to_owned()]
    );

    // An unusable id is replaced by one of the gateway's own.
    let response = env
        .api()
        .http
        .get(env.gateway.url("/healthz"))
        .header("x-request-id", "x".repeat(500))
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36, "{id}");
    // And a request without one gets one, also on errors.
    let response = env
        .api()
        .http
        .get(env.gateway.url("/api/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("x-request-id"));
    env.gateway.wait_for_log("trace-abc-123").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_tokens_never_reach_logs_or_answers() {
    let env = Env::start_with(
        fake_config(),
        GatewayConfig::new()
            .cache("max_entries = 0")
            .upstream("timeout = \"300ms\""),
    )
    .await;
    let task_id = env.api().start_task(DESIGN_KEY).await;
    let mut answers = Vec::new();
    answers.push(env.api().query(DESIGN_KEY, &task_id).await.status_json().1);
    answers.push(env.api().query(ADS_KEY, &task_id).await.status_json().1);
    env.fake
        .faults()
        .inject_generate(Fault::Slow(Duration::from_secs(1)), 1);
    answers.push(
        env.api()
            .generate(DESIGN_KEY, r#"{"model":"google/gempix2","prompt":"x"}"#)
            .await
            .status_json()
            .1,
    );
    answers.push(
        env.api()
            .generate("kgw_wrong_key_for_log_test", "{}")
            .await
            .status_json()
            .1,
    );
    env.fake.faults().inject_query(Fault::DropConnection, 2);
    answers.push(env.api().query(DESIGN_KEY, &task_id).await.status_json().1);
    env.gateway.wait_for_log("upstream_unreachable").await;

    let logs = env.gateway.logs();
    assert!(logs.contains(&task_id), "the log is being captured");
    let answers = serde_json::to_string(&answers).unwrap();
    for secret in [
        UPSTREAM_TOKEN,
        DESIGN_KEY,
        ADS_KEY,
        "kgw_wrong_key_for_log_test",
    ] {
        assert!(!logs.contains(secret), "{secret} leaked into the log");
        assert!(!answers.contains(secret), "{secret} leaked into an answer");
    }
    // Their digests stay out too: a digest in a log would let anyone test guesses offline.
    assert!(!logs.contains(&digest(DESIGN_KEY)));
}
