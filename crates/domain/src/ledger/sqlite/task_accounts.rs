//! Which account started each task, in SQLite: one row per task in `task_accounts`.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, execute, query_row, unavailable};
use crate::ledger::{StoreError, TaskAccounts};

#[async_trait]
impl TaskAccounts for SqliteStore {
    async fn record_task_account(&self, task_id: &str, account: &str) -> Result<(), StoreError> {
        let (task_id, account) = (task_id.to_owned(), account.to_owned());
        self.write(move |conn| {
            execute(
                conn,
                "INSERT INTO task_accounts (task_id, account) VALUES (?1, ?2)
                 ON CONFLICT (task_id) DO NOTHING",
                params![task_id, account],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn task_account(&self, task_id: &str) -> Result<Option<String>, StoreError> {
        self.read_point(|conn| {
            query_row(
                conn,
                "SELECT account FROM task_accounts WHERE task_id = ?1",
                params![task_id],
                |row| row.get(0),
            )
            .optional()
            .map_err(unavailable)
        })
    }
}
