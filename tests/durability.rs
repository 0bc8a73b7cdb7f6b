//! What the gateway keeps across crashes, stops, departed clients and reloads: a task it answered
//! with (or recorded for a client that left) stays its team's, and a reload changes keys
//! without a restart but never with a broken file.

use std::time::{Duration, Instant};

use ketchup_fake_upstream::Fault;
use ketchup_testkit::{
    ADS_KEY, DESIGN_KEY, Env, GEMPIX as GENERATION, GatewayProcess, Launch, wait_until,
};
use serde_json::json;

const NOT_FOUND: &str = r#"{"code":1,"message":"task not found"}"#;

/// Queries `task_id` and returns the status and the body as text, for exact comparisons.
async fn query_text(env: &Env, key: &str, task_id: &str) -> (u16, String) {
    let reply = env.api().query(key, task_id).await;
    (reply.status, reply.text)
}

/// Asserts that `task_id` is design's: design reads it, ads gets the same 404 as for an unknown id.
async fn assert_owned_by_design(env: &Env, task_id: &str) {
    let (status, body) = env.api().query(DESIGN_KEY, task_id).await.status_json();
    assert_eq!(status, 200, "design's query for {task_id}: {body}");
    assert_eq!(body["code"], 0, "{body}");
    assert_eq!(body["data"]["task_id"], task_id, "{body}");
    assert_eq!(
        query_text(env, ADS_KEY, task_id).await,
        (404, NOT_FOUND.to_owned()),
        "ads must not see design's task {task_id}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_answered_right_before_a_sigkill_stay_owned() {
    let mut env = Env::start().await;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let api = env.api().clone();
        requests.spawn(async move { api.generate(DESIGN_KEY, GENERATION).await.status_json() });
    }
    let mut task_ids = Vec::new();
    while let Some(answer) = requests.join_next().await {
        let (status, body) = answer.expect("request task");
        assert_eq!(status, 200, "{body}");
        task_ids.push(
            body["data"]["task_id"]
                .as_str()
                .expect("task id")
                .to_owned(),
        );
    }
    // Every answer came back before the kill, so every one must have been durable.
    env.gateway.restart_after_kill();

    task_ids.sort();
    task_ids.dedup();
    assert_eq!(task_ids.len(), 20);
    let upstream: Vec<String> = env.fake.stats().tasks.into_keys().collect();
    assert_eq!(upstream, task_ids, "one upstream task per answer");
    for task_id in &task_ids {
        assert_owned_by_design(&env, task_id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_and_records_its_task() {
    let Env { fake, mut gateway } = Env::start().await;
    let addr = gateway.addr;
    fake.faults()
        .inject_generate(Fault::Slow(Duration::from_millis(1500)), 1);
    let in_flight = tokio::spawn({
        let api = gateway.api.clone();
        async move { api.generate(DESIGN_KEY, GENERATION).await.status_json() }
    });
    wait_until("the upstream to receive the generation", || {
        fake.stats().generate_requests == 1
    })
    .await;
    assert!(!in_flight.is_finished());

    let exited_cleanly = tokio::task::spawn_blocking(move || {
        let ok = gateway.terminate();
        (ok, gateway)
    });
    let (status, body) = in_flight.await.expect("request task");
    assert_eq!(status, 200, "{body}");
    let task_id = body["data"]["task_id"]
        .as_str()
        .expect("task id")
        .to_owned();
    let upstream: Vec<String> = fake.stats().tasks.into_keys().collect();
    assert_eq!(upstream, vec![task_id.clone()]);

    let (ok, mut gateway) = exited_cleanly.await.expect("terminate");
    assert!(ok, "exit status after SIGTERM; log:\n{}", gateway.logs());
    let logs = gateway.logs();
    assert!(
        logs.contains("shutting down: finishing in-flight requests"),
        "{logs}"
    );
    assert!(logs.contains("\"stopped\""), "{logs}");
    assert!(!logs.contains("shutdown timeout passed"), "{logs}");
    // The request's closing line, which its worker handed to the log writer thread during the
    // shutdown, was written before the process exited.
    gateway
        .wait_for_log(&format!("\"task_id\":\"{task_id}\""))
        .await;

    // The process is gone: nothing listens on its port any more.
    let refused = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .expect_err("no connection after exit");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    // A new gateway on the same config and ledger knows whose the task is.
    gateway.restart();
    let env = Env { fake, gateway };
    assert_owned_by_design(&env, &task_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_before_the_in_flight_request_ends() {
    let Env { fake, mut gateway } = Env::start().await;
    let addr = gateway.addr;
    // Long enough that the listener's closing cannot be mistaken for the process's exit.
    fake.faults()
        .inject_generate(Fault::Slow(Duration::from_secs(6)), 1);
    let in_flight = tokio::spawn({
        let api = gateway.api.clone();
        async move { api.generate(DESIGN_KEY, GENERATION).await.status_json() }
    });
    wait_until("the upstream to receive the generation", || {
        fake.stats().generate_requests == 1
    })
    .await;
    let terminated = tokio::task::spawn_blocking(move || {
        let ok = gateway.terminate();
        (ok, gateway)
    });

    // Poll for a refused connection; it must come while the slow request is still unanswered.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let still_in_flight = !in_flight.is_finished();
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                assert!(
                    still_in_flight,
                    "new connections were accepted until the in-flight request ended"
                );
                break;
            }
            Err(e) => panic!("unexpected connect error: {e}"),
            Ok(_) => {
                assert!(Instant::now() < deadline, "the listener never closed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let (status, body) = in_flight.await.expect("request task");
    assert_eq!(status, 200, "{body}");
    let (ok, gateway) = terminated.await.expect("terminate");
    assert!(ok, "exit status after SIGTERM; log:\n{}", gateway.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_client_gave_up_is_still_recorded_as_the_teams() {
    let mut env = Env::start().await;
    env.fake
        .faults()
        .inject_generate(Fault::Slow(Duration::from_secs(1)), 1);

    // A client that gives up after 200 ms, while the upstream is still rendering its answer.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let error = impatient
        .post(env.gateway.url("/api/image/gen"))
        .bearer_auth(DESIGN_KEY)
        .header("content-type", "application/json")
        .body(GENERATION)
        .send()
        .await
        .expect_err("the client gives up before the upstream answers");
    assert!(error.is_timeout(), "{error}");
    drop(impatient);

    // On a loaded machine the 200 ms may pass before the gateway forwards the request; once it
    // has been forwarded, the upstream created the task (before its delay): the only one.
    wait_until("the upstream to receive the generation", || {
        env.fake.stats().generate_requests == 1
    })
    .await;
    let task_ids: Vec<String> = env.fake.stats().tasks.into_keys().collect();
    assert_eq!(task_ids.len(), 1);
    let task_id = &task_ids[0];

    // The gateway records it once the upstream answers, though nobody is left to hear it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = query_text(&env, DESIGN_KEY, task_id).await;
        if status == 200 {
            break;
        }
        assert_eq!((status, body.as_str()), (404, NOT_FOUND));
        assert!(Instant::now() < deadline, "the task was never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_owned_by_design(&env, task_id).await;

    env.gateway.restart_after_kill();
    assert_owned_by_design(&env, task_id).await;
    assert_eq!(env.fake.stats().generate_requests, 1, "sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_connection_closed_mid_request_is_still_recorded() {
    let mut env = Env::start().await;
    env.fake
        .faults()
        .inject_generate(Fault::Slow(Duration::from_secs(2)), 1);

    // A raw connection, closed only once the request is known to be at the upstream: the
    // disconnect falls for sure inside the upstream call, however slow the machine.
    let mut socket = tokio::net::TcpStream::connect(env.gateway.addr)
        .await
        .expect("gateway accepts");
    let request = format!(
        "POST /api/image/gen HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {DESIGN_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{GENERATION}",
        env.gateway.addr,
        GENERATION.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut socket, request.as_bytes())
        .await
        .unwrap();
    wait_until("the upstream to receive the generation", || {
        env.fake.stats().generate_requests == 1
    })
    .await;
    let task_ids: Vec<String> = env.fake.stats().tasks.into_keys().collect();
    assert_eq!(task_ids.len(), 1);
    let task_id = &task_ids[0];
    // The upstream holds its answer for 2 s: the client leaves while the gateway waits for it.
    drop(socket);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = query_text(&env, DESIGN_KEY, task_id).await;
        if status == 200 {
            break;
        }
        assert_eq!((status, body.as_str()), (404, NOT_FOUND));
        assert!(Instant::now() < deadline, "the task was never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_owned_by_design(&env, task_id).await;

    env.gateway.restart_after_kill();
    assert_owned_by_design(&env, task_id).await;
    assert_eq!(env.fake.stats().generate_requests, 1, "sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_keys_and_refuses_a_broken_file() {
    const ML_KEY: &str = "kgw_ml_test_key_5555555555";
    let mut env = Env::start().await;
    let path = env.gateway.config_path().to_owned();
    let original = env.gateway.config().clone();

    // Before the reload the new key is unknown.
    assert_eq!(
        env.api().generate(ML_KEY, GENERATION).await.status_json(),
        (401, json!({"code": 1, "message": "Invalid API key"}))
    );

    let with_ml = original.clone().team("ml", ML_KEY);
    env.gateway.reload(with_ml.clone()).await;
    let reloaded = env.gateway.log_events("configuration reloaded");
    assert_eq!(reloaded.len(), 1);
    assert_eq!(reloaded[0]["teams"], 3, "{}", reloaded[0]);
    assert_eq!(reloaded[0]["models"], 2, "{}", reloaded[0]);

    let ml_task = env.api().start_task(ML_KEY).await;
    let (status, body) = env.api().query(ML_KEY, &ml_task).await.status_json();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["task_id"], ml_task.as_str());
    assert_eq!(
        query_text(&env, DESIGN_KEY, &ml_task).await,
        (404, NOT_FOUND.to_owned())
    );

    // A broken file is refused and the running configuration, ml included, is kept.
    env.gateway
        .set_config(with_ml.team_lines("ml", "budjet = 3"));
    let broken = std::fs::read_to_string(&path).unwrap();
    env.gateway.hangup();
    env.gateway
        .wait_for_log_count("configuration reload refused", 1)
        .await;
    let refused = env.gateway.log_events("configuration reload refused");
    assert_eq!(refused.len(), 1);
    let error = refused[0]["error"].as_str().expect("error field");
    let line = broken
        .lines()
        .position(|l| l.starts_with("budjet"))
        .unwrap()
        + 1;
    assert!(
        error.starts_with(&format!("{}:{line}:1: ", path.display())),
        "{error}"
    );
    assert!(error.contains("unknown field `budjet`"), "{error}");
    assert_eq!(
        env.gateway.logs().matches("configuration reloaded").count(),
        1
    );
    for key in [DESIGN_KEY, ADS_KEY, ML_KEY] {
        let (status, body) = env.api().generate(key, GENERATION).await.status_json();
        assert_eq!(status, 200, "{body}");
    }

    // Removing a team by reload revokes its key at once; the others keep working.
    env.gateway.reload(original).await;
    assert_eq!(
        env.gateway.logs().matches("configuration reloaded").count(),
        2
    );
    assert_eq!(
        env.api().generate(ML_KEY, GENERATION).await.status_json(),
        (401, json!({"code": 1, "message": "Invalid API key"}))
    );
    assert_eq!(env.api().generate(DESIGN_KEY, GENERATION).await.status, 200);
}

/// How many fresh gateways each early-signal test tries: the race it guards against is lost by
/// only some of the starts (about half, on a 2-core machine).
const EARLY_SIGNAL_ATTEMPTS: usize = 20;

/// A gateway on `config` that is sent `signal` the moment it logs that it listens.
fn signalled_when_listening(config: &std::path::Path, signal: &str) -> GatewayProcess {
    GatewayProcess::spawn(
        config,
        Launch {
            signal_when_listening: Some(signal),
            ..Launch::default()
        },
    )
}

// KNOWN GATEWAY BUG (fails until `Server::run` installs its SIGTERM and SIGHUP handlers before it
// logs "ketchup-gateway listening"): a signal that arrives right after that line can precede
// tokio's handler, and the default action kills the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_startup_is_a_graceful_stop() {
    let env = Env::start().await;
    let path = env.gateway.config_path();
    for attempt in 1..=EARLY_SIGNAL_ATTEMPTS {
        let mut gateway = signalled_when_listening(path, "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = gateway.exited() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "attempt {attempt}: SIGTERM ignored"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(
            status.success(),
            "attempt {attempt}: SIGTERM right after the \"listening\" line killed the gateway \
             ({status}) instead of stopping it; log:\n{}",
            gateway.logs()
        );
    }
}

// KNOWN GATEWAY BUG, as above, for SIGHUP: a reload asked for right after startup kills the
// gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_right_after_startup_reloads_instead_of_killing() {
    let env = Env::start().await;
    let path = env.gateway.config_path();
    for attempt in 1..=EARLY_SIGNAL_ATTEMPTS {
        let mut gateway = signalled_when_listening(path, "HUP");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !gateway.logs().contains("configuration reloaded") {
            if let Some(status) = gateway.exited() {
                panic!(
                    "attempt {attempt}: SIGHUP right after the \"listening\" line killed the \
                     gateway ({status}); log:\n{}",
                    gateway.logs()
                );
            }
            assert!(Instant::now() < deadline, "attempt {attempt}: no reload");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(gateway.exited(), None, "attempt {attempt}: still serving");
    }
}
