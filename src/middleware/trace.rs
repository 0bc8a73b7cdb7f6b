//! One span per request, and one log line when it ends.
//!
//! The span carries the request id and route from the start; handlers fill in the team, the task
//! id and the time spent waiting on the upstream as they learn them, so the closing line has
//! everything an operator needs to follow one request. Headers are never recorded, so keys and
//! tokens cannot reach the log.

use std::time::Duration;

use axum::extract::MatchedPath;
use http::{Request, Response};
use tower_http::trace::{MakeSpan, OnResponse};
use tracing::{Span, field::Empty};

use super::{metrics::RequestFacts, request_id::RequestId};
use crate::error::ErrorKind;

#[derive(Debug, Clone, Copy)]
pub struct RequestSpan;

impl<B> MakeSpan<B> for RequestSpan {
    fn make_span(&mut self, request: &Request<B>) -> Span {
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", |p| p.as_str());
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .map_or("", |id| id.as_str());
        tracing::info_span!(
            "request",
            request_id,
            method = %request.method(),
            route,
            team = Empty,
            key = Empty,
            task_id = Empty,
            upstream_ms = Empty,
        )
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LogResponse;

impl<B> OnResponse<B> for LogResponse {
    fn on_response(self, response: &Response<B>, latency: Duration, span: &Span) {
        let status = response.status().as_u16();
        let error = response.extensions().get::<ErrorKind>().map(|k| k.0);
        let latency_ms = latency.as_secs_f64() * 1000.0;
        tracing::info!(parent: span, status, latency_ms, error, "request finished");
    }
}

/// Records how long the request waited on the upstream: in its span for the log line, and in
/// its facts for the overhead metric.
pub fn record_upstream_wait(facts: &RequestFacts, elapsed: Duration) {
    Span::current().record("upstream_ms", elapsed.as_secs_f64() * 1000.0);
    facts.add_upstream_wait(elapsed);
}
