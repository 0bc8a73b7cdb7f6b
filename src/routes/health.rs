//! Probes for orchestrators: no key needed.

use std::sync::Arc;

use axum::{extract::State, response::Response};
use http::StatusCode;
use serde_json::json;

use super::json;
use crate::{error::GatewayError, state::AppState};

/// The process is alive and serving.
pub async fn live() -> Response {
    json(StatusCode::OK, &json!({"status": "ok"}))
}

/// The gateway can do its work: the ledger answers.
pub async fn ready(State(state): State<Arc<AppState>>) -> Result<Response, GatewayError> {
    state.ledger.ping().await?;
    Ok(json(StatusCode::OK, &json!({"status": "ready"})))
}
