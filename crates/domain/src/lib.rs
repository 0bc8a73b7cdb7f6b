//! The gateway's domain, free of any HTTP framework: exact credits, budget periods, the validated
//! configuration, the ledger (its traits and both engines), settlement of what a task cost,
//! budget notifications, and the in-memory index of who owns which task.
//!
//! The web layer (the root package) depends on this crate and never the other way round, so
//! everything here can be tested and benchmarked without a server.

pub mod body;
pub mod calibration;
pub mod clock;
pub mod config;
pub mod credits;
pub mod idempotency;
pub mod ledger;
pub mod notices;
pub mod ownership;
pub mod period;
pub mod pricing;
pub mod redis_client;
pub mod route_table;
pub mod settlement;
