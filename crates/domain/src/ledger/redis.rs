//! The shared ledger for several replicas: Redis.
//!
//! Every change the SQLite engine makes in one transaction is one Lua script here (sources in
//! `redis/`, each behind the shared `redis/prelude.lua`), and Redis runs a script with nothing
//! else in between: two replicas can never both take the last credits, a task settles once and a
//! delivery is leased to one replica at a time. Reads are plain commands, pipelined where they
//! touch many records.
//!
//! Every round trip goes through one helper that bounds it by the command timeout and puts it
//! behind the circuit breaker (see `breaker`), so an outage costs clients fast errors rather than
//! a timeout each.
//!
//! Money is stored as integer units of 10⁻⁸ credit and changed only with HINCRBY; timestamps are
//! unix milliseconds, as in the SQLite engine.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, Pipeline, RedisResult, Script, ScriptInvocation, Value};

use super::breaker::Breaker;
use super::{
    AttemptOutcome, CallbackTarget, ClaimLimits, Delivery, DeliveryRecord, DeliveryState,
    FinalStatus, Ledger, NewDelivery, NewReservation, Outbox, Reports, ReservationId,
    ReservationRecord, Reservations, ReserveOutcome, SettleOutcome, SettledTask, Settlement,
    Standing, StoreError, TaskCursor, TaskRecord, TaskState, Tasks, UsageRow,
};
use crate::credits::Credits;
use crate::redis_client::{CallError, RedisEndpoint, bounded};

/// A script of the ledger: the shared prelude (key names, period arithmetic) and its own source.
macro_rules! ledger_script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("redis/prelude.lua"),
                include_str!($file)
            ))
        })
    };
}

static RESERVE: LazyLock<Script> = ledger_script!("redis/reserve.lua");
static ATTACH: LazyLock<Script> = ledger_script!("redis/attach.lua");
static MOVE: LazyLock<Script> = ledger_script!("redis/move.lua");
static ABANDON: LazyLock<Script> = ledger_script!("redis/abandon.lua");
static CLOSE: LazyLock<Script> = ledger_script!("redis/close.lua");
static OBSERVE: LazyLock<Script> = ledger_script!("redis/observe.lua");
static LOOKUP: LazyLock<Script> = ledger_script!("redis/lookup.lua");
static ENQUEUE: LazyLock<Script> = ledger_script!("redis/enqueue.lua");
static CLAIM: LazyLock<Script> = ledger_script!("redis/claim.lua");
static FINISH: LazyLock<Script> = ledger_script!("redis/finish.lua");
static PRUNE: LazyLock<Script> = ledger_script!("redis/prune.lua");

/// Reservations read per round trip by `usage`: big enough to keep round trips few, small enough
/// that no single answer holds Redis up.
const USAGE_PAGE: usize = 512;

/// Stale reservations abandoned per script call: each call is short, however many there are.
pub(crate) const ABANDON_BATCH: usize = 256;

/// Reconnection attempts per lost connection. Each call is cut off at the command timeout anyway;
/// more attempts would only make a replica slower to notice that Redis is back.
const RECONNECT_RETRIES: usize = 2;

const TASK_FIELDS: [&str; 6] = [
    "task_id",
    "team",
    "model",
    "reserved",
    "state",
    "created_at",
];
const RESERVATION_FIELDS: [&str; 9] = [
    "id",
    "task_id",
    "team",
    "model",
    "period",
    "reserved",
    "state",
    "request_id",
    "created_at",
];
const USAGE_FIELDS: [&str; 7] = [
    "team",
    "model",
    "state",
    "final_status",
    "reserved",
    "consumed",
    "created_at",
];
const CALLBACK_FIELDS: [&str; 4] = ["id", "task_id", "team", "forward_to"];
const DELIVERY_RECORD_FIELDS: [&str; 9] = [
    "id",
    "task_id",
    "team",
    "url",
    "state",
    "attempts",
    "last_error",
    "created_at",
    "updated_at",
];

/// The ledger in Redis, shared by every replica that uses the same server and key prefix.
///
/// Key layout, `P` being the key prefix (give it a separator, e.g. `ketchup:`); times are unix
/// milliseconds, amounts integer units of 10⁻⁸ credit:
///
/// | key | type | holds |
/// |---|---|---|
/// | `P reservation:{id}` | hash | one reservation: `id team model period reserved state request_id created_at`, then as they become known `task_id consumed final_status settled_at observed_at callback_digest forward_to` |
/// | `P task:{task_id}` | string | the id of the reservation that owns the task |
/// | `P callback:{digest}` | string | the id of the reservation a callback token leads to |
/// | `P period:{team}:{period}` | hash | `spent` and `reserved` of a team in a budget period (`%` and `:` in the team escaped as `%25`, `%3A`) |
/// | `P in-flight:{team}` | set | ids of the team's reservations that are reserved or open |
/// | `P created`, `P created:{team}` | sorted set | reservation ids by `created_at`, for usage |
/// | `P state:{state}` | sorted set | ids of the reservations in a state, by `created_at` |
/// | `P open-by-last-seen` | sorted set | open reservations by `observed_at`, else `created_at` |
/// | `P delivery:{id}` | hash | a webhook delivery; `body` holds the raw bytes while it is pending |
/// | `P delivery-of-task:{task_id}` | string | the id of the delivery queued for a task |
/// | `P deliveries-due:{team}` | sorted set | the team's pending deliveries by next attempt (or end of lease) |
/// | `P deliveries-due-teams` | set | the teams that have pending deliveries |
/// | `P deliveries:{state}` | sorted set | ids of the deliveries in a state, by `updated_at` |
///
/// Budget periods are part of their key, so a new period starts from zero without a reset job.
/// No key has a TTL: as in the SQLite ledger, only finished webhook deliveries go, deleted by the
/// gateway once `[webhooks] keep_finished` has passed. The scripts name keys they derive from
/// stored fields (a reservation's period and team), so the store needs one Redis server, not a
/// cluster.
pub struct RedisStore {
    connection: ConnectionManager,
    keys: Keys,
    timeout: Duration,
    /// Guards every round trip (see [`RedisStore::bounded`]).
    breaker: Breaker,
    /// The URL's password as written and as decoded: blanked out of every error message.
    secrets: Vec<String>,
}

/// Key names; `redis/prelude.lua` builds the same ones inside the scripts.
struct Keys {
    prefix: String,
}

impl Keys {
    fn reservation(&self, id: &str) -> String {
        format!("{}reservation:{id}", self.prefix)
    }

    fn task(&self, task_id: &str) -> String {
        format!("{}task:{task_id}", self.prefix)
    }

    fn callback(&self, digest: &str) -> String {
        format!("{}callback:{digest}", self.prefix)
    }

    fn period(&self, team: &str, period: &str) -> String {
        let team = team.replace('%', "%25").replace(':', "%3A");
        format!("{}period:{team}:{period}", self.prefix)
    }

    fn in_flight(&self, team: &str) -> String {
        format!("{}in-flight:{team}", self.prefix)
    }

    fn created(&self, team: Option<&str>) -> String {
        match team {
            Some(team) => format!("{}created:{team}", self.prefix),
            None => format!("{}created", self.prefix),
        }
    }

    fn by_state(&self, state: TaskState) -> String {
        format!("{}state:{}", self.prefix, state.as_str())
    }

    fn unobserved(&self) -> String {
        format!("{}open-by-last-seen", self.prefix)
    }

    fn delivery(&self, id: &str) -> String {
        format!("{}delivery:{id}", self.prefix)
    }

    fn deliveries(&self, state: DeliveryState) -> String {
        format!("{}deliveries:{}", self.prefix, state.as_str())
    }
}

impl RedisStore {
    /// Connects to the Redis at `endpoint` (`redis://` or `rediss://`) and checks that it
    /// answers. Every key starts with `key_prefix`; every call gives up after `command_timeout`.
    pub async fn connect(
        endpoint: &RedisEndpoint,
        key_prefix: &str,
        command_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let mut secrets: Vec<String> = url::Url::parse(endpoint.url.expose())
            .ok()
            .and_then(|parsed| parsed.password().map(str::to_owned))
            .into_iter()
            .collect();
        let client = endpoint
            .client()
            .map_err(|e| unavailable(&secrets, format!("invalid store: {e}")))?;
        if let Some(password) = client.get_connection_info().redis_settings().password()
            && !secrets.iter().any(|s| s == password)
        {
            secrets.push(password.to_owned());
        }
        secrets.retain(|s| !s.is_empty());
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(command_timeout))
            .set_response_timeout(Some(command_timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(command_timeout);
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| unavailable(&secrets, e))?;
        let store = RedisStore {
            connection,
            keys: Keys {
                prefix: key_prefix.to_owned(),
            },
            timeout: command_timeout,
            breaker: Breaker::new(),
            secrets,
        };
        store.ping().await?;
        Ok(store)
    }

    /// Runs one request to Redis, cut off at the command timeout: the one way the engine reaches
    /// Redis, so the breaker here guards every round trip. While it is open, the request is not
    /// sent and the answer is `NotTried`.
    async fn bounded<T>(
        &self,
        request: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.breaker
            .call(async {
                bounded(self.timeout, request).await.map_err(|e| match e {
                    CallError::Redis(e) => unavailable(&self.secrets, e),
                    timed_out @ CallError::TimedOut(_) => {
                        StoreError::Unavailable(timed_out.to_string())
                    }
                })
            })
            .await
    }

    async fn query<T: FromRedisValue>(&self, command: &Cmd) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        self.bounded(command.query_async(&mut connection)).await
    }

    /// A call of `script` with the key prefix as its first argument, as every script expects.
    fn script(&self, script: &'static Script) -> ScriptInvocation<'static> {
        let mut call = script.prepare_invoke();
        call.arg(&self.keys.prefix);
        call
    }

    async fn eval<T: FromRedisValue>(&self, call: &ScriptInvocation<'_>) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        self.bounded(call.invoke_async(&mut connection)).await
    }

    /// The `fields` of each hash in `keys`, in one round trip.
    async fn read_hashes(
        &self,
        keys: impl IntoIterator<Item = String>,
        fields: &[&str],
    ) -> Result<Vec<Vec<Value>>, StoreError> {
        let mut pipeline = Pipeline::new();
        for key in keys {
            pipeline.cmd("HMGET").arg(key).arg(fields);
        }
        if pipeline.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection.clone();
        self.bounded(pipeline.query_async(&mut connection)).await
    }

    /// The first `limit` members of a sorted set, highest score first.
    async fn newest(&self, key: String, limit: usize) -> Result<Vec<String>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stop = i64::try_from(limit).unwrap_or(i64::MAX) - 1;
        self.query(redis::cmd("ZREVRANGE").arg(key).arg(0).arg(stop))
            .await
    }

    /// Moves a reservation from one state to another (see `redis/move.lua`).
    async fn move_reservation(
        &self,
        id: ReservationId,
        from: TaskState,
        to: TaskState,
        charge: bool,
    ) -> Result<(), StoreError> {
        let mut call = self.script(&MOVE);
        call.arg(id.0.to_string())
            .arg(from.as_str())
            .arg(to.as_str())
            .arg(flag(charge));
        accepted(self.eval(&call).await?)
    }

    /// Settles or expires an open task (see `redis/close.lua`); `consumed: None` charges the
    /// reservation.
    async fn close_open_task(
        &self,
        task_id: &str,
        to: TaskState,
        status: Option<FinalStatus>,
        consumed: Option<Credits>,
        at: DateTime<Utc>,
    ) -> Result<SettleOutcome, StoreError> {
        let mut call = self.script(&CLOSE);
        call.arg(task_id)
            .arg(to.as_str())
            .arg(optional(consumed.map(Credits::units)))
            .arg(status.map_or("", FinalStatus::as_str))
            .arg(millis(at));
        let (tag, details) = tagged(self.eval(&call).await?)?;
        match tag.as_str() {
            "settled" => {
                let [team, model, reserved, consumed] = fields(details)?;
                Ok(SettleOutcome::Settled(SettledTask {
                    team: parse(team)?,
                    model: parse(model)?,
                    reserved: credits(reserved)?,
                    consumed: credits(consumed)?,
                }))
            }
            "already_closed" => Ok(SettleOutcome::AlreadyClosed),
            "not_open" => Ok(SettleOutcome::NotOpen),
            other => Err(unexpected(format!("close answered {other:?}"))),
        }
    }
}

#[async_trait]
impl Reservations for RedisStore {
    async fn reserve(&self, r: NewReservation) -> Result<ReserveOutcome, StoreError> {
        let callback = r.callback.as_ref();
        let forward_to = callback.and_then(|c| c.forward_to.as_deref());
        let mut call = self.script(&RESERVE);
        call.arg(r.id.0.to_string())
            .arg(&r.team)
            .arg(&r.model)
            .arg(&r.period)
            .arg(r.amount.units())
            .arg(optional(r.limit.map(Credits::units)))
            .arg(optional(r.max_in_flight))
            .arg(&r.request_id)
            .arg(millis(r.created_at))
            .arg(flag(callback.is_some()))
            .arg(callback.map_or("", |c| c.token_digest.as_str()))
            .arg(flag(forward_to.is_some()))
            .arg(forward_to.unwrap_or(""));
        let (tag, details) = tagged(self.eval(&call).await?)?;
        match tag.as_str() {
            "reserved" => {
                let [spent, reserved] = fields(details)?;
                Ok(ReserveOutcome::Reserved(Standing {
                    spent: credits(spent)?,
                    reserved: credits(reserved)?,
                }))
            }
            "budget_exhausted" => {
                let [spent, reserved] = fields(details)?;
                Ok(ReserveOutcome::BudgetExhausted {
                    spent: credits(spent)?,
                    reserved: credits(reserved)?,
                })
            }
            "too_many_in_flight" => {
                let [in_flight] = fields(details)?;
                Ok(ReserveOutcome::TooManyInFlight {
                    in_flight: parse(in_flight)?,
                })
            }
            "conflict" => Err(conflict(details)),
            other => Err(unexpected(format!("reserve answered {other:?}"))),
        }
    }

    async fn attach_task(&self, id: ReservationId, task_id: &str) -> Result<(), StoreError> {
        let mut call = self.script(&ATTACH);
        call.arg(id.0.to_string()).arg(task_id);
        accepted(self.eval(&call).await?)
    }

    async fn release(&self, id: ReservationId) -> Result<(), StoreError> {
        self.move_reservation(id, TaskState::Reserved, TaskState::Released, false)
            .await
    }

    async fn mark_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError> {
        self.move_reservation(id, TaskState::Reserved, TaskState::UnknownOutcome, true)
            .await
    }

    async fn settle(
        &self,
        task_id: &str,
        settlement: Settlement,
    ) -> Result<SettleOutcome, StoreError> {
        self.close_open_task(
            task_id,
            TaskState::Settled,
            Some(settlement.status),
            Some(settlement.consumed),
            settlement.at,
        )
        .await
    }

    async fn expire(&self, task_id: &str, at: DateTime<Utc>) -> Result<SettleOutcome, StoreError> {
        self.close_open_task(task_id, TaskState::Expired, None, None, at)
            .await
    }

    async fn abandon_stale_reservations(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut abandoned = 0;
        loop {
            let mut call = self.script(&ABANDON);
            call.arg(millis(before)).arg(ABANDON_BATCH);
            let (moved, looked_at): (u64, usize) = match self.eval(&call).await {
                // The batches before this one were applied: the store has seen this call.
                Err(StoreError::NotTried(why)) if abandoned > 0 => {
                    return Err(StoreError::Unavailable(why));
                }
                answer => answer?,
            };
            abandoned += moved;
            // A short batch was the last. A full one that moved nothing would only repeat.
            if looked_at < ABANDON_BATCH || moved == 0 {
                return Ok(abandoned);
            }
        }
    }

    async fn release_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError> {
        self.move_reservation(id, TaskState::UnknownOutcome, TaskState::Released, false)
            .await
    }
}

#[async_trait]
impl Tasks for RedisStore {
    async fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let mut call = self.script(&LOOKUP);
        call.arg(self.keys.task(task_id)).arg(&TASK_FIELDS);
        let found: Option<Vec<Value>> = self.eval(&call).await?;
        found.map(task_record).transpose()
    }

    async fn callback_target(
        &self,
        token_digest: &str,
    ) -> Result<Option<CallbackTarget>, StoreError> {
        let mut call = self.script(&LOOKUP);
        call.arg(self.keys.callback(token_digest))
            .arg(&CALLBACK_FIELDS);
        let found: Option<Vec<Value>> = self.eval(&call).await?;
        let Some(found) = found else {
            return Ok(None);
        };
        let [id, task_id, team, forward_to] = fields(found)?;
        let id: String = parse(id)?;
        let id = uuid::Uuid::parse_str(&id)
            .map_err(|e| unexpected(format!("reservation id {id:?}: {e}")))?;
        Ok(Some(CallbackTarget {
            reservation: ReservationId(id),
            task_id: parse(task_id)?,
            team: parse(team)?,
            forward_to: parse(forward_to)?,
        }))
    }

    async fn newest_tasks_start(&self, count: u64) -> Result<TaskCursor, StoreError> {
        // The cursor is a rank in `created`; reservations are never removed from it, and a new
        // one has the latest `created_at`, so ranks already passed stay put.
        let recorded: u64 = self
            .query(redis::cmd("ZCARD").arg(self.keys.created(None)))
            .await?;
        Ok(TaskCursor(recorded.saturating_sub(count)))
    }

    async fn tasks_from(
        &self,
        from: TaskCursor,
        limit: usize,
    ) -> Result<(Vec<TaskRecord>, Option<TaskCursor>), StoreError> {
        if limit == 0 {
            return Ok((Vec::new(), Some(from)));
        }
        let start = i64::try_from(from.0).unwrap_or(i64::MAX);
        let stop = start.saturating_add(i64::try_from(limit).unwrap_or(i64::MAX) - 1);
        let ids: Vec<String> = self
            .query(
                redis::cmd("ZRANGE")
                    .arg(self.keys.created(None))
                    .arg(start)
                    .arg(stop),
            )
            .await?;
        let rows = self
            .read_hashes(ids.iter().map(|id| self.keys.reservation(id)), &TASK_FIELDS)
            .await?;
        let tasks = rows
            .into_iter()
            // A reservation the upstream never gave a task (refused, or its outcome unknown).
            .filter(|row| !matches!(row.first(), None | Some(Value::Nil)))
            .map(task_record)
            .collect::<Result<_, _>>()?;
        let next = (ids.len() == limit).then(|| TaskCursor(from.0 + limit as u64));
        Ok((tasks, next))
    }

    async fn mark_observed(&self, task_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let mut call = self.script(&OBSERVE);
        call.arg(task_id).arg(millis(at));
        self.eval::<()>(&call).await
    }

    async fn unobserved_open_tasks(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.keys.unobserved())
                    .arg("-inf")
                    .arg(format!("({}", millis(before)))
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            )
            .await?;
        let rows = self
            .read_hashes(ids.iter().map(|id| self.keys.reservation(id)), &TASK_FIELDS)
            .await?;
        let mut tasks = Vec::with_capacity(rows.len());
        for row in rows {
            let task = task_record(row)?;
            // Settled between the two reads: no longer the reconciler's business.
            if task.state == TaskState::Open {
                tasks.push(task);
            }
        }
        Ok(tasks)
    }
}

#[async_trait]
impl Outbox for RedisStore {
    async fn enqueue_delivery(&self, d: NewDelivery) -> Result<bool, StoreError> {
        let mut call = self.script(&ENQUEUE);
        call.arg(&d.id)
            .arg(&d.task_id)
            .arg(&d.team)
            .arg(&d.url)
            .arg(d.body.as_slice())
            .arg(millis(d.created_at))
            .arg(millis(d.deadline));
        let queued: i64 = self.eval(&call).await?;
        Ok(queued == 1)
    }

    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limits: &ClaimLimits,
    ) -> Result<Vec<Delivery>, StoreError> {
        if limits.total == 0 {
            return Ok(Vec::new());
        }
        let mut call = self.script(&CLAIM);
        call.arg(millis(now))
            .arg(millis(lease_until))
            .arg(limits.total)
            .arg(limits.per_team);
        for (team, busy) in &limits.busy {
            call.arg(team).arg(*busy);
        }
        let claimed: Vec<Vec<Value>> = self.eval(&call).await?;
        claimed
            .into_iter()
            .map(|row| {
                let [id, task_id, team, url, body, attempts, created_at, deadline] = fields(row)?;
                Ok(Delivery {
                    id: parse(id)?,
                    task_id: parse(task_id)?,
                    team: parse(team)?,
                    url: parse(url)?,
                    body: parse(body)?,
                    attempts: parse(attempts)?,
                    created_at: from_millis(parse(created_at)?),
                    deadline: from_millis(parse(deadline)?),
                })
            })
            .collect()
    }

    async fn finish_attempt(
        &self,
        id: &str,
        attempt: u32,
        outcome: AttemptOutcome,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let (state, next_attempt, error) = match outcome {
            AttemptOutcome::Delivered => (DeliveryState::Delivered, None, None),
            AttemptOutcome::RetryAt(next, error) => {
                (DeliveryState::Pending, Some(millis(next)), Some(error))
            }
            AttemptOutcome::Dead(error) => (DeliveryState::Dead, None, Some(error)),
        };
        let mut call = self.script(&FINISH);
        call.arg(id)
            .arg(state.as_str())
            .arg(optional(next_attempt))
            .arg(flag(error.is_some()))
            .arg(error.unwrap_or_default())
            .arg(millis(at))
            .arg(attempt);
        self.eval::<()>(&call).await
    }

    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let ids = self.newest(self.keys.deliveries(state), limit).await?;
        let rows = self
            .read_hashes(
                ids.iter().map(|id| self.keys.delivery(id)),
                &DELIVERY_RECORD_FIELDS,
            )
            .await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let [
                id,
                task_id,
                team,
                url,
                now,
                attempts,
                last_error,
                created_at,
                updated_at,
            ] = fields(row)?;
            // Moved on between the two reads.
            if parse::<String>(now)? != state.as_str() {
                continue;
            }
            records.push(DeliveryRecord {
                id: parse(id)?,
                task_id: parse(task_id)?,
                team: parse(team)?,
                url: parse(url)?,
                state: state.as_str(),
                attempts: parse(attempts)?,
                last_error: parse(last_error)?,
                created_at: from_millis(parse(created_at)?),
                updated_at: from_millis(parse(updated_at)?),
            });
        }
        Ok(records)
    }

    async fn delete_finished_deliveries(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        let mut call = self.script(&PRUNE);
        call.arg(millis(finished_before)).arg(limit);
        self.eval(&call).await
    }
}

#[async_trait]
impl Reports for RedisStore {
    async fn standing(&self, team: &str, period: &str) -> Result<Standing, StoreError> {
        let (spent, reserved): (Option<i64>, Option<i64>) = self
            .query(
                redis::cmd("HMGET")
                    .arg(self.keys.period(team, period))
                    .arg("spent")
                    .arg("reserved"),
            )
            .await?;
        Ok(Standing {
            spent: Credits::from_units(spent.unwrap_or(0)),
            reserved: Credits::from_units(reserved.unwrap_or(0)),
        })
    }

    async fn in_flight(&self, team: &str) -> Result<u64, StoreError> {
        self.query(redis::cmd("SCARD").arg(self.keys.in_flight(team)))
            .await
    }

    async fn reservations(
        &self,
        state: TaskState,
        limit: usize,
    ) -> Result<Vec<ReservationRecord>, StoreError> {
        let ids = self.newest(self.keys.by_state(state), limit).await?;
        let rows = self
            .read_hashes(
                ids.iter().map(|id| self.keys.reservation(id)),
                &RESERVATION_FIELDS,
            )
            .await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let [
                id,
                task_id,
                team,
                model,
                period,
                reserved,
                now,
                request_id,
                created_at,
            ] = fields(row)?;
            // Moved on between the two reads.
            if parse::<String>(now)? != state.as_str() {
                continue;
            }
            records.push(ReservationRecord {
                id: parse(id)?,
                task_id: parse(task_id)?,
                team: parse(team)?,
                model: parse(model)?,
                period: parse(period)?,
                reserved: credits(reserved)?,
                state: state.as_str(),
                request_id: parse(request_id)?,
                created_at: from_millis(parse(created_at)?),
            });
        }
        Ok(records)
    }

    async fn usage(
        &self,
        team: Option<&str>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let index = self.keys.created(team);
        let end = format!("({}", millis(to));
        let mut start = millis(from).to_string();
        let mut page = USAGE_PAGE;
        let mut rows: BTreeMap<(String, String, String), UsageRow> = BTreeMap::new();
        loop {
            let batch: Vec<(String, i64)> = self
                .query(
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(&index)
                        .arg(&start)
                        .arg(&end)
                        .arg("WITHSCORES")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(page),
                )
                .await?;
            let last_page = batch.len() < page;
            let mut ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
            if !last_page && let Some(&(_, last)) = batch.last() {
                // Pages are cut by score, so reservations made meanwhile cannot shift them; the
                // run of equal times the page ends in is read again, whole, by the next page.
                let run = batch.iter().position(|&(_, at)| at == last).unwrap_or(0);
                if run == 0 {
                    page *= 2;
                    continue;
                }
                ids.truncate(run);
                start = last.to_string();
            }
            let hashes = self
                .read_hashes(
                    ids.iter().map(|id| self.keys.reservation(id)),
                    &USAGE_FIELDS,
                )
                .await?;
            for hash in hashes {
                tally(&mut rows, hash)?;
            }
            if last_page {
                break;
            }
        }
        Ok(rows.into_values().collect())
    }
}

#[async_trait]
impl Ledger for RedisStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.query(&redis::cmd("PING")).await
    }
}

/// Adds one reservation to its usage row, as the SQLite engine's `GROUP BY` does.
fn tally(
    rows: &mut BTreeMap<(String, String, String), UsageRow>,
    hash: Vec<Value>,
) -> Result<(), StoreError> {
    let [
        team,
        model,
        state,
        final_status,
        reserved,
        consumed,
        created_at,
    ] = fields(hash)?;
    let state = task_state(state)?;
    if state == TaskState::Released {
        return Ok(());
    }
    let team: String = parse(team)?;
    let model: String = parse(model)?;
    let final_status: Option<String> = parse(final_status)?;
    let charged = match state {
        TaskState::Settled => parse::<Option<i64>>(consumed)?.unwrap_or(0),
        TaskState::Expired | TaskState::UnknownOutcome => parse(reserved)?,
        _ => 0,
    };
    // Whole seconds first, truncating as SQLite's `created_at / 1000` does.
    let created_at: i64 = parse(created_at)?;
    let day = from_millis(created_at / 1000 * 1000)
        .format("%Y-%m-%d")
        .to_string();
    let row = rows
        .entry((day.clone(), team.clone(), model.clone()))
        .or_insert_with(|| UsageRow {
            day,
            team,
            model,
            tasks: 0,
            succeeded: 0,
            failed: 0,
            unsettled: 0,
            credits: Credits::ZERO,
        });
    row.tasks += 1;
    match final_status.as_deref() {
        Some(status) if status == FinalStatus::Success.as_str() => row.succeeded += 1,
        Some(status) if status == FinalStatus::Failed.as_str() => row.failed += 1,
        _ => {}
    }
    if matches!(state, TaskState::Reserved | TaskState::Open) {
        row.unsettled += 1;
    }
    row.credits = row
        .credits
        .checked_add(Credits::from_units(charged))
        .ok_or_else(|| unexpected("usage credits overflow"))?;
    Ok(())
}

fn task_record(hash: Vec<Value>) -> Result<TaskRecord, StoreError> {
    let [task_id, team, model, reserved, state, created_at] = fields(hash)?;
    Ok(TaskRecord {
        task_id: parse(task_id)?,
        team: parse(team)?,
        model: parse(model)?,
        reserved: credits(reserved)?,
        state: task_state(state)?,
        created_at: from_millis(parse(created_at)?),
    })
}

fn task_state(value: Value) -> Result<TaskState, StoreError> {
    let text: String = parse(value)?;
    TaskState::parse(&text).ok_or_else(|| unexpected(format!("unknown state {text:?}")))
}

/// A script's answer: a tag saying what happened, then its details.
fn tagged(reply: Value) -> Result<(String, Vec<Value>), StoreError> {
    let mut items: Vec<Value> = parse(reply)?;
    if items.is_empty() {
        return Err(unexpected("an empty answer"));
    }
    let tag = parse(items.remove(0))?;
    Ok((tag, items))
}

/// The answer of a script that either does what was asked or refuses.
fn accepted(reply: Value) -> Result<(), StoreError> {
    let (tag, details) = tagged(reply)?;
    match tag.as_str() {
        "ok" => Ok(()),
        "conflict" => Err(conflict(details)),
        other => Err(unexpected(format!("answered {other:?}"))),
    }
}

fn conflict(details: Vec<Value>) -> StoreError {
    match fields(details).and_then(|[why]| parse::<String>(why)) {
        Ok(why) => StoreError::Conflict(why),
        Err(e) => e,
    }
}

/// The values of a fixed list of fields, by position.
fn fields<const N: usize>(values: Vec<Value>) -> Result<[Value; N], StoreError> {
    <[Value; N]>::try_from(values)
        .map_err(|values| unexpected(format!("{} values where {N} were expected", values.len())))
}

fn parse<T: FromRedisValue>(value: Value) -> Result<T, StoreError> {
    redis::from_redis_value(value).map_err(unexpected)
}

fn credits(value: Value) -> Result<Credits, StoreError> {
    parse(value).map(Credits::from_units)
}

fn unexpected(what: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis answered unexpectedly: {what}"))
}

/// A connection or server error, with the URL's password blanked out should it ever appear.
fn unavailable(secrets: &[String], error: impl std::fmt::Display) -> StoreError {
    let mut message = error.to_string();
    for secret in secrets {
        message = message.replace(secret.as_str(), "***");
    }
    StoreError::Unavailable(format!("redis: {message}"))
}

/// An optional script argument: empty when absent.
fn optional(value: Option<impl ToString>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn flag(on: bool) -> &'static str {
    if on { "1" } else { "" }
}

fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A store on the test Redis under a fresh random prefix; `None` when the test is skipped.
#[cfg(test)]
pub(crate) async fn test_store() -> Option<RedisStore> {
    let url = ketchup_test_redis::url()?;
    let prefix = format!("ketchup-test:{}:", uuid::Uuid::new_v4().simple());
    Some(
        RedisStore::connect(
            &RedisEndpoint::from_url(url),
            &prefix,
            Duration::from_secs(5),
        )
        .await
        .expect("the test Redis answers"),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::ledger::breaker::OPEN_AFTER;
    use crate::ledger::conformance::{
        any, at, claim, deliveries_ended_three_ways, delivery, open_task, reservation,
    };
    use ketchup_test_redis::FadingRedis;

    const TIMEOUT: Duration = Duration::from_millis(300);
    /// Room for a loaded machine on top of the timeout.
    const SLACK: Duration = Duration::from_millis(1500);

    fn unavailable_message<T>(result: Result<T, StoreError>) -> String {
        match result {
            Err(StoreError::Unavailable(message)) => message,
            Err(other) => panic!("expected Unavailable, got {other:?}"),
            Ok(_) => panic!("expected Unavailable, got an answer"),
        }
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_unavailable_within_the_timeout() {
        // Accepted by the kernel's backlog, never read: the handshake gets no answer.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://:hunter2-secret@{}/", silent.local_addr().unwrap());
        let started = Instant::now();
        let message = unavailable_message(
            RedisStore::connect(&RedisEndpoint::from_url(&url), "t:", TIMEOUT).await,
        );
        assert!(
            started.elapsed() < TIMEOUT + SLACK,
            "{:?}",
            started.elapsed()
        );
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_unavailable_without_the_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://user:hunter2-secret@127.0.0.1:{port}/");
        let started = Instant::now();
        let message = unavailable_message(
            RedisStore::connect(&RedisEndpoint::from_url(&url), "t:", TIMEOUT).await,
        );
        assert!(
            started.elapsed() < TIMEOUT + SLACK,
            "{:?}",
            started.elapsed()
        );
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[tokio::test]
    async fn a_server_that_stops_answering_fails_each_call_within_the_timeout() {
        let server = FadingRedis::start().await;
        let url = format!("redis://:hunter2-secret@{}/", server.address);
        let store = RedisStore::connect(&RedisEndpoint::from_url(&url), "t:", TIMEOUT)
            .await
            .unwrap();
        server.stop();

        let started = Instant::now();
        let message = unavailable_message(store.reserve(reservation("design", "0.50", None)).await);
        assert!(
            started.elapsed() < TIMEOUT + SLACK,
            "{:?}",
            started.elapsed()
        );
        assert!(!message.contains("hunter2"), "{message}");
        let started = Instant::now();
        unavailable_message(store.ping().await);
        unavailable_message(
            store
                .usage(None, at("2026-11-01T00:00:00Z"), at("2026-12-01T00:00:00Z"))
                .await,
        );
        assert!(
            started.elapsed() < 2 * TIMEOUT + SLACK,
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn an_outage_opens_the_breaker_and_calls_then_fail_at_once() {
        let server = FadingRedis::start().await;
        let url = format!("redis://{}/", server.address);
        let store = RedisStore::connect(&RedisEndpoint::from_url(&url), "t:", TIMEOUT)
            .await
            .unwrap();
        server.stop();
        for _ in 0..OPEN_AFTER {
            unavailable_message(store.ping().await);
        }
        // Open: refused at once, nothing sent, so a reservation needs no release.
        let started = Instant::now();
        for _ in 0..20 {
            let refused = store.reserve(reservation("design", "0.50", None)).await;
            assert!(
                matches!(refused, Err(StoreError::NotTried(_))),
                "{refused:?}"
            );
        }
        assert!(started.elapsed() < TIMEOUT, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_refusal_is_an_answer_not_an_outage() {
        let Some(store) = test_store().await else {
            return;
        };
        for _ in 0..OPEN_AFTER * 3 {
            let refused = store.release(ReservationId::new()).await;
            assert!(
                matches!(refused, Err(StoreError::Conflict(_))),
                "{refused:?}"
            );
        }
        assert!(store.ping().await.is_ok());
    }

    #[tokio::test]
    async fn amounts_beyond_double_precision_stay_exact() {
        let Some(store) = test_store().await else {
            return;
        };
        // 2^53 + 1 units: the first integer a Lua number (a double) cannot hold.
        let amount = Credits::from_units((1 << 53) + 1);
        let r = NewReservation {
            amount,
            ..reservation("design", "0", None)
        };
        let id = r.id;
        assert_eq!(
            store.reserve(r).await.unwrap(),
            ReserveOutcome::Reserved(Standing {
                spent: Credits::ZERO,
                reserved: amount
            })
        );
        store.attach_task(id, "ta-big").await.unwrap();
        let consumed = Credits::from_units((1 << 60) + 3);
        let settled = store
            .settle(
                "ta-big",
                Settlement {
                    status: FinalStatus::Success,
                    consumed,
                    at: at("2026-11-23T10:05:00Z"),
                },
            )
            .await
            .unwrap();
        let SettleOutcome::Settled(task) = settled else {
            panic!("{settled:?}")
        };
        assert_eq!((task.reserved, task.consumed), (amount, consumed));
        assert_eq!(
            store.standing("design", "2026-11").await.unwrap(),
            Standing {
                spent: consumed,
                reserved: Credits::ZERO
            }
        );
    }

    #[tokio::test]
    async fn bodies_are_kept_byte_for_byte() {
        let Some(store) = test_store().await else {
            return;
        };
        let body: Vec<u8> = (0..=255u8).chain([0, b'\r', b'\n', 0xff]).collect();
        store
            .enqueue_delivery(NewDelivery {
                body: body.clone(),
                ..delivery("msg_bin", "ta-bin")
            })
            .await
            .unwrap();
        let claimed = claim(&store, "2026-11-23T10:00:00Z", "2026-11-23T10:00:30Z").await;
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].body, body);
    }

    #[tokio::test]
    async fn a_finished_delivery_keeps_no_body() {
        let Some(store) = test_store().await else {
            return;
        };
        deliveries_ended_three_ways(&store).await;
        let mut kept = Vec::new();
        for id in ["msg_delivered", "msg_dead", "msg_retried"] {
            let mut command = redis::cmd("HEXISTS");
            command.arg(store.keys.delivery(id)).arg("body");
            kept.push(store.query::<bool>(&command).await.unwrap());
        }
        assert_eq!(kept, [false, false, true]);
    }

    #[tokio::test]
    async fn deliveries_queued_before_per_team_due_sets_are_still_claimed() {
        let Some(store) = test_store().await else {
            return;
        };
        let now = at("2026-11-23T10:00:00Z");
        for (id, task, team, minutes_ago) in [
            ("msg_old_d", "ta-1", "design", 2),
            ("msg_old_a", "ta-2", "ads", 1),
        ] {
            let mut queued = delivery(id, task);
            queued.team = team.into();
            queued.created_at = now - chrono::Duration::minutes(minutes_ago);
            assert!(store.enqueue_delivery(queued).await.unwrap());
        }
        // Put them back as an earlier version kept them: one set of every team's due deliveries.
        let prefix = &store.keys.prefix;
        let mut legacy = vec![redis::cmd("DEL")];
        legacy[0].arg(format!("{prefix}deliveries-due-teams"));
        for (id, team, minutes_ago) in [("msg_old_d", "design", 2), ("msg_old_a", "ads", 1)] {
            let mut own = redis::cmd("DEL");
            own.arg(format!("{prefix}deliveries-due:{team}"));
            let mut shared = redis::cmd("ZADD");
            shared
                .arg(format!("{prefix}deliveries-due"))
                .arg(millis(now - chrono::Duration::minutes(minutes_ago)))
                .arg(id);
            legacy.extend([own, shared]);
        }
        for command in &legacy {
            store.query::<()>(command).await.unwrap();
        }

        let claimed = store
            .claim_deliveries(now, at("2026-11-23T10:00:30Z"), &any(10))
            .await
            .unwrap();
        let ids: Vec<_> = claimed.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["msg_old_d", "msg_old_a"], "oldest first, as before");
        let mut exists = redis::cmd("EXISTS");
        exists.arg(format!("{prefix}deliveries-due"));
        assert!(!store.query::<bool>(&exists).await.unwrap());
        // Leased in their team's own sets: not claimed again until the lease ends.
        assert!(
            store
                .claim_deliveries(now, at("2026-11-23T10:00:30Z"), &any(10))
                .await
                .unwrap()
                .is_empty()
        );
        let again = claim(&store, "2026-11-23T10:00:31Z", "2026-11-23T10:01:00Z").await;
        assert_eq!(again.len(), 2);
    }

    #[tokio::test]
    async fn usage_reads_past_a_page_of_equal_times() {
        let Some(store) = test_store().await else {
            return;
        };
        // More reservations in one millisecond than a page holds, then more after it.
        for _ in 0..USAGE_PAGE + 40 {
            store
                .reserve(reservation("design", "0.01", None))
                .await
                .unwrap();
        }
        for minute in 0..30 {
            let r = NewReservation {
                created_at: at("2026-11-23T10:00:00Z") + chrono::Duration::minutes(minute + 1),
                ..reservation("design", "0.01", None)
            };
            store.reserve(r).await.unwrap();
        }
        open_task(&store, "ads", "0.01", "ta-ads").await;
        let from = at("2026-11-23T00:00:00Z");
        let to = at("2026-11-24T00:00:00Z");
        let design = store.usage(Some("design"), from, to).await.unwrap();
        assert_eq!(design.len(), 1);
        assert_eq!(design[0].tasks, USAGE_PAGE as u64 + 70);
        assert_eq!(design[0].unsettled, USAGE_PAGE as u64 + 70);
        let all = store.usage(None, from, to).await.unwrap();
        let tasks: Vec<(&str, u64)> = all.iter().map(|r| (r.team.as_str(), r.tasks)).collect();
        assert_eq!(tasks, [("ads", 1), ("design", USAGE_PAGE as u64 + 70)]);
    }
}
