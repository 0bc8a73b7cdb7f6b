//! What the fake remembers: its tasks, the render schedule they follow, and the counters tests
//! and benchmarks read back.
//!
//! A task's status is never stored: it is computed from `clock.now() - created_at` on every
//! look, so a [`ManualClock`](ketchup_domain::clock::ManualClock) moves every task at once and nothing
//! needs a timer to advance.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use dashmap::{DashMap, DashSet};
use http::{HeaderMap, Uri};
use serde::{Deserialize, Serialize};

use super::catalog::Endpoint;
use super::faults::{FaultCounts, Faults};
use super::{DEFAULT_ACCOUNT, FakeConfig};
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
    /// Task queries made with another account's token than the one that created the task
    /// (answered 404 "task not found", as that account has no such task).
    pub foreign_queries: u64,
    /// Each account by name: its balance, what it spent, whether its token is revoked.
    pub accounts: BTreeMap<String, FakeAccountView>,
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

/// One account as [`FakeStats`] shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeAccountView {
    /// What `/api/user` answers for it now, eight decimal places.
    pub balance: String,
    /// What its finished tasks consumed, eight decimal places.
    pub spent: String,
    /// Tasks it created.
    pub tasks: u64,
    pub revoked: bool,
}

/// One task as [`FakeStats`] shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeTaskView {
    /// The name of the account whose token created it.
    pub account: String,
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
    /// The account whose token created it: the only one that can read it.
    pub account: usize,
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
            account: 0,
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

/// One account of the fake: a token, a balance, and whether the token still works.
pub(crate) struct Account {
    pub name: String,
    /// The full accepted `Authorization` value, `Bearer <token>`, to compare bytes directly.
    authorization: String,
    initial_balance: Credits,
    /// Added by top-ups, in units of 10⁻⁸.
    topped_up: AtomicI64,
    revoked: AtomicBool,
}

/// The state shared by the server, its handlers and the callback ticker.
pub(crate) struct Shared {
    /// The first is the default account ([`FakeConfig::token`]), then [`FakeConfig::accounts`].
    pub accounts: Vec<Account>,
    pub prices: BTreeMap<String, Credits>,
    pub schedule: Schedule,
    pub clock: SharedClock,
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
        let account = |name: &str, token: &str, initial_balance: Credits| Account {
            name: name.to_owned(),
            authorization: format!("Bearer {token}"),
            initial_balance,
            topped_up: AtomicI64::new(0),
            revoked: AtomicBool::new(false),
        };
        let accounts = std::iter::once(account(
            DEFAULT_ACCOUNT,
            &config.token,
            config.initial_balance,
        ))
        .chain(
            config
                .accounts
                .iter()
                .map(|a| account(&a.name, &a.token, a.initial_balance)),
        )
        .collect();
        Shared {
            files_url,
            accounts,
            schedule: Schedule::new(&config),
            prices: config.consumed,
            clock: config.clock,
            tasks: DashMap::new(),
            callbacks: Mutex::new(BTreeMap::new()),
            stats: Recorder::default(),
            faults: Faults::default(),
        }
    }

    /// The account whose token the request carries, unless that token is revoked.
    pub fn authorize(&self, headers: &HeaderMap) -> Option<usize> {
        let value = headers.get(http::header::AUTHORIZATION)?;
        self.accounts.iter().position(|account| {
            value.as_bytes() == account.authorization.as_bytes()
                && !account.revoked.load(Ordering::Relaxed)
        })
    }

    pub fn is_authorized(&self, headers: &HeaderMap) -> bool {
        self.authorize(headers).is_some()
    }

    /// The account named `name`.
    pub fn account(&self, name: &str) -> Option<&Account> {
        self.accounts.iter().find(|account| account.name == name)
    }

    /// What account `index`'s tasks final by `now` consumed.
    fn spent(&self, index: usize, now: DateTime<Utc>) -> Credits {
        self.tasks
            .iter()
            .filter(|task| task.account == index)
            .fold(Credits::ZERO, |spent, task| {
                let consumed = task.consumed(task.status(now, &self.schedule));
                spent
                    .checked_add(consumed.unwrap_or(Credits::ZERO))
                    .unwrap_or(spent)
            })
    }

    /// Account `index`'s balance: its initial one and top-ups minus what its tasks final by
    /// `now` consumed. Computed by a scan rather than kept, so it follows a manual clock
    /// exactly; `/api/user` is not a hot path.
    pub fn balance(&self, index: usize, now: DateTime<Utc>) -> Credits {
        let account = &self.accounts[index];
        let topped_up = Credits::from_units(account.topped_up.load(Ordering::Relaxed));
        account
            .initial_balance
            .checked_add(topped_up)
            .unwrap_or(account.initial_balance)
            .saturating_sub(self.spent(index, now))
    }

    /// Revokes (`true`) or restores account `name`'s token; `false` if there is no such account.
    pub fn set_revoked(&self, name: &str, revoked: bool) -> bool {
        self.account(name)
            .map(|account| account.revoked.store(revoked, Ordering::Relaxed))
            .is_some()
    }

    /// Adds `amount` (negative to take away) to account `name`'s balance.
    pub fn top_up(&self, name: &str, amount: Credits) -> bool {
        self.account(name)
            .map(|account| {
                account
                    .topped_up
                    .fetch_add(amount.units(), Ordering::Relaxed)
            })
            .is_some()
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
            foreign_queries: counter(&recorder.foreign_queries),
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
        let now = self.clock.now();
        for (index, account) in self.accounts.iter().enumerate() {
            let view = FakeAccountView {
                balance: self.balance(index, now).format_places(8),
                spent: self.spent(index, now).format_places(8),
                tasks: self.tasks.iter().filter(|t| t.account == index).count() as u64,
                revoked: account.revoked.load(Ordering::Relaxed),
            };
            stats.accounts.insert(account.name.clone(), view);
        }
        if details {
            stats.generate_bodies = lock(&recorder.generate_bodies).clone();
            for task in self.tasks.iter() {
                let status = task.status(now, &self.schedule);
                let queries = counter(&task.queries);
                if queries > 0 {
                    stats.queries_by_task.insert(task.key().clone(), queries);
                }
                let view = FakeTaskView {
                    account: self.accounts[task.account].name.clone(),
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
            &recorder.foreign_queries,
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
    pub foreign_queries: AtomicU64,
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
