//! Text generation, answered at once rather than as a task: OpenAI chat completions
//! (`POST /api/v1/chat/completions`), Anthropic messages (`POST /api/v1/messages`) and Gemini
//! (`POST /api/v1beta/models/{model}:generateContent` / `:streamGenerateContent`), streamed or
//! not.
//!
//! Each request reserves the most its answer can cost (its input counted as one token per byte
//! of its body, capped by the model's context, and its output limit at the output price), is
//! sent with the upstream token to the same path, and has its answer passed through as it
//! arrives ([`meter`]), its usage read on the way; the answer's end settles the reservation at
//! the exact cost ([`settle`]). Text answers are never cached: they are not idempotent reads.

mod dialect;
mod meter;
mod settle;

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{FromRequestParts, Path, State},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use http::request::Parts;
use http::{HeaderValue, Uri, header};
use http_body_util::{BodyExt, Limited};

use super::failover::{self, Sent};
use super::{
    budget::{insert_budget_headers, rfc3339},
    check_model_allowed, pass_through, read_body,
};
use crate::{
    error::GatewayError,
    middleware::facts::{Caller, Facts, RequestFacts},
    state::AppState,
    upstream::{UpstreamError, UpstreamResponse},
    webhooks::notices,
};
use dialect::Dialect;
use ketchup_domain::{
    config::{BudgetPeriod, Team},
    credits::Credits,
    ledger::{NewReservation, OutcomeReason, ReservationId, ReserveOutcome, Standing, StoreError},
    period,
};
use meter::{MeteredBody, is_event_stream};
use settle::{Charge, End, Settle, release_in_background};

/// The family of text requests in the usage report.
const FAMILY: &str = "text";
/// Largest error answer read from the upstream before it is passed on.
const MAX_ERROR_BYTES: usize = 1 << 20;

/// What a handler learnt of its caller, from the layers before it.
pub struct Sender {
    team: Arc<Team>,
    /// The name of the key it came with, which its reservation records.
    key: Arc<str>,
    facts: Arc<RequestFacts>,
}

impl<S: Send + Sync> FromRequestParts<S> for Sender {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let fail = IntoResponse::into_response;
        let Caller { team, key } = Caller::from_request_parts(parts, state)
            .await
            .map_err(fail)?;
        let Facts(facts) = Facts::from_request_parts(parts, state)
            .await
            .map_err(fail)?;
        Ok(Sender { team, key, facts })
    }
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    caller: Sender,
    uri: Uri,
    body: Body,
) -> Result<Response, GatewayError> {
    serve(state, caller, Dialect::OpenAi, None, &uri, body).await
}

pub async fn messages(
    State(state): State<Arc<AppState>>,
    caller: Sender,
    uri: Uri,
    body: Body,
) -> Result<Response, GatewayError> {
    serve(state, caller, Dialect::Anthropic, None, &uri, body).await
}

/// `{model}:generateContent` and `{model}:streamGenerateContent`: one path segment, split at
/// its last colon.
pub async fn gemini(
    State(state): State<Arc<AppState>>,
    caller: Sender,
    Path(model_action): Path<String>,
    uri: Uri,
    body: Body,
) -> Result<Response, GatewayError> {
    let (model, stream) = match model_action.rsplit_once(':') {
        Some((model, "generateContent")) if !model.is_empty() => (model, false),
        Some((model, "streamGenerateContent")) if !model.is_empty() => (model, true),
        _ => {
            return Err(GatewayError::NoSuchRoute {
                method: "POST".into(),
                path: uri.path().chars().take(200).collect(),
            });
        }
    };
    serve(
        state,
        caller,
        Dialect::Gemini,
        Some((model, stream)),
        &uri,
        body,
    )
    .await
}

async fn serve(
    state: Arc<AppState>,
    caller: Sender,
    dialect: Dialect,
    gemini: Option<(&str, bool)>,
    uri: &Uri,
    body: Body,
) -> Result<Response, GatewayError> {
    let Sender { team, key, facts } = caller;
    let request_id = facts.request_id().clone();
    let config = state.config.load_full();
    let invalid = |detail: String| GatewayError::InvalidTextRequest(dialect.error_shape(), detail);
    let body = read_body(body, config.server.max_body_bytes).await?;
    let (ask, fields) = dialect::read(dialect, &body, gemini).map_err(invalid)?;
    let Some(prices) = config
        .models
        .get(&ask.model)
        .and_then(|model| model.text_prices())
        .copied()
    else {
        let offered: Vec<&str> = config
            .models
            .values()
            .filter(|model| model.text_prices().is_some())
            .map(|model| model.name.as_str())
            .collect();
        return Err(invalid(format!(
            "model {:?} is not offered as a text model; choose one of: {}",
            ask.model.chars().take(100).collect::<String>(),
            offered.join(", ")
        )));
    };
    check_model_allowed(&state, &team, &ask.model)?;
    let amount = prices
        .worst_case(body.len(), ask.output_limit)
        .ok_or_else(|| invalid("the output token limit is too large to be priced".into()))?;

    // The upstream account's limit is checked before anything is reserved: a refused request
    // must not hold credits.
    state.rate_limits.check_global(&team.name).await?;
    // Held before the reservation is even sent: a client that leaves while the ledger applies
    // it must not leave credits held until the reconciler gives them up.
    let mut hold = Hold {
        state: state.clone(),
        id: ReservationId::new(),
        reserved: amount,
        team: team.name.clone(),
        model: ask.model.clone(),
        prices,
        stage: Stage::Reserved,
    };
    let id = hold.id;
    let reserved_at = state.clock.now();
    let reservation = ToReserve {
        id,
        model: &ask.model,
        amount,
        request_id: request_id.as_str(),
        now: reserved_at,
    };
    let standing = match reserve(&state, &team, &key, reservation).await {
        Ok(standing) => standing,
        Err(error) => {
            // Refused, or given back by `reserve` itself: nothing left for the hold.
            hold.stage = Stage::Done;
            return Err(error);
        }
    };

    let body = if ask.add_usage_chunk {
        dialect::with_usage_chunk(body, fields)
    } else {
        body
    };
    // With every account out of rotation nothing is sent: the client learns why, at once.
    if !state.accounts.any_in_rotation() {
        return Err(GatewayError::NoUpstreamAccount);
    }
    // Durably before a byte leaves, as for generations: a reservation left by a gateway that
    // stopped is then either never sent (given back) or perhaps sent (an unknown outcome).
    if let Err(error) = state.ledger.mark_dispatched(id, state.clock.now()).await {
        // Not held any more (given up as never sent): nothing for the hold to give back.
        if matches!(error, StoreError::Conflict(_)) {
            hold.stage = Stage::Done;
        }
        return Err(error.into());
    }
    hold.stage = Stage::Sent;
    let path = forwarded(uri);
    let sent = failover::send(&state, "text request", |account| {
        state
            .upstream
            .open_text(account, &path, body.clone(), request_id.as_str())
    })
    .await;
    let upstream = match sent {
        Sent::Answered(_, upstream) => upstream,
        // Every account in rotation refused its token: nothing was generated.
        Sent::NoAccount => {
            hold.stage = Stage::Done;
            release_in_background(&state, id);
            return Err(GatewayError::NoUpstreamAccount);
        }
        Sent::Failed(error) => {
            hold.stage = Stage::Done;
            match error {
                // Certainly not received: nothing was generated.
                UpstreamError::Connect(_) => release_in_background(&state, id),
                // Maybe received and answered: counted as spent until an admin knows better.
                UpstreamError::Timeout(_) => {
                    let reason = OutcomeReason::UpstreamTimeout;
                    state.ledger.mark_unknown_outcome(id, reason).await?;
                }
                UpstreamError::Broken(_) => {
                    let reason = OutcomeReason::ConnectionBroken;
                    state.ledger.mark_unknown_outcome(id, reason).await?;
                }
            }
            return Err(error.into());
        }
    };
    facts.add_upstream_wait(upstream.elapsed);

    if !upstream.status.is_success() {
        // Refused: nothing was generated, nothing is charged.
        hold.stage = Stage::Done;
        release_in_background(&state, id);
        let collected = tokio::time::timeout(
            state.upstream.idle_timeout(),
            Limited::new(upstream.body, MAX_ERROR_BYTES).collect(),
        )
        .await;
        let body = match collected {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(e)) => {
                return Err(UpstreamError::Broken(format!("reading the answer: {e}")).into());
            }
            Err(_) => return Err(UpstreamError::Timeout(state.upstream.idle_timeout()).into()),
        };
        return Ok(pass_through(UpstreamResponse {
            status: upstream.status,
            content_type: upstream.content_type,
            body,
            elapsed: upstream.elapsed,
        }));
    }

    let labels = (
        config.team_label(&team.name),
        config.model_label(&ask.model),
    );
    state
        .metrics
        .text_requests
        .with_label_values(&[
            labels.0,
            labels.1,
            dialect.as_str(),
            if ask.stream { "true" } else { "false" },
        ])
        .inc();
    let event_stream = is_event_stream(upstream.content_type.as_ref());
    let settle = hold.hand_over();
    let body = MeteredBody::new(
        upstream.body,
        dialect,
        event_stream,
        ask.add_usage_chunk,
        state.upstream.idle_timeout(),
        settle,
    );
    let mut response = Response::new(Body::new(body));
    *response.status_mut() = upstream.status;
    let headers = response.headers_mut();
    let content_type = upstream
        .content_type
        .unwrap_or(HeaderValue::from_static("application/json"));
    headers.insert(header::CONTENT_TYPE, content_type);
    if event_stream {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    // The answer's head goes before its usage is known: the standing is the one its worst
    // case was reserved against, as for a generation; the settlement gives back the rest.
    if let Some(budget) = team.budget {
        insert_budget_headers(headers, budget, standing, reserved_at);
    }
    Ok(response)
}

/// The path and query the upstream gets: the client's, less a `key` parameter (Gemini's
/// clients may put their key there; the upstream never sees a team's key).
fn forwarded(uri: &Uri) -> String {
    let path = uri.path();
    match uri.query() {
        None => path.to_owned(),
        Some(query) => {
            let kept: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
                .filter(|(name, _)| name != "key")
                .map(|(name, value)| (name.into_owned(), value.into_owned()))
                .collect();
            if kept.is_empty() {
                return path.to_owned();
            }
            let query = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(kept)
                .finish();
            format!("{path}?{query}")
        }
    }
}

/// One reservation to make: its id (which the handler's hold already has), model, amount, the
/// request it is for, and when.
struct ToReserve<'a> {
    id: ReservationId,
    model: &'a str,
    amount: Credits,
    request_id: &'a str,
    now: DateTime<Utc>,
}

/// Reserves the request's worst case in the team's budget; the standing includes it.
async fn reserve(
    state: &Arc<AppState>,
    team: &Arc<Team>,
    key: &str,
    wanted: ToReserve<'_>,
) -> Result<Standing, GatewayError> {
    let ToReserve {
        id,
        model,
        amount,
        request_id,
        now,
    } = wanted;
    let period = team.budget.map_or(BudgetPeriod::Lifetime, |b| b.period);
    let reservation = NewReservation {
        id,
        team: team.name.clone(),
        key: key.to_owned(),
        model: model.to_owned(),
        family: FAMILY.to_owned(),
        amount,
        period: period::period_key(period, now),
        limit: team.budget.map(|b| b.credits),
        max_in_flight: team.budget.and_then(|b| b.max_in_flight),
        request_id: request_id.to_owned(),
        created_at: now,
        callback: None,
        idempotency: None,
        cost: None,
    };
    let period_key = reservation.period.clone();
    let outcome = match state.ledger.reserve(reservation).await {
        Ok(outcome) => outcome,
        Err(e) => {
            // One the store may have applied although it did not answer in time is given
            // back; one it never saw needs nothing.
            if !matches!(e, StoreError::NotTried(_)) {
                release_in_background(state, id);
            }
            return Err(e.into());
        }
    };
    let rejection = |reason: &str| {
        state
            .metrics
            .budget_rejections
            .with_label_values(&[&team.name, reason])
            .inc();
    };
    match outcome {
        ReserveOutcome::Reserved(standing) => {
            notices::after_reservation(state, team, &period_key, standing, now);
            Ok(standing)
        }
        // Only a reservation with an Idempotency-Key meets a key's claim, and a text request
        // carries none: a store that answers so is wrong, and nothing was reserved.
        ReserveOutcome::Replay(_) | ReserveOutcome::KeyInUse | ReserveOutcome::KeyMismatch => {
            Err(StoreError::Conflict("an Idempotency-Key claim for a text request".into()).into())
        }
        ReserveOutcome::BudgetExhausted { spent, reserved } => {
            rejection("budget");
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
            Err(GatewayError::BudgetExhausted(format!(
                "team '{}' has {left} of {} credits left {}{resets}; this text request may \
                 cost up to {amount}",
                team.name,
                budget.credits,
                period::period_phrase(budget.period),
            )))
        }
        ReserveOutcome::TooManyInFlight { in_flight } => {
            rejection("in_flight");
            Err(GatewayError::TooManyInFlight(format!(
                "team '{}' has {in_flight} unfinished requests, the most it may have at once; \
                 retry when one finishes",
                team.name
            )))
        }
    }
}

/// Where a request's reservation stands while its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reserved, not yet sent: a client that leaves gets it back.
    Reserved,
    /// Sent: a client that leaves before the answer's head is charged the reservation.
    Sent,
    /// Someone else settles it: the answer's body, or the error path.
    Done,
}

/// The reservation of a request in its handler, closed the right way if the handler is dropped
/// (its client left) before the answer's body takes it over.
struct Hold {
    state: Arc<AppState>,
    id: ReservationId,
    reserved: Credits,
    team: String,
    model: String,
    prices: ketchup_domain::pricing::TextPrices,
    stage: Stage,
}

impl Hold {
    /// Hands the reservation to the answer's body, which settles it when it ends.
    fn hand_over(&mut self) -> Settle {
        self.stage = Stage::Done;
        Settle {
            state: self.state.clone(),
            reservation: self.id,
            reserved: self.reserved,
            team: self.team.clone(),
            model: self.model.clone(),
            prices: self.prices,
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        match self.stage {
            Stage::Reserved => release_in_background(&self.state, self.id),
            Stage::Sent => self.hand_over().run(Charge {
                end: End::ClientLeft,
                tokens: None,
                consumed: None,
            }),
            Stage::Done => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_in_the_query_stays_here() {
        let uri: Uri = "/api/v1beta/models/g:streamGenerateContent?alt=sse&key=kgw_secret"
            .parse()
            .unwrap();
        assert_eq!(
            forwarded(&uri),
            "/api/v1beta/models/g:streamGenerateContent?alt=sse"
        );
        let bare: Uri = "/api/v1/messages?key=x".parse().unwrap();
        assert_eq!(forwarded(&bare), "/api/v1/messages");
        let untouched: Uri = "/api/v1/messages".parse().unwrap();
        assert_eq!(forwarded(&untouched), "/api/v1/messages");
    }
}
