//! Tasks in SQLite: rows of `reservations`, found by task id or callback token, walked in rowid
//! order (the order they were recorded), or picked by when their status was last read.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, execute, from_millis, millis, query_row, unavailable};
use crate::credits::Credits;
use crate::ledger::{
    CallbackTarget, ReservationId, StoreError, TaskCursor, TaskRecord, TaskState, Tasks,
};

fn task_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRecord> {
    let state: String = row.get(4)?;
    Ok(TaskRecord {
        task_id: row.get(0)?,
        team: row.get(1)?,
        model: row.get(2)?,
        reserved: Credits::from_units(row.get(3)?),
        state: TaskState::parse(&state).unwrap_or(TaskState::Open),
        created_at: from_millis(row.get(5)?),
    })
}

/// The columns `task_record` reads, as a macro so that each query is one `concat!`ed literal
/// rather than a string formatted on every call.
macro_rules! task_columns {
    () => {
        "task_id, team, model, reserved, state, created_at"
    };
}

#[async_trait]
impl Tasks for SqliteStore {
    async fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.read_point(|conn| {
            query_row(
                conn,
                concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM reservations WHERE task_id = ?1"
                ),
                params![task_id],
                task_record,
            )
            .optional()
            .map_err(unavailable)
        })
    }

    async fn callback_target(
        &self,
        token_digest: &str,
    ) -> Result<Option<CallbackTarget>, StoreError> {
        self.read_point(|conn| {
            let row: Option<(String, Option<String>, String, Option<String>)> = query_row(
                conn,
                "SELECT id, task_id, team, forward_to FROM reservations
                 WHERE callback_digest = ?1",
                params![token_digest],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(unavailable)?;
            row.map(|(id, task_id, team, forward_to)| {
                let id = uuid::Uuid::parse_str(&id).map_err(unavailable)?;
                Ok(CallbackTarget {
                    reservation: ReservationId(id),
                    task_id,
                    team,
                    forward_to,
                })
            })
            .transpose()
        })
    }

    async fn newest_tasks_start(&self, count: u64) -> Result<TaskCursor, StoreError> {
        // The cursor is a rowid: rows are never deleted, so a new one always comes last.
        self.read(move |conn| {
            let rowid = |row: &rusqlite::Row<'_>| row.get::<_, i64>(0);
            let start = match count.checked_sub(1) {
                // The `count`th newest task's row, walked to from the end; with fewer tasks
                // than that, the walk starts at the beginning.
                Some(offset) => query_row(
                    conn,
                    "SELECT rowid FROM reservations WHERE task_id IS NOT NULL
                     ORDER BY rowid DESC LIMIT 1 OFFSET ?1",
                    params![i64::try_from(offset).unwrap_or(i64::MAX)],
                    rowid,
                )
                .optional()
                .map(|found| found.unwrap_or(0)),
                None => query_row(
                    conn,
                    "SELECT coalesce(max(rowid), 0) + 1 FROM reservations",
                    [],
                    rowid,
                ),
            };
            start
                .map(|rowid| TaskCursor(rowid.max(0) as u64))
                .map_err(unavailable)
        })
        .await
    }

    async fn tasks_from(
        &self,
        from: TaskCursor,
        limit: usize,
    ) -> Result<(Vec<TaskRecord>, Option<TaskCursor>), StoreError> {
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(concat!(
                    "SELECT ",
                    task_columns!(),
                    ", rowid FROM reservations WHERE rowid >= ?1 AND task_id IS NOT NULL
                     ORDER BY rowid LIMIT ?2"
                ))
                .map_err(unavailable)?;
            let mut last = None;
            let tasks: Vec<TaskRecord> = statement
                .query_map(
                    params![i64::try_from(from.0).unwrap_or(i64::MAX), limit as i64],
                    |row| {
                        last = Some(row.get::<_, i64>(6)?);
                        task_record(row)
                    },
                )
                .map_err(unavailable)?
                .collect::<Result<_, _>>()
                .map_err(unavailable)?;
            // The query skips rows without a task itself, so a short page is the last.
            let next = match last {
                Some(rowid) if tasks.len() == limit => Some(TaskCursor(rowid as u64 + 1)),
                _ => None,
            };
            Ok((tasks, next))
        })
        .await
    }

    async fn mark_observed(&self, task_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let task_id = task_id.to_owned();
        self.write(move |conn| {
            execute(
                conn,
                "UPDATE reservations SET observed_at = ?2 WHERE task_id = ?1",
                params![task_id, millis(at)],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn unobserved_open_tasks(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM reservations
                     WHERE state = 'open' AND coalesce(observed_at, created_at) < ?1
                     ORDER BY coalesce(observed_at, created_at) LIMIT ?2"
                ))
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![millis(before), limit as i64], task_record)
                .map_err(unavailable)?;
            rows.collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }
}
