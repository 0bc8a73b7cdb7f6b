//! The gateway's own middleware, one per file. The stack itself is assembled in `app::router`.

pub mod auth;
pub mod metrics;
pub mod rate_limit;
pub mod request_id;
pub mod trace;
