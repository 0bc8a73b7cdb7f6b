//! The one error type of the gateway and its one mapping to HTTP.
//!
//! Every error a client sees uses the upstream's envelope `{"code":1,"message":…,"detail":…}`, so
//! clients written against the upstream parse gateway errors the same way.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("Invalid API key")]
    InvalidApiKey,
    /// A request the upstream would refuse too; the detail says which field and why.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("task not found")]
    TaskNotFound,
    /// A callback URL whose token the gateway never issued.
    #[error("callback not found")]
    UnknownCallback,
    /// A callback for a task whose creation the gateway has not finished recording; the upstream
    /// should retry it shortly.
    #[error("the task of this callback is not recorded yet")]
    CallbackTooEarly,
    #[error("no such endpoint: {method} {path}")]
    NoSuchRoute { method: String, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("{0}")]
    BudgetExhausted(String),
    #[error("{0}")]
    TooManyInFlight(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{}", .0.detail)]
    RateLimited(crate::rate_limit::Refusal),
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream did not answer in time: {0}")]
    UpstreamTimeout(String),
    #[error("upstream answered in an unexpected way: {0}")]
    UpstreamBadResponse(String),
    #[error("the ledger is unavailable: {0}")]
    LedgerUnavailable(String),
    /// The upstream accepted a generation, but the ledger could not record the task as the
    /// team's yet; the gateway keeps trying, and the client gets the task id to poll later.
    #[error(
        "the upstream accepted task {0}, but the ledger could not record it yet; it becomes your \
         team's as soon as the ledger is back: poll it then rather than start another"
    )]
    TaskNotRecorded(String),
    /// The replicas' shared rate limits cannot be consulted, and the configuration refuses
    /// rather than let each replica count alone.
    #[error("the shared rate limits are unavailable: {0}")]
    LimiterUnavailable(String),
    #[error("the request took longer than {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::rate_limit::Refused> for GatewayError {
    fn from(refused: crate::rate_limit::Refused) -> Self {
        match refused {
            crate::rate_limit::Refused::Limited(refusal) => GatewayError::RateLimited(refusal),
            crate::rate_limit::Refused::Unavailable(why) => GatewayError::LimiterUnavailable(why),
        }
    }
}

/// The upstream's error envelope.
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    pub code: i32,
    pub message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidApiKey => StatusCode::UNAUTHORIZED,
            GatewayError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::TaskNotFound
            | GatewayError::UnknownCallback
            | GatewayError::NoSuchRoute { .. } => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::BudgetExhausted(_) => StatusCode::PAYMENT_REQUIRED,
            GatewayError::TooManyInFlight(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Conflict(_) => StatusCode::CONFLICT,
            GatewayError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::UpstreamUnreachable(_) | GatewayError::UpstreamBadResponse(_) => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout(_) | GatewayError::RequestTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            GatewayError::LedgerUnavailable(_)
            | GatewayError::TaskNotRecorded(_)
            | GatewayError::LimiterUnavailable(_)
            | GatewayError::CallbackTooEarly => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn envelope(&self) -> Envelope<'static> {
        let (message, detail) = match self {
            // The upstream's own bodies, word for word: clients already handle them.
            GatewayError::InvalidApiKey => ("Invalid API key", None),
            GatewayError::TaskNotFound => ("task not found", None),
            GatewayError::UnknownCallback => ("callback not found", None),
            GatewayError::CallbackTooEarly => ("retry later", Some(self.to_string())),
            GatewayError::InvalidRequest(detail) => ("failed", Some(detail.clone())),
            GatewayError::NoSuchRoute { .. } => ("not found", Some(self.to_string())),
            GatewayError::MethodNotAllowed { .. } => ("method not allowed", Some(self.to_string())),
            GatewayError::BudgetExhausted(detail) => ("budget exhausted", Some(detail.clone())),
            GatewayError::TooManyInFlight(detail) => {
                ("too many tasks in flight", Some(detail.clone()))
            }
            GatewayError::Conflict(detail) => ("conflict", Some(detail.clone())),
            GatewayError::RateLimited(refusal) => ("rate limited", Some(refusal.detail.clone())),
            GatewayError::PayloadTooLarge { .. } => ("payload too large", Some(self.to_string())),
            GatewayError::UpstreamUnreachable(_) => {
                ("upstream unavailable", Some(self.to_string()))
            }
            GatewayError::UpstreamTimeout(_) => ("upstream timeout", Some(self.to_string())),
            GatewayError::UpstreamBadResponse(_) => {
                ("bad upstream response", Some(self.to_string()))
            }
            GatewayError::LedgerUnavailable(_) => ("ledger unavailable", None),
            GatewayError::TaskNotRecorded(_) => ("ledger unavailable", Some(self.to_string())),
            // The same Redis holds the replicas' ledger and limits: one outage, one message.
            GatewayError::LimiterUnavailable(_) => (
                "ledger unavailable",
                Some("the rate limits shared by the gateway's replicas cannot be checked".into()),
            ),
            GatewayError::RequestTimeout(_) => ("request timeout", Some(self.to_string())),
            // Internal details go to the log, not to the client.
            GatewayError::Internal(_) => ("internal error", None),
        };
        Envelope {
            code: 1,
            message,
            detail,
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let body = serde_json::to_vec(&self.envelope()).expect("envelope serialises");
        let mut response = (status, body).into_response();
        match &self {
            GatewayError::RateLimited(refusal) => {
                refusal.verdict.write_headers(response.headers_mut());
            }
            GatewayError::CallbackTooEarly => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // The rest of the body is left unread on the socket, so the connection cannot carry
            // another request; saying so keeps a client from reusing it and failing its next call.
            GatewayError::PayloadTooLarge { .. } => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response.extensions_mut().insert(ErrorKind(self.kind()));
        response
    }
}

/// A short, bounded name of what went wrong, attached to error responses for logs.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind(pub &'static str);

impl GatewayError {
    fn kind(&self) -> &'static str {
        match self {
            GatewayError::InvalidApiKey => "invalid_api_key",
            GatewayError::InvalidRequest(_) => "invalid_request",
            GatewayError::TaskNotFound => "task_not_found",
            GatewayError::UnknownCallback => "unknown_callback",
            GatewayError::CallbackTooEarly => "callback_too_early",
            GatewayError::NoSuchRoute { .. } => "no_such_route",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::BudgetExhausted(_) => "budget_exhausted",
            GatewayError::TooManyInFlight(_) => "too_many_in_flight",
            GatewayError::Conflict(_) => "conflict",
            GatewayError::RateLimited(_) => "rate_limited",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::UpstreamUnreachable(_) => "upstream_unreachable",
            GatewayError::UpstreamTimeout(_) => "upstream_timeout",
            GatewayError::UpstreamBadResponse(_) => "upstream_bad_response",
            GatewayError::LedgerUnavailable(_) => "ledger_unavailable",
            GatewayError::TaskNotRecorded(_) => "task_not_recorded",
            GatewayError::LimiterUnavailable(_) => "limiter_unavailable",
            GatewayError::RequestTimeout(_) => "request_timeout",
            GatewayError::Internal(_) => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(error: GatewayError) -> (StatusCode, String) {
        let status = error.status();
        (status, serde_json::to_string(&error.envelope()).unwrap())
    }

    #[test]
    fn upstream_bodies_are_reproduced_exactly() {
        assert_eq!(
            body_of(GatewayError::InvalidApiKey),
            (
                StatusCode::UNAUTHORIZED,
                r#"{"code":1,"message":"Invalid API key"}"#.into()
            )
        );
        assert_eq!(
            body_of(GatewayError::TaskNotFound),
            (
                StatusCode::NOT_FOUND,
                r#"{"code":1,"message":"task not found"}"#.into()
            )
        );
        assert_eq!(
            body_of(GatewayError::InvalidRequest("prompt is required".into())),
            (
                StatusCode::BAD_REQUEST,
                r#"{"code":1,"message":"failed","detail":"prompt is required"}"#.into()
            )
        );
    }

    #[test]
    fn internal_details_stay_in_the_log() {
        let (status, body) = body_of(GatewayError::Internal("disk I/O error at /secret".into()));
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body, r#"{"code":1,"message":"internal error"}"#);
    }
}
