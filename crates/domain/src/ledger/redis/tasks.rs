//! Tasks in Redis: a task id and a callback token each name their reservation's hash, which a
//! script reads in the same step; walks go by rank in `created`, and the reconciler's work list is
//! `open-by-last-seen`.

use std::sync::LazyLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::{Script, Value};

use super::{RedisStore, credits, fields, from_millis, millis, parse, task_state, unexpected};
use crate::ledger::{
    CallbackTarget, ReservationId, StoreError, TaskCursor, TaskRecord, TaskState, Tasks,
};

static OBSERVE: LazyLock<Script> = ledger_script!("observe.lua");
static LOOKUP: LazyLock<Script> = ledger_script!("lookup.lua");

const TASK_FIELDS: [&str; 6] = [
    "task_id",
    "team",
    "model",
    "reserved",
    "state",
    "created_at",
];
const CALLBACK_FIELDS: [&str; 4] = ["id", "task_id", "team", "forward_to"];

fn task_record(hash: Vec<Value>) -> Result<TaskRecord, StoreError> {
    let [task_id, team, model, reserved, state, created_at] = fields(hash)?;
    Ok(TaskRecord {
        task_id: parse(task_id)?,
        team: parse(team)?,
        model: parse(model)?,
        reserved: credits(reserved)?,
        state: task_state(state)?,
        created_at: from_millis(parse(created_at)?),
    })
}

#[async_trait]
impl Tasks for RedisStore {
    async fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let mut call = self.script(&LOOKUP);
        call.arg(self.keys.task(task_id)).arg(&TASK_FIELDS);
        let found: Option<Vec<Value>> = self.eval(&call).await?;
        found.map(task_record).transpose()
    }

    async fn callback_target(
        &self,
        token_digest: &str,
    ) -> Result<Option<CallbackTarget>, StoreError> {
        let mut call = self.script(&LOOKUP);
        call.arg(self.keys.callback(token_digest))
            .arg(&CALLBACK_FIELDS);
        let found: Option<Vec<Value>> = self.eval(&call).await?;
        let Some(found) = found else {
            return Ok(None);
        };
        let [id, task_id, team, forward_to] = fields(found)?;
        let id: String = parse(id)?;
        let id = uuid::Uuid::parse_str(&id)
            .map_err(|e| unexpected(format!("reservation id {id:?}: {e}")))?;
        Ok(Some(CallbackTarget {
            reservation: ReservationId(id),
            task_id: parse(task_id)?,
            team: parse(team)?,
            forward_to: parse(forward_to)?,
        }))
    }

    async fn newest_tasks_start(&self, count: u64) -> Result<TaskCursor, StoreError> {
        // The cursor is a rank in `created`; reservations are never removed from it, and a new
        // one has the latest `created_at`, so ranks already passed stay put.
        let recorded: u64 = self
            .query(redis::cmd("ZCARD").arg(self.keys.created(None)))
            .await?;
        Ok(TaskCursor(recorded.saturating_sub(count)))
    }

    async fn tasks_from(
        &self,
        from: TaskCursor,
        limit: usize,
    ) -> Result<(Vec<TaskRecord>, Option<TaskCursor>), StoreError> {
        if limit == 0 {
            return Ok((Vec::new(), Some(from)));
        }
        let start = i64::try_from(from.0).unwrap_or(i64::MAX);
        let stop = start.saturating_add(i64::try_from(limit).unwrap_or(i64::MAX) - 1);
        let ids: Vec<String> = self
            .query(
                redis::cmd("ZRANGE")
                    .arg(self.keys.created(None))
                    .arg(start)
                    .arg(stop),
            )
            .await?;
        let rows = self
            .read_hashes(ids.iter().map(|id| self.keys.reservation(id)), &TASK_FIELDS)
            .await?;
        let tasks = rows
            .into_iter()
            // A reservation the upstream never gave a task (refused, or its outcome unknown).
            .filter(|row| !matches!(row.first(), None | Some(Value::Nil)))
            .map(task_record)
            .collect::<Result<_, _>>()?;
        let next = (ids.len() == limit).then(|| TaskCursor(from.0 + limit as u64));
        Ok((tasks, next))
    }

    async fn mark_observed(&self, task_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let mut call = self.script(&OBSERVE);
        call.arg(task_id).arg(millis(at));
        self.eval::<()>(&call).await
    }

    async fn unobserved_open_tasks(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.keys.unobserved())
                    .arg("-inf")
                    .arg(format!("({}", millis(before)))
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            )
            .await?;
        let rows = self
            .read_hashes(ids.iter().map(|id| self.keys.reservation(id)), &TASK_FIELDS)
            .await?;
        let mut tasks = Vec::with_capacity(rows.len());
        for row in rows {
            let task = task_record(row)?;
            // Settled between the two reads: no longer the reconciler's business.
            if task.state == TaskState::Open {
                tasks.push(task);
            }
        }
        Ok(tasks)
    }
}
