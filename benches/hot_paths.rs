//! The hot in-process pieces of a request, each beside a baseline measured in the same run:
//! team-key lookup (beside hashing the key alone), the rate-limit check, parsing `consumed`
//! (beside parsing the same text as an integer), a status-cache hit (beside a plain map read),
//! a durable ledger reserve + dispatch + attach + settle (beside an empty SQLite commit), and
//! claiming webhook deliveries while one team's receivers hang with a backlog due (beside the
//! same claim without the backlog), and a task's owner from the ownership index holding a million
//! tasks (beside hashing the task id alone).
//!
//! `cargo bench --bench hot_paths`

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::StatusCode;
use ketchup_domain::{
    config::{Config, KeyDigest},
    credits::Credits,
    ledger::{
        ClaimLimits, FinalStatus, Ledger, NewDelivery, NewReservation, ReservationId, Reservations,
        Settlement, redis::RedisStore, sqlite::SqliteStore,
    },
    ownership::OwnershipIndex,
    redis_client::RedisEndpoint,
};
use ketchup_gateway::{
    metrics::Metrics,
    rate_limiter::{LimitKind, RateLimits},
    status_cache::{Answer, StatusCache},
};

/// A configuration with 100 teams, as in a large deployment.
fn config() -> Config {
    let mut text = String::from(
        "[upstream]\ntoken_env = \"T\"\nmax_requests_per_second = 1000000\n\
         [models.\"google/gempix2\"]\nreserve = \"0.50\"\n\
         [defaults.limits]\ngenerate = \"1000000/s\"\nquery = \"1000000/s\"\n",
    );
    for team in 0..100 {
        text.push_str(&format!(
            "[[teams]]\nname = \"team-{team}\"\nkeys = [{{ sha256 = \"{}\" }}]\n",
            KeyDigest::of(&format!("kgw_key_{team}")).to_hex()
        ));
    }
    Config::parse(Path::new("bench.toml"), &text).expect("bench config is valid")
}

fn key_lookup(c: &mut Criterion) {
    let config = config();
    let mut group = c.benchmark_group("key_lookup");
    group.bench_function("baseline: sha256 of the key", |b| {
        b.iter(|| KeyDigest::of(std::hint::black_box("kgw_key_57")))
    });
    group.bench_function("team for a key (sha256 + map)", |b| {
        b.iter(|| config.key(std::hint::black_box("kgw_key_57")).is_some())
    });
    group.finish();
}

fn rate_limit(c: &mut Criterion) {
    let limits = RateLimits::new(&config(), Arc::new(Metrics::new()), None);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("rate_limit/check a team's query limit", |b| {
        b.to_async(&runtime)
            .iter(|| limits.check_team(std::hint::black_box("team-57"), LimitKind::Query))
    });
}

fn decimal_parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("decimal_parsing");
    group.bench_function("baseline: u64 from \"100000\"", |b| {
        b.iter(|| std::hint::black_box("100000").parse::<u64>())
    });
    group.bench_function("credits from \"0.00100000\"", |b| {
        b.iter(|| std::hint::black_box("0.00100000").parse::<Credits>())
    });
    group.finish();
}

fn cache_hit(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let cache = StatusCache::new(
        &ketchup_domain::config::CacheConfig {
            status_ttl: Duration::from_secs(3600),
            max_entries: 100_000,
            max_bytes: 64 << 20,
            max_owners: 0,
        },
        Arc::new(Metrics::new()),
        None,
    );
    let answer = Answer {
        status: StatusCode::OK,
        content_type: None,
        body: Bytes::from_static(br#"{"code":0,"message":"ok","data":{"status":"in_progress"}}"#),
        is_final: false,
    };
    let map: dashmap::DashMap<String, Arc<Answer>> = dashmap::DashMap::new();
    for i in 0..1000 {
        let task_id = format!("ta-{i}");
        map.insert(task_id.clone(), Arc::new(answer.clone()));
        runtime.block_on(cache.insert(&task_id, answer.clone()));
    }
    let mut group = c.benchmark_group("cache_hit");
    group.bench_function("baseline: DashMap read", |b| {
        b.iter(|| map.get(std::hint::black_box("ta-500")).map(|a| a.clone()))
    });
    group.bench_function("status cache hit", |b| {
        b.to_async(&runtime).iter(|| async {
            cache
                .get_or_fetch::<(), _>(std::hint::black_box("ta-500"), || async {
                    unreachable!("the entry is cached")
                })
                .await
                .1
                .is_ok()
        })
    });
    group.finish();
}

fn ledger(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("ledger.db")).expect("ledger opens");
    let mut group = c.benchmark_group("ledger");
    group.sample_size(20);
    group.bench_function("baseline: durable no-op write (ping)", |b| {
        b.to_async(&runtime)
            .iter(|| async { store.ping().await.is_ok() })
    });
    group.bench_function("reserve + dispatch + attach + settle, durable", |b| {
        b.to_async(&runtime).iter(|| async {
            let id = ReservationId::new();
            let task_id = id.0.to_string();
            let reservation = NewReservation {
                id,
                team: "team-57".into(),
                key: "bench".into(),
                model: "google/gempix2".into(),
                family: "image".into(),
                amount: Credits::from_units(50_000_000),
                period: "lifetime".into(),
                limit: None,
                max_in_flight: None,
                request_id: "bench".into(),
                created_at: chrono::Utc::now(),
                callback: None,
                idempotency: None,
                cost: None,
            };
            store.reserve(reservation).await.expect("reserve");
            store
                .mark_dispatched(id, chrono::Utc::now())
                .await
                .expect("dispatch");
            store.attach_task(id, &task_id, None).await.expect("attach");
            let settlement = Settlement {
                status: FinalStatus::Success,
                consumed: Credits::from_units(37_000_000),
                at: chrono::Utc::now(),
            };
            store.settle(&task_id, settlement).await.expect("settle")
        })
    });
    group.finish();
}

/// Due deliveries of the team whose receivers hang, in the second claim bench.
const BACKLOG: usize = 50_000;

/// One due delivery for `team`, queued `minutes_ago`.
fn due_delivery(n: usize, team: &str, now: chrono::DateTime<chrono::Utc>) -> NewDelivery {
    let created_at = now - chrono::Duration::minutes(60) + chrono::Duration::milliseconds(n as i64);
    NewDelivery {
        id: format!("msg_{team}_{n}"),
        task_id: format!("ta-{team}-{n}"),
        team: team.into(),
        url: "https://hooks.example/ketchup".into(),
        body: vec![b'x'; 200].into(),
        created_at,
        deadline: now + chrono::Duration::hours(24),
    }
}

/// Queues `backlog` due deliveries of `design` (written in parallel, so that group commit takes
/// them in big batches) and one of `ads`, older than all of them.
async fn seed_outbox(store: Arc<dyn Ledger>, backlog: usize, now: chrono::DateTime<chrono::Utc>) {
    let mut oldest = due_delivery(0, "ads", now);
    oldest.created_at -= chrono::Duration::minutes(1);
    store.enqueue_delivery(oldest).await.expect("enqueue");
    let mut writes = tokio::task::JoinSet::new();
    for chunk in (0..backlog)
        .collect::<Vec<_>>()
        .chunks(backlog.div_ceil(64).max(1))
    {
        let (store, chunk) = (store.clone(), chunk.to_vec());
        writes.spawn(async move {
            for n in chunk {
                store
                    .enqueue_delivery(due_delivery(n, "design", now))
                    .await
                    .expect("enqueue");
            }
        });
    }
    writes.join_all().await;
}

/// A fresh, empty ledger of one engine; with Redis, under a key prefix of its own that
/// `forget` deletes afterwards.
enum Engine {
    Sqlite(tempfile::TempDir),
    Redis { url: String, prefix: String },
}

impl Engine {
    async fn open(&self) -> Arc<dyn Ledger> {
        match self {
            Engine::Sqlite(dir) => {
                Arc::new(SqliteStore::open(&dir.path().join("ledger.db")).expect("ledger opens"))
            }
            Engine::Redis { url, prefix } => Arc::new(
                RedisStore::connect(
                    &RedisEndpoint::from_url(url),
                    prefix,
                    Duration::from_secs(5),
                )
                .await
                .expect("the bench Redis answers"),
            ),
        }
    }

    async fn forget(&self) {
        let Engine::Redis { url, prefix } = self else {
            return;
        };
        let client = redis::Client::open(url.as_str()).expect("a Redis URL");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("the bench Redis answers");
        let mut keys: Vec<String> = Vec::new();
        {
            use redis::AsyncCommands;
            let mut scan = connection
                .scan_match::<_, String>(format!("{prefix}*"))
                .await
                .expect("SCAN");
            while let Some(key) = scan.next_item().await {
                keys.push(key.expect("a key"));
            }
        }
        for chunk in keys.chunks(1000) {
            let _: () = redis::cmd("DEL")
                .arg(chunk)
                .query_async(&mut connection)
                .await
                .expect("DEL");
        }
    }
}

/// `design`'s receivers hang: its share of the attempts is taken, so a claim returns the one
/// `ads` delivery whatever `design` has due. Its lease ends at once, so every claim finds the
/// same outbox. SQLite always; Redis when `REDIS_URL` names one.
fn webhook_claim(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let now: chrono::DateTime<chrono::Utc> = "2026-12-01T12:00:00Z".parse().expect("a time");
    let limits = ClaimLimits {
        total: 32,
        per_team: 8,
        busy: [("design".to_owned(), 8)].into(),
    };
    let redis_url = std::env::var("REDIS_URL").ok();
    if redis_url.is_none() {
        eprintln!("webhook_claim: REDIS_URL is not set, so the Redis engine is not measured");
    }
    let mut group = c.benchmark_group("webhook_claim");
    group.sample_size(20);
    for engine_name in ["sqlite", "redis"] {
        for (case, backlog) in [
            ("baseline: claim, nothing else due", 0),
            (
                "claim beside 50,000 due deliveries of a team at its share",
                BACKLOG,
            ),
        ] {
            let engine = match (engine_name, &redis_url) {
                ("sqlite", _) => Engine::Sqlite(tempfile::tempdir().expect("temp dir")),
                (_, Some(url)) => Engine::Redis {
                    url: url.clone(),
                    prefix: format!("ketchup-bench:{}:", uuid::Uuid::new_v4().simple()),
                },
                (_, None) => continue,
            };
            let store = runtime.block_on(engine.open());
            runtime.block_on(seed_outbox(store.clone(), backlog, now));
            group.bench_function(format!("{engine_name}/{case}"), |b| {
                b.to_async(&runtime).iter(|| async {
                    let claimed = store
                        .claim_deliveries(now, now, &limits)
                        .await
                        .expect("claim");
                    assert_eq!(claimed.len(), 1, "only ads' delivery");
                })
            });
            runtime.block_on(engine.forget());
        }
    }
    group.finish();
}

fn owner_lookup(c: &mut Criterion) {
    use sha2::Digest;
    const TASKS: u64 = 1_000_000;
    let index = OwnershipIndex::new(TASKS);
    let task_ids: Vec<String> = (0..TASKS).map(|n| format!("ta-{n:032x}")).collect();
    for (n, task_id) in task_ids.iter().enumerate() {
        index.record(task_id, &format!("team-{}", n % 100), false);
    }
    let mut group = c.benchmark_group("owner_lookup");
    // Random ids, as pollers of many tasks read them: each lookup misses the CPU's caches.
    let mut next = 0x9e37_79b9_7f4a_7c15_u64;
    let mut pick = move || {
        next ^= next << 13;
        next ^= next >> 7;
        next ^= next << 17;
        (next % TASKS) as usize
    };
    group.bench_function("baseline: sha256 of the task id", |b| {
        b.iter(|| sha2::Sha256::digest(task_ids[pick()].as_bytes()))
    });
    group.bench_function("owner from the index of 1,000,000 tasks", |b| {
        b.iter(|| {
            let n = pick();
            index.lookup(&task_ids[n], "team-7")
        })
    });
    group.finish();
}

criterion_group!(
    hot_paths,
    key_lookup,
    rate_limit,
    decimal_parsing,
    cache_hit,
    ledger,
    webhook_claim,
    owner_lookup
);
criterion_main!(hot_paths);
