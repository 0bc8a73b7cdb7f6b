//! What every handler shares: the live configuration and the gateway's parts, built once by
//! the server and handed to the router.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::{
    accounts::Accounts, metrics::Metrics, rate_limiter::RateLimits, status_cache::StatusCache,
    upstream::UpstreamClient,
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
    pub recently_observed: moka::sync::Cache<String, ()>,
    pub clock: SharedClock,
    /// Work that must finish even if its client has gone (recording a task the upstream
    /// accepted); shutdown waits for it.
    pub background: TaskTracker,
    /// Wakes the webhook worker when a delivery is queued, so it goes out at once rather than at
    /// the worker's next look.
    pub webhook_wake: tokio::sync::Notify,
    /// The upstream account as the balance check last saw it.
    pub accounts: Accounts,
    /// Budget notifications, and which of them this process knows to be claimed.
    pub notifier: Notifier,
}
