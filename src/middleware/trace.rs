//! The request's span, and its one log line when it ends.
//!
//! Every line logged while serving a request names it (its id, method and route): in the JSON
//! format from [`logging::InRequest`], in the human format from a span this makes. The closing
//! line is flat: it carries those three itself, plus what layers and handlers learned on the way
//! ([`RequestFacts`]: the team, the key's label, the task id, the time spent waiting on the
//! upstream), so that one line has everything an operator needs to follow one request. Headers
//! are never recorded, so keys and tokens cannot reach the log.

use std::time::Duration;

use http::Response;
use tracing::Span;

use super::facts::RequestFacts;
use crate::{error::ErrorKind, logging};

/// The request's span in the human format: its id, method and route as the prefix of every
/// line logged while it is served. None in the JSON format, whose lines name the request from
/// [`logging::InRequest`] at a fraction of a span's cost.
pub fn span(facts: &RequestFacts) -> Span {
    if logging::json_lines() {
        return Span::none();
    }
    tracing::info_span!(
        "request",
        request_id = facts.request_id().as_str(),
        method = facts.method(),
        route = facts.route(),
    )
}

/// The closing line's target, as a `tracing` event here gets, and its message.
const TARGET: &str = module_path!();
const MESSAGE: &str = "request finished";

/// Writes the request's closing line, if the log level takes it.
pub fn log_response<B>(response: &Response<B>, facts: &RequestFacts, latency: Duration) {
    if !tracing::enabled!(tracing::Level::INFO) {
        return;
    }
    let line = RequestLine {
        request_id: Some(facts.request_id().as_str()),
        method: Some(facts.method()),
        route: Some(facts.route()),
        status: response.status().as_u16(),
        latency_ms: millis(latency),
        error: response.extensions().get::<ErrorKind>().map(|k| k.0),
        team: facts.team(),
        key: facts.key(),
        task_id: facts.task_id(),
        upstream_ms: facts.upstream_wait().map(millis),
    };
    if logging::json_lines() {
        logging::write_json_line(tracing::Level::INFO, TARGET, MESSAGE, &line);
    } else {
        log_event(&line);
    }
}

/// The line as a `tracing` event: a root event carrying the span's fields itself.
fn log_event(line: &RequestLine) {
    tracing::info!(
        parent: None,
        request_id = line.request_id,
        method = line.method,
        route = line.route,
        status = line.status,
        latency_ms = line.latency_ms,
        error = line.error,
        team = line.team,
        key = line.key,
        task_id = line.task_id,
        upstream_ms = line.upstream_ms,
        "{MESSAGE}"
    );
}

/// The closing line's fields. In the JSON format they are written as they are (see
/// [`logging::write_json_line`]): the members the same `tracing` event gets there, in the same
/// order, absent ones left out.
struct RequestLine<'a> {
    request_id: Option<&'a str>,
    method: Option<&'a str>,
    route: Option<&'a str>,
    status: u16,
    latency_ms: f64,
    error: Option<&'static str>,
    team: Option<&'a str>,
    key: Option<&'a str>,
    task_id: Option<&'a str>,
    upstream_ms: Option<f64>,
}

impl logging::JsonMembers for RequestLine<'_> {
    fn write_members(&self, members: &mut logging::Members<'_>) {
        members.str("request_id", self.request_id);
        members.str("method", self.method);
        members.str("route", self.route);
        members.value("status", Some(self.status));
        members.value("latency_ms", Some(self.latency_ms));
        members.str("error", self.error);
        members.str("team", self.team);
        members.str("key", self.key);
        members.str("task_id", self.task_id);
        members.value("upstream_ms", self.upstream_ms);
    }
}

/// Milliseconds to the microsecond, so the line shows `1.259321`, not `1.2593210000000001`.
fn millis(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_line_is_the_line_the_event_would_give() {
        let lines = [
            RequestLine {
                request_id: Some("r-1"),
                method: Some("GET"),
                route: Some("/api/task/query"),
                status: 200,
                latency_ms: 1.25,
                error: None,
                team: Some("design \"blue\""),
                key: Some("prod"),
                task_id: Some("ta1"),
                upstream_ms: Some(0.5),
            },
            RequestLine {
                request_id: None,
                method: None,
                route: None,
                status: 401,
                latency_ms: 0.004,
                error: Some("invalid_api_key"),
                team: None,
                key: None,
                task_id: None,
                upstream_ms: None,
            },
        ];
        for line in &lines {
            let direct = logging::json_line(tracing::Level::INFO, TARGET, MESSAGE, line);
            let mut direct: serde_json::Value = serde_json::from_slice(&direct).unwrap();
            let mut event = logging::tests::logged(|| log_event(line)).remove(0);
            let [direct_stamp, event_stamp] = [&mut direct, &mut event].map(|json| {
                let stamp = json.as_object_mut().unwrap().remove("timestamp").unwrap();
                let stamp = stamp.as_str().unwrap().to_owned();
                assert!(stamp.ends_with('Z'), "{stamp}");
                chrono::DateTime::parse_from_rfc3339(&stamp).unwrap();
                stamp
            });
            // Both to the microsecond, in UTC.
            assert_eq!(
                direct_stamp.len(),
                event_stamp.len(),
                "{direct_stamp} {event_stamp}"
            );
            assert_eq!(direct, event);
        }
    }
}
