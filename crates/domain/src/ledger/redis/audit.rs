//! The audit trail of admin actions in Redis: one sorted set scored by id, each member the id and
//! the action as JSON, so a page of the trail is one read.
//!
//! Ids are numbered by one script (`record_admin_action.lua`), so they follow the order actions
//! were recorded in across replicas. That order is the trail's: `since` and retention walk it
//! and stop at the first action older than their instant, as replicas' clocks agree closely
//! enough for a trail written by hand-made admin calls.

use std::sync::LazyLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::Script;
use serde::{Deserialize, Serialize};

use super::{RedisStore, from_millis, millis, unexpected};
use crate::ledger::{AdminActionRecord, Audit, AuditQuery, NewAdminAction, StoreError};

static RECORD: LazyLock<Script> = ledger_script!("record_admin_action.lua");

/// Members read per round trip while a listing walks the trail.
const PAGE: usize = 200;

/// An action as its member stores it, after its id and `|`.
#[derive(Serialize, Deserialize)]
struct Stored {
    at: i64,
    admin: String,
    action: String,
    target: String,
    status: u16,
    request_id: String,
}

/// A member of the trail: its id, and the action.
fn decode(member: &str) -> Result<AdminActionRecord, StoreError> {
    let (id, json) = member
        .split_once('|')
        .ok_or_else(|| unexpected("an admin action without its id"))?;
    let stored: Stored = serde_json::from_str(json).map_err(unexpected)?;
    Ok(AdminActionRecord {
        id: id.parse().map_err(unexpected)?,
        at: from_millis(stored.at),
        admin: stored.admin,
        action: stored.action,
        target: stored.target,
        status: stored.status,
        request_id: stored.request_id,
    })
}

#[async_trait]
impl Audit for RedisStore {
    async fn record_admin_action(&self, action: NewAdminAction) -> Result<u64, StoreError> {
        let stored = Stored {
            at: millis(action.at),
            admin: action.admin,
            action: action.action,
            target: action.target,
            status: action.status,
            request_id: action.request_id,
        };
        let mut call = self.script(&RECORD);
        call.arg(serde_json::to_string(&stored).map_err(unexpected)?);
        self.eval(&call).await
    }

    async fn admin_actions(&self, query: AuditQuery) -> Result<Vec<AdminActionRecord>, StoreError> {
        let mut found = Vec::new();
        let mut below = query
            .before
            .map_or("+inf".to_owned(), |id| format!("({id}"));
        while found.len() < query.limit {
            let members: Vec<String> = self
                .query(
                    redis::cmd("ZREVRANGEBYSCORE")
                        .arg(self.keys.audit())
                        .arg(&below)
                        .arg("-inf")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(PAGE),
                )
                .await?;
            let last_page = members.len() < PAGE;
            for member in &members {
                let record = decode(member)?;
                below = format!("({}", record.id);
                if query.since.is_some_and(|since| record.at < since) {
                    return Ok(found);
                }
                if query
                    .admin
                    .as_ref()
                    .is_none_or(|admin| *admin == record.admin)
                {
                    found.push(record);
                    if found.len() == query.limit {
                        break;
                    }
                }
            }
            if last_page {
                break;
            }
        }
        Ok(found)
    }

    async fn delete_admin_actions(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let stop = i64::try_from(limit).unwrap_or(i64::MAX) - 1;
        let oldest: Vec<String> = self
            .query(redis::cmd("ZRANGE").arg(self.keys.audit()).arg(0).arg(stop))
            .await?;
        let mut old = Vec::new();
        for member in oldest {
            if decode(&member)?.at >= before {
                break;
            }
            old.push(member);
        }
        if old.is_empty() {
            return Ok(0);
        }
        self.query(redis::cmd("ZREM").arg(self.keys.audit()).arg(old))
            .await
    }
}
