//! Per-team rate limits on generation and status reads, checked right after authentication so a
//! refused request costs nothing further: no validation, no reservation, no upstream call.
//! Every limited response carries the `RateLimit-*` headers of the limit that applied. The
//! layer sits around every route, and the router tells it which routes a limit applies to, and
//! of which kind: a layer on those routes alone would wrap each of them in a route of its own,
//! which costs every request on it a boxed clone of the service and a future more.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use super::facts::{Caller, RequestFacts};
use crate::{
    error::GatewayError,
    headers,
    rate_limiter::{LimitKind, RateLimits, Verdict},
};
use axum::{
    extract::Request,
    response::{IntoResponse, Response},
};
use foldhash::fast::RandomState;
use futures_util::future::Either;
use http::StatusCode;
use ketchup_domain::config::Team;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// The routes a team's rate limit applies to, each with the kind of limit it counts against,
/// by route template.
#[derive(Default)]
pub struct LimitedRoutes(HashMap<Box<str>, LimitKind, RandomState>);

impl LimitedRoutes {
    pub fn insert(&mut self, route: &str, kind: LimitKind) {
        self.0.insert(route.into(), kind);
    }

    fn kind_of(&self, route: &str) -> Option<LimitKind> {
        self.0.get(route).copied()
    }
}

/// The layer: the team's limits, and which routes they apply to.
#[derive(Clone)]
pub struct Limit {
    limits: Arc<RateLimits>,
    routes: Arc<LimitedRoutes>,
}

impl Limit {
    pub fn new(limits: Arc<RateLimits>, routes: LimitedRoutes) -> Self {
        Limit {
            limits,
            routes: Arc::new(routes),
        }
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
    type Future = Either<
        Either<Ready<Result<Response, Infallible>>, WithHeaders<S::Future>>,
        Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let Limit { limits, routes } = &self.limit;
        let limited = request
            .extensions()
            .get::<Arc<RequestFacts>>()
            .and_then(|facts| Some((facts.caller()?, routes.kind_of(facts.route())?)));
        // A route without a limit, or no team (a public route) to count it against.
        let Some((Caller { team, .. }, kind)) = limited else {
            return Either::Left(Either::Right(WithHeaders {
                inner: self.inner.call(request),
                verdict: None,
            }));
        };
        match limits.check_team_here(&team.name, kind) {
            // The limits are this process's: decided already, and the answer needs no box.
            Some(Ok(verdict)) => Either::Left(Either::Right(WithHeaders {
                inner: self.inner.call(request),
                verdict: Some(verdict),
            })),
            Some(Err(refused)) => Either::Left(Either::Left(ready(Ok(GatewayError::from(
                refused,
            )
            .into_response())))),
            // Shared in Redis: asked on the way, in a future of its own.
            None => {
                let team = team.clone();
                // The service that was made ready is the one called; its clone waits for the next.
                let ready = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, ready);
                let limits = limits.clone();
                Either::Right(Box::pin(limit(limits, kind, team, request, inner)))
            }
        }
    }
}

pin_project! {
    /// The inner service's answer, with the headers of the limit that let the request through.
    pub struct WithHeaders<F> {
        #[pin]
        inner: F,
        verdict: Option<Verdict>,
    }
}

impl<F> Future for WithHeaders<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        if let Some(verdict) = this.verdict.take() {
            add_headers(&verdict, &mut response);
        }
        Poll::Ready(Ok(response))
    }
}

/// The limit's headers on an answer, unless a refusal further in (the upstream account's
/// limit) set its own.
fn add_headers(verdict: &Verdict, response: &mut Response) {
    let refused_further_in = response.status() == StatusCode::TOO_MANY_REQUESTS
        && response.headers().contains_key(headers::RATELIMIT_LIMIT);
    if !refused_further_in {
        verdict.write_headers(response.headers_mut());
    }
}

/// The team's request through its limit shared in Redis.
async fn limit<S>(
    limits: Arc<RateLimits>,
    kind: LimitKind,
    team: Arc<Team>,
    request: Request,
    mut inner: S,
) -> Result<Response, Infallible>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    match limits.check_team(&team.name, kind).await {
        Err(refused) => Ok(GatewayError::from(refused).into_response()),
        Ok(verdict) => {
            let mut response = inner.call(request).await?;
            add_headers(&verdict, &mut response);
            Ok(response)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, E, F>(_: impl Fn(A, B, C, D, E) -> F) -> usize {
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
