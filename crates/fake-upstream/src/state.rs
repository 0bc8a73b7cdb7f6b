//! What the fake remembers: its tasks, the render schedule they follow, and the counters tests
//! and benchmarks read back.
//!
//! A task's status is never stored: it is computed from `clock.now() - created_at` on every
//! look, so a [`ManualClock`](ketchup_domain::clock::ManualClock) moves every task at once and nothing
//! needs a timer to advance.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use dashmap::{DashMap, DashSet};
use http::{HeaderMap, Uri};
use serde::{Deserialize, Serialize};

use super::FakeConfig;
use super::catalog::Endpoint;
use super::faults::{FaultCounts, Faults};
use ketchup_domain::clock::SharedClock;
use ketchup_domain::credits::Credits;

/// How many values each of the recorded lists (bodies, Authorization headers, request ids) keeps;
/// later ones are only counted, so request volume alone does not grow the fake. (Tasks are all
/// kept, one small entry each, so that every id it issued stays queryable.)
pub const RECORD_CAP: usize = 10_000;

/// The reason a failed task reports, whatever made it fail.
pub(crate) const FAILURE_REASON: &str = "content policy violation";

/// A task's status as the upstream names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Pending,
    Submitted,
    InProgress,
    Success,
    Failed,
}

/// Everything the fake has counted and recorded, as of the moment it was taken.
///
/// The three lists keep the first [`RECORD_CAP`] entries; the `*_dropped` counters say how many
/// arrivals were not recorded after that (a repeated unrecorded header counts each time).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FakeStats {
    /// Submissions to any asynchronous endpoint that arrived, whatever their outcome.
    pub generate_requests: u64,
    /// Generations that created a task.
    pub generate_accepted: u64,
    /// `GET /api/task/query` requests that arrived, whatever their outcome.
    pub query_requests: u64,
    /// `GET /api/user` requests that arrived.
    pub user_requests: u64,
    /// Text requests (any of the three dialects) that arrived, whatever their outcome.
    pub text_requests: u64,
    /// Requests answered 401, on any endpoint.
    pub unauthorized: u64,
    /// Queries per existing task (ids the fake never issued are not counted here, so hostile
    /// ids cannot grow the map); tasks never queried are absent.
    pub queries_by_task: BTreeMap<String, u64>,
    /// Every distinct `Authorization` header value seen, in order of first arrival.
    pub authorization_headers: Vec<String>,
    pub authorization_headers_dropped: u64,
    /// Every submission body that parsed as JSON, as received.
    pub generate_bodies: Vec<serde_json::Value>,
    pub generate_bodies_dropped: u64,
    /// Every distinct `X-Request-Id` header value seen, in order of first arrival.
    pub request_ids: Vec<String>,
    pub request_ids_dropped: u64,
    /// Callbacks the receiver accepted (2xx).
    pub callbacks_sent: u64,
    /// Callbacks given up on after every attempt failed.
    pub callbacks_failed: u64,
    /// The faults injected so far.
    pub faults: FaultCounts,
    /// Every task, as of now.
    pub tasks: BTreeMap<String, FakeTaskView>,
}

/// One task as [`FakeStats`] shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeTaskView {
    pub model: String,
    pub status: TaskStatus,
    /// Eight decimal places, only once final (`"0.00000000"` when failed).
    pub consumed: Option<String>,
    /// The `X-Request-Id` of the generation that created it, if it had one: which request a
    /// task came from, when its creator never heard the answer.
    pub request_id: Option<String>,
}

/// When a task changes status, as offsets from its creation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    /// Queries answer 404 "task not found" while the task is younger than this.
    pub unknown_for: TimeDelta,
    submitted_after: TimeDelta,
    in_progress_after: TimeDelta,
    final_after: TimeDelta,
}

impl Schedule {
    fn new(config: &FakeConfig) -> Self {
        // A phase too long for chrono is as good as forever; saturate rather than fail.
        let delta = |d: Duration| TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        let then = |a: TimeDelta, b: Duration| a.checked_add(&delta(b)).unwrap_or(TimeDelta::MAX);
        let submitted_after = delta(config.pending_for);
        let in_progress_after = then(submitted_after, config.submitted_for);
        Schedule {
            unknown_for: delta(config.unknown_for),
            submitted_after,
            in_progress_after,
            final_after: then(in_progress_after, config.in_progress_for),
        }
    }
}

/// One render, as created by a successful generation.
#[derive(Debug)]
pub(crate) struct Task {
    /// The endpoint that started it, which gives its result's shape.
    pub endpoint: &'static Endpoint,
    pub model: String,
    pub created_at: DateTime<Utc>,
    /// Number of images a success returns (the request's `n`; 1 for other media).
    pub images: u32,
    /// What a success costs; a failure costs nothing.
    pub price: Credits,
    /// Decided at creation: the task ends `failed` instead of `success`.
    pub fails: bool,
    /// The `X-Request-Id` of the generation that created it.
    pub request_id: Option<String>,
    queries: AtomicU64,
}

impl Task {
    pub fn new(
        endpoint: &'static Endpoint,
        model: String,
        created_at: DateTime<Utc>,
        images: u32,
        price: Credits,
        fails: bool,
    ) -> Self {
        Task {
            endpoint,
            model,
            created_at,
            images,
            price,
            fails,
            request_id: None,
            queries: AtomicU64::new(0),
        }
    }

    pub fn age(&self, now: DateTime<Utc>) -> TimeDelta {
        now.signed_duration_since(self.created_at)
    }

    /// The moment the task becomes final, if that moment is representable.
    pub fn final_at(&self, schedule: &Schedule) -> Option<DateTime<Utc>> {
        self.created_at.checked_add_signed(schedule.final_after)
    }

    pub fn status(&self, now: DateTime<Utc>, schedule: &Schedule) -> TaskStatus {
        let age = self.age(now);
        if age >= schedule.final_after {
            if self.fails {
                TaskStatus::Failed
            } else {
                TaskStatus::Success
            }
        } else if age >= schedule.in_progress_after {
            TaskStatus::InProgress
        } else if age >= schedule.submitted_after {
            TaskStatus::Submitted
        } else {
            TaskStatus::Pending
        }
    }

    /// What the task cost, once final.
    pub fn consumed(&self, status: TaskStatus) -> Option<Credits> {
        match status {
            TaskStatus::Success => Some(self.price),
            TaskStatus::Failed => Some(Credits::ZERO),
            _ => None,
        }
    }

    pub fn count_query(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
    }
}

/// A callback to POST once its task is final.
#[derive(Debug, PartialEq)]
pub(crate) struct PendingCallback {
    pub task_id: String,
    pub url: Uri,
    pub due: DateTime<Utc>,
}

/// The state shared by the server, its handlers and the callback ticker.
pub(crate) struct Shared {
    /// The full accepted `Authorization` value, `Bearer <token>`, to compare bytes directly.
    authorization: String,
    pub prices: BTreeMap<String, Credits>,
    pub schedule: Schedule,
    pub clock: SharedClock,
    initial_balance: Credits,
    pub tasks: DashMap<String, Task>,
    /// Callbacks not yet sent, keyed by (due time, task id) so a tick only touches due ones.
    callbacks: Mutex<BTreeMap<(DateTime<Utc>, String), Uri>>,
    pub stats: Recorder,
    pub faults: Faults,
    /// Where results' files are served: the fake's own `/_fake/files`.
    pub files_url: String,
}

impl Shared {
    pub fn new(config: FakeConfig, files_url: String) -> Self {
        Shared {
            files_url,
            authorization: format!("Bearer {}", config.token),
            schedule: Schedule::new(&config),
            prices: config.consumed,
            clock: config.clock,
            initial_balance: config.initial_balance,
            tasks: DashMap::new(),
            callbacks: Mutex::new(BTreeMap::new()),
            stats: Recorder::default(),
            faults: Faults::default(),
        }
    }

    pub fn is_authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get(http::header::AUTHORIZATION)
            .is_some_and(|value| value.as_bytes() == self.authorization.as_bytes())
    }

    /// The account balance: the initial one minus what every task final by `now` consumed.
    /// Computed by a scan rather than kept, so it follows a manual clock exactly; `/api/user` is
    /// not a hot path.
    pub fn balance(&self, now: DateTime<Utc>) -> Credits {
        self.tasks
            .iter()
            .fold(self.initial_balance, |balance, task| {
                let consumed = task.consumed(task.status(now, &self.schedule));
                balance.saturating_sub(consumed.unwrap_or(Credits::ZERO))
            })
    }

    pub fn schedule_callback(&self, callback: PendingCallback) {
        lock(&self.callbacks).insert((callback.due, callback.task_id), callback.url);
    }

    /// Removes and returns the callbacks whose task is final by `now`, earliest first.
    pub fn take_due_callbacks(&self, now: DateTime<Utc>) -> Vec<PendingCallback> {
        let mut pending = lock(&self.callbacks);
        let mut due = Vec::new();
        while let Some(entry) = pending.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((due_at, task_id), url) = entry.remove_entry();
            due.push(PendingCallback {
                task_id,
                url,
                due: due_at,
            });
        }
        due
    }

    /// A snapshot of the counters; `details` adds the per-task map, the per-task query counts
    /// and the recorded bodies, which can be large after a benchmark.
    pub fn stats(&self, details: bool) -> FakeStats {
        let counter = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let recorder = &self.stats;
        let (authorization_headers, authorization_headers_dropped) =
            recorder.authorization_headers.snapshot();
        let (request_ids, request_ids_dropped) = recorder.request_ids.snapshot();
        let mut stats = FakeStats {
            generate_requests: counter(&recorder.generate_requests),
            generate_accepted: counter(&recorder.generate_accepted),
            query_requests: counter(&recorder.query_requests),
            user_requests: counter(&recorder.user_requests),
            text_requests: counter(&recorder.text_requests),
            unauthorized: counter(&recorder.unauthorized),
            authorization_headers,
            authorization_headers_dropped,
            request_ids,
            request_ids_dropped,
            generate_bodies_dropped: counter(&recorder.generate_bodies_dropped),
            callbacks_sent: counter(&recorder.callbacks_sent),
            callbacks_failed: counter(&recorder.callbacks_failed),
            faults: self.faults.counts(),
            ..FakeStats::default()
        };
        if details {
            stats.generate_bodies = lock(&recorder.generate_bodies).clone();
            let now = self.clock.now();
            for task in self.tasks.iter() {
                let status = task.status(now, &self.schedule);
                let queries = counter(&task.queries);
                if queries > 0 {
                    stats.queries_by_task.insert(task.key().clone(), queries);
                }
                let view = FakeTaskView {
                    model: task.model.clone(),
                    status,
                    consumed: task.consumed(status).map(|c| c.format_places(8)),
                    request_id: task.request_id.clone(),
                };
                stats.tasks.insert(task.key().clone(), view);
            }
        }
        stats
    }

    /// Zeroes every counter and forgets the recorded lists. Tasks, balance and pending
    /// callbacks are state, not statistics, and stay.
    pub fn reset_stats(&self) {
        self.faults.reset_counts();
        let recorder = &self.stats;
        for counter in [
            &recorder.generate_requests,
            &recorder.generate_accepted,
            &recorder.query_requests,
            &recorder.user_requests,
            &recorder.text_requests,
            &recorder.unauthorized,
            &recorder.callbacks_sent,
            &recorder.callbacks_failed,
            &recorder.generate_bodies_dropped,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        lock(&recorder.generate_bodies).clear();
        recorder.authorization_headers.clear();
        recorder.request_ids.clear();
        for task in self.tasks.iter() {
            task.queries.store(0, Ordering::Relaxed);
        }
    }
}

/// The live counters behind [`FakeStats`]: atomics and sharded sets, so the query hot path never
/// waits on a global lock.
#[derive(Default)]
pub(crate) struct Recorder {
    pub generate_requests: AtomicU64,
    pub generate_accepted: AtomicU64,
    pub query_requests: AtomicU64,
    pub user_requests: AtomicU64,
    pub text_requests: AtomicU64,
    pub unauthorized: AtomicU64,
    pub callbacks_sent: AtomicU64,
    pub callbacks_failed: AtomicU64,
    authorization_headers: DistinctLog,
    request_ids: DistinctLog,
    generate_bodies: Mutex<Vec<serde_json::Value>>,
    generate_bodies_dropped: AtomicU64,
}

impl Recorder {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the headers tests inspect: who authenticated how, and which request ids came.
    pub fn observe_headers(&self, headers: &HeaderMap) {
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            self.authorization_headers
                .record(&String::from_utf8_lossy(value.as_bytes()));
        }
        if let Some(value) = headers.get("x-request-id") {
            self.request_ids
                .record(&String::from_utf8_lossy(value.as_bytes()));
        }
    }

    pub fn record_generate_body(&self, body: &serde_json::Value) {
        let mut bodies = lock(&self.generate_bodies);
        if bodies.len() < RECORD_CAP {
            bodies.push(body.clone());
        } else {
            Self::count(&self.generate_bodies_dropped);
        }
    }
}

/// Distinct strings in order of first arrival, capped at [`RECORD_CAP`]. The sharded set answers
/// "seen already?" (the common case) without touching the ordered list's lock.
#[derive(Default)]
struct DistinctLog {
    seen: DashSet<String>,
    order: Mutex<Vec<String>>,
    dropped: AtomicU64,
}

impl DistinctLog {
    fn record(&self, value: &str) {
        if self.seen.contains(value) {
            return;
        }
        let mut order = lock(&self.order);
        if order.len() >= RECORD_CAP {
            Recorder::count(&self.dropped);
        } else if self.seen.insert(value.to_owned()) {
            order.push(value.to_owned());
        }
    }

    fn snapshot(&self) -> (Vec<String>, u64) {
        (
            lock(&self.order).clone(),
            self.dropped.load(Ordering::Relaxed),
        )
    }

    fn clear(&self) {
        let mut order = lock(&self.order);
        order.clear();
        self.seen.clear();
        self.dropped.store(0, Ordering::Relaxed);
    }
}

/// Locks, shrugging off poisoning: every critical section here leaves the data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_gen() -> &'static Endpoint {
        crate::catalog::endpoint("/api/image/gen").unwrap()
    }

    fn schedule(phases: [u64; 3]) -> Schedule {
        let mut config = FakeConfig::new("t");
        config.pending_for = Duration::from_secs(phases[0]);
        config.submitted_for = Duration::from_secs(phases[1]);
        config.in_progress_for = Duration::from_secs(phases[2]);
        Schedule::new(&config)
    }

    #[test]
    fn status_follows_the_schedule_and_clock_skew_reads_as_pending() {
        let schedule = schedule([1, 2, 3]);
        let start = DateTime::UNIX_EPOCH;
        let task = Task::new(
            image_gen(),
            "m".into(),
            start,
            1,
            Credits::from_units(5),
            false,
        );
        let at = |secs: i64| task.status(start + TimeDelta::seconds(secs), &schedule);
        assert_eq!(at(-5), TaskStatus::Pending);
        assert_eq!(at(0), TaskStatus::Pending);
        assert_eq!(at(1), TaskStatus::Submitted);
        assert_eq!(at(2), TaskStatus::Submitted);
        assert_eq!(at(3), TaskStatus::InProgress);
        assert_eq!(at(5), TaskStatus::InProgress);
        assert_eq!(at(6), TaskStatus::Success);
        assert_eq!(
            task.final_at(&schedule),
            Some(start + TimeDelta::seconds(6))
        );
    }

    #[test]
    fn enormous_phases_saturate_instead_of_panicking() {
        let mut config = FakeConfig::new("t");
        config.pending_for = Duration::MAX;
        config.in_progress_for = Duration::MAX;
        let schedule = Schedule::new(&config);
        let task = Task::new(image_gen(), "m".into(), Utc::now(), 1, Credits::ZERO, false);
        assert_eq!(task.status(Utc::now(), &schedule), TaskStatus::Pending);
        assert_eq!(task.final_at(&schedule), None);
    }

    #[test]
    fn only_due_callbacks_are_taken_earliest_first() {
        let shared = Shared::new(FakeConfig::new("t"), "http://fake.test/_fake/files".into());
        let start = DateTime::UNIX_EPOCH;
        let callback = |id: &str, secs: i64| PendingCallback {
            task_id: id.into(),
            url: Uri::from_static("http://127.0.0.1:1/hook"),
            due: start + TimeDelta::seconds(secs),
        };
        for (id, secs) in [("late", 9), ("b", 2), ("a", 1)] {
            shared.schedule_callback(callback(id, secs));
        }
        assert_eq!(shared.take_due_callbacks(start), vec![]);
        let two = start + TimeDelta::seconds(2);
        assert_eq!(
            shared.take_due_callbacks(two),
            vec![callback("a", 1), callback("b", 2)]
        );
        assert_eq!(shared.take_due_callbacks(two), vec![]);
        let nine = start + TimeDelta::seconds(9);
        assert_eq!(shared.take_due_callbacks(nine), vec![callback("late", 9)]);
    }

    #[test]
    fn distinct_log_keeps_first_arrivals_and_counts_past_the_cap() {
        let log = DistinctLog::default();
        log.record("a");
        log.record("b");
        log.record("a");
        assert_eq!(log.snapshot(), (vec!["a".to_owned(), "b".to_owned()], 0));
        for i in 0..RECORD_CAP {
            log.record(&i.to_string());
        }
        let (kept, dropped) = log.snapshot();
        assert_eq!(kept.len(), RECORD_CAP);
        assert_eq!(dropped, 2);
        log.clear();
        assert_eq!(log.snapshot(), (vec![], 0));
    }
}
