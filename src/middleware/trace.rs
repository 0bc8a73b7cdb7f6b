//! One span per request, and one log line when it ends.
//!
//! The span carries the request id, method and route, so every line logged while serving the
//! request can be traced to it. The closing line adds what layers and handlers learned on the
//! way ([`RequestFacts`]: the team, the key's label, the task id, the time spent waiting on the
//! upstream), so that one line has everything an operator needs to follow one request. Headers
//! are never recorded, so keys and tokens cannot reach the log.

use std::{sync::Arc, time::Duration};

use axum::extract::MatchedPath;
use http::{Request, Response};
use tower_http::trace::{MakeSpan, OnResponse};
use tracing::Span;

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
        let facts = response.extensions().get::<Arc<RequestFacts>>();
        let facts = facts.map(|facts| &**facts);
        tracing::info!(
            parent: span,
            status,
            latency_ms,
            error,
            team = facts.and_then(RequestFacts::team),
            key = facts.and_then(RequestFacts::key),
            task_id = facts.and_then(RequestFacts::task_id),
            upstream_ms = facts
                .and_then(RequestFacts::upstream_wait)
                .map(|wait| wait.as_secs_f64() * 1000.0),
            "request finished"
        );
    }
}
