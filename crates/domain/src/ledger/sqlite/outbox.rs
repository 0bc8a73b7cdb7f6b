//! The webhook outbox in SQLite: the `deliveries` table, whose `next_attempt_at` is a pending
//! delivery's due time or, while an attempt holds it, the end of that attempt's lease.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, execute, from_millis, millis, unavailable};
use crate::ledger::{
    AttemptOutcome, ClaimLimits, Delivery, DeliveryRecord, DeliveryState, NewDelivery, Outbox,
    StoreError,
};

/// The teams that have pending deliveries, each found by one seek in `deliveries_due_by_team`
/// past the one before: as many steps as teams, however many deliveries each has. The index is
/// named because without statistics SQLite would rather walk every pending delivery by state.
fn teams_with_pending_deliveries(conn: &Connection) -> Result<Vec<String>, StoreError> {
    let mut statement = conn
        .prepare_cached(
            "SELECT team FROM deliveries INDEXED BY deliveries_due_by_team
             WHERE state = 'pending' AND team > ?1 ORDER BY team LIMIT 1",
        )
        .map_err(unavailable)?;
    let mut teams: Vec<String> = Vec::new();
    loop {
        let after = teams.last().map_or("", String::as_str);
        match statement
            .query_row([after], |r| r.get(0))
            .optional()
            .map_err(unavailable)?
        {
            Some(team) => teams.push(team),
            None => return Ok(teams),
        }
    }
}

/// Queues a delivery, in the caller's transaction; `false` if its id or task has one already.
pub(super) fn queue(conn: &Connection, d: &NewDelivery) -> Result<bool, StoreError> {
    let inserted = execute(
        conn,
        "INSERT INTO deliveries (id, task_id, team, url, body, state, next_attempt_at,
                                 created_at, deadline, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6, ?7, ?6)
         ON CONFLICT DO NOTHING",
        params![
            d.id,
            d.task_id,
            d.team,
            d.url,
            d.body.as_ref(),
            millis(d.created_at),
            millis(d.deadline)
        ],
    )
    .map_err(unavailable)?;
    Ok(inserted == 1)
}

#[async_trait]
impl Outbox for SqliteStore {
    async fn enqueue_delivery(&self, d: NewDelivery) -> Result<bool, StoreError> {
        self.write(move |conn| queue(conn, &d)).await
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
        let limits = limits.clone();
        self.write(move |conn| {
            // The oldest due deliveries of each team, as many as its share has left: one index
            // range per team, never a walk over the deliveries of a team that must wait.
            let mut due_of_team = conn
                .prepare_cached(
                    "SELECT next_attempt_at, id FROM deliveries
                     INDEXED BY deliveries_due_by_team
                     WHERE state = 'pending' AND team = ?1 AND next_attempt_at <= ?2
                     ORDER BY next_attempt_at, id LIMIT ?3",
                )
                .map_err(unavailable)?;
            let mut candidates: Vec<(i64, String)> = Vec::new();
            for team in teams_with_pending_deliveries(conn)? {
                let taken = limits.busy.get(&team).copied().unwrap_or(0);
                let left = limits.per_team.saturating_sub(taken).min(limits.total);
                if left == 0 {
                    continue;
                }
                let due = due_of_team
                    .query_map(params![team, millis(now), left as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .map_err(unavailable)?;
                for row in due {
                    candidates.push(row.map_err(unavailable)?);
                }
            }
            candidates.sort_unstable();
            candidates.truncate(limits.total);

            let mut lease = conn
                .prepare_cached(
                    "UPDATE deliveries SET next_attempt_at = ?2, attempts = attempts + 1
                     WHERE id = ?1
                     RETURNING id, task_id, team, url, body, attempts, created_at, deadline",
                )
                .map_err(unavailable)?;
            candidates
                .into_iter()
                .map(|(_, id)| {
                    lease
                        .query_row(params![id, millis(lease_until)], |r| {
                            Ok(Delivery {
                                id: r.get(0)?,
                                task_id: r.get(1)?,
                                team: r.get(2)?,
                                url: r.get(3)?,
                                body: r.get(4)?,
                                attempts: r.get(5)?,
                                created_at: from_millis(r.get(6)?),
                                deadline: from_millis(r.get(7)?),
                            })
                        })
                        .map_err(unavailable)
                })
                .collect()
        })
        .await
    }

    async fn finish_attempt(
        &self,
        id: &str,
        attempt: u32,
        outcome: AttemptOutcome,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |conn| {
            let (state, next_attempt_at, error) = match outcome {
                AttemptOutcome::Delivered => (DeliveryState::Delivered, None, None),
                AttemptOutcome::RetryAt(next, error) => {
                    (DeliveryState::Pending, Some(millis(next)), Some(error))
                }
                AttemptOutcome::Dead(error) => (DeliveryState::Dead, None, Some(error)),
            };
            execute(
                conn,
                "UPDATE deliveries
                 SET state = ?2, next_attempt_at = coalesce(?3, next_attempt_at),
                     last_error = coalesce(?4, last_error), updated_at = ?5,
                     body = CASE ?2 WHEN 'pending' THEN body ELSE x'' END
                 WHERE id = ?1 AND state = 'pending' AND attempts = ?6",
                params![
                    id,
                    state.as_str(),
                    next_attempt_at,
                    error,
                    millis(at),
                    attempt
                ],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT id, task_id, team, url, attempts, last_error, created_at, updated_at
                     FROM deliveries WHERE state = ?1
                     ORDER BY updated_at DESC, id DESC LIMIT ?2",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![state.as_str(), limit as i64], |r| {
                    Ok(DeliveryRecord {
                        id: r.get(0)?,
                        task_id: r.get(1)?,
                        team: r.get(2)?,
                        url: r.get(3)?,
                        state: state.as_str(),
                        attempts: r.get(4)?,
                        last_error: r.get(5)?,
                        created_at: from_millis(r.get(6)?),
                        updated_at: from_millis(r.get(7)?),
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }

    async fn delete_finished_deliveries(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let mut deleted = 0;
            // One state at a time, so that each walks its own range of `deliveries_by_state`.
            for state in [DeliveryState::Delivered, DeliveryState::Dead] {
                deleted += execute(
                    conn,
                    "DELETE FROM deliveries WHERE id IN (
                         SELECT id FROM deliveries WHERE state = ?1 AND updated_at < ?2
                         ORDER BY updated_at LIMIT ?3)",
                    params![
                        state.as_str(),
                        millis(finished_before),
                        (limit - deleted) as i64
                    ],
                )
                .map_err(unavailable)?;
            }
            Ok(deleted as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::conformance::outbox::{deliveries_ended_three_ways, delivery};

    #[tokio::test]
    async fn a_finished_delivery_keeps_no_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let store = SqliteStore::open(&path).unwrap();
        deliveries_ended_three_ways(&store).await;
        let conn = Connection::open(&path).unwrap();
        let body_bytes = |id: &str| -> i64 {
            conn.query_row(
                "SELECT length(body) FROM deliveries WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(body_bytes("msg_delivered"), 0);
        assert_eq!(body_bytes("msg_dead"), 0);
        assert_eq!(
            body_bytes("msg_retried") as usize,
            delivery("msg_retried", "ta-3").body.len()
        );
    }
}
