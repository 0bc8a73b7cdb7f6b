//! Reports from SQLite: a team's standing is its row of `budget_periods`, the rest is counted or
//! listed from `reservations`; all of it read on the blocking pool, off the async workers.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, from_millis, millis, query_row, unavailable};
use crate::credits::Credits;
use crate::ledger::{
    OutcomeReason, Reports, ReservationRecord, Standing, StoreError, TaskState, UsageRow,
};

#[async_trait]
impl Reports for SqliteStore {
    async fn standing(&self, team: &str, period: &str) -> Result<Standing, StoreError> {
        let (team, period) = (team.to_owned(), period.to_owned());
        self.read(move |conn| {
            let totals: Option<(i64, i64)> = query_row(
                conn,
                "SELECT spent, reserved FROM budget_periods WHERE team = ?1 AND period = ?2",
                params![team, period],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(unavailable)?;
            let (spent, reserved) = totals.unwrap_or((0, 0));
            Ok(Standing {
                spent: Credits::from_units(spent),
                reserved: Credits::from_units(reserved),
            })
        })
        .await
    }

    async fn in_flight(&self, team: &str) -> Result<u64, StoreError> {
        let team = team.to_owned();
        self.read(move |conn| {
            let count: i64 = query_row(
                conn,
                "SELECT count(*) FROM reservations
                     WHERE team = ?1 AND state IN ('reserved', 'open')",
                params![team],
                |r| r.get(0),
            )
            .map_err(unavailable)?;
            Ok(count.unsigned_abs())
        })
        .await
    }

    async fn reservations(
        &self,
        state: TaskState,
        limit: usize,
    ) -> Result<Vec<ReservationRecord>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT id, task_id, team, model, period, reserved, request_id, created_at,
                            reason, dispatched_at, idempotency_key, retry_of, resolved_by
                     FROM reservations WHERE state = ?1 ORDER BY created_at DESC LIMIT ?2",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![state.as_str(), limit as i64], |r| {
                    let reason: Option<String> = r.get(8)?;
                    Ok(ReservationRecord {
                        id: r.get(0)?,
                        task_id: r.get(1)?,
                        team: r.get(2)?,
                        model: r.get(3)?,
                        period: r.get(4)?,
                        reserved: Credits::from_units(r.get(5)?),
                        state: state.as_str(),
                        reason: reason
                            .as_deref()
                            .and_then(OutcomeReason::parse)
                            .map(OutcomeReason::as_str),
                        dispatched_at: r.get::<_, Option<i64>>(9)?.map(from_millis),
                        idempotency_key: r.get(10)?,
                        retry_of: r.get(11)?,
                        resolved_by: r.get(12)?,
                        request_id: r.get(6)?,
                        created_at: from_millis(r.get(7)?),
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }

    async fn usage(
        &self,
        team: Option<&str>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let team = team.map(str::to_owned);
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT strftime('%Y-%m-%d', created_at / 1000, 'unixepoch') AS day, team,
                            key_label, family, model,
                            count(*),
                            coalesce(sum(final_status = 'success'), 0),
                            coalesce(sum(final_status = 'failed'), 0),
                            coalesce(sum(state IN ('reserved', 'open')), 0),
                            coalesce(sum(CASE WHEN state = 'settled' THEN consumed
                                              WHEN state IN ('expired', 'unknown_outcome')
                                              THEN reserved ELSE 0 END), 0)
                     FROM reservations
                     WHERE created_at >= ?1 AND created_at < ?2 AND state != 'released'
                       AND (?3 IS NULL OR team = ?3)
                     GROUP BY day, team, key_label, family, model
                     ORDER BY day, team, key_label, family, model",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![millis(from), millis(to), team], |r| {
                    let count = |i| r.get::<_, i64>(i).map(i64::unsigned_abs);
                    Ok(UsageRow {
                        day: r.get(0)?,
                        team: r.get(1)?,
                        key: r.get(2)?,
                        family: r.get(3)?,
                        model: r.get(4)?,
                        tasks: count(5)?,
                        succeeded: count(6)?,
                        failed: count(7)?,
                        unsettled: count(8)?,
                        credits: Credits::from_units(r.get(9)?),
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }
}
