//! Reservations in SQLite: each change of a reservation's state and the change of its team's
//! period totals run in one transaction, so the totals always equal the sum over the reservations.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, execute, millis, query_row, unavailable};
use crate::credits::Credits;
use crate::ledger::{
    FinalStatus, NewReservation, ReservationId, Reservations, ReserveOutcome, SettleOutcome,
    SettledTask, Settlement, Standing, StoreError, TaskState,
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
/// (unknown outcome) or is given back. Refused when the reservation is not in `from`.
fn move_reservation(
    conn: &Connection,
    id: ReservationId,
    from: TaskState,
    to: TaskState,
    charge: bool,
) -> Result<(), StoreError> {
    let row: Option<(String, String, i64)> = query_row(
        conn,
        "UPDATE reservations SET state = ?3 WHERE id = ?1 AND state = ?2
             RETURNING team, period, reserved",
        params![id.0.to_string(), from.as_str(), to.as_str()],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
    .map_err(unavailable)?;
    let (team, period, amount) = row.ok_or_else(|| {
        StoreError::Conflict(format!("reservation {} is not {}", id.0, from.as_str()))
    })?;
    match (from, charge) {
        (TaskState::Reserved, true) => adjust_period(conn, &team, &period, -amount, amount),
        (TaskState::Reserved, false) => adjust_period(conn, &team, &period, -amount, 0),
        // Leaving a state that counted as spent.
        _ => adjust_period(conn, &team, &period, 0, -amount),
    }
}

/// Closes an open task as `to`, charging `consumed` (or its reservation when `None`).
fn close_open_task(
    conn: &Connection,
    task_id: &str,
    to: TaskState,
    status: Option<FinalStatus>,
    consumed: Option<Credits>,
    at: DateTime<Utc>,
) -> Result<SettleOutcome, StoreError> {
    let row: Option<(String, String, String, i64, i64)> = query_row(
        conn,
        "UPDATE reservations
             SET state = ?2, consumed = coalesce(?3, reserved), final_status = ?4,
                 settled_at = ?5, observed_at = ?5
             WHERE task_id = ?1 AND state = 'open'
             RETURNING team, model, period, reserved, consumed",
        params![
            task_id,
            to.as_str(),
            consumed.map(Credits::units),
            status.map(FinalStatus::as_str),
            millis(at)
        ],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )
    .optional()
    .map_err(unavailable)?;
    let Some((team, model, period, reserved, consumed)) = row else {
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
        model,
        reserved: Credits::from_units(reserved),
        consumed: Credits::from_units(consumed),
    }))
}

#[async_trait]
impl Reservations for SqliteStore {
    async fn reserve(&self, r: NewReservation) -> Result<ReserveOutcome, StoreError> {
        self.write(move |conn| {
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
                                           request_id, created_at, callback_digest, forward_to)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'reserved', ?7, ?8, ?9, ?10)",
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
                ],
            )
            .map_err(unavailable)?;
            adjust_period(conn, &r.team, &r.period, r.amount.units(), 0)?;
            Ok(ReserveOutcome::Reserved(Standing {
                spent: Credits::from_units(spent),
                reserved: Credits::from_units(reserved + r.amount.units()),
            }))
        })
        .await
    }

    async fn attach_task(&self, id: ReservationId, task_id: &str) -> Result<(), StoreError> {
        let task_id = task_id.to_owned();
        self.write(move |conn| {
            let held: Option<(String, String, String, i64)> = query_row(
                conn,
                "SELECT state, team, period, reserved FROM reservations
                     WHERE id = ?1 AND task_id IS NULL",
                params![id.0.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(unavailable)?;
            let given_up = match held
                .as_ref()
                .and_then(|(state, ..)| TaskState::parse(state))
            {
                Some(TaskState::Reserved) => false,
                Some(TaskState::UnknownOutcome) => true,
                _ => {
                    return Err(StoreError::Conflict(format!(
                        "reservation {} is not held",
                        id.0
                    )));
                }
            };
            execute(
                conn,
                "UPDATE reservations SET task_id = ?2, state = 'open' WHERE id = ?1",
                params![id.0.to_string(), task_id],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    StoreError::Conflict(format!("task {task_id} is already recorded"))
                }
                other => unavailable(other),
            })?;
            if let (true, Some((_, team, period, amount))) = (given_up, held) {
                // The answer came after all: what was counted as spent is held again, until the
                // task settles at what it consumed.
                adjust_period(conn, &team, &period, amount, -amount)?;
            }
            Ok(())
        })
        .await
    }

    async fn release(&self, id: ReservationId) -> Result<(), StoreError> {
        self.write(move |conn| {
            move_reservation(conn, id, TaskState::Reserved, TaskState::Released, false)
        })
        .await
    }

    async fn mark_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError> {
        self.write(move |conn| {
            move_reservation(
                conn,
                id,
                TaskState::Reserved,
                TaskState::UnknownOutcome,
                true,
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

    async fn expire(&self, task_id: &str, at: DateTime<Utc>) -> Result<SettleOutcome, StoreError> {
        let task_id = task_id.to_owned();
        self.write(move |conn| close_open_task(conn, &task_id, TaskState::Expired, None, None, at))
            .await
    }

    async fn abandon_stale_reservations(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "UPDATE reservations SET state = 'unknown_outcome'
                     WHERE state = 'reserved' AND created_at < ?1
                     RETURNING team, period, reserved",
                )
                .map_err(unavailable)?;
            let rows: Vec<(String, String, i64)> = statement
                .query_map(params![millis(before)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .map_err(unavailable)?
                .collect::<Result<_, _>>()
                .map_err(unavailable)?;
            for (team, period, amount) in &rows {
                adjust_period(conn, team, period, -amount, *amount)?;
            }
            Ok(rows.len() as u64)
        })
        .await
    }

    async fn release_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError> {
        self.write(move |conn| {
            move_reservation(
                conn,
                id,
                TaskState::UnknownOutcome,
                TaskState::Released,
                false,
            )
        })
        .await
    }
}
