//! The shared ledger for several replicas: Redis.
//!
//! Every change the SQLite engine makes in one transaction is one Lua script here (sources beside
//! this file, each behind the shared `prelude.lua`), and Redis runs a script with nothing else in
//! between: two replicas can never both take the last credits, a task settles once and a delivery
//! is leased to one replica at a time. Reads are plain commands, pipelined where they touch many
//! records.
//!
//! The operations are in one file per concern, as the ledger's traits cut them: `reservations`,
//! `tasks`, `outbox`, `notices`, `reports`, `audit` and `calibration`, each with its scripts and
//! the fields it reads. This file is the store they share: the connection, the key layout, the
//! one call helper, and the decoding of answers.
//!
//! Every round trip goes through that helper, which bounds it by the command timeout and puts it
//! behind the circuit breaker (see `breaker`), so an outage costs clients fast errors rather than
//! a timeout each.
//!
//! Money is stored as integer units of 10⁻⁸ credit and changed only with HINCRBY; timestamps are
//! unix milliseconds, as in the SQLite engine.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, Pipeline, RedisResult, Script, ScriptInvocation, Value};

use super::breaker::Breaker;
use super::{DeliveryState, Ledger, StoreError, TaskState};
use crate::credits::Credits;
use crate::redis_client::{CallError, RedisEndpoint, bounded};

/// A script of the ledger: the shared prelude (key names, period arithmetic) and its own source.
macro_rules! ledger_script {
    ($file:literal) => {
        std::sync::LazyLock::new(|| {
            redis::Script::new(concat!(include_str!("prelude.lua"), include_str!($file)))
        })
    };
}

mod audit;
mod calibration;
mod notices;
mod outbox;
mod reports;
mod reservations;
mod task_accounts;
mod tasks;

/// Stale reservations abandoned per script call: each call is short, however many there are.
pub(crate) const ABANDON_BATCH: usize = 256;

/// Reconnection attempts per lost connection. Each call is cut off at the command timeout anyway;
/// more attempts would only make a replica slower to notice that Redis is back.
const RECONNECT_RETRIES: usize = 2;

/// The ledger in Redis, shared by every replica that uses the same server and key prefix.
///
/// Key layout, `P` being the key prefix (give it a separator, e.g. `ketchup:`); times are unix
/// milliseconds, amounts integer units of 10⁻⁸ credit:
///
/// | key | type | holds |
/// |---|---|---|
/// | `P reservation:{id}` | hash | one reservation: `id team model family period reserved state request_id created_at dispatch key_label` (no `family` on those recorded before routes had one: read as `image`; no `key_label` on those recorded before keys were: read as empty; `dispatch` is `pending`, then `sent`, and missing on those recorded before it was kept: perhaps sent), then as they become known `dispatched_at task_id consumed final_status settled_at observed_at callback_digest forward_to reason idempotency_key retry_of resolved_by`, and `cost_count` (with `cost_value` for a field-priced model) for a task's reservation |
/// | `P task:{task_id}` | string | the id of the reservation that owns the task |
/// | `P task-account:{task_id}` | string | the upstream account that started the task |
/// | `P callback:{digest}` | string | the id of the reservation a callback token leads to |
/// | `P idempotency:{team}:{key}` | hash, with a TTL | a team's claim of an Idempotency-Key (the team escaped as in `period`): `fingerprint reservation expires_at`, and `status content_type body` once its request has its answer; it expires with the key |
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
/// | `P budget-notice:{team}:{period}:{percent}` | string, with a TTL unless lifetime | the id of the delivery a team's budget notification queued (the team escaped as in `period`); it expires at the claim's `expires_at` |
/// | `P audit` | sorted set | admin actions, each member `{id}|{JSON of the rest}`, by id |
/// | `P audit-seq` | string | the last admin action's id |
/// | `P settled-costs:{day}` | set, with a TTL | the models and cost-field values (JSON `[model, value or null]`) settled on a UTC day |
/// | `P settled-costs:{day}:{member}` | hash, with a TTL | their settled costs that day: `settled over max` and `b:{bucket}` counts (see `calibration`); both expire when the window stops covering the day |
///
/// Budget periods are part of their key, so a new period starts from zero without a reset job.
/// Only Idempotency-Key claims (for the key's lifetime), budget notification claims (until
/// their `expires_at`, after their period) and settled costs (while the calibration window
/// covers their day) have a TTL. Otherwise, as in the SQLite ledger, only finished webhook
/// deliveries go, deleted by the gateway once `[webhooks] keep_finished` has passed, and admin
/// actions, once `[admin] keep_audit` has. The scripts name keys they derive from stored fields
/// (a reservation's period and team), so the store needs one Redis server, not a cluster.
pub struct RedisStore {
    connection: ConnectionManager,
    keys: Keys,
    timeout: Duration,
    /// Guards every round trip (see [`RedisStore::bounded`]).
    breaker: Breaker,
    /// The URL's password as written and as decoded: blanked out of every error message.
    secrets: Vec<String>,
}

/// A team as the first of two free parts of a key: with ':' escaped, the key is unambiguous.
fn escape(team: &str) -> String {
    team.replace('%', "%25").replace(':', "%3A")
}

/// Key names; `prelude.lua` builds the same ones inside the scripts.
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

    fn task_account(&self, task_id: &str) -> String {
        format!("{}task-account:{task_id}", self.prefix)
    }

    fn callback(&self, digest: &str) -> String {
        format!("{}callback:{digest}", self.prefix)
    }

    fn period(&self, team: &str, period: &str) -> String {
        format!("{}period:{}:{period}", self.prefix, escape(team))
    }

    /// The Rust side names a claim only to check it in tests; the scripts keep them.
    #[cfg(test)]
    fn idempotency(&self, team: &str, key: &str) -> String {
        format!("{}idempotency:{}:{key}", self.prefix, escape(team))
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

    fn audit(&self) -> String {
        format!("{}audit", self.prefix)
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
}

#[async_trait]
impl Ledger for RedisStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.query(&redis::cmd("PING")).await
    }
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
    use crate::ledger::conformance::{at, reservation};
    use crate::ledger::{Reports, ReservationId, Reservations};
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
}
