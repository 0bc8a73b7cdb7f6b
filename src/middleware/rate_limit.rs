//! Per-team rate limits on generation and status reads, checked right after authentication so a
//! refused request costs nothing further: no validation, no reservation, no upstream call.
//! Every limited response carries the `RateLimit-*` headers of the limit that applied. The
//! router puts this layer on the routes a limit applies to, with that limit's kind.

use std::sync::Arc;

use super::auth::Caller;
use crate::{
    error::GatewayError,
    headers,
    rate_limiter::{LimitKind, RateLimits},
};
use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};

pub async fn limit(
    State((limits, kind)): State<(Arc<RateLimits>, LimitKind)>,
    request: Request,
    next: Next,
) -> Response {
    let Some(Caller { team, .. }) = request.extensions().get::<Caller>() else {
        return next.run(request).await;
    };
    match limits.check_team(&team.name, kind).await {
        Err(refused) => GatewayError::from(refused).into_response(),
        Ok(verdict) => {
            let mut response = next.run(request).await;
            // A refusal further in (the upstream account's limit) keeps its own headers.
            if !response.headers().contains_key(headers::RATELIMIT_LIMIT) {
                verdict.write_headers(response.headers_mut());
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    fn future_size<A, B, C, F>(_: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn the_redis_path_stays_out_of_every_requests_future() {
        // Boxed where it is taken (replicas sharing Redis): inline, it doubled this future to
        // about 2 KB for every request of every gateway.
        let size = future_size(super::limit);
        assert!(
            size <= 1280,
            "the rate limit middleware's future is {size} bytes"
        );
    }
}
