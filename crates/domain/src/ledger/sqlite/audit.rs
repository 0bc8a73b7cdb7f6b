//! The audit trail of admin actions in SQLite: one row per action, its id from AUTOINCREMENT so
//! that an id is never reused once its row is deleted.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::params;

use super::{SqliteStore, execute, from_millis, millis, unavailable};
use crate::ledger::{AdminActionRecord, Audit, AuditQuery, NewAdminAction, StoreError};

#[async_trait]
impl Audit for SqliteStore {
    async fn record_admin_action(&self, action: NewAdminAction) -> Result<u64, StoreError> {
        self.write(move |conn| {
            execute(
                conn,
                "INSERT INTO admin_actions (at, admin, action, target, status, request_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    millis(action.at),
                    action.admin,
                    action.action,
                    action.target,
                    action.status,
                    action.request_id
                ],
            )
            .map_err(unavailable)?;
            Ok(conn.last_insert_rowid().unsigned_abs())
        })
        .await
    }

    async fn admin_actions(&self, query: AuditQuery) -> Result<Vec<AdminActionRecord>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT id, at, admin, action, target, status, request_id
                     FROM admin_actions
                     WHERE (?1 IS NULL OR id < ?1) AND (?2 IS NULL OR at >= ?2)
                       AND (?3 IS NULL OR admin = ?3)
                     ORDER BY id DESC LIMIT ?4",
                )
                .map_err(unavailable)?;
            let before = query.before.map(|id| i64::try_from(id).unwrap_or(i64::MAX));
            let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
            let rows = statement
                .query_map(
                    params![before, query.since.map(millis), query.admin, limit],
                    |r| {
                        Ok(AdminActionRecord {
                            id: r.get::<_, i64>(0)?.unsigned_abs(),
                            at: from_millis(r.get(1)?),
                            admin: r.get(2)?,
                            action: r.get(3)?,
                            target: r.get(4)?,
                            status: r.get(5)?,
                            request_id: r.get(6)?,
                        })
                    },
                )
                .map_err(unavailable)?;
            rows.collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }

    async fn delete_admin_actions(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.write(move |conn| {
            execute(
                conn,
                "DELETE FROM admin_actions WHERE id IN
                     (SELECT id FROM admin_actions WHERE at < ?1 ORDER BY at, id LIMIT ?2)",
                params![millis(before), limit],
            )
            .map(|deleted| deleted as u64)
            .map_err(unavailable)
        })
        .await
    }
}
