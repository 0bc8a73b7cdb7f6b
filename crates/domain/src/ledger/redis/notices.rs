//! Budget notifications in Redis: a claim per team, period and threshold (a string naming the
//! delivery it queued), set by the script that queues that delivery.

use std::sync::LazyLock;

use async_trait::async_trait;
use redis::{Script, Value};

use super::{RedisStore, conflict, millis, optional, tagged, unexpected};
use crate::ledger::{BudgetNotice, BudgetNotices, StoreError};

static NOTICE: LazyLock<Script> = ledger_script!("notice.lua");

#[async_trait]
impl BudgetNotices for RedisStore {
    async fn claim_budget_notice(&self, notice: BudgetNotice) -> Result<bool, StoreError> {
        let d = &notice.delivery;
        let lifetime = notice
            .expires_at
            .map(|end| millis(end) - millis(d.created_at));
        let mut call = self.script(&NOTICE);
        call.arg(&notice.team)
            .arg(&notice.period)
            .arg(notice.percent)
            .arg(optional(lifetime))
            .arg(&d.id)
            .arg(&d.task_id)
            .arg(&d.url)
            .arg(d.body.as_ref())
            .arg(millis(d.created_at))
            .arg(millis(d.deadline));
        let reply: Value = self.eval(&call).await?;
        let (tag, details) = tagged(reply)?;
        match tag.as_str() {
            "claimed" => Ok(true),
            "claimed_before" => Ok(false),
            "conflict" => Err(conflict(details)),
            other => Err(unexpected(format!("answered {other:?}"))),
        }
    }
}
