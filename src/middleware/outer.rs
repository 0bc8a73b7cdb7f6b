//! What every request gets around its handling, in one layer: the headers that carry keys and
//! tokens marked sensitive (no later layer or log line ever shows it), its id (`request_id`), the request its
//! lines are logged for (`logging::InRequest`; a span in the human format) and its closing log
//! line (`trace`), its metrics (`request_metrics`), a panic answered 500 in the
//! envelope instead of a dropped connection, and the request timeout (until the answer's head;
//! the handler's spawned upstream work is not cut short, so the ledger still records what the
//! upstream accepted, and a text answer's body streams on after it, bounded between chunks by
//! `routes::text`).
//!
//! One layer rather than a stack of one per concern: each generic layer (axum's `from_fn`,
//! tower-http's trace and panic layers, the timeout and its error handler) clones the services
//! below it and boxes its own future on every request, and together those cost as much CPU as
//! the HTTP stack itself. Here a request costs one boxed future.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::{
    extract::{MatchedPath, Request},
    response::{IntoResponse, Response},
};
use futures_util::FutureExt;
use http::header;
use tower::{Layer, Service};
use tracing::Instrument;

use super::{facts::RequestFacts, request_id, request_metrics::RequestMetrics, trace};
use crate::{error::GatewayError, headers, logging};

/// The headers a team key or token may come in, hidden from every later layer and log line.
const SECRET_HEADERS: [header::HeaderName; 3] = [
    header::AUTHORIZATION,
    headers::ANTHROPIC_API_KEY,
    headers::GOOGLE_API_KEY,
];

/// The layer, with what it records into and the request timeout.
#[derive(Clone)]
pub struct Outer {
    shared: Arc<Shared>,
}

struct Shared {
    metrics: RequestMetrics,
    request_timeout: Duration,
}

impl Outer {
    pub fn new(metrics: RequestMetrics, request_timeout: Duration) -> Self {
        Outer {
            shared: Arc::new(Shared {
                metrics,
                request_timeout,
            }),
        }
    }
}

impl<S> Layer<S> for Outer {
    type Service = OuterService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OuterService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct OuterService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Request> for OuterService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        for name in SECRET_HEADERS {
            if let header::Entry::Occupied(mut entry) = request.headers_mut().entry(name) {
                entry.iter_mut().for_each(|value| value.set_sensitive(true));
            }
        }
        let (id, id_header) = request_id::assign(&request);
        let route = request.extensions().get::<MatchedPath>().cloned();
        let facts = Arc::new(RequestFacts::new(id, request.method().clone(), route));
        let span = trace::span(&facts);
        request.extensions_mut().insert(facts.clone());
        // The service that was made ready is the one called; its clone waits for the next.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let shared = self.shared.clone();
        let request_facts: logging::LoggedRequest = facts.clone();
        let handled = async move {
            let timeout = shared.request_timeout;
            let answer = AssertUnwindSafe(async move { inner.call(request).await }).catch_unwind();
            let mut response = match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(Ok(response))) => response,
                Ok(Ok(Err(never))) => match never {},
                Ok(Err(_panic)) => {
                    GatewayError::Internal("a handler panicked".into()).into_response()
                }
                Err(_elapsed) => GatewayError::RequestTimeout(timeout).into_response(),
            };
            let elapsed = started.elapsed();
            shared.metrics.record(&facts, response.status(), elapsed);
            response
                .headers_mut()
                .insert(headers::REQUEST_ID, id_header);
            trace::log_response(&response, &facts, elapsed);
            Ok(response)
        };
        Box::pin(logging::InRequest::new(request_facts, handled).instrument(span))
    }
}
