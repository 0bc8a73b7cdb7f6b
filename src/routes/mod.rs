//! Request handlers, one file per endpoint family, and what they share.

use axum::{
    body::Body,
    extract::Request,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

use crate::{error::GatewayError, state::AppState, upstream::UpstreamResponse};
use ketchup_domain::config::Team;

pub mod admin;
pub mod budget;
pub mod calibration;
pub mod callbacks;
mod failover;
pub mod generate;
pub mod health;
mod idempotent;
pub mod openapi;
pub mod scrape;
pub mod task_query;
pub mod text;

/// Refuses a model outside the team's `models` allow-list before anything is reserved or sent,
/// counted as a budget rejection. Generations and text requests alike.
pub fn check_model_allowed(state: &AppState, team: &Team, model: &str) -> Result<(), GatewayError> {
    let Some(allowed) = team.models.as_ref().filter(|list| !list.allows(model)) else {
        return Ok(());
    };
    state
        .metrics
        .budget_rejections
        .with_label_values(&[&team.name, "model_not_allowed"])
        .inc();
    Err(GatewayError::ModelNotAllowed(format!(
        "team '{}' may use {}",
        team.name,
        allowed.patterns().join(", ")
    )))
}

/// Reads a request body, refusing it as soon as it passes `limit` bytes, and before reading
/// any of it when its declared `Content-Length` (the body's exact size hint) is already over.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    if axum::body::HttpBody::size_hint(&body).lower() > limit as u64 {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|cause| cause.is::<http_body_util::LengthLimitError>());
        if too_large {
            GatewayError::PayloadTooLarge { limit }
        } else {
            GatewayError::InvalidRequest(format!("could not read the request body: {e}"))
        }
    })
}

/// The upstream's answer, as it came: status, content type and body, unknown fields included.
pub fn pass_through(upstream: UpstreamResponse) -> Response {
    let content_type = upstream
        .content_type
        .unwrap_or(HeaderValue::from_static("application/json"));
    let mut response = (upstream.status, upstream.body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

/// A JSON body the gateway writes itself.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut response = (status, value.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub async fn no_such_route(request: Request) -> GatewayError {
    GatewayError::NoSuchRoute {
        method: request.method().to_string(),
        path: request.uri().path().chars().take(200).collect(),
    }
}

pub async fn no_such_method(request: Request) -> GatewayError {
    GatewayError::MethodNotAllowed {
        method: request.method().to_string(),
        path: request.uri().path().chars().take(200).collect(),
    }
}
