//! Settling a task's cost from its final state, wherever that state is first seen: a status read
//! passing through, or the reconciler's own read.
//!
//! The ledger makes settlement atomic and idempotent per task, so any number of readers may call
//! this at once; exactly one of them settles, and reading a finished task again never charges it.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use prometheus::{CounterVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use crate::{
    calibration::CostSample,
    clock::SharedClock,
    config::Config,
    credits::Credits,
    ledger::{
        Calibration, FinalStatus, Reservations, SettleOutcome, SettledTask, Settlement, StoreError,
        TaskRecord,
    },
    ownership::OwnershipIndex,
};

/// `consumed` as the upstream reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consumed {
    Exact(Credits),
    Missing,
    /// Present but not an amount we can trust (negative, too precise, not a number).
    Malformed(String),
}

impl Consumed {
    pub fn from_json(value: Option<&Value>) -> Consumed {
        match value {
            None | Some(Value::Null) => Consumed::Missing,
            Some(Value::String(text)) => Consumed::from_text(text),
            Some(other) => Consumed::untrusted(&other.to_string()),
        }
    }

    /// `consumed` given as a string, as the upstream gives it.
    pub fn from_text(text: &str) -> Consumed {
        match text.parse::<Credits>() {
            Ok(credits) => Consumed::Exact(credits),
            Err(_) => Consumed::untrusted(text),
        }
    }

    /// An amount that cannot be used, kept short enough to log.
    pub fn untrusted(text: &str) -> Consumed {
        Consumed::Malformed(text.chars().take(64).collect())
    }
}

/// How it reads in a log line: the amount, `missing`, or the unusable text.
impl std::fmt::Display for Consumed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Consumed::Exact(credits) => credits.fmt(f),
            Consumed::Missing => f.write_str("missing"),
            Consumed::Malformed(text) => write!(f, "{text:?}"),
        }
    }
}

/// `success` and `failed` are final; every other status is not.
pub fn final_status(status: &str) -> Option<FinalStatus> {
    match status {
        "success" => Some(FinalStatus::Success),
        "failed" => Some(FinalStatus::Failed),
        _ => None,
    }
}

/// The final state in a task-query answer body (`{"code":0,"data":{…}}`); `None` for a body
/// that is not JSON, as for one whose task is still running.
///
/// Read field by field rather than into a `Value`: this runs on every status read that reaches
/// the upstream, and the rest of the body (result URLs, reasons) need not be built to be skipped.
/// It reads what [`final_state`] reads of the same body as a `Value`: the text is checked as UTF-8
/// first (skipping a field does not check its string), and only objects are read (a derived
/// reader would also take an array of the fields in order).
pub fn final_state_of_query(body: &[u8]) -> Option<(FinalStatus, Consumed)> {
    let answer: Answer = serde_json::from_str(std::str::from_utf8(body).ok()?).ok()?;
    if answer.code != Some(0) {
        return None;
    }
    let fields = answer.data?;
    Some((
        fields.status?,
        Consumed::from_json(fields.consumed.as_ref()),
    ))
}

/// What settlement reads of a task query's answer; of a key written twice, the last counts.
struct Answer {
    code: Option<i64>,
    data: Option<QueryFields>,
}

/// What settlement reads of a task query's `data`.
struct QueryFields {
    /// `None` for a status that is not final.
    status: Option<FinalStatus>,
    consumed: Option<Value>,
}

/// A key of an object settlement reads: one of the names it reads, or `None`, told apart
/// without keeping the key.
struct Key(Option<&'static str>);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }

            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Key, E> {
                let read = ["code", "data", "status", "consumed"];
                Ok(Key(read.into_iter().find(|name| *name == key)))
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Answer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AnswerVisitor;
        impl<'de> Visitor<'de> for AnswerVisitor {
            type Value = Answer;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a task query's answer, a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Answer, A::Error> {
                let mut answer = Answer {
                    code: None,
                    data: None,
                };
                while let Some(Key(key)) = entries.next_key()? {
                    match key {
                        Some("code") => answer.code = entries.next_value::<Value>()?.as_i64(),
                        Some("data") => answer.data = entries.next_value()?,
                        _ => drop(entries.next_value::<IgnoredAny>()?),
                    }
                }
                Ok(answer)
            }
        }
        deserializer.deserialize_map(AnswerVisitor)
    }
}

impl<'de> Deserialize<'de> for QueryFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = QueryFields;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a task's fields, a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<QueryFields, A::Error> {
                let mut fields = QueryFields {
                    status: None,
                    consumed: None,
                };
                while let Some(Key(key)) = entries.next_key()? {
                    match key {
                        Some("status") => {
                            let status = entries.next_value::<Value>()?;
                            fields.status = status.as_str().and_then(final_status);
                        }
                        Some("consumed") => fields.consumed = Some(entries.next_value()?),
                        _ => drop(entries.next_value::<IgnoredAny>()?),
                    }
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// `consumed − reserved` in credits: negative when the reservation was too high.
const RESERVATION_ERROR_BUCKETS: &[f64] = &[
    -5.0, -1.0, -0.5, -0.25, -0.1, -0.05, -0.01, 0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// What settlement counts, registered in the gateway's one registry.
#[derive(Clone)]
pub struct SettlementMetrics {
    pub tasks_finished: IntCounterVec,
    pub credits_consumed: CounterVec,
    pub credits_spent: CounterVec,
    pub reservation_error: HistogramVec,
    pub settlements_without_consumed: IntCounterVec,
    pub settled_over_reservation: IntCounterVec,
}

impl SettlementMetrics {
    /// Creates the metrics under `namespace` and registers them in `registry`.
    pub fn register(registry: &Registry, namespace: &str) -> prometheus::Result<Self> {
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(namespace);
        let metrics = SettlementMetrics {
            tasks_finished: IntCounterVec::new(
                opts(
                    "tasks_finished_total",
                    "Tasks settled, by final status: success, failed or expired.",
                ),
                &["team", "model", "status"],
            )?,
            credits_consumed: CounterVec::new(
                opts("credits_consumed_total", "Credits charged by settled tasks."),
                &["team", "model"],
            )?,
            credits_spent: CounterVec::new(
                opts(
                    "credits_spent_total",
                    "Credits charged by settled tasks and text answers, by the team key that made \
                     them (its label; `unknown` for a key no longer configured).",
                ),
                &["team", "key"],
            )?,
            reservation_error: HistogramVec::new(
                HistogramOpts::new(
                    "reservation_error_credits",
                    "What a settled task consumed minus what it reserved, in credits (tune `reserve` from it).",
                )
                .namespace(namespace)
                .buckets(RESERVATION_ERROR_BUCKETS.to_vec()),
                &["model"],
            )?,
            settlements_without_consumed: IntCounterVec::new(
                opts(
                    "settlements_without_consumed_total",
                    "Final states whose `consumed` was missing or unusable, settled at the reservation.",
                ),
                &["team", "reason"],
            )?,
            settled_over_reservation: IntCounterVec::new(
                opts(
                    "settled_over_reservation_total",
                    "Tasks whose upstream `consumed` exceeded what they reserved: while this grows, a team can overrun its budget.",
                ),
                &["model"],
            )?,
        };
        registry.register(Box::new(metrics.tasks_finished.clone()))?;
        registry.register(Box::new(metrics.credits_consumed.clone()))?;
        registry.register(Box::new(metrics.credits_spent.clone()))?;
        registry.register(Box::new(metrics.reservation_error.clone()))?;
        registry.register(Box::new(metrics.settlements_without_consumed.clone()))?;
        registry.register(Box::new(metrics.settled_over_reservation.clone()))?;
        Ok(metrics)
    }
}

/// Settles tasks: the ledger's idempotent step, the ownership index told the task is closed,
/// the metrics of what it cost, and its cost added to what reservations are calibrated from. The
/// one handle the status read, the callback and the reconciler share, so that each settles the
/// same way.
pub struct Settler {
    ledger: Arc<dyn Reservations>,
    costs: Arc<dyn Calibration>,
    owners: Arc<OwnershipIndex>,
    clock: SharedClock,
    metrics: SettlementMetrics,
}

impl Settler {
    pub fn new(
        ledger: Arc<dyn Reservations>,
        costs: Arc<dyn Calibration>,
        owners: Arc<OwnershipIndex>,
        clock: SharedClock,
        metrics: SettlementMetrics,
    ) -> Self {
        Settler {
            ledger,
            costs,
            owners,
            clock,
            metrics,
        }
    }

    /// Replaces the task's reservation by what it consumed. A missing or untrustworthy `consumed`
    /// settles at the reservation (never silently at zero) and is logged. `config` bounds the
    /// metric labels.
    pub async fn settle(
        &self,
        config: &Config,
        task: &TaskRecord,
        status: FinalStatus,
        consumed: Consumed,
    ) -> Result<SettleOutcome, StoreError> {
        let untrustworthy = |reason: &str| {
            self.metrics
                .settlements_without_consumed
                .with_label_values(&[config.team_label(&task.team), reason])
                .inc();
        };
        let charged = match &consumed {
            Consumed::Exact(credits) => *credits,
            Consumed::Missing => {
                untrustworthy("missing");
                tracing::warn!(task_id = %task.task_id, "final state without `consumed`: settling at the reservation");
                task.reserved
            }
            Consumed::Malformed(text) => {
                untrustworthy("malformed");
                tracing::warn!(task_id = %task.task_id, consumed = %text, "unusable `consumed`: settling at the reservation");
                task.reserved
            }
        };
        let settlement = Settlement {
            status,
            consumed: charged,
            at: self.clock.now(),
        };
        let outcome = self.ledger.settle(&task.task_id, settlement).await?;
        if matches!(
            outcome,
            SettleOutcome::Settled(_) | SettleOutcome::AlreadyClosed
        ) {
            // Later reads (with the cache off, or after eviction) need not try to settle it again.
            self.owners.record(&task.task_id, &task.team, true);
        }
        if let SettleOutcome::Settled(settled) = &outcome {
            self.count_finished(config, settled, status.as_str());
            self.metrics
                .reservation_error
                .with_label_values(&[config.model_label(&settled.model)])
                .observe(
                    settled.consumed.as_f64_for_metrics() - settled.reserved.as_f64_for_metrics(),
                );
            tracing::info!(
                task_id = %task.task_id,
                team = %settled.team,
                model = %settled.model,
                status = status.as_str(),
                reserved = %settled.reserved,
                consumed = %settled.consumed,
                "task settled"
            );
            if matches!(consumed, Consumed::Exact(_)) {
                self.calibrate(config, settled, settlement.at).await;
            }
        }
        Ok(outcome)
    }

    /// Counts a task whose upstream cost exceeded its reservation, and adds its cost to the
    /// settled costs by model and value. The settlement stands if that write fails: the
    /// calibration misses one task, which is logged.
    async fn calibrate(&self, config: &Config, settled: &SettledTask, at: DateTime<Utc>) {
        if settled.consumed > settled.reserved {
            self.metrics
                .settled_over_reservation
                .with_label_values(&[config.model_label(&settled.model)])
                .inc();
            tracing::warn!(
                model = %settled.model,
                reserved = %settled.reserved,
                consumed = %settled.consumed,
                "a task cost more than it reserved"
            );
        }
        let Some(sample) = settled.cost.as_ref().and_then(|key| {
            CostSample::new(&settled.model, key, settled.reserved, settled.consumed, at)
        }) else {
            return;
        };
        if let Err(e) = self.costs.record_cost(&sample).await {
            tracing::warn!(model = %settled.model, error = %e, "settled cost not recorded for calibration");
        }
    }

    /// Counts a task that reached the end of its life: `success`, `failed` or `expired`.
    pub fn count_finished(&self, config: &Config, settled: &SettledTask, status: &str) {
        let (team, model) = (
            config.team_label(&settled.team),
            config.model_label(&settled.model),
        );
        self.metrics
            .tasks_finished
            .with_label_values(&[team, model, status])
            .inc();
        self.metrics
            .credits_consumed
            .with_label_values(&[team, model])
            .inc_by(settled.consumed.as_f64_for_metrics());
        self.count_spent(config, settled);
    }

    /// Adds what a settled reservation charged to its key's spend.
    pub fn count_spent(&self, config: &Config, settled: &SettledTask) {
        let key = config.key_label(&settled.team, &settled.key);
        self.metrics
            .credits_spent
            .with_label_values(&[config.team_label(&settled.team), key])
            .inc_by(settled.consumed.as_f64_for_metrics());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The final state of a task query answering `data`.
    fn final_state(data: Value) -> Option<(FinalStatus, Consumed)> {
        final_state_of_query(
            json!({"code": 0, "message": "ok", "data": data})
                .to_string()
                .as_bytes(),
        )
    }

    #[test]
    fn reads_final_states_and_their_cost_exactly() {
        let body =
            br#"{"code":0,"message":"ok","data":{"status":"success","consumed":"0.00100000"}}"#;
        assert_eq!(
            final_state_of_query(body),
            Some((
                FinalStatus::Success,
                Consumed::Exact("0.001".parse().unwrap())
            ))
        );
        assert_eq!(
            final_state(json!({"status": "failed", "consumed": "0.000000"})),
            Some((FinalStatus::Failed, Consumed::Exact(Credits::ZERO)))
        );
        assert_eq!(final_state(json!({"status": "in_progress"})), None);
        assert_eq!(
            final_state_of_query(br#"{"code":1,"data":{"status":"success"}}"#),
            None
        );
        // The fields in order in an array, as a derived reader would take them: not an object.
        assert_eq!(
            final_state_of_query(br#"{"code":0,"data":["failed","0.5"]}"#),
            None
        );
        assert_eq!(final_state_of_query(br#"[0,{"status":"success"}]"#), None);
        // Not JSON, though its one broken string is in a field the reading skips.
        assert_eq!(
            final_state_of_query(b"{\"code\":0,\"data\":{\"status\":\"success\",\"x\":\"\xff\"}}"),
            None
        );
    }

    #[test]
    fn untrustworthy_amounts_are_told_apart_from_missing_ones() {
        let of = |consumed: Value| {
            final_state(json!({"status": "success", "consumed": consumed}))
                .unwrap()
                .1
        };
        assert_eq!(of(json!(null)), Consumed::Missing);
        assert_eq!(of(json!("-1")), Consumed::Malformed("-1".into()));
        assert_eq!(
            of(json!("0.123456789")),
            Consumed::Malformed("0.123456789".into())
        );
        assert_eq!(of(json!(0.5)), Consumed::Malformed("0.5".into()));
        assert_eq!(of(json!("abc")), Consumed::Malformed("abc".into()));
        assert_eq!(of(json!("x".repeat(100))).to_string().len(), 66);
        assert_eq!(of(json!("0.5")).to_string(), "0.50");
        assert_eq!(of(json!(null)).to_string(), "missing");
    }
}
