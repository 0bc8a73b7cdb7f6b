//! The gateway's own middleware, one layer per file: `outer` (what every request gets around
//! it, made of the parts in `request_id`, `trace` and `request_metrics`), `auth`, `audit`,
//! `rate_limit`; `facts`, what they and the handlers learn about a request.
//! The stack itself is assembled in `router::router`.

pub mod audit;
pub mod auth;
pub mod facts;
pub mod outer;
pub mod rate_limit;
pub mod request_id;
pub mod request_metrics;
pub mod trace;
