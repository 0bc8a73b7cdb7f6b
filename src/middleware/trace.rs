//! One span per request, and one log line when it ends.
//!
//! The span carries the request id, method and route, so every line logged while serving the
//! request can be traced to it. The closing line is flat: it carries those three itself, plus
//! what layers and handlers learned on the way ([`RequestFacts`]: the team, the key's label, the
//! task id, the time spent waiting on the upstream), so that one line has everything an operator
//! needs to follow one request. Headers are never recorded, so keys and tokens cannot reach the
//! log.

use std::{sync::Arc, time::Duration};

use http::{Request, Response};
use tower_http::trace::{MakeSpan, OnResponse};
use tracing::Span;

use super::{
    metrics::{RequestFacts, route_of},
    request_id::RequestId,
};
use crate::error::ErrorKind;

#[derive(Debug, Clone, Copy)]
pub struct RequestSpan;

impl<B> MakeSpan<B> for RequestSpan {
    fn make_span(&mut self, request: &Request<B>) -> Span {
        let route = route_of(request.extensions());
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
    fn on_response(self, response: &Response<B>, latency: Duration, _: &Span) {
        let status = response.status().as_u16();
        let error = response.extensions().get::<ErrorKind>().map(|k| k.0);
        let latency_ms = millis(latency);
        let facts = response.extensions().get::<Arc<RequestFacts>>();
        let facts = facts.map(|facts| &**facts);
        // A root event carrying the span's fields itself: the JSON format would otherwise parse
        // the span's stored fields back and write them again, for the one line every request
        // has.
        tracing::info!(
            parent: None,
            request_id = facts.and_then(RequestFacts::request_id),
            method = facts.map(RequestFacts::method),
            route = facts.map(RequestFacts::route),
            status,
            latency_ms,
            error,
            team = facts.and_then(RequestFacts::team),
            key = facts.and_then(RequestFacts::key),
            task_id = facts.and_then(RequestFacts::task_id),
            upstream_ms = facts.and_then(RequestFacts::upstream_wait).map(millis),
            "request finished"
        );
    }
}

/// Milliseconds to the microsecond, so the line shows `1.259321`, not `1.2593210000000001`.
fn millis(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}
