//! `POST /callbacks/{token}`: the upstream's callback for a task whose `callback_url` the gateway
//! replaced. It queues the payload for the team's own URL, settles the task (exactly once,
//! shared with the polling path), and puts the final status in the cache.
//!
//! The token is the only credential, so it is never logged (spans carry the route pattern, not
//! the path) and only its digest is stored. Every refusal changes nothing.

use std::sync::Arc;

use axum::{
    Extension,
    body::Body,
    extract::{Path, State},
    response::Response,
};
use http::{HeaderValue, StatusCode};
use serde_json::{Value, json};

use super::{json, read_body};
use crate::{
    error::GatewayError, middleware::request_metrics::RequestFacts, state::AppState,
    status_cache::Answer, webhooks,
};
use ketchup_domain::{
    ledger::{NewDelivery, SettleOutcome, TaskRecord},
    settlement::{self, Consumed},
};

/// Longer than any token the gateway issues: not worth a ledger lookup.
const MAX_TOKEN_LEN: usize = 128;

fn malformed(detail: impl Into<String>) -> GatewayError {
    GatewayError::InvalidRequest(detail.into())
}

pub async fn receive(
    State(state): State<Arc<AppState>>,
    Path(token): Path<String>,
    Extension(facts): Extension<Arc<RequestFacts>>,
    body: Body,
) -> Result<Response, GatewayError> {
    let count = |outcome: &str| state.metrics.callbacks.with_label_values(&[outcome]).inc();
    let config = state.config.load_full();

    let target = if token.len() <= MAX_TOKEN_LEN {
        state
            .ledger
            .callback_target(&webhooks::token_digest(&token))
            .await?
    } else {
        None
    };
    let Some(target) = target else {
        count("unknown_token");
        return Err(GatewayError::UnknownCallback);
    };
    let body = read_body(body, config.webhooks.max_callback_bytes).await?;
    let Some((payload_task_id, status, consumed)) = parse(&body) else {
        count("malformed");
        return Err(malformed(
            "a callback must be a JSON object with a task_id and a final status (success or failed)",
        ));
    };
    let Some(task_id) = target.task_id else {
        count("too_early");
        return Err(GatewayError::CallbackTooEarly);
    };
    if payload_task_id != task_id {
        count("malformed");
        return Err(malformed(
            "task_id does not match the task this callback URL was issued for",
        ));
    }
    // The upstream calls, but the request is about this team's task: its metrics and log line
    // say so.
    facts.set_task_id(&task_id);
    facts.set_team(&target.team);
    let task = state
        .ledger
        .task(&task_id)
        .await?
        .ok_or(GatewayError::UnknownCallback)?;

    // Queued before settling: both steps are idempotent (one delivery per task, one settlement
    // per task), so if settling fails, or the process dies, after the delivery is queued, a
    // retried callback or the reconciler still settles. Settled first, a failure in between
    // would lose the delivery for good, as the upstream may never call back again.
    let queued = match target.forward_to {
        Some(url) => {
            let now = state.clock.now();
            let deadline = chrono::Duration::from_std(config.webhooks.delivery_deadline)
                .unwrap_or(chrono::Duration::MAX);
            state
                .ledger
                .enqueue_delivery(NewDelivery {
                    id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
                    task_id: task_id.clone(),
                    team: target.team.clone(),
                    url,
                    body: body.to_vec(),
                    created_at: now,
                    deadline: now.checked_add_signed(deadline).unwrap_or(now),
                })
                .await?
        }
        None => false,
    };
    let settled = state
        .settler
        .settle(&state.config.load(), &task, status, consumed.clone())
        .await;
    if queued {
        // Woken even if settling failed: the delivery is owed either way.
        state.webhook_wake.notify_one();
    }
    let outcome = settled?;
    count(match outcome {
        SettleOutcome::Settled(_) => "settled",
        _ => "repeated",
    });
    remember_final(&state, &task, &body, &consumed).await;
    Ok(json(StatusCode::OK, &json!({"code": 0, "message": "ok"})))
}

/// The task id and final state of a callback payload.
fn parse(body: &[u8]) -> Option<(String, ketchup_domain::ledger::FinalStatus, Consumed)> {
    let payload: Value = serde_json::from_slice(body).ok()?;
    let task_id = payload.get("task_id")?.as_str()?.to_owned();
    let (status, consumed) = settlement::final_state(&payload)?;
    Some((task_id, status, consumed))
}

/// The next status read of the task is answered from the cache, in the task query's shape: the
/// payload's fields plus `created_at`, `consumed` in the query's eight places.
async fn remember_final(state: &AppState, task: &TaskRecord, body: &[u8], consumed: &Consumed) {
    let Ok(Value::Object(mut data)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    data.entry("created_at")
        .or_insert_with(|| json!(task.created_at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()));
    if let Consumed::Exact(credits) = consumed {
        data.insert("consumed".into(), json!(credits.format_places(8)));
    }
    let answer = Answer {
        status: StatusCode::OK,
        content_type: Some(HeaderValue::from_static("application/json")),
        body: json!({"code": 0, "message": "ok", "data": data})
            .to_string()
            .into(),
        is_final: true,
    };
    state.status_cache.insert(&task.task_id, answer).await;
}
