//! The one error type of the gateway and its one mapping to HTTP.
//!
//! Every error a client sees uses the upstream's envelope `{"code":1,"message":…,"detail":…}`, so
//! clients written against the upstream parse gateway errors the same way.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use ketchup_domain::ledger::StoreError;
use serde::Serialize;

use crate::rate_limiter::{Refusal, Refused};
use crate::upstream::UpstreamError;

/// Clone, because a status read shared by coalesced readers hands each of them its outcome.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("Invalid API key")]
    InvalidApiKey,
    /// A request the upstream would refuse too; the detail says which field and why.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A text request the gateway refuses (its model not priced, its body unreadable), answered
    /// in its dialect's own error shape, which that dialect's clients parse.
    #[error("invalid request: {1}")]
    InvalidTextRequest(ErrorShape, String),
    #[error("task not found")]
    TaskNotFound,
    /// A callback URL whose token the gateway never issued.
    #[error("callback not found")]
    UnknownCallback,
    /// A callback for a task whose creation the gateway has not finished recording; the upstream
    /// should retry it shortly.
    #[error("the task of this callback is not recorded yet")]
    CallbackTooEarly,
    /// A callback the upstream's own status read could not confirm now: the task is not final
    /// there yet, or the read failed. The detail says which; the upstream should retry it.
    #[error("{0}")]
    CallbackUnconfirmed(String),
    /// A callback whose claim the upstream's own status read contradicts.
    #[error(
        "the upstream's own status of this task does not agree with this callback; nothing was \
         changed"
    )]
    CallbackContradicted,
    #[error("no such endpoint: {method} {path}")]
    NoSuchRoute { method: String, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// A model outside the team's `models` allow-list; the detail lists what it may use.
    #[error("{0}")]
    ModelNotAllowed(String),
    #[error("{0}")]
    BudgetExhausted(String),
    #[error("{0}")]
    TooManyInFlight(String),
    /// A repeat of an Idempotency-Key's request while that request still waits on the upstream.
    #[error(
        "a request with this Idempotency-Key is still waiting for the upstream; send it again \
         later for its answer"
    )]
    IdempotencyKeyInUse,
    /// An Idempotency-Key sent again with another route or body.
    #[error(
        "this Idempotency-Key was used for another request (another route or body); use a new \
         key for a new request"
    )]
    IdempotencyKeyReused,
    #[error("{}", .0.detail)]
    RateLimited(Refusal),
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// No usable answer from the upstream: none at all, or none in time.
    #[error("{}", describe_upstream(.0))]
    Upstream(#[from] UpstreamError),
    #[error("upstream answered in an unexpected way: {0}")]
    UpstreamBadResponse(String),
    /// Every upstream account is out of rotation (its token refused, or its credit at the
    /// floor): nothing was sent.
    #[error(
        "no upstream account can take this request now: every account's token was refused or \
         its credit is at the floor; nothing was sent or charged, retry later"
    )]
    NoUpstreamAccount,
    /// The upstream refuses the token of the account that started the task, the only one that
    /// can read it: not the team's key.
    #[error(
        "the upstream refuses the token of the upstream account that started this task, the \
         only one that can read it; retry once the account's token is replaced"
    )]
    TaskAccountRefused,
    /// The ledger could not be used (an outage), or refused the operation (a conflict).
    #[error(transparent)]
    Ledger(#[from] StoreError),
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

fn describe_upstream(error: &UpstreamError) -> String {
    match error {
        UpstreamError::Timeout(_) => format!("upstream did not answer in time: {error}"),
        UpstreamError::Connect(_) | UpstreamError::Broken(_) => {
            format!("upstream unreachable: {error}")
        }
    }
}

impl From<Refused> for GatewayError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Limited(refusal) => GatewayError::RateLimited(refusal),
            Refused::Unavailable(why) => GatewayError::LimiterUnavailable(why),
        }
    }
}

/// The error bodies of the text dialects, for the errors the gateway makes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// `{"error":{"message","type","param","code"}}`
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`
    Anthropic,
    /// `{"error":{"code","message","status"}}`
    Gemini,
}

impl ErrorShape {
    /// A 400's body in this shape.
    fn invalid_request(self, detail: &str) -> serde_json::Value {
        use serde_json::json;
        match self {
            ErrorShape::OpenAi => json!({"error": {
                "message": detail, "type": "invalid_request_error", "param": null, "code": null,
            }}),
            ErrorShape::Anthropic => json!({"type": "error", "error": {
                "type": "invalid_request_error", "message": detail,
            }}),
            ErrorShape::Gemini => json!({"error": {
                "code": 400, "message": detail, "status": "INVALID_ARGUMENT",
            }}),
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

/// How an error is answered: its status, a short bounded name for logs, and the envelope's
/// message and detail.
struct Answer {
    status: StatusCode,
    kind: &'static str,
    message: &'static str,
    detail: Option<String>,
}

impl GatewayError {
    /// The one mapping of every error to what the client sees.
    fn answer(&self) -> Answer {
        let answer = |status, kind, message, detail| Answer {
            status,
            kind,
            message,
            detail,
        };
        let said = || Some(self.to_string());
        use StatusCode as S;
        match self {
            // The upstream's own bodies, word for word: clients already handle them.
            GatewayError::InvalidApiKey => {
                answer(S::UNAUTHORIZED, "invalid_api_key", "Invalid API key", None)
            }
            GatewayError::TaskNotFound => {
                answer(S::NOT_FOUND, "task_not_found", "task not found", None)
            }
            GatewayError::InvalidRequest(detail) | GatewayError::InvalidTextRequest(_, detail) => {
                answer(
                    S::BAD_REQUEST,
                    "invalid_request",
                    "failed",
                    Some(detail.clone()),
                )
            }
            GatewayError::UnknownCallback => {
                answer(S::NOT_FOUND, "unknown_callback", "callback not found", None)
            }
            GatewayError::CallbackTooEarly => answer(
                S::SERVICE_UNAVAILABLE,
                "callback_too_early",
                "retry later",
                said(),
            ),
            GatewayError::CallbackUnconfirmed(_) => answer(
                S::SERVICE_UNAVAILABLE,
                "callback_unconfirmed",
                "retry later",
                said(),
            ),
            GatewayError::CallbackContradicted => answer(
                S::CONFLICT,
                "callback_contradicted",
                "callback contradicted",
                said(),
            ),
            GatewayError::NoSuchRoute { .. } => {
                answer(S::NOT_FOUND, "no_such_route", "not found", said())
            }
            GatewayError::MethodNotAllowed { .. } => answer(
                S::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed",
                said(),
            ),
            GatewayError::ModelNotAllowed(detail) => answer(
                S::FORBIDDEN,
                "model_not_allowed",
                "model not allowed",
                Some(detail.clone()),
            ),
            GatewayError::BudgetExhausted(detail) => answer(
                S::PAYMENT_REQUIRED,
                "budget_exhausted",
                "budget exhausted",
                Some(detail.clone()),
            ),
            GatewayError::TooManyInFlight(detail) => answer(
                S::TOO_MANY_REQUESTS,
                "too_many_in_flight",
                "too many tasks in flight",
                Some(detail.clone()),
            ),
            // The draft's statuses: 409 while the first request runs, 422 for another request.
            GatewayError::IdempotencyKeyInUse => answer(
                S::CONFLICT,
                "idempotency_key_in_use",
                "request in progress",
                said(),
            ),
            GatewayError::IdempotencyKeyReused => answer(
                S::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "idempotency key reused",
                said(),
            ),
            GatewayError::RateLimited(refusal) => answer(
                S::TOO_MANY_REQUESTS,
                "rate_limited",
                "rate limited",
                Some(refusal.detail.clone()),
            ),
            GatewayError::PayloadTooLarge { .. } => answer(
                S::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "payload too large",
                said(),
            ),
            GatewayError::Upstream(UpstreamError::Timeout(_)) => answer(
                S::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "upstream timeout",
                said(),
            ),
            GatewayError::Upstream(_) => answer(
                S::BAD_GATEWAY,
                "upstream_unreachable",
                "upstream unavailable",
                said(),
            ),
            GatewayError::UpstreamBadResponse(_) => answer(
                S::BAD_GATEWAY,
                "upstream_bad_response",
                "bad upstream response",
                said(),
            ),
            GatewayError::TaskAccountRefused => answer(
                S::SERVICE_UNAVAILABLE,
                "task_account_refused",
                "upstream account unavailable",
                said(),
            ),
            GatewayError::NoUpstreamAccount => answer(
                S::SERVICE_UNAVAILABLE,
                "no_upstream_account",
                "upstream account unavailable",
                said(),
            ),
            // A refusal is the ledger working as meant (the operation does not apply), not an
            // outage: the client learns why.
            GatewayError::Ledger(StoreError::Conflict(detail)) => {
                answer(S::CONFLICT, "conflict", "conflict", Some(detail.clone()))
            }
            // What failed inside the store stays in the log.
            GatewayError::Ledger(_) => answer(
                S::SERVICE_UNAVAILABLE,
                "ledger_unavailable",
                "ledger unavailable",
                None,
            ),
            GatewayError::TaskNotRecorded(_) => answer(
                S::SERVICE_UNAVAILABLE,
                "task_not_recorded",
                "ledger unavailable",
                said(),
            ),
            // The same Redis holds the replicas' ledger and limits: one outage, one message.
            GatewayError::LimiterUnavailable(_) => answer(
                S::SERVICE_UNAVAILABLE,
                "limiter_unavailable",
                "ledger unavailable",
                Some("the rate limits shared by the gateway's replicas cannot be checked".into()),
            ),
            GatewayError::RequestTimeout(_) => answer(
                S::GATEWAY_TIMEOUT,
                "request_timeout",
                "request timeout",
                said(),
            ),
            // Internal details go to the log, not to the client.
            GatewayError::Internal(_) => {
                answer(S::INTERNAL_SERVER_ERROR, "internal", "internal error", None)
            }
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let Answer {
            status,
            kind,
            message,
            detail,
        } = self.answer();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let body = match (&self, &detail) {
            (GatewayError::InvalidTextRequest(shape, _), Some(detail)) => {
                shape.invalid_request(detail).to_string().into_bytes()
            }
            _ => serde_json::to_vec(&Envelope {
                code: 1,
                message,
                detail,
            })
            .expect("envelope serialises"),
        };
        let mut response = (status, body).into_response();
        match &self {
            GatewayError::RateLimited(refusal) => {
                refusal.verdict.write_headers(response.headers_mut());
            }
            GatewayError::CallbackTooEarly
            | GatewayError::CallbackUnconfirmed(_)
            | GatewayError::IdempotencyKeyInUse => {
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
        response.extensions_mut().insert(ErrorKind(kind));
        response
    }
}

/// A short, bounded name of what went wrong, attached to error responses for logs.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(error: GatewayError) -> (StatusCode, String) {
        let Answer {
            status,
            message,
            detail,
            ..
        } = error.answer();
        let envelope = Envelope {
            code: 1,
            message,
            detail,
        };
        (status, serde_json::to_string(&envelope).unwrap())
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
    fn a_refused_text_request_speaks_its_dialect() {
        let body = |shape| {
            let response =
                GatewayError::InvalidTextRequest(shape, "model \"x\" is not offered".into())
                    .into_response();
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
            let bytes = futures_body(response);
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
        };
        assert_eq!(
            body(ErrorShape::OpenAi)["error"]["message"],
            "model \"x\" is not offered"
        );
        assert_eq!(body(ErrorShape::Anthropic)["type"], "error");
        assert_eq!(
            body(ErrorShape::Anthropic)["error"]["type"],
            "invalid_request_error"
        );
        assert_eq!(
            body(ErrorShape::Gemini)["error"]["status"],
            "INVALID_ARGUMENT"
        );
    }

    /// The whole body of an answer made in memory.
    fn futures_body(response: Response) -> bytes::Bytes {
        let body = response.into_body();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(axum::body::to_bytes(body, 1 << 16))
            .unwrap()
    }

    #[test]
    fn a_ledger_conflict_is_no_outage() {
        let conflict = GatewayError::from(StoreError::Conflict("not unknown_outcome".into()));
        assert_eq!(
            body_of(conflict),
            (
                StatusCode::CONFLICT,
                r#"{"code":1,"message":"conflict","detail":"not unknown_outcome"}"#.into()
            )
        );
        let outage = GatewayError::from(StoreError::Unavailable("connection refused".into()));
        assert_eq!(
            body_of(outage),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"code":1,"message":"ledger unavailable"}"#.into()
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
