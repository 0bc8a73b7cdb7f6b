//! The Idempotency-Key of generations, and reservations a stopped gateway leaves behind, through
//! the real binary on both ledger engines: a repeat of a key's request gets the first answer
//! (after a restart too, and from another replica), never a second render or charge; a retry
//! after a timeout is charged once; keys expire; and a gateway killed mid-request leaves
//! reservations an admin can tell apart, the never-sent one given back by itself.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use ketchup_domain::credits::Credits;
use ketchup_domain::ledger::{NewReservation, ReservationId, Reservations, ReserveOutcome};
use ketchup_fake_upstream::{FakeHandle, Fault};
use ketchup_testkit::{
    ADS_KEY, DEADLINE, DESIGN_KEY, GEMPIX, Gateway, GatewayConfig, Reply, fake_config, start_fake,
    until_a_generation_reached,
};
use serde_json::{Value, json};

const ZERO: &str = "0.00000000";
const HALF: &str = "0.50000000";
const OTHER_BODY: &str = r#"{"model":"google/gempix2","prompt":"a cucumber"}"#;

/// Where a test's gateways keep their ledger.
#[derive(Clone, Debug)]
enum Store {
    Sqlite,
    /// The test Redis, under a key prefix of the test's own.
    Redis {
        url: String,
        prefix: String,
    },
}

impl Store {
    /// The test Redis under a fresh prefix; `None` when Redis tests are skipped.
    fn redis() -> Option<Store> {
        let url = ketchup_test_redis::url()?;
        let prefix = format!("test-{}:", uuid::Uuid::now_v7().simple());
        Some(Store::Redis { url, prefix })
    }

    fn apply(&self, config: GatewayConfig) -> GatewayConfig {
        match self {
            Store::Sqlite => config,
            Store::Redis { url, prefix } => {
                config.redis(url, prefix).store(r#"command_timeout = "2s""#)
            }
        }
    }
}

/// `design` may spend 5.00 credits in all; there is an admin API.
fn config(store: &Store, fake: &FakeHandle) -> GatewayConfig {
    store.apply(
        GatewayConfig::new()
            .upstream_url(&fake.base_url())
            .budget("design", r#"{ credits = "5.00", period = "lifetime" }"#)
            .admin(),
    )
}

fn fresh_key() -> String {
    format!("key-{}", uuid::Uuid::now_v7())
}

/// `POST /api/image/gen` of `body` for the team of `team_key`, with the Idempotency-Key header
/// `value` as sent.
async fn keyed(gateway: &Gateway, team_key: &str, value: &str, body: &str) -> Reply {
    let api = &gateway.api;
    api.send(
        api.generate_request(team_key, body)
            .header("idempotency-key", value),
    )
    .await
}

/// Asserts a fresh acceptance (not a replay); its task id.
fn first_answer(reply: &Reply) -> String {
    assert_eq!(reply.header("idempotent-replayed"), None, "{}", reply.text);
    reply.task_id()
}

/// Asserts that `reply` replays `first`: the same status, content type and body, marked.
fn assert_replays(reply: &Reply, first: &Reply) {
    assert_eq!(reply.status, first.status, "{}", reply.text);
    assert_eq!(reply.text, first.text);
    assert_eq!(reply.header("content-type"), first.header("content-type"));
    assert_eq!(reply.header("idempotent-replayed").as_deref(), Some("true"));
}

async fn budget(gateway: &Gateway) -> (String, String) {
    let budget = gateway.api.budget(DESIGN_KEY).await;
    (
        budget["spent"].as_str().unwrap().to_owned(),
        budget["reserved"].as_str().unwrap().to_owned(),
    )
}

async fn reservations(gateway: &Gateway, state: &str) -> Vec<Value> {
    let listed = gateway
        .api
        .admin(&format!("/admin/reservations?state={state}"))
        .await;
    listed["reservations"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .clone()
}

// ---------------------------------------------------------------------------------------------
// A repeat gets the first answer, also after a restart and from another replica
// ---------------------------------------------------------------------------------------------

/// `gateway` (and `replica`, another gateway on the same ledger, if any) in front of `fake`.
async fn a_repeat_gets_the_first_answer(
    fake: &FakeHandle,
    mut gateway: Gateway,
    replica: Option<Gateway>,
) {
    let key = fresh_key();
    let first = keyed(&gateway, DESIGN_KEY, &key, GEMPIX).await;
    let task_id = first_answer(&first);
    assert_eq!(budget(&gateway).await, (ZERO.into(), HALF.into()));

    let again = keyed(&gateway, DESIGN_KEY, &key, GEMPIX).await;
    assert_replays(&again, &first);
    // The draft's quoted form is the same key.
    let quoted = keyed(&gateway, DESIGN_KEY, &format!("\"{key}\""), GEMPIX).await;
    assert_replays(&quoted, &first);

    // The claim and its answer are in the ledger: a SIGKILL loses neither.
    gateway.restart_after_kill();
    assert_replays(&keyed(&gateway, DESIGN_KEY, &key, GEMPIX).await, &first);
    if let Some(replica) = &replica {
        assert_replays(&keyed(replica, DESIGN_KEY, &key, GEMPIX).await, &first);
    }
    assert_eq!(fake.stats().generate_requests, 1, "one render");
    assert_eq!(
        budget(&gateway).await,
        (ZERO.into(), HALF.into()),
        "one charge"
    );

    // The key with another body, or on another route, is another request: refused.
    let reused = keyed(&gateway, DESIGN_KEY, &key, OTHER_BODY).await;
    assert_eq!(reused.status, 422, "{}", reused.text);
    assert_eq!(
        reused.json(),
        json!({
            "code": 1,
            "message": "idempotency key reused",
            "detail": "this Idempotency-Key was used for another request (another route or body); \
                       use a new key for a new request"
        })
    );
    let api = &gateway.api;
    let other_route = api
        .send(
            api.submit_request(DESIGN_KEY, "/api/gpt-image/gen", GEMPIX)
                .header("idempotency-key", &key),
        )
        .await;
    assert_eq!(other_route.status, 422, "{}", other_route.text);

    // Keys are the team's own: ads's key of the same name starts its own task.
    let ads = keyed(&gateway, ADS_KEY, &key, GEMPIX).await;
    assert_ne!(first_answer(&ads), task_id);
    assert_eq!(fake.stats().generate_requests, 2);

    let metric = |outcome: &str| {
        format!(
            "ketchup_gateway_idempotent_requests_total{{outcome=\"{outcome}\",team=\"design\"}}"
        )
    };
    // Counted since the restart.
    assert_eq!(gateway.api.metric(&metric("replayed")).await, 1.0);
    assert_eq!(gateway.api.metric(&metric("reused")).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_gets_the_first_answer_on_sqlite() {
    let fake = start_fake(fake_config()).await;
    let gateway = Gateway::start(&config(&Store::Sqlite, &fake));
    a_repeat_gets_the_first_answer(&fake, gateway, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_gets_the_first_answer_on_redis_from_either_replica() {
    let Some(store) = Store::redis() else {
        return;
    };
    let fake = start_fake(fake_config()).await;
    let gateway = Gateway::start(&config(&store, &fake));
    let replica = Gateway::start(&config(&store, &fake));
    a_repeat_gets_the_first_answer(&fake, gateway, Some(replica)).await;
}

// ---------------------------------------------------------------------------------------------
// Concurrent repeats: one reaches the upstream, the others hear it is in progress
// ---------------------------------------------------------------------------------------------

async fn concurrent_repeats_reach_the_upstream_once(fake: &FakeHandle, gateways: &[Gateway]) {
    fake.faults()
        .inject_generate(Fault::Slow(Duration::from_secs(3)), 1);
    let key = fresh_key();
    let mut requests = tokio::task::JoinSet::new();
    for n in 0..8 {
        let api = gateways[n % gateways.len()].api.clone();
        let key = key.clone();
        requests.spawn(async move {
            api.send(
                api.generate_request(DESIGN_KEY, GEMPIX)
                    .header("idempotency-key", key),
            )
            .await
        });
    }
    let mut tasks = BTreeSet::new();
    let mut in_progress = 0;
    while let Some(reply) = requests.join_next().await {
        let reply = reply.expect("request task");
        match reply.status {
            200 => {
                tasks.insert(reply.task_id());
            }
            409 => {
                in_progress += 1;
                assert_eq!(
                    reply.json()["message"],
                    "request in progress",
                    "{}",
                    reply.text
                );
                assert_eq!(reply.header("retry-after").as_deref(), Some("1"));
            }
            other => panic!("{other}: {}", reply.text),
        }
    }
    assert_eq!(tasks.len(), 1, "one task for all: {tasks:?}");
    assert!(in_progress >= 1, "the first was still rendering");
    assert_eq!(fake.stats().generate_requests, 1, "sent upstream once");
    let task_id = tasks.into_iter().next().unwrap();
    let later = keyed(&gateways[0], DESIGN_KEY, &key, GEMPIX).await;
    assert_eq!(later.task_id(), task_id);
    assert_eq!(budget(&gateways[0]).await, (ZERO.into(), HALF.into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_repeats_reach_the_upstream_once_on_sqlite() {
    let fake = start_fake(fake_config()).await;
    let gateway = Gateway::start(&config(&Store::Sqlite, &fake));
    concurrent_repeats_reach_the_upstream_once(&fake, &[gateway]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_repeats_through_two_replicas_reach_the_upstream_once_on_redis() {
    let Some(store) = Store::redis() else {
        return;
    };
    let fake = start_fake(fake_config()).await;
    let gateways = [
        Gateway::start(&config(&store, &fake)),
        Gateway::start(&config(&store, &fake)),
    ];
    concurrent_repeats_reach_the_upstream_once(&fake, &gateways).await;
}

// ---------------------------------------------------------------------------------------------
// A retry after a timeout: tried again, and charged once
// ---------------------------------------------------------------------------------------------

async fn a_retry_after_a_timeout_is_charged_once(store: Store) {
    let fake = start_fake(fake_config()).await;
    let gateway = Gateway::start(&config(&store, &fake).upstream(r#"timeout = "300ms""#));
    // The upstream starts the render, then answers too late.
    fake.faults()
        .inject_generate(Fault::Slow(Duration::from_secs(2)), 1);
    let key = fresh_key();
    let timed_out = keyed(&gateway, DESIGN_KEY, &key, GEMPIX).await;
    assert_eq!(timed_out.status, 504, "{}", timed_out.text);
    assert_eq!(budget(&gateway).await, (HALF.into(), ZERO.into()));
    let unknown = reservations(&gateway, "unknown_outcome").await;
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    let first = unknown[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(unknown[0]["reason"], "upstream_timeout");
    assert_eq!(unknown[0]["idempotency_key"], key.as_str());
    assert!(unknown[0]["dispatched_at"].is_string(), "{unknown:?}");

    // The client retries with its key: tried again, as the first may never have started.
    let retried = keyed(&gateway, DESIGN_KEY, &key, GEMPIX).await;
    let task_id = first_answer(&retried);
    assert_eq!(fake.stats().generate_requests, 2);
    // The team pays for the task it got, not for the attempt that timed out as well.
    assert_eq!(budget(&gateway).await, (ZERO.into(), HALF.into()));
    assert_eq!(
        reservations(&gateway, "unknown_outcome").await,
        Vec::<Value>::new()
    );
    let open = reservations(&gateway, "open").await;
    let retry = open
        .iter()
        .find(|r| r["task_id"] == task_id.as_str())
        .unwrap_or_else(|| panic!("{open:?}"));
    assert_eq!(retry["retry_of"], first.as_str());
    let released = reservations(&gateway, "released").await;
    let resolved = released
        .iter()
        .find(|r| r["id"] == first.as_str())
        .unwrap_or_else(|| panic!("{released:?}"));
    assert_eq!(resolved["resolved_by"], retry["id"]);
    assert_eq!(
        gateway
            .api
            .metric("ketchup_gateway_unknown_outcomes_resolved_total{team=\"design\"}")
            .await,
        1.0
    );
    gateway
        .wait_for_log("a retry with the same Idempotency-Key got a task")
        .await;

    // Repeats now get the retry's answer.
    let repeat = keyed(&gateway, DESIGN_KEY, &key, GEMPIX).await;
    assert_replays(&repeat, &retried);
    assert_eq!(fake.stats().generate_requests, 2);
    // Settled at what its task consumed: once.
    gateway.api.wait_for_final(DESIGN_KEY, &task_id).await;
    let settled = gateway
        .api
        .wait_for_budget(DESIGN_KEY, "the task to settle", |b| b["reserved"] == ZERO)
        .await;
    assert_eq!(settled["spent"], HALF, "{settled}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_timeout_is_charged_once_on_sqlite() {
    a_retry_after_a_timeout_is_charged_once(Store::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_timeout_is_charged_once_on_redis() {
    let Some(store) = Store::redis() else {
        return;
    };
    a_retry_after_a_timeout_is_charged_once(store).await;
}

// ---------------------------------------------------------------------------------------------
// Keys that are no keys, and keys that expire
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_no_key_is_refused_before_anything_is_reserved() {
    let fake = start_fake(fake_config()).await;
    let gateway = Gateway::start(&config(&Store::Sqlite, &fake));
    let detail = "Idempotency-Key must be 1 to 255 printable ASCII characters, bare or as a \
                  quoted string";
    let too_long = "k".repeat(256);
    let values: [&[u8]; 5] = [
        b"",
        too_long.as_bytes(),
        b"caf\xc3\xa9",
        b"\"unclosed",
        b"two words",
    ];
    for value in values {
        let api = &gateway.api;
        let header = reqwest::header::HeaderValue::from_bytes(value).expect("a header value");
        let reply = api
            .send(
                api.generate_request(DESIGN_KEY, GEMPIX)
                    .header("idempotency-key", header),
            )
            .await;
        assert_eq!(
            reply.status_json(),
            (
                400,
                json!({"code": 1, "message": "failed", "detail": detail})
            ),
            "{:?}",
            String::from_utf8_lossy(value)
        );
    }
    let api = &gateway.api;
    let twice = api
        .send(
            api.generate_request(DESIGN_KEY, GEMPIX)
                .header("idempotency-key", "a")
                .header("idempotency-key", "b"),
        )
        .await;
    assert_eq!(twice.status, 400, "{}", twice.text);
    assert_eq!(
        twice.json()["detail"],
        "send one Idempotency-Key, not several"
    );
    assert_eq!(fake.stats().generate_requests, 0);
    assert_eq!(budget(&gateway).await, (ZERO.into(), ZERO.into()));
}

/// Whether a claim of `key` by `design` is still stored.
async fn claim_stored(gateway: &Gateway, store: &Store, key: &str) -> bool {
    match store {
        Store::Sqlite => {
            let path = gateway.config_path().with_file_name("ledger.db");
            let conn = rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .expect("the ledger opens");
            let count: i64 = conn
                .query_row(
                    "SELECT count(*) FROM idempotency_keys WHERE team = 'design' AND key = ?1",
                    [key],
                    |r| r.get(0),
                )
                .expect("claims are countable");
            count > 0
        }
        Store::Redis { url, prefix } => {
            let client = redis::Client::open(url.as_str()).expect("a Redis URL");
            let mut connection = client
                .get_multiplexed_async_connection()
                .await
                .expect("Redis answers");
            redis::cmd("EXISTS")
                .arg(format!("{prefix}idempotency:design:{key}"))
                .query_async(&mut connection)
                .await
                .expect("EXISTS")
        }
    }
}

async fn a_key_expires_and_its_claim_goes(store: Store) {
    let fake = start_fake(fake_config()).await;
    // A key lives 20 s, ample for the two requests below on a loaded machine: longer than
    // abandon_after, itself longer than a generation may wait on the upstream.
    let gateway = Gateway::start(
        &config(&store, &fake)
            .server(r#"idempotency_ttl = "20s""#)
            .reconciler("interval = \"100ms\"\nabandon_after = \"10s\"")
            .upstream("timeout = \"5s\"\nconnect_timeout = \"500ms\""),
    );
    let key = fresh_key();
    let first = keyed(&gateway, DESIGN_KEY, &key, GEMPIX).await;
    let task_id = first_answer(&first);
    let reused = keyed(&gateway, DESIGN_KEY, &key, OTHER_BODY).await;
    assert_eq!(reused.status, 422, "{}", reused.text);
    assert!(claim_stored(&gateway, &store, &key).await);

    // Once expired, the claim is deleted (by the reconciler, or by Redis), and the key may name
    // another request.
    let deadline = Instant::now() + Duration::from_secs(20) + DEADLINE;
    while claim_stored(&gateway, &store, &key).await {
        assert!(
            Instant::now() < deadline,
            "the expired claim was never deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let another = keyed(&gateway, DESIGN_KEY, &key, OTHER_BODY).await;
    assert_ne!(first_answer(&another), task_id);
    assert_eq!(fake.stats().generate_requests, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_expires_and_its_claim_goes_on_sqlite() {
    a_key_expires_and_its_claim_goes(Store::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_expires_and_its_claim_goes_on_redis() {
    let Some(store) = Store::redis() else {
        return;
    };
    a_key_expires_and_its_claim_goes(store).await;
}

// ---------------------------------------------------------------------------------------------
// A gateway killed mid-request: what it leaves, told apart
// ---------------------------------------------------------------------------------------------

/// What a gateway killed right after reserving leaves in `store`'s ledger: a reservation never
/// sent upstream. The binary cannot be stopped between its reserve and its dispatch, writes
/// microseconds apart; so, with the gateway dead, the reserve is made here, by the ledger's own
/// code on the gateway's own ledger. Its id.
async fn reserve_as_a_gateway_killed_before_dispatch(gateway: &Gateway, store: &Store) -> String {
    let reservation = NewReservation {
        id: ReservationId::new(),
        team: "design".into(),
        key: "design-test".into(),
        model: "google/gempix2".into(),
        family: "image".into(),
        amount: "0.50".parse::<Credits>().unwrap(),
        period: "lifetime".into(),
        limit: Some("5.00".parse().unwrap()),
        max_in_flight: None,
        request_id: "never-dispatched-0001".into(),
        created_at: Utc::now(),
        callback: None,
        idempotency: None,
        cost: None,
    };
    let id = reservation.id.0.to_string();
    let outcome = match store {
        Store::Sqlite => {
            let path = gateway.config_path().with_file_name("ledger.db");
            let ledger = ketchup_domain::ledger::sqlite::SqliteStore::open(&path).unwrap();
            ledger.reserve(reservation).await
        }
        Store::Redis { url, prefix } => {
            let endpoint = ketchup_domain::redis_client::RedisEndpoint::from_url(url.as_str());
            let ledger = ketchup_domain::ledger::redis::RedisStore::connect(
                &endpoint,
                prefix,
                Duration::from_secs(2),
            )
            .await
            .unwrap();
            ledger.reserve(reservation).await
        }
    };
    assert!(
        matches!(outcome, Ok(ReserveOutcome::Reserved(_))),
        "{outcome:?}"
    );
    id
}

async fn a_killed_gateway_leaves_reservations_an_admin_tells_apart(store: Store) {
    let fake = start_fake(fake_config()).await;
    let mut gateway = Gateway::start(
        &config(&store, &fake)
            .reconciler("interval = \"100ms\"\nsettle_after = \"1s\"\nabandon_after = \"4s\"")
            .upstream("timeout = \"3s\"\nconnect_timeout = \"200ms\""),
    );
    // One request reaches the upstream, which takes its time; the gateway dies meanwhile.
    fake.faults()
        .inject_generate(Fault::Slow(Duration::from_secs(30)), 1);
    let sent = tokio::spawn({
        let api = gateway.api.clone();
        async move {
            api.try_send(
                api.generate_request(DESIGN_KEY, GEMPIX)
                    .header("x-request-id", "dispatched-0001"),
            )
            .await
        }
    });
    until_a_generation_reached(&fake).await;
    let before_kill = Utc::now();
    gateway.kill();
    assert!(
        sent.await.unwrap().is_err(),
        "the gateway died before answering"
    );
    // Another it had reserved but not yet sent.
    let never_sent = reserve_as_a_gateway_killed_before_dispatch(&gateway, &store).await;
    assert_eq!(fake.stats().generate_requests, 1);

    gateway.restart();
    let settled = gateway
        .api
        .wait_for_budget(DESIGN_KEY, "both reservations to be given up", |b| {
            b["reserved"] == ZERO
        })
        .await;
    // Only the one the upstream may have started counts as spent.
    assert_eq!(settled["spent"], HALF, "{settled}");

    let unknown = reservations(&gateway, "unknown_outcome").await;
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert_eq!(unknown[0]["request_id"], "dispatched-0001");
    assert_eq!(unknown[0]["reason"], "no_answer_recorded");
    let dispatched_at: chrono::DateTime<Utc> = unknown[0]["dispatched_at"]
        .as_str()
        .unwrap_or_else(|| panic!("{unknown:?}"))
        .parse()
        .expect("RFC 3339");
    assert!(
        dispatched_at <= before_kill,
        "{dispatched_at} after {before_kill}"
    );

    let released = reservations(&gateway, "released").await;
    assert_eq!(released.len(), 1, "{released:?}");
    assert_eq!(released[0]["id"], never_sent.as_str());
    assert_eq!(released[0]["reason"], "never_dispatched");
    assert_eq!(released[0]["dispatched_at"], Value::Null);

    for counter in ["abandoned", "released"] {
        let series = format!("ketchup_gateway_reconciler_{counter}_total");
        assert_eq!(gateway.api.metric(&series).await, 1.0, "{series}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_leaves_reservations_an_admin_tells_apart_on_sqlite() {
    a_killed_gateway_leaves_reservations_an_admin_tells_apart(Store::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_leaves_reservations_an_admin_tells_apart_on_redis() {
    let Some(store) = Store::redis() else {
        return;
    };
    a_killed_gateway_leaves_reservations_an_admin_tells_apart(store).await;
}
