//! ketchup-gateway's web layer: the HTTP stack in front of the Ketchup API. Teams call it with
//! their key; it swaps the key for the upstream token, enforces budgets and rate limits, owns the
//! task ids it created and shields the upstream. The domain it serves lives in `ketchup-domain`.

pub mod accounts;
pub mod balance;
pub mod check_config;
pub mod demo;
pub mod error;
pub mod headers;
pub mod key_use;
pub mod keygen;
pub mod logging;
pub mod metrics;
pub mod middleware;
pub mod rate_limiter;
pub mod reconciler;
pub mod router;
pub mod routes;
pub mod server;
pub mod state;
pub mod status_cache;
pub mod upstream;
pub mod webhooks;
pub mod workers;
