//! Budget notifications in SQLite: the `budget_notices` claims, each inserted in the transaction
//! that queues its delivery.

use async_trait::async_trait;
use rusqlite::params;

use super::outbox::queue;
use super::{SqliteStore, execute, millis, unavailable};
use crate::ledger::{BudgetNotice, BudgetNotices, StoreError};

#[async_trait]
impl BudgetNotices for SqliteStore {
    async fn claim_budget_notice(&self, notice: BudgetNotice) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let now = millis(notice.delivery.created_at);
            // Bounded by the team's thresholds of the periods since its last claim.
            execute(
                conn,
                "DELETE FROM budget_notices WHERE team = ?1 AND expires_at <= ?2",
                params![notice.team, now],
            )
            .map_err(unavailable)?;
            let claimed = execute(
                conn,
                "INSERT INTO budget_notices (team, period, percent, delivery_id, claimed_at,
                                             expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT DO NOTHING",
                params![
                    notice.team,
                    notice.period,
                    notice.percent,
                    notice.delivery.id,
                    now,
                    notice.expires_at.map(millis)
                ],
            )
            .map_err(unavailable)?;
            if claimed == 0 {
                return Ok(false);
            }
            if !queue(conn, &notice.delivery)? {
                // Rolled back with the claim: the notice stays unclaimed.
                return Err(StoreError::Conflict(format!(
                    "delivery {} or one for {} is queued already",
                    notice.delivery.id, notice.delivery.task_id
                )));
            }
            Ok(true)
        })
        .await
    }
}
