//! Reservations in Redis: each change of a reservation's state is one script, which changes the
//! team's period totals in the same step. An Idempotency-Key's claim and answer are part of the
//! scripts of `reserve` and `attach_task`; the claims expire by their TTL.

use std::sync::LazyLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::Script;

use super::{
    ABANDON_BATCH, RedisStore, accepted, conflict, credits, fields, flag, millis, optional, parse,
    tagged, unexpected,
};
use crate::calibration::CostKey;
use crate::credits::Credits;
use crate::ledger::{
    Abandoned, FinalStatus, NewReservation, OutcomeReason, ReservationId, Reservations,
    ReserveOutcome, SettleOutcome, SettledTask, Settlement, Standing, StoreError, StoredAnswer,
    TaskState,
};

static RESERVE: LazyLock<Script> = ledger_script!("reserve.lua");
static DISPATCH: LazyLock<Script> = ledger_script!("dispatch.lua");
static ATTACH: LazyLock<Script> = ledger_script!("attach.lua");
static MOVE: LazyLock<Script> = ledger_script!("move.lua");
static ABANDON: LazyLock<Script> = ledger_script!("abandon.lua");
static CLOSE: LazyLock<Script> = ledger_script!("close.lua");
static SETTLE_RESERVATION: LazyLock<Script> = ledger_script!("settle_reservation.lua");

impl RedisStore {
    /// Moves a reservation from one state to another (see `move.lua`).
    async fn move_reservation(
        &self,
        id: ReservationId,
        from: TaskState,
        to: TaskState,
        charge: bool,
        reason: Option<OutcomeReason>,
    ) -> Result<(), StoreError> {
        let mut call = self.script(&MOVE);
        call.arg(id.0.to_string())
            .arg(from.as_str())
            .arg(to.as_str())
            .arg(flag(charge))
            .arg(reason.map_or("", OutcomeReason::as_str));
        accepted(self.eval(&call).await?)
    }

    /// Settles or expires an open task (see `close.lua`); `consumed: None` charges the
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
                let [team, model, reserved, consumed, key, count, value] = fields(details)?;
                let count: Option<i64> = parse(count)?;
                Ok(SettleOutcome::Settled(SettledTask {
                    team: parse(team)?,
                    key: parse(key)?,
                    model: parse(model)?,
                    reserved: credits(reserved)?,
                    consumed: credits(consumed)?,
                    cost: match count {
                        Some(count) => Some(CostKey {
                            value: parse(value)?,
                            count,
                        }),
                        None => None,
                    },
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
            .arg(&r.family)
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
        let claim = r.idempotency.as_ref();
        call.arg(flag(claim.is_some()))
            .arg(claim.map_or("", |c| c.key.as_str()))
            .arg(claim.map_or("", |c| c.fingerprint.as_str()))
            .arg(optional(claim.map(|c| millis(c.expires_at))))
            .arg(&r.key);
        let cost = r.cost.as_ref();
        let cost_value = cost.and_then(|c| c.value.as_deref());
        call.arg(optional(cost.map(|c| c.count)))
            .arg(flag(cost_value.is_some()))
            .arg(cost_value.unwrap_or(""));
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
            "replay" => {
                let [status, content_type, body] = fields(details)?;
                Ok(ReserveOutcome::Replay(StoredAnswer {
                    status: parse(status)?,
                    content_type: parse(content_type)?,
                    body: parse(body)?,
                }))
            }
            "key_in_use" => Ok(ReserveOutcome::KeyInUse),
            "key_mismatch" => Ok(ReserveOutcome::KeyMismatch),
            "conflict" => Err(conflict(details)),
            other => Err(unexpected(format!("reserve answered {other:?}"))),
        }
    }

    async fn mark_dispatched(
        &self,
        id: ReservationId,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut call = self.script(&DISPATCH);
        call.arg(id.0.to_string()).arg(millis(at));
        accepted(self.eval(&call).await?)
    }

    async fn attach_task(
        &self,
        id: ReservationId,
        task_id: &str,
        answer: Option<&StoredAnswer>,
    ) -> Result<Vec<ReservationId>, StoreError> {
        let mut call = self.script(&ATTACH);
        call.arg(id.0.to_string())
            .arg(task_id)
            .arg(flag(answer.is_some()))
            .arg(answer.map_or(0, |a| a.status))
            .arg(answer.map_or("", |a| a.content_type.as_str()))
            .arg(answer.map_or(&[][..], |a| a.body.as_slice()));
        let (tag, details) = tagged(self.eval(&call).await?)?;
        match tag.as_str() {
            "ok" => details
                .into_iter()
                .map(|released| {
                    let text: String = parse(released)?;
                    uuid::Uuid::parse_str(&text)
                        .map(ReservationId)
                        .map_err(unexpected)
                })
                .collect(),
            "conflict" => Err(conflict(details)),
            other => Err(unexpected(format!("attach answered {other:?}"))),
        }
    }

    async fn release(&self, id: ReservationId) -> Result<(), StoreError> {
        self.move_reservation(id, TaskState::Reserved, TaskState::Released, false, None)
            .await
    }

    async fn mark_unknown_outcome(
        &self,
        id: ReservationId,
        reason: OutcomeReason,
    ) -> Result<(), StoreError> {
        self.move_reservation(
            id,
            TaskState::Reserved,
            TaskState::UnknownOutcome,
            true,
            Some(reason),
        )
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

    async fn settle_reservation(
        &self,
        id: ReservationId,
        settlement: Settlement,
    ) -> Result<SettleOutcome, StoreError> {
        let mut call = self.script(&SETTLE_RESERVATION);
        call.arg(id.0.to_string())
            .arg(settlement.consumed.units())
            .arg(settlement.status.as_str())
            .arg(millis(settlement.at));
        let (tag, details) = tagged(self.eval(&call).await?)?;
        match tag.as_str() {
            "settled" => {
                let [team, model, reserved, key] = fields(details)?;
                Ok(SettleOutcome::Settled(SettledTask {
                    team: parse(team)?,
                    key: parse(key)?,
                    model: parse(model)?,
                    reserved: credits(reserved)?,
                    consumed: settlement.consumed,
                    cost: None,
                }))
            }
            "already_closed" => Ok(SettleOutcome::AlreadyClosed),
            "not_open" => Ok(SettleOutcome::NotOpen),
            other => Err(unexpected(format!("settle_reservation answered {other:?}"))),
        }
    }

    async fn expire(&self, task_id: &str, at: DateTime<Utc>) -> Result<SettleOutcome, StoreError> {
        self.close_open_task(task_id, TaskState::Expired, None, None, at)
            .await
    }

    async fn abandon_stale_reservations(
        &self,
        before: DateTime<Utc>,
    ) -> Result<Abandoned, StoreError> {
        let mut abandoned = Abandoned::default();
        loop {
            let mut call = self.script(&ABANDON);
            call.arg(millis(before)).arg(ABANDON_BATCH);
            let (unknown, released, looked_at): (u64, u64, usize) = match self.eval(&call).await {
                // The batches before this one were applied: the store has seen this call.
                Err(StoreError::NotTried(why)) if abandoned != Abandoned::default() => {
                    return Err(StoreError::Unavailable(why));
                }
                answer => answer?,
            };
            abandoned.unknown_outcome += unknown;
            abandoned.released += released;
            // A short batch was the last. A full one that moved nothing would only repeat.
            if looked_at < ABANDON_BATCH || unknown + released == 0 {
                return Ok(abandoned);
            }
        }
    }

    async fn release_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError> {
        self.move_reservation(
            id,
            TaskState::UnknownOutcome,
            TaskState::Released,
            false,
            None,
        )
        .await
    }

    /// Nothing to delete: each claim carries a TTL that ends with it, and Redis drops it then.
    async fn purge_expired_keys(
        &self,
        _now: DateTime<Utc>,
        _limit: usize,
    ) -> Result<u64, StoreError> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Reports;
    use crate::ledger::conformance::idempotency::{accepted, keyed};
    use crate::ledger::conformance::{at, reservation};
    use crate::ledger::redis::test_store;

    #[tokio::test]
    async fn a_key_claim_lives_as_long_as_the_key_and_no_longer() {
        let Some(store) = test_store().await else {
            return;
        };
        let r = keyed("design", "k:1", "fp", "2026-11-23T10:00:00Z");
        let id = r.id;
        store.reserve(r).await.unwrap();
        store
            .attach_task(id, "ta-ttl", Some(&accepted("ta-ttl")))
            .await
            .unwrap();
        // Claimed for an hour: Redis drops the claim then, answer and all.
        let ttl: i64 = store
            .query(redis::cmd("PTTL").arg(store.keys.idempotency("design", "k:1")))
            .await
            .unwrap();
        assert!(
            (3_590_000..=3_600_000).contains(&ttl),
            "the claim's TTL is {ttl} ms"
        );
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
        store.attach_task(id, "ta-big", None).await.unwrap();
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
}
