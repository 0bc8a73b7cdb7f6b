//! Reservations in SQLite: each change of a reservation's state and the change of its team's
//! period totals run in one transaction, so the totals always equal the sum over the reservations.
//! An Idempotency-Key's claim and answer (see `idempotency`) join the transactions of `reserve`
//! and `attach_task`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::idempotency::{self, KeyState};
use super::{SqliteStore, execute, millis, query_row, unavailable};
use crate::calibration::CostKey;
use crate::credits::Credits;
use crate::ledger::{
    Abandoned, FinalStatus, NewReservation, OutcomeReason, ReservationId, Reservations,
    ReserveOutcome, SettleOutcome, SettledTask, Settlement, Standing, StoreError, StoredAnswer,
    TaskState,
};

/// Adds to a period's totals; every change of a reservation's state calls it in the same
/// transaction, so the totals always equal the sum over the reservations.
fn adjust_period(
    conn: &Connection,
    team: &str,
    period: &str,
    reserved: i64,
    spent: i64,
) -> Result<(), StoreError> {
    execute(
        conn,
        "INSERT INTO budget_periods (team, period, reserved, spent) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (team, period) DO UPDATE
         SET reserved = reserved + excluded.reserved, spent = spent + excluded.spent",
        params![team, period, reserved, spent],
    )
    .map_err(unavailable)?;
    Ok(())
}

/// Moves a reservation out of `from`; `charge` says whether its held amount becomes spent
/// (unknown outcome) or is given back, `reason` (if any) says why. Refused when the reservation
/// is not in `from`.
pub(super) fn move_reservation(
    conn: &Connection,
    id: &str,
    from: TaskState,
    to: TaskState,
    charge: bool,
    reason: Option<OutcomeReason>,
) -> Result<(), StoreError> {
    let row: Option<(String, String, i64)> = query_row(
        conn,
        "UPDATE reservations SET state = ?3, reason = coalesce(?4, reason)
             WHERE id = ?1 AND state = ?2
             RETURNING team, period, reserved",
        params![
            id,
            from.as_str(),
            to.as_str(),
            reason.map(OutcomeReason::as_str)
        ],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
    .map_err(unavailable)?;
    let (team, period, amount) = row.ok_or_else(|| {
        StoreError::Conflict(format!("reservation {id} is not {}", from.as_str()))
    })?;
    match (from, charge) {
        (TaskState::Reserved, true) => adjust_period(conn, &team, &period, -amount, amount),
        (TaskState::Reserved, false) => adjust_period(conn, &team, &period, -amount, 0),
        // Leaving a state that counted as spent.
        _ => adjust_period(conn, &team, &period, 0, -amount),
    }
}

/// Closes an open task as `to`, charging `consumed` (or its reservation when `None`).
/// What closing an open task reads back: team, the name of the key that reserved it, model,
/// period, reserved, consumed, and the cost key's value and count.
type OpenTaskRow = (
    String,
    String,
    String,
    String,
    i64,
    i64,
    Option<String>,
    Option<i64>,
);

fn close_open_task(
    conn: &Connection,
    task_id: &str,
    to: TaskState,
    status: Option<FinalStatus>,
    consumed: Option<Credits>,
    at: DateTime<Utc>,
) -> Result<SettleOutcome, StoreError> {
    let row: Option<OpenTaskRow> = query_row(
        conn,
        "UPDATE reservations
             SET state = ?2, consumed = coalesce(?3, reserved), final_status = ?4,
                 settled_at = ?5, observed_at = ?5
             WHERE task_id = ?1 AND state = 'open'
             RETURNING team, key_label, model, period, reserved, consumed, cost_value, cost_count",
        params![
            task_id,
            to.as_str(),
            consumed.map(Credits::units),
            status.map(FinalStatus::as_str),
            millis(at)
        ],
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        },
    )
    .optional()
    .map_err(unavailable)?;
    let Some((team, key, model, period, reserved, consumed, cost_value, cost_count)) = row else {
        let closed: Option<String> = query_row(
            conn,
            "SELECT state FROM reservations WHERE task_id = ?1",
            params![task_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(unavailable)?;
        return Ok(match closed.as_deref().and_then(TaskState::parse) {
            Some(state) if state.is_closed() => SettleOutcome::AlreadyClosed,
            _ => SettleOutcome::NotOpen,
        });
    };
    adjust_period(conn, &team, &period, -reserved, consumed)?;
    Ok(SettleOutcome::Settled(SettledTask {
        team,
        key,
        model,
        reserved: Credits::from_units(reserved),
        consumed: Credits::from_units(consumed),
        cost: cost_count.map(|count| CostKey {
            value: cost_value,
            count,
        }),
    }))
}

#[async_trait]
impl Reservations for SqliteStore {
    async fn reserve(&self, r: NewReservation) -> Result<ReserveOutcome, StoreError> {
        self.write(move |conn| {
            // The key first: a repeat gets its answer even when the budget is spent by now.
            let retry_of = match &r.idempotency {
                None => None,
                Some(claim) => match idempotency::look(conn, &r.team, claim, millis(r.created_at))?
                {
                    KeyState::Free { retry_of } => retry_of,
                    KeyState::Answered(answer) => return Ok(ReserveOutcome::Replay(answer)),
                    KeyState::InUse => return Ok(ReserveOutcome::KeyInUse),
                    KeyState::Mismatch => return Ok(ReserveOutcome::KeyMismatch),
                },
            };
            let (spent, reserved): (i64, i64) = query_row(
                conn,
                "SELECT spent, reserved FROM budget_periods WHERE team = ?1 AND period = ?2",
                params![r.team, r.period],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(unavailable)?
            .unwrap_or((0, 0));
            if let Some(limit) = r.limit {
                let needed = spent
                    .checked_add(reserved)
                    .and_then(|held| held.checked_add(r.amount.units()));
                if needed.is_none_or(|needed| needed > limit.units()) {
                    return Ok(ReserveOutcome::BudgetExhausted {
                        spent: Credits::from_units(spent),
                        reserved: Credits::from_units(reserved),
                    });
                }
            }
            if let Some(max) = r.max_in_flight {
                let in_flight: i64 = query_row(
                    conn,
                    "SELECT count(*) FROM reservations
                         WHERE team = ?1 AND state IN ('reserved', 'open')",
                    params![r.team],
                    |row| row.get(0),
                )
                .map_err(unavailable)?;
                let in_flight = in_flight.unsigned_abs();
                if in_flight >= u64::from(max) {
                    return Ok(ReserveOutcome::TooManyInFlight { in_flight });
                }
            }
            execute(
                conn,
                "INSERT INTO reservations (id, team, model, family, period, reserved, state,
                                           request_id, created_at, callback_digest, forward_to,
                                           idempotency_key, retry_of, key_label, cost_value,
                                           cost_count)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'reserved', ?7, ?8, ?9, ?10, ?11, ?12, ?13,
                         ?14, ?15)",
                params![
                    r.id.0.to_string(),
                    r.team,
                    r.model,
                    r.family,
                    r.period,
                    r.amount.units(),
                    r.request_id,
                    millis(r.created_at),
                    r.callback.as_ref().map(|c| &c.token_digest),
                    r.callback.as_ref().and_then(|c| c.forward_to.as_ref()),
                    r.idempotency.as_ref().map(|c| &c.key),
                    retry_of,
                    r.key,
                    r.cost.as_ref().and_then(|c| c.value.as_ref()),
                    r.cost.as_ref().map(|c| c.count),
                ],
            )
            .map_err(unavailable)?;
            if let Some(claim) = &r.idempotency {
                idempotency::claim(conn, &r.team, r.id, claim)?;
            }
            adjust_period(conn, &r.team, &r.period, r.amount.units(), 0)?;
            Ok(ReserveOutcome::Reserved(Standing {
                spent: Credits::from_units(spent),
                reserved: Credits::from_units(reserved + r.amount.units()),
            }))
        })
        .await
    }

    async fn mark_dispatched(
        &self,
        id: ReservationId,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let changed = execute(
                conn,
                "UPDATE reservations SET dispatched_at = ?2 WHERE id = ?1 AND state = 'reserved'",
                params![id.0.to_string(), millis(at)],
            )
            .map_err(unavailable)?;
            if changed == 0 {
                return Err(StoreError::Conflict(format!(
                    "reservation {} is not held",
                    id.0
                )));
            }
            Ok(())
        })
        .await
    }

    async fn attach_task(
        &self,
        id: ReservationId,
        task_id: &str,
        answer: Option<&StoredAnswer>,
    ) -> Result<Vec<ReservationId>, StoreError> {
        let task_id = task_id.to_owned();
        let answer = answer.cloned();
        self.write(move |conn| {
            // A reservation given up as an unknown outcome while its request still waited (the
            // ledger was slow, not the gateway dead) opens too: what was counted as spent is
            // held again, until the task settles at what it consumed.
            let held: Option<(String, String, i64)> = query_row(
                conn,
                "SELECT state, period, reserved FROM reservations
                     WHERE id = ?1 AND task_id IS NULL",
                params![id.0.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(unavailable)?;
            let (given_up, period, amount) = match held {
                Some((state, period, amount)) => match TaskState::parse(&state) {
                    Some(TaskState::Reserved) => (false, period, amount),
                    Some(TaskState::UnknownOutcome) => (true, period, amount),
                    _ => return Err(not_held(id)),
                },
                None => return Err(not_held(id)),
            };
            let attached: Option<(String, Option<String>, Option<String>)> = query_row(
                conn,
                "UPDATE reservations SET task_id = ?2, state = 'open'
                     WHERE id = ?1
                     RETURNING team, idempotency_key, retry_of",
                params![id.0.to_string(), task_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    StoreError::Conflict(format!("task {task_id} is already recorded"))
                }
                other => unavailable(other),
            })?;
            let Some((team, key, retry_of)) = attached else {
                return Err(not_held(id));
            };
            if given_up {
                adjust_period(conn, &team, &period, amount, -amount)?;
            }
            if let (Some(key), Some(answer)) = (key, &answer) {
                idempotency::answer(conn, &team, &key, id, answer)?;
            }
            idempotency::resolve_earlier(conn, id, retry_of)
        })
        .await
    }

    async fn release(&self, id: ReservationId) -> Result<(), StoreError> {
        self.write(move |conn| {
            move_reservation(
                conn,
                &id.0.to_string(),
                TaskState::Reserved,
                TaskState::Released,
                false,
                None,
            )
        })
        .await
    }

    async fn mark_unknown_outcome(
        &self,
        id: ReservationId,
        reason: OutcomeReason,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            move_reservation(
                conn,
                &id.0.to_string(),
                TaskState::Reserved,
                TaskState::UnknownOutcome,
                true,
                Some(reason),
            )
        })
        .await
    }

    async fn settle(
        &self,
        task_id: &str,
        settlement: Settlement,
    ) -> Result<SettleOutcome, StoreError> {
        let task_id = task_id.to_owned();
        self.write(move |conn| {
            close_open_task(
                conn,
                &task_id,
                TaskState::Settled,
                Some(settlement.status),
                Some(settlement.consumed),
                settlement.at,
            )
        })
        .await
    }

    async fn settle_reservation(
        &self,
        id: ReservationId,
        settlement: Settlement,
    ) -> Result<SettleOutcome, StoreError> {
        self.write(move |conn| {
            let id = id.0.to_string();
            let state: Option<String> = query_row(
                conn,
                "SELECT state FROM reservations WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable)?;
            let from = match state.as_deref().and_then(TaskState::parse) {
                Some(state @ (TaskState::Reserved | TaskState::UnknownOutcome)) => state,
                Some(state) if state.is_closed() => return Ok(SettleOutcome::AlreadyClosed),
                _ => return Ok(SettleOutcome::NotOpen),
            };
            let (team, key, model, period, reserved): (String, String, String, String, i64) =
                query_row(
                    conn,
                    "UPDATE reservations
                     SET state = 'settled', consumed = ?2, final_status = ?3, settled_at = ?4,
                         observed_at = ?4
                     WHERE id = ?1
                     RETURNING team, key_label, model, period, reserved",
                    params![
                        id,
                        settlement.consumed.units(),
                        settlement.status.as_str(),
                        millis(settlement.at)
                    ],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .map_err(unavailable)?;
            let consumed = settlement.consumed.units();
            match from {
                TaskState::Reserved => adjust_period(conn, &team, &period, -reserved, consumed)?,
                // An unknown outcome counted its reservation as spent already.
                _ => adjust_period(conn, &team, &period, 0, consumed - reserved)?,
            }
            Ok(SettleOutcome::Settled(SettledTask {
                team,
                key,
                model,
                reserved: Credits::from_units(reserved),
                consumed: settlement.consumed,
                cost: None,
            }))
        })
        .await
    }

    async fn expire(&self, task_id: &str, at: DateTime<Utc>) -> Result<SettleOutcome, StoreError> {
        let task_id = task_id.to_owned();
        self.write(move |conn| close_open_task(conn, &task_id, TaskState::Expired, None, None, at))
            .await
    }

    async fn abandon_stale_reservations(
        &self,
        before: DateTime<Utc>,
    ) -> Result<Abandoned, StoreError> {
        self.write(move |conn| {
            // Made before `before` (the index's range) and, if dispatched, dispatched before it
            // too: the upstream call it waits on may have started late.
            let mut statement = conn
                .prepare_cached(
                    "UPDATE reservations
                     SET state = CASE WHEN dispatched_at IS NULL
                                      THEN 'released' ELSE 'unknown_outcome' END,
                         reason = CASE WHEN dispatched_at IS NULL
                                       THEN ?2 ELSE ?3 END
                     WHERE state = 'reserved' AND created_at < ?1
                       AND coalesce(dispatched_at, created_at) < ?1
                     RETURNING team, period, reserved, state",
                )
                .map_err(unavailable)?;
            let rows: Vec<(String, String, i64, String)> = statement
                .query_map(
                    params![
                        millis(before),
                        OutcomeReason::NeverDispatched.as_str(),
                        OutcomeReason::NoAnswerRecorded.as_str()
                    ],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .map_err(unavailable)?
                .collect::<Result<_, _>>()
                .map_err(unavailable)?;
            let mut abandoned = Abandoned::default();
            for (team, period, amount, state) in &rows {
                if state == TaskState::Released.as_str() {
                    adjust_period(conn, team, period, -amount, 0)?;
                    abandoned.released += 1;
                } else {
                    adjust_period(conn, team, period, -amount, *amount)?;
                    abandoned.unknown_outcome += 1;
                }
            }
            Ok(abandoned)
        })
        .await
    }

    async fn release_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError> {
        self.write(move |conn| {
            move_reservation(
                conn,
                &id.0.to_string(),
                TaskState::UnknownOutcome,
                TaskState::Released,
                false,
                None,
            )
        })
        .await
    }

    async fn purge_expired_keys(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        self.write(move |conn| idempotency::purge(conn, millis(now), limit))
            .await
    }
}

fn not_held(id: ReservationId) -> StoreError {
    StoreError::Conflict(format!("reservation {} is not held", id.0))
}
