//! Budget notifications as the gateway sends them (what they are: `ketchup_domain::notices`).
//!
//! They are looked for right after each reservation, with the standing the reservation returned,
//! so the threshold it reached is claimed at once; and by a sweep every `[reconciler] interval`
//! over each notified team's standing in its current period, which catches a threshold reached
//! by a settlement above its reservation, and one that a stop between a reservation and its
//! claim left unclaimed. Queued notifications go out through the delivery worker, signed with
//! the team's webhook secret and only where its `callback_hosts` and the SSRF guard allow.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::state::AppState;
use ketchup_domain::config::{Team, Thresholds};
use ketchup_domain::ledger::Standing;
use ketchup_domain::notices::Seen;
use ketchup_domain::period;

/// Looks for thresholds a reservation reached: `standing` is what it returned (this reservation
/// included), in `period` at `at`. Claims those due in the background, so the request does not
/// wait for it; most reservations find none due and cost nothing here.
pub fn after_reservation(
    state: &Arc<AppState>,
    team: &Arc<Team>,
    period: &str,
    standing: Standing,
    at: DateTime<Utc>,
) {
    let seen = Seen {
        team,
        period,
        standing,
        at,
    };
    let due = state.notifier.due(seen);
    if due.is_empty() {
        return;
    }
    let (state, team, period) = (state.clone(), team.clone(), period.to_owned());
    let background = state.background.clone();
    background.spawn(async move {
        let seen = Seen {
            team: &team,
            period: &period,
            standing,
            at,
        };
        notify(&state, seen, due).await;
    });
}

/// The sweep: every `[reconciler] interval`, each notified team's current standing.
pub async fn run(state: Arc<AppState>) {
    let mut ticks = tokio::time::interval(state.config.load().reconciler.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let config = state.config.load_full();
        for team in &config.teams {
            let Some(budget) = team.budget.filter(|_| team.notify_url.is_some()) else {
                continue;
            };
            let at = state.clock.now();
            let period = period::period_key(budget.period, at);
            let standing = match state.ledger.standing(&team.name, &period).await {
                Ok(standing) => standing,
                Err(e) => {
                    tracing::warn!(team = %team.name, error = %e, "could not read a budget to notify on; retrying at the next interval");
                    continue;
                }
            };
            let seen = Seen {
                team,
                period: &period,
                standing,
                at,
            };
            let due = state.notifier.due(seen);
            if !due.is_empty() {
                notify(&state, seen, due).await;
            }
        }
    }
}

/// Claims `due` and queues what is claimed; what the ledger could not answer stays due, for the
/// next reservation or sweep.
async fn notify(state: &AppState, seen: Seen<'_>, due: Thresholds) {
    let config = state.config.load();
    let deadline = config.webhooks.delivery_deadline;
    let result = state
        .notifier
        .notify(&*state.ledger, seen, due, deadline)
        .await;
    let (queued, error) = match result {
        Ok(queued) => (queued, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    for percent in &queued {
        let threshold = percent.to_string();
        state
            .metrics
            .budget_notifications
            .with_label_values(&[config.team_label(&seen.team.name), threshold.as_str()])
            .inc();
        tracing::info!(team = %seen.team.name, period = seen.period, threshold_percent = percent, spent = %seen.standing.spent, reserved = %seen.standing.reserved, "budget notification queued");
    }
    if !queued.is_empty() {
        state.webhook_wake.notify_one();
    }
    if let Some(e) = error {
        tracing::warn!(team = %seen.team.name, period = seen.period, error = %e, "could not claim a budget notification; trying again at the next reservation or sweep");
    }
}
