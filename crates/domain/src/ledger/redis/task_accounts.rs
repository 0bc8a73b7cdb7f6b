//! Which account started each task, in Redis: a string per task, set once.

use async_trait::async_trait;

use super::RedisStore;
use crate::ledger::{StoreError, TaskAccounts};

#[async_trait]
impl TaskAccounts for RedisStore {
    async fn record_task_account(&self, task_id: &str, account: &str) -> Result<(), StoreError> {
        let _: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(self.keys.task_account(task_id))
                    .arg(account)
                    .arg("NX"),
            )
            .await?;
        Ok(())
    }

    async fn task_account(&self, task_id: &str) -> Result<Option<String>, StoreError> {
        self.query(redis::cmd("GET").arg(self.keys.task_account(task_id)))
            .await
    }
}
