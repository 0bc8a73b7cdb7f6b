//! ketchup-gateway: a gateway in front of the Ketchup image API that maps team keys to the
//! upstream token, enforces budgets and rate limits, owns task ids and shields the upstream.

pub mod app;
pub mod budget;
pub mod clock;
pub mod config;
pub mod credits;
pub mod demo;
pub mod error;
pub mod fake_upstream;
pub mod keygen;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod middleware;
pub mod ownership;
pub mod rate_limit;
pub mod reconciler;
pub mod redis_client;
pub mod routes;
pub mod server;
pub mod settlement;
pub mod status_cache;
#[cfg(test)]
mod test_redis;
pub mod upstream;
pub mod webhooks;
