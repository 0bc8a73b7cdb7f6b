//! The admin API, behind an admin token: every team's standing, usage reports, the reservations
//! whose outcome is unknown, and the audit trail of what admins changed.

use std::sync::Arc;

use axum::{
    extract::{Path, RawQuery, State},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::json;

use super::{budget::standing, json};
use crate::{error::GatewayError, state::AppState};
use ketchup_domain::ledger::{AuditQuery, DeliveryState, ReservationId, TaskState, UsageRow};

/// Most reservations one listing returns.
const LISTING_LIMIT: usize = 1000;
/// Admin actions one page of the audit trail lists unless `limit` says otherwise.
const AUDIT_PAGE: usize = 100;

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
        .filter(|value| !value.is_empty())
}

pub async fn teams(State(state): State<Arc<AppState>>) -> Result<Response, GatewayError> {
    let config = state.config.load_full();
    let mut teams = Vec::with_capacity(config.teams.len());
    for team in &config.teams {
        teams.push(standing(&state, team).await?);
    }
    Ok(json(StatusCode::OK, &json!({ "teams": teams })))
}

/// `GET /admin/usage?team=&from=YYYY-MM-DD&to=YYYY-MM-DD`: `from` inclusive (default: the first
/// of this month), `to` exclusive (default: tomorrow). JSON, or CSV for `Accept: text/csv`.
pub async fn usage(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, GatewayError> {
    let today = state.clock.now().date_naive();
    let date = |name: &str, default: NaiveDate| match query_param(query.as_deref(), name) {
        None => Ok(default),
        Some(text) => NaiveDate::parse_from_str(&text, "%Y-%m-%d").map_err(|_| {
            GatewayError::InvalidRequest(format!("{name} must be a date such as 2026-11-01"))
        }),
    };
    let from = date("from", today.with_day(1).unwrap_or(today))?;
    let to = date("to", today.succ_opt().unwrap_or(today))?;
    if from >= to {
        return Err(GatewayError::InvalidRequest(
            "from must be before to".into(),
        ));
    }
    let team = query_param(query.as_deref(), "team");
    if let Some(name) = &team
        && state.config.load().team(name).is_none()
    {
        return Err(GatewayError::InvalidRequest(format!("no team {name:?}")));
    }
    let midnight = |day: NaiveDate| Utc.from_utc_datetime(&day.and_time(chrono::NaiveTime::MIN));
    let rows = state
        .ledger
        .usage(team.as_deref(), midnight(from), midnight(to))
        .await?;

    let wants_csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/csv"));
    if !wants_csv {
        return Ok(json(
            StatusCode::OK,
            &json!({"from": from.to_string(), "to": to.to_string(), "rows": rows}),
        ));
    }
    let csv = usage_csv(&rows);
    let mut response = (StatusCode::OK, csv).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    Ok(response)
}

/// The usage rows as CSV, a header line first. Team names and route families are labels of
/// letters, digits, '-' and '_'; the config does not restrict key labels or model names, so a
/// comma, quote or newline in one is replaced. No field needs CSV quoting.
fn usage_csv(rows: &[UsageRow]) -> String {
    let mut csv =
        String::from("day,team,key,family,model,tasks,succeeded,failed,unsettled,credits\n");
    for row in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            row.day,
            row.team,
            row.key.replace([',', '"', '\n'], "_"),
            row.family,
            row.model.replace([',', '"', '\n'], "_"),
            row.tasks,
            row.succeeded,
            row.failed,
            row.unsettled,
            row.credits.format_places(8)
        ));
    }
    csv
}

/// `GET /admin/reservations?state=unknown_outcome` (the default state).
pub async fn reservations(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, GatewayError> {
    let wanted = query_param(query.as_deref(), "state").unwrap_or_else(|| "unknown_outcome".into());
    let task_state = TaskState::parse(&wanted).ok_or_else(|| {
        GatewayError::InvalidRequest(
            "state must be one of reserved, open, unknown_outcome, settled, released, expired"
                .into(),
        )
    })?;
    let reservations = state.ledger.reservations(task_state, LISTING_LIMIT).await?;
    Ok(json(
        StatusCode::OK,
        &json!({ "reservations": reservations }),
    ))
}

/// `GET /admin/webhooks?state=dead`: deliveries to teams in one state (default: dead-lettered),
/// with their attempts and last error. URLs are shown without their query, which may hold a
/// team's own token.
pub async fn webhooks(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, GatewayError> {
    let wanted = query_param(query.as_deref(), "state").unwrap_or_else(|| "dead".into());
    let delivery_state = DeliveryState::parse(&wanted).ok_or_else(|| {
        GatewayError::InvalidRequest("state must be one of pending, delivered, dead".into())
    })?;
    let mut deliveries = state
        .ledger
        .deliveries(delivery_state, LISTING_LIMIT)
        .await?;
    for delivery in &mut deliveries {
        if let Ok(mut url) = url::Url::parse(&delivery.url) {
            url.set_query(None);
            let _ = url.set_password(None);
            delivery.url = url.into();
        }
    }
    Ok(json(StatusCode::OK, &json!({ "webhooks": deliveries })))
}

/// `GET /admin/upstream`: each upstream account's credit, when it was read, and its state, as
/// the balance check last saw them (`[upstream] balance_check`).
pub async fn upstream(State(state): State<Arc<AppState>>) -> Response {
    json(
        StatusCode::OK,
        &json!({ "accounts": state.accounts.views() }),
    )
}

/// `GET /admin/audit?limit=&before=&since=&admin=`: admin actions, newest first. `limit` (1 to
/// 1000, default 100) bounds the page; `before` (an action's id) starts it below the last one of
/// the page before, which `next_before` gives while there may be more; `since` (RFC 3339) and
/// `admin` (a label) filter.
pub async fn audit(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, GatewayError> {
    let param = |name: &str| query_param(query.as_deref(), name);
    let limit = match param("limit") {
        None => AUDIT_PAGE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=LISTING_LIMIT).contains(n))
            .ok_or_else(|| {
                GatewayError::InvalidRequest(format!(
                    "limit must be a whole number from 1 to {LISTING_LIMIT}"
                ))
            })?,
    };
    let before = param("before")
        .map(|text| {
            text.parse::<u64>().map_err(|_| {
                GatewayError::InvalidRequest(
                    "before must be an action's id, as next_before gives it".into(),
                )
            })
        })
        .transpose()?;
    let since = param("since")
        .map(|text| {
            DateTime::parse_from_rfc3339(&text)
                .map(|at| at.with_timezone(&Utc))
                .map_err(|_| {
                    GatewayError::InvalidRequest(
                        "since must be an RFC 3339 time such as 2026-11-01T00:00:00Z".into(),
                    )
                })
        })
        .transpose()?;
    let actions = state
        .ledger
        .admin_actions(AuditQuery {
            before,
            since,
            admin: param("admin"),
            limit,
        })
        .await?;
    let next_before = (actions.len() == limit)
        .then(|| actions.last().map(|action| action.id))
        .flatten();
    Ok(json(
        StatusCode::OK,
        &json!({ "actions": actions, "next_before": next_before }),
    ))
}

/// `POST /admin/reservations/{id}/release`: the admin has checked that the upstream did not
/// charge a reservation whose outcome was unknown; its credits go back to the team.
pub async fn release_reservation(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let uuid = uuid::Uuid::parse_str(&id)
        .map_err(|_| GatewayError::InvalidRequest("the reservation id must be a UUID".into()))?;
    state
        .ledger
        .release_unknown_outcome(ReservationId(uuid))
        .await?;
    tracing::info!(reservation = %uuid, "unknown-outcome reservation released by an admin");
    Ok(json(StatusCode::OK, &json!({ "released": id })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_csv_puts_the_key_and_family_after_the_team_in_every_line() {
        let row = UsageRow {
            day: "2026-11-23".into(),
            team: "design".into(),
            key: "ci,\"bot\"".into(),
            family: "video".into(),
            model: "odd,\"model\"".into(),
            tasks: 3,
            succeeded: 1,
            failed: 1,
            unsettled: 1,
            credits: "1.2".parse().unwrap(),
        };
        assert_eq!(
            usage_csv(&[row]).lines().collect::<Vec<_>>(),
            [
                "day,team,key,family,model,tasks,succeeded,failed,unsettled,credits",
                "2026-11-23,design,ci__bot_,video,odd__model_,3,1,1,1,1.20000000",
            ]
        );
    }
}
