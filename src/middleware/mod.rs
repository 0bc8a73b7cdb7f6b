//! The gateway's own middleware, one per file. The stack itself is assembled in `router::router`.

pub mod audit;
pub mod auth;
pub mod rate_limit;
pub mod request_id;
pub mod request_metrics;
pub mod trace;
