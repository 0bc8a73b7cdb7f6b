//! The audit trail of admin actions. Every admin request that may change state (any method but
//! GET and HEAD) on one of the router's routes is recorded in the ledger once it is answered:
//! who (the admin token's label, never the token), what (the method and route, and the route's
//! path parameters as its target), the status it was answered, and when.
//!
//! It is a layer of the whole router, not a line in each handler, so an admin route added later
//! records itself. Refused attempts are recorded too (a 409 for a reservation that was not an
//! unknown outcome, a 400 for a malformed id): an operator reading the trail sees what each admin
//! tried, not only what worked. A request no admin token opened never gets here (authentication
//! answers it first), and one for a path no route matches records nothing.
//!
//! The record is written after the answer is made and before it is sent, in a task of its own, so
//! a client that hangs up then does not lose it. A ledger that cannot take it is logged with the
//! whole record: the action itself already happened.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::{
    RequestPartsExt,
    extract::{MatchedPath, RawPathParams, Request},
    response::Response,
};
use futures_util::future::Either;
use http::Method;
use tokio_util::task::TaskTracker;
use tower::{Layer, Service};

use super::{auth::Admin, facts::RequestFacts};
use ketchup_domain::{
    clock::SharedClock,
    ledger::{Audit, NewAdminAction},
};

/// Longest target recorded, in characters: path parameters are whatever the admin sent.
const MAX_TARGET: usize = 256;
/// Longest method recorded: HTTP lets a client name any method, of any length.
const MAX_METHOD: usize = 16;

/// Where admin actions are recorded, the clock that dates them, and the tracker shutdown waits
/// on, so a record being written is not cut off.
#[derive(Clone)]
pub struct AuditTrail {
    ledger: Arc<dyn Audit>,
    clock: SharedClock,
    background: TaskTracker,
}

impl AuditTrail {
    pub fn new(ledger: Arc<dyn Audit>, clock: SharedClock, background: TaskTracker) -> Self {
        AuditTrail {
            ledger,
            clock,
            background,
        }
    }
}

impl<S> Layer<S> for AuditTrail {
    type Service = Audited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Audited {
            trail: self.clone(),
            inner,
        }
    }
}

/// The layer's service: a request that is not an admin action goes on to `inner` as it is,
/// without a future of this layer's own.
#[derive(Clone)]
pub struct Audited<S> {
    trail: AuditTrail,
    inner: S,
}

type Recording = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S> Service<Request> for Audited<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, Recording>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let admin = request.extensions().get::<Admin>();
        let route = request.extensions().get::<MatchedPath>();
        let (Some(Admin(admin)), Some(route)) = (admin, route) else {
            return Either::Left(self.inner.call(request));
        };
        if matches!(*request.method(), Method::GET | Method::HEAD) {
            return Either::Left(self.inner.call(request));
        }
        let (admin, route) = (admin.clone(), route.clone());
        // The service that was made ready is the one called; its clone waits for the next.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        Either::Right(Box::pin(record(
            self.trail.clone(),
            admin,
            route,
            request,
            inner,
        )))
    }
}

/// Answers the admin's request through `inner`, then records it.
async fn record<S>(
    trail: AuditTrail,
    admin: Arc<str>,
    route: MatchedPath,
    request: Request,
    mut inner: S,
) -> Result<Response, Infallible>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let (mut parts, body) = request.into_parts();
    let target: String = match parts.extract::<RawPathParams>().await {
        Ok(params) => params
            .iter()
            .map(|(_, value)| value)
            .collect::<Vec<_>>()
            .join("/")
            .chars()
            .take(MAX_TARGET)
            .collect(),
        Err(_) => String::new(),
    };
    let method: String = parts.method.as_str().chars().take(MAX_METHOD).collect();
    let action = format!("{method} {}", route.as_str());
    let request_id = parts
        .extensions
        .get::<Arc<RequestFacts>>()
        .map_or_else(String::new, |facts| facts.request_id().as_str().to_owned());
    let response = inner.call(Request::from_parts(parts, body)).await?;
    let action = NewAdminAction {
        at: trail.clock.now(),
        admin: admin.to_string(),
        action,
        target,
        status: response.status().as_u16(),
        request_id,
    };
    let ledger = trail.ledger.clone();
    let written = trail.background.spawn(async move {
        if let Err(e) = ledger.record_admin_action(action.clone()).await {
            tracing::error!(
                error = %e,
                admin = %action.admin,
                action = %action.action,
                target = %action.target,
                status = action.status,
                "could not record an admin action in the audit trail"
            );
        }
    });
    let _ = written.await;
    Ok(response)
}
