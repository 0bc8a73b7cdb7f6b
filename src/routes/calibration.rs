//! `GET /admin/models`, behind the admin token: per model and value of its cost field, what the
//! configuration reserves against the costs the gateway settled (see
//! `ketchup_domain::calibration`), so that an admin sees a reservation that is too low before
//! a team overruns its budget.

use std::sync::Arc;

use axum::{extract::State, response::Response};
use http::StatusCode;
use serde_json::json;

use super::json;
use crate::{error::GatewayError, state::AppState};
use ketchup_domain::calibration::{self, Line, WINDOW_DAYS, day_key, merge_days, window_start};

/// `GET /admin/models`: the table over the days of the window up to today.
pub async fn models(State(state): State<Arc<AppState>>) -> Result<Response, GatewayError> {
    let config = state.config.load_full();
    let now = state.clock.now();
    let (first, last) = (window_start(now), now.date_naive());
    let records = state.ledger.settled_costs(first, last).await?;
    let observed = merge_days(records)
        .into_iter()
        .map(|(key, histogram)| (key, histogram.summary()))
        .collect();
    let lines: Vec<Line> = calibration::rows(&config, &observed)
        .iter()
        .map(calibration::Row::line)
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({
            "window_days": WINDOW_DAYS,
            "from": day_key(first),
            "to": day_key(last),
            "models": lines,
        }),
    ))
}
