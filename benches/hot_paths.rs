//! The hot in-process pieces of a request, each beside a baseline measured in the same run:
//! team-key lookup (beside hashing the key alone), the rate-limit check, parsing `consumed`
//! (beside parsing the same text as an integer), a status-cache hit (beside a plain map read),
//! and a durable ledger reserve + attach + settle (beside an empty SQLite commit).
//!
//! `cargo bench --bench hot_paths`

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::StatusCode;
use ketchup_gateway::{
    config::{Config, KeyDigest},
    credits::Credits,
    ledger::{
        FinalStatus, LedgerStore, NewReservation, ReservationId, Settlement, sqlite::SqliteStore,
    },
    metrics::Metrics,
    rate_limit::{LimitKind, RateLimits},
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
        &ketchup_gateway::config::CacheConfig {
            status_ttl: Duration::from_secs(3600),
            max_entries: 100_000,
            max_bytes: 64 << 20,
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
    group.bench_function("reserve + attach + settle, durable", |b| {
        b.to_async(&runtime).iter(|| async {
            let id = ReservationId::new();
            let task_id = id.0.to_string();
            let reservation = NewReservation {
                id,
                team: "team-57".into(),
                model: "google/gempix2".into(),
                amount: Credits::from_units(50_000_000),
                period: "lifetime".into(),
                limit: None,
                max_in_flight: None,
                request_id: "bench".into(),
                created_at: chrono::Utc::now(),
                callback: None,
            };
            store.reserve(reservation).await.expect("reserve");
            store.attach_task(id, &task_id).await.expect("attach");
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

criterion_group!(
    hot_paths,
    key_lookup,
    rate_limit,
    decimal_parsing,
    cache_hit,
    ledger
);
criterion_main!(hot_paths);
