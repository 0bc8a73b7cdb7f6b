//! `GET /api/task/query?task_id=…`: answered only for the caller's own tasks.

use std::sync::Arc;

use axum::{
    extract::{Extension, RawQuery, State},
    response::Response,
};
use http::StatusCode;
use serde_json::json;

use super::{json, pass_through};
use crate::{
    app::AppState,
    error::GatewayError,
    middleware::{auth::Caller, request_id::RequestId, trace::record_upstream_wait},
    settlement,
    upstream::UpstreamError,
};

/// Longest task id looked up; anything longer cannot be one of ours.
const MAX_TASK_ID_LEN: usize = 256;

fn task_id_of(query: Option<&str>) -> Result<String, GatewayError> {
    let task_id = query
        .into_iter()
        .flat_map(|q| url::form_urlencoded::parse(q.as_bytes()))
        .find(|(key, _)| key == "task_id")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    if task_id.is_empty() {
        return Err(GatewayError::InvalidRequest("task_id is required".into()));
    }
    Ok(task_id)
}

pub async fn query(
    State(state): State<Arc<AppState>>,
    Extension(Caller(team)): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    RawQuery(query): RawQuery,
) -> Result<Response, GatewayError> {
    let task_id = task_id_of(query.as_deref())?;
    if task_id.len() > MAX_TASK_ID_LEN {
        return Err(GatewayError::TaskNotFound);
    }
    tracing::Span::current().record("task_id", task_id.as_str());

    // Another team's task and a task that does not exist get the same answer: nothing tells a
    // team that an id it guessed belongs to someone.
    let task = state
        .ledger
        .task(&task_id)
        .await
        .map_err(|e| GatewayError::LedgerUnavailable(e.to_string()))?
        .filter(|task| task.team == team.name)
        .ok_or(GatewayError::TaskNotFound)?;

    let upstream = state
        .upstream
        .query_task(&task_id, request_id.as_str())
        .await
        .map_err(|e| match e {
            UpstreamError::Timeout(_) => GatewayError::UpstreamTimeout(e.to_string()),
            UpstreamError::Connect(_) | UpstreamError::Broken(_) => {
                GatewayError::UpstreamUnreachable(e.to_string())
            }
        })?;
    record_upstream_wait(upstream.elapsed);

    // A task the upstream accepted moments ago can briefly be unknown to its query endpoint.
    // The gateway knows it created the task, so it answers "pending" instead of a 404 that
    // clients would have to retry around.
    let grace = state.config.load().upstream.new_task_grace;
    let age = state.clock.now() - task.created_at;
    let young = age.to_std().map_or(true, |age| age < grace);
    if upstream.status == StatusCode::NOT_FOUND && young {
        return Ok(json(
            StatusCode::OK,
            &json!({
                "code": 0,
                "message": "ok",
                "data": {
                    "result": null,
                    "status": "pending",
                    "task_id": task_id,
                    "created_at": task.created_at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
                    "status_reason": {"message": null},
                },
            }),
        ));
    }
    if upstream.status.is_success() && !task.state.is_closed() {
        match settlement::final_state_of_query(&upstream.body) {
            Some((status, consumed)) => {
                // The client gets its status even if the ledger is down; the reconciler settles
                // later.
                if let Err(e) = settlement::settle(&state, &task, status, consumed).await {
                    tracing::warn!(error = %e, "could not settle a finished task");
                }
            }
            // A client is watching this task: the reconciler need not read it too. Bookkeeping
            // only, so it does not hold up the answer.
            None => {
                let (ledger, at) = (state.ledger.clone(), state.clock.now());
                state.background.spawn(async move {
                    if let Err(e) = ledger.mark_observed(&task.task_id, at).await {
                        tracing::debug!(error = %e, "could not note a status read");
                    }
                });
            }
        }
    }
    Ok(pass_through(upstream))
}
