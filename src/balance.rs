//! Reads the upstream account's own balance (`GET /api/user` with its token) every
//! `[upstream] balance_check`, for admins and alerts: how much credit the shared account has
//! left, how fast it goes, and whether the upstream still takes the token. A reload's new
//! interval applies from the next check.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::{
    accounts::{Check, DEFAULT_ACCOUNT},
    metrics::credits,
    state::AppState,
};
use ketchup_domain::credits::Credits;

/// How often a gateway with the check turned off looks whether a reload turned it on.
const WHILE_OFF: Duration = Duration::from_secs(5);

pub async fn run(state: Arc<AppState>) {
    loop {
        let Some(every) = state.config.load().upstream.balance_check else {
            tokio::time::sleep(WHILE_OFF).await;
            continue;
        };
        check(&state, DEFAULT_ACCOUNT).await;
        tokio::time::sleep(every).await;
    }
}

async fn check(state: &AppState, account: &str) {
    // A balance read is a request to the account like any other.
    state.rate_limits.wait_global().await;
    let request_id = format!("balance-{}", uuid::Uuid::now_v7().simple());
    let check = match state.upstream.account_balance(&request_id).await {
        Ok(answer) if matches!(answer.status.as_u16(), 401 | 403) => Check::Unauthorized,
        Ok(answer) if answer.status.is_success() => match credit_of(&answer.body) {
            Some(credit) => Check::Credit(credit),
            None => Check::Failed("the upstream's answer has no data.credit".into()),
        },
        Ok(answer) => Check::Failed(format!("the upstream answered {}", answer.status)),
        Err(e) => Check::Failed(e.to_string()),
    };
    let metrics = &state.metrics;
    let outcome = match &check {
        Check::Credit(credit) => {
            metrics
                .upstream_credit
                .with_label_values(&[account])
                .set(credits(*credit));
            "ok"
        }
        Check::Unauthorized => {
            tracing::error!(
                account,
                "the upstream refused the account's token: rotate it ([upstream] token_env or token_file)"
            );
            "unauthorized"
        }
        Check::Failed(error) => {
            tracing::warn!(
                account,
                error,
                "could not read the upstream account's balance"
            );
            "failed"
        }
    };
    metrics
        .upstream_balance_checks
        .with_label_values(&[account, outcome])
        .inc();
    let lost = state.accounts.record(account, check, state.clock.now());
    if lost > Credits::ZERO {
        metrics
            .upstream_credit_consumed
            .with_label_values(&[account])
            .inc_by(credits(lost));
    }
}

/// `data.credit` of a `{"code":0,…}` answer, an exact decimal string.
fn credit_of(body: &[u8]) -> Option<Credits> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.get("data")?.get("credit")?.as_str()?.parse().ok()
}
