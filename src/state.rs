//! What every handler shares: the live configuration and the gateway's parts, built once by
//! the server and handed to the router.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::{
    accounts::{AccountId, Accounts, refuses_token},
    error::GatewayError,
    metrics::Metrics,
    rate_limiter::RateLimits,
    status_cache::StatusCache,
    upstream::{UpstreamClient, UpstreamResponse},
};
use ketchup_domain::{
    clock::SharedClock, config::Config, ledger::Ledger, notices::Notifier,
    ownership::OwnershipIndex, settlement::Settler,
};

/// What every handler shares.
pub struct AppState {
    /// Swapped whole on reload, so a request sees one consistent configuration.
    pub config: Arc<ArcSwap<Config>>,
    pub ledger: Arc<dyn Ledger>,
    pub upstream: UpstreamClient,
    pub metrics: Arc<Metrics>,
    pub rate_limits: Arc<RateLimits>,
    pub status_cache: StatusCache,
    /// Who owns the newest tasks, so that reading their status need not ask the ledger.
    pub owners: Arc<OwnershipIndex>,
    /// Settles tasks from their final state, wherever it is first seen.
    pub settler: Settler,
    /// Tasks whose status a client read lately (for half of `reconciler.settle_after`): their
    /// ledger row is not touched again until then, which is often enough for the reconciler.
    pub recently_observed: TaskMap<()>,
    pub clock: SharedClock,
    /// Work that must finish even if its client has gone (recording a task the upstream
    /// accepted); shutdown waits for it.
    pub background: TaskTracker,
    /// Wakes the webhook worker when a delivery is queued, so it goes out at once rather than at
    /// the worker's next look.
    pub webhook_wake: tokio::sync::Notify,
    /// The upstream accounts: which are in rotation, and each as the balance check last saw it.
    pub accounts: Accounts,
    /// Budget notifications, and which of them this process knows to be claimed.
    pub notifier: Notifier,
    /// The account that started each of the newest tasks, so that reading their status need not
    /// ask the ledger; bounded like the ownership index. Unused with a single account.
    pub task_accounts: TaskMap<AccountId>,
}

/// A bounded map by task id, hashed with foldhash rather than SipHash: only the ids of tasks
/// the gateway owns go in, and the upstream made them.
pub type TaskMap<V> = moka::sync::Cache<String, V, foldhash::fast::RandomState>;

impl AppState {
    /// The account whose token reads `task_id`: the one that started it, as the ledger recorded
    /// (the fallback for a task recorded without one). With one account, that one.
    pub async fn account_of_task(&self, task_id: &str) -> Result<AccountId, GatewayError> {
        if self.accounts.len() == 1 {
            return Ok(AccountId(0));
        }
        if let Some(account) = self.task_accounts.get(task_id) {
            return Ok(account);
        }
        let name = self.ledger.task_account(task_id).await?;
        let account = self.accounts.for_task(name.as_deref());
        self.task_accounts.insert(task_id.to_owned(), account);
        Ok(account)
    }

    /// Notes the account that started a task the upstream just accepted.
    pub fn started_with(&self, task_id: &str, account: AccountId) {
        if self.accounts.len() > 1 {
            self.task_accounts.insert(task_id.to_owned(), account);
        }
    }

    /// One upstream read of `task_id`'s status with the token of the account that started it
    /// (no other account can read it). A refusal of that token takes the account out of rotation.
    pub async fn query_task(
        &self,
        task_id: &str,
        request_id: &str,
    ) -> Result<UpstreamResponse, GatewayError> {
        let account = self.account_of_task(task_id).await?;
        let answer = self
            .upstream
            .query_task(account, task_id, request_id)
            .await?;
        if refuses_token(answer.status) {
            self.accounts
                .refused(account, "status read", self.clock.now());
        }
        Ok(answer)
    }
}
