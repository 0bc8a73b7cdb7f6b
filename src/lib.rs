//! ketchup-gateway: a gateway in front of the Ketchup image API that maps team keys to the
//! upstream token, enforces budgets and rate limits, owns task ids and shields the upstream.

pub mod clock;
pub mod credits;
pub mod fake_upstream;
