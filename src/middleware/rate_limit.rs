//! Per-team rate limits on generation and status reads, checked right after authentication so a
//! refused request costs nothing further: no validation, no reservation, no upstream call.
//! Every limited response carries the `RateLimit-*` headers of the limit that applied. The
//! router puts this layer on the routes a limit applies to, with that limit's kind.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::auth::Caller;
use crate::{
    error::GatewayError,
    headers,
    rate_limiter::{LimitKind, RateLimits},
};
use axum::{
    extract::Request,
    response::{IntoResponse, Response},
};
use tower::{Layer, Service};

/// The layer: the team's limit of one kind.
#[derive(Clone)]
pub struct Limit {
    limits: Arc<RateLimits>,
    kind: LimitKind,
}

impl Limit {
    pub fn new(limits: Arc<RateLimits>, kind: LimitKind) -> Self {
        Limit { limits, kind }
    }
}

impl<S> Layer<S> for Limit {
    type Service = LimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitService {
            limit: self.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct LimitService<S> {
    limit: Limit,
    inner: S,
}

impl<S> Service<Request> for LimitService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The service that was made ready is the one called; its clone waits for the next.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(limit(self.limit.clone(), request, inner))
    }
}

async fn limit<S>(
    Limit { limits, kind }: Limit,
    request: Request,
    mut inner: S,
) -> Result<Response, Infallible>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let Some(Caller { team, .. }) = request.extensions().get::<Caller>() else {
        return inner.call(request).await;
    };
    match limits.check_team(&team.name, kind).await {
        Err(refused) => Ok(GatewayError::from(refused).into_response()),
        Ok(verdict) => {
            let mut response = inner.call(request).await?;
            // A refusal further in (the upstream account's limit) keeps its own headers.
            if !response.headers().contains_key(headers::RATELIMIT_LIMIT) {
                verdict.write_headers(response.headers_mut());
            }
            Ok(response)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, F>(_: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn the_redis_path_stays_out_of_every_requests_future() {
        // Boxed where it is taken (replicas sharing Redis): inline, it doubled this future to
        // about 2 KB for every request of every gateway.
        let size = future_size(limit::<axum::routing::Route>);
        assert!(
            size <= 1280,
            "the rate limit middleware's future is {size} bytes"
        );
    }
}
