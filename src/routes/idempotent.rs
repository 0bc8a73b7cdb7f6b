//! The Idempotency-Key of generations (draft-ietf-httpapi-idempotency-key-header), as
//! `routes::generate` uses it: the header read, what the key did counted, the first answer
//! replayed, and what is stored for repeats.
//!
//! A key makes a retry safe. A repeat of the key's request (same team, route and body, see
//! `ketchup_domain::idempotency`) gets the first answer, replayed with `Idempotent-Replayed:
//! true`, without an upstream call or a charge; a repeat while the first waits on the upstream
//! gets 409, another request under the key 422. The ledger claims the key in the same atomic step
//! as the reservation, so two requests with one key never both reach the upstream, whichever
//! replica they reach.
//!
//! Only the acceptance of a task is stored for repeats. A request the upstream refused, or never
//! got, started nothing, and its refusal may pass (a 5xx, a token being rotated), so its repeat is
//! sent again. So is a repeat of a request whose outcome is unknown (a timeout): if it gets a
//! task, the earlier attempt's credits go back, since the team is charged for the one task it got;
//! the earlier one may have rendered upstream unbilled, which is logged and counted.

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::{error::GatewayError, headers, state::AppState, upstream::UpstreamResponse};
use ketchup_domain::{
    idempotency,
    ledger::{ReservationId, ReserveOutcome, StoredAnswer},
};

/// Largest upstream acceptance stored as is for an Idempotency-Key's repeats. The upstream's is
/// about a hundred bytes; one over this is stored as the bare acceptance of the same task id.
const MAX_STORED_ANSWER_BYTES: usize = 16 * 1024;

/// The request's Idempotency-Key, if it has one; a 400 for one that is no key, or for two.
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, GatewayError> {
    let mut keys = headers.get_all(headers::IDEMPOTENCY_KEY).iter();
    let Some(value) = keys.next() else {
        return Ok(None);
    };
    if keys.next().is_some() {
        return Err(GatewayError::InvalidRequest(
            "send one Idempotency-Key, not several".into(),
        ));
    }
    idempotency::parse_key(value.as_bytes())
        .map(Some)
        .map_err(GatewayError::InvalidRequest)
}

/// Counts what a generation's Idempotency-Key did.
pub(super) fn count_key(state: &AppState, team: &str, outcome: &ReserveOutcome) {
    let outcome = match outcome {
        ReserveOutcome::Reserved(_) => "claimed",
        ReserveOutcome::Replay(_) => "replayed",
        ReserveOutcome::KeyInUse => "in_progress",
        ReserveOutcome::KeyMismatch => "reused",
        // Refused before the key was claimed: counted as a budget rejection.
        ReserveOutcome::BudgetExhausted { .. } | ReserveOutcome::TooManyInFlight { .. } => return,
    };
    state
        .metrics
        .idempotent_requests
        .with_label_values(&[team, outcome])
        .inc();
}

/// The first answer to an Idempotency-Key's request, for a repeat of it.
pub(super) fn replay(answer: StoredAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let content_type = HeaderValue::try_from(answer.content_type)
        .unwrap_or(HeaderValue::from_static("application/json"));
    let mut response = (status, answer.body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(
        headers::IDEMPOTENT_REPLAYED,
        HeaderValue::from_static("true"),
    );
    response
}

/// What an Idempotency-Key's repeats get once the upstream accepted `task_id`: its answer as the
/// client gets it (see `routes::pass_through`), or, should it be over [`MAX_STORED_ANSWER_BYTES`], the
/// bare acceptance of the same task.
pub(super) fn stored_answer(upstream: &UpstreamResponse, task_id: &str) -> StoredAnswer {
    let content_type = upstream
        .content_type
        .as_ref()
        .and_then(|value| value.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    if upstream.body.len() <= MAX_STORED_ANSWER_BYTES {
        return StoredAnswer {
            status: upstream.status.as_u16(),
            content_type,
            body: upstream.body.to_vec(),
        };
    }
    let body = serde_json::json!({"code": 0, "message": "ok", "data": {"task_id": task_id}});
    StoredAnswer {
        status: upstream.status.as_u16(),
        content_type: "application/json".into(),
        body: body.to_string().into_bytes(),
    }
}

/// Counts and logs the attempts with an unknown outcome that a retry's task resolved.
pub(super) fn note_resolved(
    state: &AppState,
    team: &str,
    by: ReservationId,
    resolved: &[ReservationId],
) {
    if resolved.is_empty() {
        return;
    }
    state
        .metrics
        .unknown_outcomes_resolved
        .with_label_values(&[team])
        .inc_by(resolved.len() as u64);
    let earlier: Vec<String> = resolved.iter().map(|id| id.0.to_string()).collect();
    tracing::warn!(
        reservation = %by.0,
        released = ?earlier,
        "a retry with the same Idempotency-Key got a task: the earlier attempts whose outcome was \
         unknown are given back; the upstream may have rendered them without charge to the team"
    );
}
