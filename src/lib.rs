//! ketchup-gateway's web layer: the HTTP stack in front of the Ketchup API. Teams call it with
//! their key; it swaps the key for the upstream token, enforces budgets and rate limits, owns the
//! task ids it created and shields the upstream. The domain it serves lives in `ketchup-domain`.

pub mod app;
pub mod demo;
pub mod error;
pub mod keygen;
pub mod logging;
pub mod metrics;
pub mod middleware;
pub mod rate_limit;
pub mod reconciler;
pub mod routes;
pub mod server;
pub mod status_cache;
pub mod upstream;
pub mod webhooks;
