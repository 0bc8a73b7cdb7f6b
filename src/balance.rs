//! Reads each upstream account's own balance (`GET /api/user` with its token) every
//! `[upstream] balance_check`, for admins, alerts and the rotation: how much credit each account
//! has left, how fast it goes, and whether the upstream still takes its token. An account at or
//! below `[upstream] balance_floor`, or whose token is refused, leaves rotation; a read of its
//! credit above the floor brings it back. A reload's new interval and floor apply from the next
//! check.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::{
    accounts::{AccountId, Check, refuses_token},
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
        for account in (0..state.accounts.len()).map(AccountId) {
            check(&state, account).await;
        }
        tokio::time::sleep(every).await;
    }
}

async fn check(state: &AppState, id: AccountId) {
    // A balance read is a request to the account like any other.
    state.rate_limits.wait_global().await;
    let request_id = format!("balance-{}", uuid::Uuid::now_v7().simple());
    let name = state.accounts.name(id);
    let account = name.as_str();
    let check = match state.upstream.account_balance(id, &request_id).await {
        Ok(answer) if refuses_token(answer.status) => Check::Unauthorized,
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
                "the upstream refused the account's token: rotate it (its token_env or token_file)"
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
    let floor = state.config.load().upstream.balance_floor;
    let lost = state.accounts.record(id, check, floor, state.clock.now());
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
