//! `POST /callbacks/{token}`: the upstream's callback for a task whose `callback_url` the gateway
//! replaced.
//!
//! A callback is a claim ("this task ended so, at this cost"), and anyone who saw its URL could
//! make it. So the gateway reads only the claim from the body (see [`claim`]) and checks it
//! against a status read of the task upstream (joined with any read already on its way, and
//! cached as any read is). Only when the upstream says the task is final as claimed does the
//! gateway queue the upstream's own task state for the team's URL and settle the task at the
//! upstream's `consumed` (both exactly once, shared with the polling path). A claim the upstream
//! contradicts is refused with 409; one it cannot confirm yet (still running there, or the read
//! failed) with 503 and `Retry-After`, so the upstream's retry comes back. Every refusal changes
//! nothing.
//!
//! The token is the only credential, so it is never logged (spans carry the route pattern, not
//! the path) and only its digest is stored.

mod claim;

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Path, State},
    response::Response,
};
use bytes::Bytes;
use http::StatusCode;
use serde_json::{json, value::RawValue};

use super::{json, task_query};
use crate::{
    error::GatewayError,
    middleware::facts::{Facts, RequestFacts},
    state::AppState,
    status_cache::{Answer, NotCached, Served},
    webhooks,
};
use ketchup_domain::{
    ledger::{FinalStatus, NewDelivery, SettleOutcome},
    settlement::{self, Consumed},
};

/// Longer than any token the gateway issues: not worth a ledger lookup.
const MAX_TOKEN_LEN: usize = 128;

/// A callback writes `consumed` with six places, the task query with eight: amounts closer
/// than the sixth place's unit (in 10⁻⁸ credits) agree.
const CALLBACK_PRECISION_UNITS: u64 = 100;

fn malformed(detail: impl Into<String>) -> GatewayError {
    GatewayError::InvalidRequest(detail.into())
}

pub async fn receive(
    State(state): State<Arc<AppState>>,
    Path(token): Path<String>,
    Facts(facts): Facts,
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
    let claim = claim::read(body, config.webhooks.max_callback_bytes)
        .await
        .inspect_err(|e| {
            if matches!(e, GatewayError::InvalidRequest(_)) {
                count("malformed");
            }
        })?;
    let Some(claimed_status) = settlement::final_status(&claim.status) else {
        count("malformed");
        return Err(malformed(
            "a callback must be a JSON object with a task_id and a final status (success or failed)",
        ));
    };
    let Some(task_id) = target.task_id else {
        count("too_early");
        return Err(GatewayError::CallbackTooEarly);
    };
    if claim.task_id != task_id {
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

    let answer = confirming_read(&state, &task_id, &target.team, &facts)
        .await
        .inspect_err(|_| count("unconfirmed"))?;
    let Some(upstream) = answer
        .is_final
        .then(|| upstream_state(&answer.body))
        .flatten()
    else {
        count("not_final");
        tracing::info!(
            task_id = %task_id,
            claimed_status = claimed_status.as_str(),
            "callback for a task the upstream does not report final yet"
        );
        return Err(GatewayError::CallbackUnconfirmed(
            "the upstream does not report this task final yet".into(),
        ));
    };
    if !agrees(claimed_status, &claim.consumed.0, &upstream) {
        count("contradicted");
        tracing::warn!(
            task_id = %task_id,
            team = %target.team,
            claimed_status = claimed_status.as_str(),
            claimed_consumed = %claim.consumed.0,
            upstream_status = upstream.status.as_str(),
            upstream_consumed = %upstream.consumed,
            "callback contradicted by the upstream: refused"
        );
        return Err(GatewayError::CallbackContradicted);
    }

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
                    body: upstream.data,
                    created_at: now,
                    deadline: now.checked_add_signed(deadline).unwrap_or(now),
                })
                .await?
        }
        None => false,
    };
    let settled = state
        .settler
        .settle(&config, &task, upstream.status, upstream.consumed)
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
    Ok(json(StatusCode::OK, &json!({"code": 0, "message": "ok"})))
}

/// The task's status as the upstream says it now: a final status the cache holds, or one read
/// of the upstream, joined with any read of the task already on its way and cached as any read
/// is. No answer, or an answer that is no status, cannot confirm anything.
async fn confirming_read(
    state: &AppState,
    task_id: &str,
    team: &str,
    facts: &RequestFacts,
) -> Result<Arc<Answer>, GatewayError> {
    let asked = std::time::Instant::now();
    let (served, read) = state
        .status_cache
        .get_final_or_fetch(task_id, || async {
            task_query::read_status(state, task_id, team, facts).await.0
        })
        .await;
    if served == Served::Coalesced {
        // Waiting on another request's upstream read is waiting on the upstream.
        facts.add_upstream_wait(asked.elapsed());
    }
    match read {
        Ok(answer) => Ok(answer),
        Err(not_cached) => Err(GatewayError::CallbackUnconfirmed(match &*not_cached {
            NotCached::Answer(answer) => format!(
                "the upstream answered the status read of this task with {}",
                answer.status
            ),
            NotCached::Error(error) => format!("the status read of this task failed: {error}"),
        })),
    }
}

/// A task's final state as the upstream's task query gives it.
struct UpstreamState {
    status: FinalStatus,
    consumed: Consumed,
    /// The query's `data`, byte for byte: the payload delivered to the team.
    data: Bytes,
}

/// The final state in a task query's answer, `None` if it has none.
fn upstream_state(body: &Bytes) -> Option<UpstreamState> {
    #[derive(serde::Deserialize)]
    struct Query<'a> {
        #[serde(borrow)]
        data: &'a RawValue,
    }
    let (status, consumed) = settlement::final_state_of_query(body)?;
    let data = serde_json::from_slice::<Query>(body).ok()?.data.get();
    // `data` borrows from `body`: its bytes are a slice of the answer, shared rather than copied.
    let start = (data.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    Some(UpstreamState {
        status,
        consumed,
        data: body.slice(start..start + data.len()),
    })
}

/// Whether a callback's claim is the upstream's final state: the same status and, where both
/// give an amount, the same amount to the callback's precision. An amount missing or unusable in
/// either is not compared (the task settles at the upstream's either way).
fn agrees(status: FinalStatus, consumed: &Consumed, upstream: &UpstreamState) -> bool {
    status == upstream.status
        && match (consumed, &upstream.consumed) {
            (Consumed::Exact(claimed), Consumed::Exact(confirmed)) => {
                claimed.units().abs_diff(confirmed.units()) < CALLBACK_PRECISION_UNITS
            }
            _ => true,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_of(body: &str) -> Option<UpstreamState> {
        upstream_state(&Bytes::copy_from_slice(body.as_bytes()))
    }

    #[test]
    fn the_delivered_payload_is_the_querys_data_byte_for_byte() {
        let data = r#"{ "result":[{"image":"https://x/1.png"}],"status":"success","task_id":"t","consumed":"0.50000000","created_at":"2025-09-10T10:22:20.010Z","status_reason":{"message":null} ,"new" : 1 }"#;
        let body = format!(r#"{{"code":0,"message":"ok","data":{data}}}"#);
        let state = state_of(&body).unwrap();
        assert_eq!(state.data, data.as_bytes());
        assert_eq!(state.status, FinalStatus::Success);
        assert_eq!(state.consumed, Consumed::from_text("0.5"));
        let running = r#"{"code":0,"message":"ok","data":{"status":"in_progress"}}"#;
        assert!(state_of(running).is_none());
        assert!(state_of(r#"{"code":1,"data":{"status":"success"}}"#).is_none());
    }

    #[test]
    fn claims_agree_to_the_callbacks_six_places() {
        let upstream = |status, consumed: &str| UpstreamState {
            status,
            consumed: Consumed::from_text(consumed),
            data: Bytes::new(),
        };
        let confirmed = upstream(FinalStatus::Success, "0.50000000");
        let claim = |text: &str| Consumed::from_text(text);
        assert!(agrees(FinalStatus::Success, &claim("0.500000"), &confirmed));
        assert!(agrees(FinalStatus::Success, &Consumed::Missing, &confirmed));
        assert!(!agrees(FinalStatus::Failed, &claim("0.500000"), &confirmed));
        assert!(!agrees(
            FinalStatus::Success,
            &claim("0.000000"),
            &confirmed
        ));
        assert!(!agrees(
            FinalStatus::Success,
            &claim("0.499999"),
            &confirmed
        ));
        // Eight places upstream, rounded or cut to six in the callback.
        let precise = upstream(FinalStatus::Success, "0.00100099");
        assert!(agrees(FinalStatus::Success, &claim("0.001001"), &precise));
        assert!(agrees(FinalStatus::Success, &claim("0.001000"), &precise));
        assert!(!agrees(FinalStatus::Success, &claim("0.000999"), &precise));
    }
}
