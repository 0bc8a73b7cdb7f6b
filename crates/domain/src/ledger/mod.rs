//! The ledger: which team owns which task, and what each task reserved and cost.
//!
//! Its operations are cut by concern, each trait with its own callers: [`Reservations`] (credits
//! held, then charged or given back), [`Tasks`] (who owns what, and which tasks nobody watches),
//! [`Outbox`] (webhook deliveries), [`BudgetNotices`] (the one notification per budget threshold
//! and period), [`Reports`] (what teams and admins read), [`Audit`] (the trail of admin
//! actions), [`Calibration`] (the settled costs reservations are tuned from) and [`TaskAccounts`]
//! (which upstream account started each task). Domain code takes the narrowest it needs (the
//! settler [`Reservations`], the ownership index's fill [`Tasks`]); [`Ledger`] is all of them,
//! for the gateway's shared state. Every engine implements them all and
//! passes the same conformance suite (`conformance/`), so the gateway's guarantees do not depend
//! on which one runs.
//!
//! A generation moves through these states:
//! `reserved` (credits held, upstream not yet answered) → `open` (upstream gave a task id; the
//! team owns it) → `settled` (final status seen, `consumed` recorded). Side exits: `released`
//! (the upstream refused, nothing was charged), `unknown_outcome` (the request may have reached
//! the upstream but no answer came back: counted as spent until an admin releases it, or a retry
//! with the same Idempotency-Key gets a task) and `expired` (no final status within the maximum
//! task age: charged at its reservation).
//!
//! While `reserved`, a reservation is marked *dispatched*, durably, before its request may leave
//! for the upstream. So one left behind by a gateway that stopped is certain either never to have
//! been sent (given back) or to have perhaps been (an unknown outcome), and every unknown outcome
//! records why it is one ([`OutcomeReason`]).
//!
//! A generation may carry an Idempotency-Key ([`KeyClaim`]): `reserve` claims it in the same
//! atomic step as the credits, and `attach_task` stores the answer its repeats get, so two
//! requests with one key never both reach the upstream, whichever replica they reach.
//! A text request is answered at once and has no task: its reservation goes from `reserved`
//! straight to `settled` at what the answer reports.

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use crate::calibration::{CostHistogram, CostKey, CostKeyOf, CostSample};
use crate::credits::Credits;

pub mod breaker;
pub mod redis;
pub mod sqlite;

#[cfg(test)]
mod conformance;

/// Identifies a reservation before the upstream has given it a task id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReservationId(pub Uuid);

impl ReservationId {
    pub fn new() -> Self {
        ReservationId(Uuid::now_v7())
    }
}

impl Default for ReservationId {
    fn default() -> Self {
        Self::new()
    }
}

/// What a generation asks the ledger to hold before it calls the upstream.
#[derive(Debug, Clone)]
pub struct NewReservation {
    pub id: ReservationId,
    pub team: String,
    /// The name of the team key that made it ([`crate::config::KeyEntry::name`]), which usage
    /// and the spend metric are split by.
    pub key: String,
    pub model: String,
    /// The family of the route the generation came through (`image`, `video`, …), for usage.
    pub family: String,
    pub amount: Credits,
    /// The budget period the cost belongs to (e.g. `2026-11`); it is part of the key, so a new
    /// period starts from zero without any reset job.
    pub period: String,
    /// The team's budget for that period, if it has one.
    pub limit: Option<Credits>,
    /// Most unsettled tasks the team may have at once, if limited.
    pub max_in_flight: Option<u32>,
    pub request_id: String,
    pub created_at: DateTime<Utc>,
    /// Set when the gateway put its own callback URL into the upstream request.
    pub callback: Option<CallbackRoute>,
    /// The request's Idempotency-Key, claimed with the reservation.
    pub idempotency: Option<KeyClaim>,
    /// What the task's cost is set against when it settles; `None` for a text request.
    pub cost: Option<CostKey>,
}

/// An Idempotency-Key, as a generation claims it for its team. A key names one request: the same
/// route and body. Within its lifetime the key's first answer is what every repeat gets, and while
/// its request waits on the upstream no repeat may start another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyClaim {
    /// The key as the client sent it: 1 to 255 printable ASCII characters.
    pub key: String,
    /// SHA-256 (hex) of the route's path and the body as the client sent them.
    pub fingerprint: String,
    /// From then on the key is free for any request again.
    pub expires_at: DateTime<Utc>,
}

/// The answer to a key's request that its repeats get: the upstream's acceptance of the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// Why a reservation's outcome is unknown, or why a stale one was given back without the
/// upstream refusing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeReason {
    /// No answer from the upstream within `upstream.timeout`.
    UpstreamTimeout,
    /// The connection broke after the request was sent.
    ConnectionBroken,
    /// A 2xx answer without a task id: something may run that the gateway cannot track.
    AcceptedWithoutTaskId,
    /// Dispatched, and no answer was recorded within `reconciler.abandon_after`: the gateway
    /// that sent it stopped, or could not write the ledger.
    NoAnswerRecorded,
    /// Never dispatched, and given up after `reconciler.abandon_after`: the gateway stopped
    /// before sending it, so the upstream cannot have started it. Released, not unknown.
    NeverDispatched,
}

impl OutcomeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeReason::UpstreamTimeout => "upstream_timeout",
            OutcomeReason::ConnectionBroken => "connection_broken",
            OutcomeReason::AcceptedWithoutTaskId => "accepted_without_task_id",
            OutcomeReason::NoAnswerRecorded => "no_answer_recorded",
            OutcomeReason::NeverDispatched => "never_dispatched",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "upstream_timeout" => OutcomeReason::UpstreamTimeout,
            "connection_broken" => OutcomeReason::ConnectionBroken,
            "accepted_without_task_id" => OutcomeReason::AcceptedWithoutTaskId,
            "no_answer_recorded" => OutcomeReason::NoAnswerRecorded,
            "never_dispatched" => OutcomeReason::NeverDispatched,
            _ => return None,
        })
    }
}

/// What one look for stale reservations did with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Abandoned {
    /// Dispatched ones, now `unknown_outcome` ([`OutcomeReason::NoAnswerRecorded`]).
    pub unknown_outcome: u64,
    /// Never dispatched ones, given back ([`OutcomeReason::NeverDispatched`]).
    pub released: u64,
}

/// How the upstream's callback for a task finds its way back, decided before the upstream call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackRoute {
    /// SHA-256 (hex) of the per-task token in `{public_url}/callbacks/{token}`; the token itself
    /// is never stored, so a copy of the ledger cannot forge callbacks.
    pub token_digest: String,
    /// The team's own `callback_url`, to which the payload is delivered; `None` when the gateway
    /// registered its callback only to settle by push.
    pub forward_to: Option<String>,
}

/// What a callback token leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackTarget {
    pub reservation: ReservationId,
    /// `None` while the upstream's answer to the generation is not recorded yet.
    pub task_id: Option<String>,
    pub team: String,
    pub forward_to: Option<String>,
}

/// A webhook to deliver to a team: queued durably, then attempted until it succeeds or its
/// deadline passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    /// Sent as `webhook-id`, the same on every attempt, so receivers can drop repeats.
    pub id: String,
    /// The task whose state it delivers; a budget notification names its claim here instead,
    /// `budget:{team}:{period}:{percent}` (no upstream task id has that form).
    pub task_id: String,
    pub team: String,
    pub url: String,
    /// The payload, byte for byte: the task's state as the upstream confirmed it, shared with
    /// the answer it was read from rather than copied (it can be megabytes of images).
    pub body: Bytes,
    pub created_at: DateTime<Utc>,
    /// No attempt starts after this; the delivery is then dead-lettered.
    pub deadline: DateTime<Utc>,
}

/// How many attempts one claim may start: `total` in all, and for each team no more than
/// `per_team` less the attempts it has in flight already (`busy`), so that one team's receivers
/// that do not answer can hold only a share of the slots, never every one. Deliveries left out
/// stay due, their attempts uncounted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimLimits {
    pub total: usize,
    pub per_team: usize,
    pub busy: std::collections::BTreeMap<String, usize>,
}

/// A delivery claimed for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: String,
    pub task_id: String,
    pub team: String,
    pub url: String,
    pub body: Vec<u8>,
    /// Attempts started so far, this one included.
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for its next attempt (or in one).
    Pending,
    Delivered,
    /// Gave up: the deadline passed or the target may never be called.
    Dead,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => DeliveryState::Pending,
            "delivered" => DeliveryState::Delivered,
            "dead" => DeliveryState::Dead,
            _ => return None,
        })
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    /// Failed; try again at the given time.
    RetryAt(DateTime<Utc>, String),
    /// Failed for good.
    Dead(String),
}

/// A delivery as admins see it (without its body).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryRecord {
    pub id: String,
    pub task_id: String,
    pub team: String,
    pub url: String,
    pub state: &'static str,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a team has spent and holds in one budget period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Standing {
    pub spent: Credits,
    pub reserved: Credits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Held; the standing includes this reservation.
    Reserved(Standing),
    /// `spent + reserved + amount` would pass the limit.
    BudgetExhausted {
        spent: Credits,
        reserved: Credits,
    },
    TooManyInFlight {
        in_flight: u64,
    },
    /// The key's request got its answer before: this is it. Nothing was reserved.
    Replay(StoredAnswer),
    /// The key's request is still waiting for the upstream. Nothing was reserved.
    KeyInUse,
    /// The key was claimed for another request (another route or body). Nothing was reserved.
    KeyMismatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Reserved,
    Open,
    UnknownOutcome,
    Settled,
    Released,
    Expired,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Reserved => "reserved",
            TaskState::Open => "open",
            TaskState::UnknownOutcome => "unknown_outcome",
            TaskState::Settled => "settled",
            TaskState::Released => "released",
            TaskState::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "reserved" => TaskState::Reserved,
            "open" => TaskState::Open,
            "unknown_outcome" => TaskState::UnknownOutcome,
            "settled" => TaskState::Settled,
            "released" => TaskState::Released,
            "expired" => TaskState::Expired,
            _ => return None,
        })
    }
}

/// A task the gateway created, as the ledger knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    pub task_id: String,
    pub team: String,
    pub model: String,
    pub reserved: Credits,
    pub state: TaskState,
    pub created_at: DateTime<Utc>,
}

/// A place in a store's own order of recorded tasks, where a walk over them resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskCursor(pub u64);

impl TaskState {
    /// Settled, released or expired: nothing about the task will change any more.
    pub fn is_closed(self) -> bool {
        matches!(
            self,
            TaskState::Settled | TaskState::Released | TaskState::Expired
        )
    }
}

/// How a task ended upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalStatus {
    Success,
    Failed,
}

impl FinalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Success => "success",
            FinalStatus::Failed => "failed",
        }
    }
}

/// A task's final state as first seen, with the credits it is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    pub status: FinalStatus,
    pub consumed: Credits,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleOutcome {
    /// This call settled the task.
    Settled(SettledTask),
    /// The task was settled (or expired) before: nothing changed.
    AlreadyClosed,
    /// No open task has this id.
    NotOpen,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledTask {
    pub team: String,
    /// The name of the team key that made it; empty for reservations recorded before keys were.
    pub key: String,
    pub model: String,
    pub reserved: Credits,
    pub consumed: Credits,
    /// As the reservation recorded it: `None` for a text request, or one recorded before
    /// reservations kept it.
    pub cost: Option<CostKey>,
}

/// A reservation as admins see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReservationRecord {
    pub id: String,
    pub task_id: Option<String>,
    pub team: String,
    pub model: String,
    pub period: String,
    pub reserved: Credits,
    pub state: &'static str,
    /// Why its outcome is unknown, or why it was given back on its own ([`OutcomeReason`]).
    pub reason: Option<&'static str>,
    /// When it was marked as sent to the upstream; `None`: never sent.
    pub dispatched_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    /// The earlier attempt with the same key whose outcome was unknown when this one started.
    pub retry_of: Option<String>,
    /// The retry with the same key whose task released this unknown outcome.
    pub resolved_by: Option<String>,
    pub request_id: String,
    pub created_at: DateTime<Utc>,
}

/// One row of usage: the tasks of one team key, route family and model started on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageRow {
    pub day: String,
    pub team: String,
    /// The name of the team key that made them; empty for tasks recorded before keys were.
    pub key: String,
    pub family: String,
    pub model: String,
    pub tasks: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Tasks whose cost is not final yet (open, or reserved and waiting for the upstream).
    pub unsettled: u64,
    /// Credits charged: `consumed` of settled tasks, the reservation of expired ones and of
    /// those with an unknown outcome.
    pub credits: Credits,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time: the operation may or may not
    /// have taken effect.
    #[error("ledger store unavailable: {0}")]
    Unavailable(String),
    /// Not even tried (the circuit breaker is open): the store saw nothing of it.
    #[error("ledger store unavailable: {0}")]
    NotTried(String),
    #[error("ledger store refused the operation: {0}")]
    Conflict(String),
}

/// A reservation's way from held credits to charged ones: every change of its state, each one
/// atomic step together with its team's totals for the period, so that the totals always equal
/// the sum over the reservations. A generation reserves, records its task and releases; the
/// settler and the reconciler close tasks and abandon what never got an answer; an admin releases
/// an unknown outcome.
#[async_trait]
pub trait Reservations: Send + Sync + 'static {
    /// Atomically checks the team's budget and in-flight limit and, if both allow it, records the
    /// reservation. Two concurrent calls can never both take the last credits.
    ///
    /// With an Idempotency-Key, the key is looked at first, in the same step. A live claim of it
    /// for another request is [`ReserveOutcome::KeyMismatch`]; one whose request has its answer is
    /// [`ReserveOutcome::Replay`]; one whose request still waits is [`ReserveOutcome::KeyInUse`].
    /// Otherwise (no live claim, or its request ended unknown or refused) the key is claimed for
    /// this reservation, which then remembers the last attempt with an unknown outcome as its
    /// `retry_of`. Two concurrent calls with one key can never both reserve.
    async fn reserve(&self, reservation: NewReservation) -> Result<ReserveOutcome, StoreError>;

    /// Notes, durably, that the reservation's request is about to be sent to the upstream. Refused
    /// unless it is `reserved`: one given up as never sent must then not be sent.
    async fn mark_dispatched(&self, id: ReservationId, at: DateTime<Utc>)
    -> Result<(), StoreError>;

    /// Records the task id the upstream gave a reservation: from now on the team owns the task.
    /// Durable when it returns. For a reservation that claimed an Idempotency-Key, `answer` is
    /// stored as what the key's repeats get, and the earlier attempts with that key whose outcome
    /// is still unknown (its `retry_of` chain) are released: the team pays for the task it got.
    /// Returns those it released.
    async fn attach_task(
        &self,
        id: ReservationId,
        task_id: &str,
        answer: Option<&StoredAnswer>,
    ) -> Result<Vec<ReservationId>, StoreError>;

    /// The upstream refused the generation: the reservation is dropped, nothing is charged.
    async fn release(&self, id: ReservationId) -> Result<(), StoreError>;

    /// The generation may have reached the upstream but no answer came back: the reservation is
    /// kept and counted as spent, with why.
    async fn mark_unknown_outcome(
        &self,
        id: ReservationId,
        reason: OutcomeReason,
    ) -> Result<(), StoreError>;

    /// Replaces an open task's reservation by what it consumed, atomically and once: of many
    /// concurrent calls for one task, exactly one returns `Settled`.
    async fn settle(
        &self,
        task_id: &str,
        settlement: Settlement,
    ) -> Result<SettleOutcome, StoreError>;

    /// Settles a reservation that never gets a task id (a text request, answered at once) at
    /// what its answer cost, atomically and once: from `reserved`, or from `unknown_outcome`
    /// when the reservation was given up on (by the reconciler) while its answer still ran.
    /// `AlreadyClosed` if it was settled or released before, `NotOpen` if it is not held.
    async fn settle_reservation(
        &self,
        id: ReservationId,
        settlement: Settlement,
    ) -> Result<SettleOutcome, StoreError>;

    /// Closes an open task that never reached a final state, charging its reservation.
    async fn expire(&self, task_id: &str, at: DateTime<Utc>) -> Result<SettleOutcome, StoreError>;

    /// Reservations still waiting for the upstream's answer that were made, and dispatched if
    /// they were, before `before`: the gateway stopped between reserving and recording. Those
    /// dispatched become `unknown_outcome`; those never dispatched are released.
    async fn abandon_stale_reservations(
        &self,
        before: DateTime<Utc>,
    ) -> Result<Abandoned, StoreError>;

    /// An admin gives back a reservation whose outcome is unknown (the upstream did not charge).
    async fn release_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError>;

    /// Deletes up to `limit` Idempotency-Key claims that expired by `now`, and returns how many,
    /// so that their storage stays bounded by what the key lifetime holds. An expired claim is
    /// free whether deleted or not.
    async fn purge_expired_keys(&self, now: DateTime<Utc>, limit: usize)
    -> Result<u64, StoreError>;
}

/// The tasks the ledger records, apart from their credits: who owns one (for a status read or a
/// callback), where a callback token leads, the walk in the order they were recorded that fills
/// the ownership index, and the open ones nobody has read lately (the reconciler's work). Nothing
/// here moves credits.
#[async_trait]
pub trait Tasks: Send + Sync + 'static {
    /// The task, if the gateway created it.
    async fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError>;

    /// The reservation whose callback token has this digest.
    async fn callback_target(
        &self,
        token_digest: &str,
    ) -> Result<Option<CallbackTarget>, StoreError>;

    /// Where a walk over the tasks, in the order they were recorded, starts so that (about) the
    /// `count` newest follow: fewer where some of the newest reservations never got a task.
    async fn newest_tasks_start(&self, count: u64) -> Result<TaskCursor, StoreError>;

    /// Up to `limit` tasks from `from` on, in the order they were recorded, and where the walk
    /// goes on (`None` at the end). A page may hold fewer than `limit`, even none, before the
    /// end. A task recorded during the walk may be missed, or met twice.
    async fn tasks_from(
        &self,
        from: TaskCursor,
        limit: usize,
    ) -> Result<(Vec<TaskRecord>, Option<TaskCursor>), StoreError>;

    /// Notes that the task's status was read at `at`, so the reconciler leaves it alone a while.
    async fn mark_observed(&self, task_id: &str, at: DateTime<Utc>) -> Result<(), StoreError>;

    /// Open tasks whose status nobody has read since `before`, least recently seen first.
    async fn unobserved_open_tasks(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError>;
}

/// The webhook outbox: deliveries to teams' own URLs, queued durably by the callback, leased one
/// attempt at a time to the delivery worker, listed for admins, and deleted by retention once
/// they ended.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Queues a delivery; durable when it returns. A task has at most one delivery: queueing
    /// another for the same task changes nothing and returns `false`.
    async fn enqueue_delivery(&self, delivery: NewDelivery) -> Result<bool, StoreError>;

    /// Pending deliveries due at `now`, oldest due first within `limits`, each leased until
    /// `lease_until`: no other claim returns it before then, so one replica attempts it at a
    /// time, and a replica that dies mid-attempt only delays it. Counts the attempt.
    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limits: &ClaimLimits,
    ) -> Result<Vec<Delivery>, StoreError>;

    /// Records how a claimed attempt ended: `attempt` is its number, [`Delivery::attempts`] of
    /// the claim. Ignored unless the delivery is still pending and that attempt is its latest,
    /// so a replica whose lease ran out while it was stalled, the delivery claimed again since,
    /// cannot overrule the attempt now under way. A delivery that ends delivered or dead keeps
    /// no body: nothing will send it again, and a task's state can be megabytes of images.
    async fn finish_attempt(
        &self,
        id: &str,
        attempt: u32,
        outcome: AttemptOutcome,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Deliveries in `state`, most recently changed first.
    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError>;

    /// Deletes up to `limit` deliveries that ended (delivered or dead) before `finished_before`,
    /// the delivered ones first, oldest first within each state, and returns how many; pending
    /// ones are never touched.
    async fn delete_finished_deliveries(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError>;
}

/// A team's claim that its spending reached `percent` of its budget in `period`, with the
/// notification that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetNotice {
    pub team: String,
    pub period: String,
    /// From 1 to 100.
    pub percent: u8,
    /// From then on the claim may be forgotten: a while after its period ended, when no gateway
    /// asks about that period any more. `None` for a lifetime budget: kept for good.
    pub expires_at: Option<DateTime<Utc>>,
    /// Queued with the claim; its `task_id` is the claim's name (see [`NewDelivery::task_id`]).
    pub delivery: NewDelivery,
}

/// Budget notifications, at most one per team, period and threshold, whichever replica sees the
/// threshold reached and however often.
#[async_trait]
pub trait BudgetNotices: Send + Sync + 'static {
    /// Claims the notice's threshold for its team and period and queues its delivery, in one
    /// atomic step; durable when it returns. `false`, and nothing queued, when it was claimed
    /// before. Claims of the team that expired by the delivery's `created_at` are forgotten.
    async fn claim_budget_notice(&self, notice: BudgetNotice) -> Result<bool, StoreError>;
}

/// What teams and admins read about credits: a team's standing and tasks in flight, reservations
/// by state, usage. Reads only.
#[async_trait]
pub trait Reports: Send + Sync + 'static {
    /// What the team has spent and holds in `period`.
    async fn standing(&self, team: &str, period: &str) -> Result<Standing, StoreError>;

    /// Unsettled tasks of the team (reserved or open), across periods.
    async fn in_flight(&self, team: &str) -> Result<u64, StoreError>;

    /// Reservations in `state`, newest first.
    async fn reservations(
        &self,
        state: TaskState,
        limit: usize,
    ) -> Result<Vec<ReservationRecord>, StoreError>;

    /// Usage per UTC day, team, key, route family and model for tasks started in `[from, to)`,
    /// in that order.
    async fn usage(
        &self,
        team: Option<&str>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<UsageRow>, StoreError>;
}

/// An admin API call that changed state, or tried to, as the audit trail records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAdminAction {
    pub at: DateTime<Utc>,
    /// The label of the admin token it was made with; never the token.
    pub admin: String,
    /// The method and route as the router names it: `POST /admin/reservations/{id}/release`.
    pub action: String,
    /// What it acted on: the route's path parameters as sent (a reservation id).
    pub target: String,
    /// The HTTP status the admin was answered: a refused attempt is recorded too.
    pub status: u16,
    pub request_id: String,
}

/// An admin action as `GET /admin/audit` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdminActionRecord {
    /// Its place in the trail: a later action has a higher id, and ids are never reused.
    pub id: u64,
    pub at: DateTime<Utc>,
    pub admin: String,
    pub action: String,
    pub target: String,
    pub status: u16,
    pub request_id: String,
}

/// Which admin actions a listing wants: newest first, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only actions with a lower id: where the previous page ended.
    pub before: Option<u64>,
    /// Only actions at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Only actions of the admin with this label.
    pub admin: Option<String>,
    pub limit: usize,
}

/// The audit trail of admin actions: recorded as they are answered, listed for admins, and
/// deleted once `[admin] keep_audit` has passed.
#[async_trait]
pub trait Audit: Send + Sync + 'static {
    /// Records an action; durable when it returns. Returns its id.
    async fn record_admin_action(&self, action: NewAdminAction) -> Result<u64, StoreError>;

    /// The actions `query` asks for, newest (highest id) first.
    async fn admin_actions(&self, query: AuditQuery) -> Result<Vec<AdminActionRecord>, StoreError>;

    /// Deletes up to `limit` actions made before `before`, oldest first, and returns how many.
    async fn delete_admin_actions(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError>;
}

/// The settled costs reservations are calibrated against (see [`crate::calibration`]): a record
/// per UTC day, model and cost-field value, kept for [`crate::calibration::WINDOW_DAYS`].
#[async_trait]
pub trait Calibration: Send + Sync + 'static {
    /// Adds one settled task's cost to its day's record, and deletes the records of days before
    /// the window that ends on that day.
    async fn record_cost(&self, sample: &CostSample) -> Result<(), StoreError>;

    /// Every record of the UTC days from `first` to `last`, both included: one per day, model
    /// and value.
    async fn settled_costs(
        &self,
        first: NaiveDate,
        last: NaiveDate,
    ) -> Result<Vec<(CostKeyOf, CostHistogram)>, StoreError>;
}

/// Which upstream account started each task: its status can only be read with that account's
/// token, by any replica, before and after a restart. Nothing here moves credits.
#[async_trait]
pub trait TaskAccounts: Send + Sync + 'static {
    /// Records that `account` started `task_id`; durable when it returns. The first record of a
    /// task stays: a task is started once, by one account.
    async fn record_task_account(&self, task_id: &str, account: &str) -> Result<(), StoreError>;

    /// The account that started the task; `None` for one recorded without (before accounts were
    /// recorded) or not known.
    async fn task_account(&self, task_id: &str) -> Result<Option<String>, StoreError>;
}

/// The whole ledger, for what needs all of it: the gateway's shared state, which each route and
/// worker uses its part of, and `/readyz`.
#[async_trait]
pub trait Ledger:
    Reservations + Tasks + Outbox + BudgetNotices + Reports + Audit + Calibration + TaskAccounts
{
    /// Cheap round trip that proves the store can be used (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
}
