//! Every asynchronous generation (`POST /api/image/gen`, `/api/sora2/gen`, … one per route of
//! the route table): validate locally, reserve the most it can cost (claiming its Idempotency-Key,
//! if it has one, in the same step), mark it dispatched, forward with the upstream token, record
//! the task as the team's (and the answer as the key's) before answering.
//!
//! What an Idempotency-Key does is in `routes::idempotent`.

use std::sync::Arc;
use std::time::Duration;

use axum::{body::Body, extract::State, response::Response};
use bytes::Bytes;
use http::{HeaderMap, Uri};
use serde_json::{Map, Value};
use tracing::Instrument;

use super::failover::{self, Sent};
use super::idempotent::{count_key, idempotency_key, note_resolved, replay, stored_answer};
use super::{
    budget::{insert_budget_headers, rfc3339},
    check_model_allowed, pass_through, read_body,
};
use crate::{
    error::GatewayError,
    logging,
    middleware::facts::{Caller, Facts, RequestFacts},
    state::AppState,
    upstream::UpstreamError,
    webhooks::{self, notices, target},
};
use ketchup_domain::{
    body::{check_case, check_unique_keys},
    calibration::CostKey,
    config::{BudgetPeriod, Config, Team},
    credits::Credits,
    idempotency,
    ledger::{
        CallbackRoute, KeyClaim, NewReservation, OutcomeReason, ReservationId, ReserveOutcome,
        StoreError,
    },
    period,
};

/// What the gateway itself takes from a generation request; everything else in the body is
/// forwarded untouched.
#[derive(Debug, PartialEq, Eq)]
pub struct Generation {
    pub model: String,
    /// The route's family (`image`, `video`, …), for metrics and the usage report.
    pub family: String,
    /// What the request reserves: the most it can cost under the configuration.
    pub amount: Credits,
    /// What its settled cost is set against: the value it was priced at, and `n`.
    pub cost: CostKey,
    pub callback_url: Option<String>,
    /// Whether the route's upstream endpoint takes a `callback_url` the client did not send.
    pub accepts_callback: bool,
}

fn invalid(detail: impl Into<String>) -> GatewayError {
    GatewayError::InvalidRequest(detail.into())
}

/// Checks what the upstream would refuse, and prices the request, so a bad request costs
/// neither a reservation nor an upstream call. Also gives the body's fields, parsed once, for
/// whatever must rewrite them.
pub fn validate(
    path: &str,
    body: &[u8],
    config: &Config,
) -> Result<(Generation, Map<String, Value>), GatewayError> {
    let route = config
        .routes
        .get(path)
        .ok_or_else(|| GatewayError::NoSuchRoute {
            method: "POST".into(),
            path: path.chars().take(200).collect(),
        })?;
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("request body is not valid JSON: {e}")))?;
    // The body is forwarded as sent, so it must mean to the upstream what it means here.
    check_unique_keys(body).map_err(invalid)?;
    let Value::Object(fields) = value else {
        return Err(invalid("request body must be a JSON object"));
    };
    check_case(&fields, route.fields_read()).map_err(invalid)?;
    let submission = route.check(&fields).map_err(invalid)?;
    let Some(model) = config.models.get(&submission.model) else {
        let offered: Vec<&str> = config.models.keys().map(String::as_str).collect();
        return Err(invalid(format!(
            "model {:?} is not offered; choose one of: {}",
            submission.model.chars().take(100).collect::<String>(),
            offered.join(", ")
        )));
    };
    let Some(reserve) = model.task_reserve() else {
        return Err(invalid(format!(
            "model {:?} is a text model: send it to a text endpoint",
            submission.model
        )));
    };
    check_case(&fields, reserve.field()).map_err(invalid)?;
    let amount = reserve
        .for_request(&submission.model, &fields, submission.count)
        .map_err(invalid)?;
    let generation = Generation {
        model: submission.model,
        family: route.family.clone(),
        amount,
        cost: CostKey {
            value: reserve.priced_value(&fields),
            count: submission.count,
        },
        callback_url: submission.callback_url,
        accepts_callback: route.accepts_callback,
    };
    Ok((generation, fields))
}

/// With `server.public_url` set, points the upstream's callback at the gateway instead of the
/// team: `{public_url}/callbacks/{token}`, the token known only to the upstream (the ledger keeps
/// its digest). The team's own URL, checked against where webhooks may go, is remembered for
/// delivery. Without `public_url`, or without a callback to take over, the body goes unchanged;
/// otherwise `fields`, the body as [`validate`] parsed it, is written out again.
fn intercept_callback(
    body: Bytes,
    mut fields: Map<String, Value>,
    generation: &Generation,
    config: &Config,
    team: &Team,
) -> Result<(Bytes, Option<CallbackRoute>), GatewayError> {
    let Some(public_url) = &config.server.public_url else {
        return Ok((body, None));
    };
    let callback_url = generation.callback_url.clone();
    // Without the client's own, the gateway adds one only where the upstream is known to take it.
    if callback_url.is_none() && !(config.webhooks.always_intercept && generation.accepts_callback)
    {
        return Ok((body, None));
    }
    if let Some(url) = &callback_url {
        target::check_url(url, &target::Allowed::new(&team.callback_hosts)).map_err(invalid)?;
    }
    let (token, token_digest) = webhooks::new_callback_token();
    let ours = format!(
        "{}/callbacks/{token}",
        public_url.as_str().trim_end_matches('/')
    );
    fields.insert("callback_url".into(), Value::String(ours));
    let body = serde_json::to_vec(&fields)
        .map_err(|e| GatewayError::Internal(format!("cannot re-encode the request: {e}")))?;
    Ok((
        body.into(),
        Some(CallbackRoute {
            token_digest,
            forward_to: callback_url,
        }),
    ))
}

pub async fn generate(
    State(state): State<Arc<AppState>>,
    Caller {
        team,
        key: caller_key,
    }: Caller,
    Facts(facts): Facts,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let config = state.config.load_full();
    let body = read_body(body, config.server.max_body_bytes).await?;
    let key = idempotency_key(&headers)?;
    let (generation, fields) = validate(uri.path(), &body, &config)?;
    check_model_allowed(&state, &team, &generation.model)?;
    let now = state.clock.now();
    // Of the body as the client sent it, before the gateway puts its own callback in.
    let claim = key.map(|key| KeyClaim {
        fingerprint: idempotency::fingerprint(uri.path(), &body),
        key,
        expires_at: now + config.server.idempotency_ttl,
    });
    let (body, callback) = intercept_callback(body, fields, &generation, &config, &team)?;

    // The upstream account's limit is checked before anything is reserved: a refused request
    // must not hold credits.
    state.rate_limits.check_global(&team.name).await?;

    let amount = generation.amount;
    let period = team.budget.map_or(BudgetPeriod::Lifetime, |b| b.period);
    let reservation = NewReservation {
        id: ReservationId::new(),
        team: team.name.clone(),
        key: caller_key.to_string(),
        model: generation.model,
        family: generation.family.clone(),
        amount,
        period: period::period_key(period, now),
        limit: team.budget.map(|b| b.credits),
        max_in_flight: team.budget.and_then(|b| b.max_in_flight),
        request_id: facts.request_id().as_str().to_owned(),
        created_at: now,
        callback,
        idempotency: claim,
        cost: Some(generation.cost),
    };
    let id = reservation.id;
    let reservation_period = reservation.period.clone();
    let reservation_model = reservation.model.clone();
    let keyed = reservation.idempotency.is_some();
    // Armed before the reservation is even sent: a client that hangs up from here until the
    // upstream call starts must not leave credits held for a render that never began.
    let mut hold = ReleaseOnDrop {
        state: state.clone(),
        id,
        armed: true,
    };
    let outcome = match state.ledger.reserve(reservation).await {
        Ok(outcome) => outcome,
        Err(e) => {
            // Only a reservation the store never saw needs no release. One it did not answer
            // for in time may still be applied (a hung Redis runs what it was sent once it goes
            // on), so the hold keeps trying to give it back.
            hold.armed = !matches!(e, StoreError::NotTried(_));
            return Err(e.into());
        }
    };
    if keyed {
        count_key(&state, &team.name, &outcome);
    }
    let standing = match outcome {
        ReserveOutcome::Reserved(standing) => {
            notices::after_reservation(&state, &team, &reservation_period, standing, now);
            standing
        }
        ReserveOutcome::Replay(answer) => {
            hold.armed = false;
            if let Some(task_id) = accepted_task_id(&answer.body) {
                facts.set_task_id(&task_id);
            }
            return Ok(replay(answer));
        }
        ReserveOutcome::KeyInUse => {
            hold.armed = false;
            return Err(GatewayError::IdempotencyKeyInUse);
        }
        ReserveOutcome::KeyMismatch => {
            hold.armed = false;
            return Err(GatewayError::IdempotencyKeyReused);
        }
        ReserveOutcome::BudgetExhausted { spent, reserved } => {
            hold.armed = false;
            count_rejection(&state, &team.name, "budget");
            let budget = team
                .budget
                .expect("only a team with a budget can exhaust it");
            let left = budget
                .credits
                .saturating_sub(spent)
                .saturating_sub(reserved)
                .max(Credits::ZERO);
            let resets = period::period_end(budget.period, now)
                .map(|end| format!(" (resets {})", rfc3339(end)))
                .unwrap_or_default();
            return Err(GatewayError::BudgetExhausted(format!(
                "team '{}' has {left} of {} credits left {}{resets}; this request needs {amount}",
                team.name,
                budget.credits,
                period::period_phrase(budget.period),
            )));
        }
        ReserveOutcome::TooManyInFlight { in_flight } => {
            hold.armed = false;
            count_rejection(&state, &team.name, "in_flight");
            return Err(GatewayError::TooManyInFlight(format!(
                "team '{}' has {in_flight} unfinished tasks, the most it may have at once; \
                 retry when one finishes",
                team.name
            )));
        }
    };

    // Once the request may reach the upstream, its outcome must be recorded even if the client
    // disconnects and this handler is dropped: the work runs as a task of its own.
    let started = StartedTask {
        reservation: id,
        team: team.name.clone(),
        model: reservation_model,
        family: generation.family,
        path: uri.path().to_owned(),
        keyed,
    };
    let work = forward(state.clone(), started, body, facts);
    let forwarding = state.background.spawn(logging::InRequest::current(
        work.instrument(tracing::Span::current()),
    ));
    // The spawned work owns the reservation now, whatever happens to this handler.
    hold.armed = false;
    let mut response = forwarding
        .await
        .map_err(|e| GatewayError::Internal(format!("generation task failed: {e}")))??;

    // Teams see their standing on every accepted generation, without another call.
    if let Some(budget) = team.budget
        && response.status().is_success()
    {
        insert_budget_headers(response.headers_mut(), budget, standing, now);
    }
    Ok(response)
}

/// Gives a reservation back when dropped armed. The release goes through the same ordered
/// ledger queue as the reservation, so it can never overtake it; releasing a reservation that was
/// never recorded is refused by the ledger and changes nothing. While the ledger is unavailable
/// the release is tried again (see [`keep_trying`]).
struct ReleaseOnDrop {
    state: Arc<AppState>,
    id: ReservationId,
    armed: bool,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if self.armed {
            release_in_background(
                &self.state,
                self.id,
                "give back the reservation of a client that left",
            );
        }
    }
}

fn release_in_background(state: &AppState, id: ReservationId, what: &'static str) {
    let ledger = state.ledger.clone();
    keep_trying(state, id, what, move || {
        let ledger = ledger.clone();
        async move { ledger.release(id).await }
    });
}

/// Between tries of a ledger write while the ledger is unavailable: from the first to the last,
/// doubling.
const RETRY_WHILE_UNAVAILABLE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

/// Runs a write about a reservation in the background, and runs it again while the ledger is
/// unavailable, until it is applied, or refused as a conflict (applied already by a try whose
/// answer was lost, or no longer possible), or until `reconciler.abandon_after` has passed: the
/// reconciler then takes the reservation over, as for a replica that died mid-request.
fn keep_trying<W, F>(state: &AppState, id: ReservationId, what: &'static str, mut write: W)
where
    W: FnMut() -> F + Send + 'static,
    F: Future<Output = Result<(), StoreError>> + Send + 'static,
{
    let patience = state.config.load().reconciler.abandon_after;
    state.background.spawn(async move {
        let give_up = tokio::time::Instant::now() + patience;
        let mut wait = RETRY_WHILE_UNAVAILABLE.0;
        loop {
            match write().await {
                Ok(()) => {
                    tracing::info!(reservation = %id.0, "ledger write done: {what}");
                    return;
                }
                Err(StoreError::Conflict(e)) => {
                    tracing::debug!(reservation = %id.0, error = %e, "ledger write not needed: {what}");
                    return;
                }
                Err(_) if tokio::time::Instant::now() + wait < give_up => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY_WHILE_UNAVAILABLE.1);
                }
                Err(e) => {
                    tracing::warn!(reservation = %id.0, error = %e, "could not {what}; the reconciler will abandon the reservation");
                    return;
                }
            }
        }
    });
}

fn count_rejection(state: &AppState, team: &str, reason: &str) {
    state
        .metrics
        .budget_rejections
        .with_label_values(&[team, reason])
        .inc();
}

/// A generation whose credits are reserved.
struct StartedTask {
    reservation: ReservationId,
    team: String,
    model: String,
    family: String,
    /// The upstream path it goes to: the route's own.
    path: String,
    /// Whether it claimed an Idempotency-Key, whose repeats then get its answer.
    keyed: bool,
}

async fn forward(
    state: Arc<AppState>,
    task: StartedTask,
    body: Bytes,
    facts: Arc<RequestFacts>,
) -> Result<Response, GatewayError> {
    let id = task.reservation;
    // With every account out of rotation nothing is sent: the client learns why, at once.
    if !state.accounts.any_in_rotation() {
        release(&state, id).await;
        return Err(GatewayError::NoUpstreamAccount);
    }
    // Durably before a byte leaves: a reservation left by a gateway that stopped is then either
    // never sent (given back) or perhaps sent (an unknown outcome), never a guess.
    if let Err(error) = state.ledger.mark_dispatched(id, state.clock.now()).await {
        // Not held any more (given up as never sent): nothing to give back. Otherwise the mark
        // may or may not have been written, and the request is not sent either way.
        if !matches!(error, StoreError::Conflict(_)) {
            release(&state, id).await;
        }
        return Err(error.into());
    }
    let sent = failover::send(&state, "generation", |account| {
        state.upstream.generate(
            account,
            &task.path,
            body.clone(),
            facts.request_id().as_str(),
        )
    })
    .await;
    let (account, upstream) = match sent {
        Sent::Answered(account, upstream) => (account, upstream),
        // Every account in rotation refused its token: nothing started.
        Sent::NoAccount => {
            release(&state, id).await;
            return Err(GatewayError::NoUpstreamAccount);
        }
        Sent::Failed(error) => {
            match error {
                // Certainly not received: nothing can have started.
                UpstreamError::Connect(_) => release(&state, id).await,
                // Maybe received: the render may run and be charged.
                UpstreamError::Timeout(_) => {
                    keep_as_unknown_outcome(&state, id, OutcomeReason::UpstreamTimeout).await?;
                }
                UpstreamError::Broken(_) => {
                    keep_as_unknown_outcome(&state, id, OutcomeReason::ConnectionBroken).await?;
                }
            }
            return Err(error.into());
        }
    };
    facts.add_upstream_wait(upstream.elapsed);

    if !upstream.status.is_success() {
        release(&state, id).await;
        return Ok(pass_through(upstream));
    }
    let Some(task_id) = accepted_task_id(&upstream.body) else {
        // A 2xx without a task id: something may have started upstream that we cannot track.
        keep_as_unknown_outcome(&state, id, OutcomeReason::AcceptedWithoutTaskId).await?;
        return Err(GatewayError::UpstreamBadResponse(
            "the upstream accepted the generation but returned no task id".into(),
        ));
    };
    facts.set_task_id(&task_id);
    let answer = task.keyed.then(|| stored_answer(&upstream, &task_id));
    state.started_with(&task_id, account);
    let account = state.accounts.name(account);
    match failover::record_task(&state, id, &task_id, &account, answer.as_ref()).await {
        // Its first status read, moments from now, need not ask the ledger who owns it.
        Ok(resolved) => {
            state.owners.record(&task_id, &task.team, false);
            note_resolved(&state, &task.team, id, &resolved);
        }
        // Not an outage: the reservation is no longer held, or the id is another reservation's.
        // Retrying cannot help, and the task cannot be promised to the team.
        Err(e @ StoreError::Conflict(_)) => {
            tracing::error!(error = %e, task_id, "a task the upstream accepted cannot be recorded");
            return Err(e.into());
        }
        Err(e) => {
            // The task runs upstream, and will be charged, whatever the ledger says. Recording it
            // later still lets the team poll it and the reconciler settle it at what it consumed;
            // the client learns its id now, so it need not start (and pay for) another.
            tracing::warn!(error = %e, task_id, "could not record a task the upstream accepted; retrying");
            let (shared, recorded) = (state.clone(), task_id.clone());
            let (team, account) = (task.team.clone(), account.clone());
            keep_trying(
                &state,
                id,
                "record a task the upstream accepted",
                move || {
                    let (state, task_id) = (shared.clone(), recorded.clone());
                    let (team, answer) = (team.clone(), answer.clone());
                    let account = account.clone();
                    async move {
                        let resolved =
                            failover::record_task(&state, id, &task_id, &account, answer.as_ref())
                                .await?;
                        note_resolved(&state, &team, id, &resolved);
                        Ok(())
                    }
                },
            );
            return Err(GatewayError::TaskNotRecorded(task_id));
        }
    }
    state
        .metrics
        .tasks_started
        .with_label_values(&[&task.team, &task.family, &task.model])
        .inc();
    Ok(pass_through(upstream))
}

/// Keeps the reservation of a generation that may have started upstream, counted as spent. One
/// the reconciler has given up on already (its request waited past `abandon_after`, behind a slow
/// ledger) is in that state: the client still learns what went wrong upstream, not of a conflict.
async fn keep_as_unknown_outcome(
    state: &AppState,
    id: ReservationId,
    reason: OutcomeReason,
) -> Result<(), GatewayError> {
    match state.ledger.mark_unknown_outcome(id, reason).await {
        Ok(()) => Ok(()),
        Err(StoreError::Conflict(e)) => {
            tracing::debug!(reservation = %id.0, error = %e, "reservation no longer held");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Gives a reservation back after the upstream refused the generation or could not be reached.
/// The client gets the upstream's answer either way; a ledger that cannot take the release now
/// gets it again later.
async fn release(state: &AppState, id: ReservationId) {
    match state.ledger.release(id).await {
        Ok(()) => {}
        // Not held any more: nothing to give back, and nothing a retry could change.
        Err(StoreError::Conflict(e)) => {
            tracing::debug!(reservation = %id.0, error = %e, "reservation already gone")
        }
        Err(e) => {
            tracing::warn!(reservation = %id.0, error = %e, "could not release a reservation; retrying");
            release_in_background(state, id, "release a reservation the upstream did not take");
        }
    }
}

/// `data.task_id` of a `{"code":0,…}` answer.
fn accepted_task_id(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    if value.get("code")?.as_i64()? != 0 {
        return None;
    }
    let task_id = value.get("data")?.get("task_id")?.as_str()?;
    (!task_id.is_empty() && task_id.len() <= 256).then(|| task_id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            Path::new("test.toml"),
            r#"
            [upstream]
            token_env = "T"
            [models."google/gempix2"]
            reserve = "0.50"
            [models."sora-2"]
            reserve = { by = "duration", prices = { "10" = "1.00", "15" = "1.50" } }
            "#,
        )
        .unwrap()
    }

    fn detail(path: &str, body: &str) -> String {
        match validate(path, body.as_bytes(), &config()) {
            Err(GatewayError::InvalidRequest(detail)) => detail,
            other => panic!("expected a 400 for {body}, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_full_request_and_reserves_n_times_the_model() {
        let body = r#"{"model":"google/gempix2","prompt":"a cat","images":["https://x.example/a.png"],
            "callback_url":"http://hooks.example/cb","aspect_ratio":"16:9","n":3,"future_field":{"x":1}}"#;
        assert_eq!(
            validate("/api/image/gen", body.as_bytes(), &config())
                .unwrap()
                .0,
            Generation {
                model: "google/gempix2".into(),
                family: "image".into(),
                amount: "1.50".parse().unwrap(),
                cost: CostKey {
                    value: None,
                    count: 3
                },
                callback_url: Some("http://hooks.example/cb".into()),
                accepts_callback: true,
            }
        );
    }

    #[test]
    fn a_video_reserves_by_its_duration() {
        let sora = |duration: &str| {
            let body = format!(r#"{{"model":"sora-2","prompt":"x","duration":{duration}}}"#);
            validate("/api/sora2/gen", body.as_bytes(), &config()).map(|(generation, _)| generation)
        };
        assert_eq!(sora(r#""15""#).unwrap().amount, "1.50".parse().unwrap());
        assert_eq!(sora(r#""15""#).unwrap().family, "video");
        assert_eq!(sora(r#""15""#).unwrap().cost.value.as_deref(), Some("15"));
        assert!(
            matches!(sora("15"), Err(GatewayError::InvalidRequest(d)) if d == "duration must be a string here")
        );
        assert!(
            matches!(sora(r#""30""#), Err(GatewayError::InvalidRequest(d)) if d.starts_with(r#"duration "30" is not priced for model sora-2"#))
        );
        assert!(matches!(
            validate("/api/no/such", b"{}", &config()),
            Err(GatewayError::NoSuchRoute { .. })
        ));
    }

    #[test]
    fn a_body_the_upstream_could_read_otherwise_is_refused() {
        assert!(
            detail(
                "/api/image/gen",
                r#"{"model":"google/gempix2","prompt":"x","n":1,"n":4}"#
            )
            .starts_with(r#"duplicate key "n" in the request body"#)
        );
        for (path, body, expected) in [
            (
                "/api/image/gen",
                r#"{"model":"google/gempix2","prompt":"x","Images":[]}"#,
                r#""Images" differs from "images" only in case"#,
            ),
            (
                "/api/video/seedance/gen",
                r#"{"model":"seedance-2.0","content":[{"text":"x"}],"CONTENT":[]}"#,
                r#""CONTENT" differs from "content" only in case"#,
            ),
            // `duration` prices sora-2: a variant of the reserve's field is refused as well.
            (
                "/api/image/gen",
                r#"{"model":"sora-2","prompt":"x","duration":"10","DURATION":"15"}"#,
                r#""DURATION" differs from "duration" only in case"#,
            ),
        ] {
            assert_eq!(detail(path, body), expected, "{body}");
        }
        // A case variant of a field the gateway does not read is the upstream's business.
        assert!(
            validate(
                "/api/image/gen",
                br#"{"model":"google/gempix2","prompt":"x","Size":"1k","size":"4k"}"#,
                &config()
            )
            .is_ok()
        );
    }

    #[test]
    fn refuses_each_invalid_field_with_a_clear_detail() {
        let detail = |body: &str| detail("/api/image/gen", body);
        assert!(detail("{").starts_with("request body is not valid JSON"));
        assert_eq!(detail("[1]"), "request body must be a JSON object");
        assert_eq!(detail(r#"{"prompt":"x"}"#), "model is required");
        assert_eq!(
            detail(r#"{"model":7,"prompt":"x"}"#),
            "model must be a string"
        );
        assert_eq!(
            detail(r#"{"model":"acme/x","prompt":"x"}"#),
            r#"model "acme/x" is not offered; choose one of: google/gempix2, sora-2"#
        );
        assert_eq!(
            detail(r#"{"model":"google/gempix2"}"#),
            "prompt is required"
        );
        assert_eq!(
            detail(r#"{"model":"google/gempix2","prompt":"  "}"#),
            "prompt is required"
        );
        assert_eq!(
            detail(r#"{"model":"google/gempix2","prompt":1}"#),
            "prompt must be a string"
        );
        let five = r#"{"model":"google/gempix2","prompt":"x","images":["http://a/1","http://a/2","http://a/3","http://a/4","http://a/5"]}"#;
        assert_eq!(
            detail(five),
            "at most 4 reference images are allowed in images, got 5"
        );
        assert_eq!(
            detail(r#"{"model":"google/gempix2","prompt":"x","images":["ftp://a/1"]}"#),
            "images[0] must be an http(s) URL or a data URI"
        );
        assert_eq!(
            detail(r#"{"model":"google/gempix2","prompt":"x","images":7}"#),
            "images must be http(s) URLs or data URIs"
        );
        assert_eq!(
            detail(
                r#"{"model":"google/gempix2","prompt":"x","callback_url":"javascript:alert(1)"}"#
            ),
            "callback_url must be an http(s) URL"
        );
        assert_eq!(
            detail(r#"{"model":"google/gempix2","prompt":"x","n":0}"#),
            "n must be a positive whole number"
        );
        assert_eq!(
            detail(r#"{"model":"google/gempix2","prompt":"x","n":1.5}"#),
            "n must be a positive whole number"
        );
    }

    #[test]
    fn finds_the_task_id_only_in_an_accepting_answer() {
        let ok = br#"{"code":0,"message":"ok","data":{"task_id":"ta1"}}"#;
        assert_eq!(accepted_task_id(ok).as_deref(), Some("ta1"));
        assert_eq!(
            accepted_task_id(br#"{"code":1,"data":{"task_id":"ta1"}}"#),
            None
        );
        assert_eq!(accepted_task_id(br#"{"code":0,"data":{}}"#), None);
        assert_eq!(accepted_task_id(b"not json"), None);
    }
}
