//! A team's own standing: `GET /gateway/v1/budget`, and `GET /api/user` answered in the
//! upstream's shape with the team's remaining budget (never the shared account's balance).

use std::sync::Arc;

use axum::{extract::State, response::Response};
use chrono::{DateTime, Utc};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Serialize;
use serde_json::json;

use super::json;
use crate::{error::GatewayError, headers, middleware::facts::Caller, state::AppState};
use ketchup_domain::{
    config::{Budget, BudgetPeriod, Team},
    credits::Credits,
    ledger::Standing,
    period,
};

/// Where a team stands in its current budget period.
#[derive(Debug, Serialize)]
pub struct BudgetView {
    pub team: String,
    pub period: &'static str,
    pub period_key: String,
    /// The budget; `None` for a team without one (metered, not limited).
    pub credits: Option<Credits>,
    pub spent: Credits,
    pub reserved: Credits,
    pub remaining: Option<Credits>,
    pub in_flight: u64,
    pub max_in_flight: Option<u32>,
    pub resets_at: Option<String>,
}

/// The period a team's costs go to, and when it ends.
pub fn current_period(
    team: &Team,
    now: DateTime<Utc>,
) -> (BudgetPeriod, String, Option<DateTime<Utc>>) {
    let period = team.budget.map_or(BudgetPeriod::Lifetime, |b| b.period);
    (
        period,
        period::period_key(period, now),
        period::period_end(period, now),
    )
}

/// `X-Budget-Remaining` and `X-Budget-Reset` from the standing a reservation made at `now` left:
/// what an accepted request tells its team of its budget, without another call.
pub fn insert_budget_headers(
    headers: &mut HeaderMap,
    budget: Budget,
    standing: Standing,
    now: DateTime<Utc>,
) {
    let remaining = budget
        .credits
        .saturating_sub(standing.spent)
        .saturating_sub(standing.reserved)
        .max(Credits::ZERO);
    headers.insert(
        headers::BUDGET_REMAINING,
        HeaderValue::from_str(&remaining.format_places(8)).expect("digits are header-safe"),
    );
    if let Some(end) = period::period_end(budget.period, now) {
        headers.insert(
            headers::BUDGET_RESET,
            HeaderValue::from_str(&rfc3339(end)).expect("a timestamp is header-safe"),
        );
    }
}

pub fn rfc3339(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub async fn standing(state: &AppState, team: &Team) -> Result<BudgetView, GatewayError> {
    let (period, period_key, resets_at) = current_period(team, state.clock.now());
    let totals = state.ledger.standing(&team.name, &period_key).await?;
    let in_flight = state.ledger.in_flight(&team.name).await?;
    let credits = team.budget.map(|b| b.credits);
    Ok(BudgetView {
        team: team.name.clone(),
        period: match period {
            BudgetPeriod::Daily => "daily",
            BudgetPeriod::Weekly => "weekly",
            BudgetPeriod::Monthly => "monthly",
            BudgetPeriod::Lifetime => "lifetime",
        },
        period_key,
        credits,
        spent: totals.spent,
        reserved: totals.reserved,
        remaining: credits.map(|c| {
            c.saturating_sub(totals.spent)
                .saturating_sub(totals.reserved)
                .max(Credits::ZERO)
        }),
        in_flight,
        max_in_flight: team.budget.and_then(|b| b.max_in_flight),
        resets_at: team.budget.and(resets_at).map(rfc3339),
    })
}

pub async fn budget(
    State(state): State<Arc<AppState>>,
    Caller { team, .. }: Caller,
) -> Result<Response, GatewayError> {
    let view = standing(&state, &team).await?;
    Ok(json(StatusCode::OK, &json!(view)))
}

pub async fn user_balance(
    State(state): State<Arc<AppState>>,
    Caller { team, .. }: Caller,
) -> Result<Response, GatewayError> {
    let view = standing(&state, &team).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"code": 0, "message": "ok", "data": {"credit": view.remaining}}),
    ))
}
