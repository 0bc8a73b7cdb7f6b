//! A coalescing cache of task statuses, so many pollers cost the upstream at most one read per
//! task per `status_ttl`.
//!
//! moka does the hard parts: a size bound with TinyLFU eviction, a per-entry lifetime (a final
//! status stays until evicted, a running one for `status_ttl`), and single flight: concurrent
//! misses for one task wait on one upstream read. Only statuses are cached; an upstream error or
//! a refusal reaches every waiter of that read and is then forgotten.
//!
//! The cache sits behind the ownership check: it is never asked about a task the caller does
//! not own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::fast::RandomState;
use http::{HeaderValue, StatusCode};
use moka::{Expiry, future::Cache, notification::RemovalCause};

pub mod shared;

use crate::metrics::Metrics;
use ketchup_domain::config::CacheConfig;
use shared::SharedStatuses;

/// An upstream answer to a status read, as served to clients.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
    /// `success` or `failed`: the status will not change any more.
    pub is_final: bool,
}

/// How a read was served, for the `X-Cache` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Hit,
    Miss,
    /// Waited for another request's upstream read of the same task.
    Coalesced,
}

impl Served {
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::Miss => "miss",
            Served::Coalesced => "coalesced",
        }
    }
}

/// What a read that missed produced.
pub enum Fetched<E> {
    /// A task status: cached.
    Status(Answer),
    /// An answer to pass on but not to cache (an upstream 404 or 5xx).
    Uncacheable(Answer),
    /// No answer at all.
    Failed(E),
}

/// Why a read produced nothing cacheable, shared by every request that waited on it.
#[derive(Debug)]
pub enum NotCached<E> {
    Answer(Answer),
    Error(E),
}

/// Which statuses another replica read (the shared layer) may answer a miss.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fresh {
    /// Any: a running one is at most `status_ttl` old.
    Any,
    /// Only a final one: the caller needs to know whether the task has finished by now.
    FinalOnly,
}

struct Lifetime {
    running: Duration,
}

impl Expiry<String, Arc<Answer>> for Lifetime {
    fn expire_after_create(
        &self,
        _task_id: &String,
        answer: &Arc<Answer>,
        _created_at: Instant,
    ) -> Option<Duration> {
        (!answer.is_final).then_some(self.running)
    }
}

pub struct StatusCache {
    /// `None` when `cache.max_entries = 0`: every read goes upstream. Hashed with foldhash
    /// rather than SipHash: only the ids of tasks the gateway owns are looked up, and the
    /// upstream made them.
    entries: Option<Cache<String, Arc<Answer>, RandomState>>,
    /// With several replicas: statuses any of them read, behind this replica's own cache.
    shared: Option<Arc<SharedStatuses>>,
}

impl StatusCache {
    pub fn new(
        config: &CacheConfig,
        metrics: Arc<Metrics>,
        shared: Option<SharedStatuses>,
    ) -> Self {
        let entries = (config.max_entries > 0).then(|| {
            let slot = config.max_bytes.div_ceil(config.max_entries);
            Cache::builder()
                // Weighed in bytes, each entry at least one slot: the entries' bodies stay within
                // max_bytes, and their number within max_bytes / slot <= max_entries.
                .max_capacity(config.max_bytes)
                .weigher(move |_task_id: &String, answer: &Arc<Answer>| {
                    let bytes = u64::try_from(answer.body.len()).unwrap_or(u64::MAX);
                    u32::try_from(bytes.max(slot)).unwrap_or(u32::MAX)
                })
                .expire_after(Lifetime {
                    running: config.status_ttl,
                })
                .eviction_listener(move |_task_id, _answer, cause| {
                    if cause == RemovalCause::Size {
                        metrics.cache_evictions.inc();
                    }
                })
                .build_with_hasher(RandomState::default())
        });
        let shared = shared.filter(|_| entries.is_some()).map(Arc::new);
        StatusCache { entries, shared }
    }

    /// The task's status from the cache, or from the future `fetch` makes (once, however many
    /// ask at once), and how it was served: a request that waited on another's read is
    /// `Coalesced`, whether that read gave a status or not.
    pub async fn get_or_fetch<E, F>(
        &self,
        task_id: &str,
        fetch: impl FnOnce() -> F,
    ) -> (Served, Result<Arc<Answer>, Arc<NotCached<E>>>)
    where
        E: Send + Sync + 'static,
        F: Future<Output = Fetched<E>>,
    {
        if let Some(entries) = &self.entries
            && let Some(answer) = entries.get(task_id).await
        {
            return (Served::Hit, Ok(answer));
        }
        // Boxed, so that a hit does not carry it: the upstream read and its coalescing make a
        // future of kilobytes, and a request's future is moved whole, hits included. The read
        // is boxed where it is made, so that it is copied once, not again into each future
        // that takes it on the way.
        let fetch = Box::pin(fetch());
        Box::pin(self.fetch_through(task_id, fetch, Fresh::Any)).await
    }

    /// The task's status as the upstream says it now, to check a claim against (a callback's):
    /// a final status from the cache, which was read from the upstream and will not change, or
    /// else the future `fetch` makes. A running status held here or in the shared layer is not
    /// used, as the task may have finished since; a read of the task already on its way is
    /// joined, and what the read gives is cached as any read's answer is.
    pub async fn get_final_or_fetch<E, F>(
        &self,
        task_id: &str,
        fetch: impl FnOnce() -> F,
    ) -> (Served, Result<Arc<Answer>, Arc<NotCached<E>>>)
    where
        E: Send + Sync + 'static,
        F: Future<Output = Fetched<E>>,
    {
        if let Some(entries) = &self.entries {
            match entries.get(task_id).await {
                Some(answer) if answer.is_final => return (Served::Hit, Ok(answer)),
                Some(_) => entries.invalidate(task_id).await,
                None => {}
            }
        }
        self.fetch_through(task_id, fetch(), Fresh::FinalOnly).await
    }

    /// The miss path of [`get_or_fetch`](Self::get_or_fetch) and
    /// [`get_final_or_fetch`](Self::get_final_or_fetch).
    async fn fetch_through<E, F>(
        &self,
        task_id: &str,
        fetch: F,
        shared_statuses: Fresh,
    ) -> (Served, Result<Arc<Answer>, Arc<NotCached<E>>>)
    where
        E: Send + Sync + 'static,
        F: Future<Output = Fetched<E>>,
    {
        let Some(entries) = &self.entries else {
            let result = match fetch.await {
                Fetched::Status(answer) => Ok(Arc::new(answer)),
                Fetched::Uncacheable(answer) => Err(Arc::new(NotCached::Answer(answer))),
                Fetched::Failed(e) => Err(Arc::new(NotCached::Error(e))),
            };
            return (Served::Miss, result);
        };
        let fetched_here = AtomicBool::new(false);
        // Another replica's read, found in the shared layer: no upstream read, so a hit.
        let from_shared = AtomicBool::new(false);
        let result = entries
            .try_get_with(task_id.to_owned(), async {
                fetched_here.store(true, Ordering::Relaxed);
                if let Some(shared) = &self.shared
                    && let Some(answer) = shared.get(task_id).await
                    && (answer.is_final || shared_statuses == Fresh::Any)
                {
                    from_shared.store(true, Ordering::Relaxed);
                    return Ok(Arc::new(answer));
                }
                let fetched = fetch.await;
                if let (Some(shared), Fetched::Status(answer)) = (&self.shared, &fetched) {
                    // The answer is ready: it must not wait on a Redis that is slow or gone,
                    // and the other replicas gain nothing from it waiting.
                    let (shared, task_id, answer) =
                        (shared.clone(), task_id.to_owned(), answer.clone());
                    tokio::spawn(async move { shared.put(&task_id, &answer).await });
                }
                match fetched {
                    Fetched::Status(answer) => Ok(Arc::new(answer)),
                    Fetched::Uncacheable(answer) => Err(NotCached::Answer(answer)),
                    Fetched::Failed(e) => Err(NotCached::Error(e)),
                }
            })
            .await;
        let served = if from_shared.load(Ordering::Relaxed) {
            Served::Hit
        } else if fetched_here.load(Ordering::Relaxed) {
            Served::Miss
        } else {
            Served::Coalesced
        };
        (served, result)
    }

    pub fn is_enabled(&self) -> bool {
        self.entries.is_some()
    }

    /// Records a status read outside the cache (the reconciler's).
    pub async fn insert(&self, task_id: &str, answer: Answer) {
        if let Some(shared) = &self.shared {
            shared.put(task_id, &answer).await;
        }
        if let Some(entries) = &self.entries {
            entries.insert(task_id.to_owned(), Arc::new(answer)).await;
        }
    }

    /// Entries held now (after pending evictions are applied).
    pub async fn entry_count(&self) -> u64 {
        match &self.entries {
            Some(entries) => {
                entries.run_pending_tasks().await;
                entries.entry_count()
            }
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn answer(is_final: bool) -> Answer {
        Answer {
            status: StatusCode::OK,
            content_type: None,
            body: Bytes::from_static(b"{}"),
            is_final,
        }
    }

    fn cache(ttl_ms: u64, max_entries: u64) -> StatusCache {
        bounded_cache(ttl_ms, max_entries, 64 << 20)
    }

    fn bounded_cache(ttl_ms: u64, max_entries: u64, max_bytes: u64) -> StatusCache {
        StatusCache::new(
            &CacheConfig {
                status_ttl: Duration::from_millis(ttl_ms),
                max_entries,
                max_bytes,
                max_owners: 0,
            },
            Arc::new(Metrics::new()),
            None,
        )
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_read() {
        let cache = Arc::new(cache(60_000, 100));
        let reads = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..50)
            .map(|_| {
                let (cache, reads) = (cache.clone(), reads.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_fetch::<(), _>("ta-1", || async {
                            reads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Fetched::Status(answer(false))
                        })
                        .await
                        .0
                })
            })
            .collect();
        let mut served = Vec::new();
        for reader in readers {
            served.push(reader.await.unwrap());
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert_eq!(served.iter().filter(|s| **s == Served::Miss).count(), 1);
        assert_eq!(
            served.iter().filter(|s| **s == Served::Coalesced).count(),
            49
        );
        let (again, _) = cache
            .get_or_fetch::<(), _>("ta-1", || async { unreachable!("cached") })
            .await;
        assert_eq!(again, Served::Hit);
    }

    #[tokio::test]
    async fn a_read_for_a_claim_trusts_only_final_statuses_and_joins_reads_on_their_way() {
        let cache = Arc::new(cache(60_000, 100));
        // A running status in the cache is read again, and the fresh answer replaces it.
        cache.insert("ta-1", answer(false)).await;
        let (served, read) = cache
            .get_final_or_fetch::<(), _>("ta-1", || async { Fetched::Status(answer(true)) })
            .await;
        assert_eq!(served, Served::Miss);
        assert!(read.unwrap().is_final);
        // A final one is taken as it is.
        let (served, _) = cache
            .get_final_or_fetch::<(), _>("ta-1", || async { unreachable!("final") })
            .await;
        assert_eq!(served, Served::Hit);
        let (served, _) = cache
            .get_or_fetch::<(), _>("ta-1", || async { unreachable!("cached") })
            .await;
        assert_eq!(served, Served::Hit, "the fresh answer filled the cache");

        // A poller's read on its way is joined rather than repeated.
        let reads = Arc::new(AtomicUsize::new(0));
        let poller = {
            let (cache, reads) = (cache.clone(), reads.clone());
            tokio::spawn(async move {
                cache
                    .get_or_fetch::<(), _>("ta-2", || async {
                        reads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Fetched::Status(answer(true))
                    })
                    .await
                    .0
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (served, read) = cache
            .get_final_or_fetch::<(), _>("ta-2", || async {
                reads.fetch_add(1, Ordering::SeqCst);
                Fetched::Status(answer(true))
            })
            .await;
        assert_eq!(served, Served::Coalesced);
        assert!(read.unwrap().is_final);
        assert_eq!(poller.await.unwrap(), Served::Miss);
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn errors_and_uncacheable_answers_are_not_kept() {
        let cache = cache(60_000, 100);
        let failed = cache
            .get_or_fetch("ta-1", || async { Fetched::Failed("upstream down") })
            .await
            .1
            .unwrap_err();
        assert!(matches!(*failed, NotCached::Error("upstream down")));
        let passed_on = cache
            .get_or_fetch::<(), _>("ta-1", || async { Fetched::Uncacheable(answer(false)) })
            .await
            .1
            .unwrap_err();
        assert!(matches!(*passed_on, NotCached::Answer(_)));
        let (served, _) = cache
            .get_or_fetch::<(), _>("ta-1", || async { Fetched::Status(answer(false)) })
            .await;
        assert_eq!(served, Served::Miss, "nothing was cached before");
    }

    #[tokio::test]
    async fn running_statuses_expire_and_final_ones_stay() {
        let cache = cache(20, 100);
        cache.insert("running", answer(false)).await;
        cache.insert("done", answer(true)).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        let refetched = cache
            .get_or_fetch::<(), _>("running", || async { Fetched::Status(answer(false)) })
            .await
            .0;
        assert_eq!(refetched, Served::Miss);
        let kept = cache
            .get_or_fetch::<(), _>("done", || async { unreachable!("final statuses stay") })
            .await
            .0;
        assert_eq!(kept, Served::Hit);
    }

    #[tokio::test]
    async fn big_answers_are_bounded_by_bytes_and_small_ones_by_count() {
        const MAX_BYTES: u64 = 1 << 20;
        let cache = bounded_cache(60_000, 1_000, MAX_BYTES);
        let entries = cache.entries.as_ref().unwrap();
        // Base64 images make a final status big: 20 of 200 KiB are four times the bound.
        for i in 0..20 {
            let body = Bytes::from(vec![b'A'; 200 << 10]);
            let big = Answer {
                body,
                ..answer(true)
            };
            cache.insert(&format!("big-{i}"), big).await;
        }
        entries.run_pending_tasks().await;
        assert!(
            entries.weighted_size() <= MAX_BYTES,
            "{}",
            entries.weighted_size()
        );
        assert!(
            (1..=5).contains(&entries.entry_count()),
            "{}",
            entries.entry_count()
        );
        // Small ones: the entry bound holds, however little they weigh.
        let cache = bounded_cache(60_000, 1_000, MAX_BYTES);
        let entries = cache.entries.as_ref().unwrap();
        for i in 0..3_000 {
            cache.insert(&format!("small-{i}"), answer(true)).await;
        }
        entries.run_pending_tasks().await;
        assert!(entries.entry_count() <= 1_000, "{}", entries.entry_count());
        assert!(entries.entry_count() >= 500, "{}", entries.entry_count());
    }

    /// A cache in front of `server`, whose Redis calls give up after `timeout`.
    async fn shared_cache(
        server: &ketchup_test_redis::FadingRedis,
        timeout: Duration,
    ) -> StatusCache {
        let url = format!("redis://{}/", server.address);
        let shared = SharedStatuses::connect(
            &ketchup_domain::redis_client::RedisEndpoint::from_url(&url),
            "t:",
            timeout,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        StatusCache::new(
            &CacheConfig {
                status_ttl: Duration::from_secs(1),
                max_entries: 100,
                max_bytes: 64 << 20,
                max_owners: 0,
            },
            Arc::new(Metrics::new()),
            Some(shared),
        )
    }

    #[tokio::test]
    async fn a_redis_that_stops_answering_holds_up_no_answer_beyond_the_timeout() {
        const TIMEOUT: Duration = Duration::from_secs(1);
        // Redis answers the read (with nothing usable: a miss) and stops answering while the
        // upstream is asked, so only the write of what the upstream said meets the silence.
        let server = ketchup_test_redis::FadingRedis::start().await;
        let cache = shared_cache(&server, TIMEOUT).await;
        let started = Instant::now();
        let (served, read) = cache
            .get_or_fetch::<(), _>("ta-1", || async {
                server.stop();
                Fetched::Status(answer(true))
            })
            .await;
        assert_eq!(served, Served::Miss);
        assert!(read.is_ok());
        assert!(started.elapsed() < TIMEOUT, "{:?}", started.elapsed());

        // Silent from the start: the read costs the timeout, the write nothing more.
        let server = ketchup_test_redis::FadingRedis::start().await;
        let cache = shared_cache(&server, TIMEOUT).await;
        server.stop();
        let started = Instant::now();
        let (served, read) = cache
            .get_or_fetch::<(), _>("ta-2", || async { Fetched::Status(answer(true)) })
            .await;
        assert_eq!(served, Served::Miss);
        assert!(read.is_ok());
        let elapsed = started.elapsed();
        assert!(
            elapsed >= TIMEOUT && elapsed < TIMEOUT + Duration::from_millis(900),
            "{elapsed:?}"
        );
    }

    #[tokio::test]
    async fn a_read_for_a_claim_does_not_take_another_replicas_running_status() {
        let Some(url) = ketchup_test_redis::url() else {
            return;
        };
        let prefix = format!("t{}:", uuid::Uuid::now_v7().simple());
        let replica = || async {
            let shared = SharedStatuses::connect(
                &ketchup_domain::redis_client::RedisEndpoint::from_url(&url),
                &prefix,
                Duration::from_secs(1),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
            StatusCache::new(
                &CacheConfig {
                    status_ttl: Duration::from_secs(60),
                    max_entries: 100,
                    max_bytes: 64 << 20,
                    max_owners: 0,
                },
                Arc::new(Metrics::new()),
                Some(shared),
            )
        };
        let (a, b) = (replica().await, replica().await);
        a.insert("running", answer(false)).await;
        a.insert("done", answer(true)).await;
        let (served, read) = b
            .get_final_or_fetch::<(), _>("running", || async { Fetched::Status(answer(true)) })
            .await;
        assert_eq!(served, Served::Miss, "read again, not taken from replica a");
        assert!(read.unwrap().is_final);
        let (served, _) = b
            .get_final_or_fetch::<(), _>("done", || async { unreachable!("final in Redis") })
            .await;
        assert_eq!(served, Served::Hit);
    }

    #[tokio::test]
    async fn the_size_bound_holds() {
        let cache = cache(60_000, 50);
        for i in 0..500 {
            cache.insert(&format!("ta-{i}"), answer(true)).await;
        }
        assert!(
            cache.entry_count().await <= 50,
            "{}",
            cache.entry_count().await
        );
    }
}
