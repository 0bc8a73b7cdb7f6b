//! Deletes finished webhook deliveries once `[webhooks] keep_finished` has passed.
//!
//! Without it the outbox would keep every delivery ever made. Their bodies go as soon as they
//! finish (see `LedgerStore::finish_attempt`); this takes the rows, after admins have had time
//! to look at them in `GET /admin/webhooks`. Every replica runs it: deleting is idempotent.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{app::AppState, ledger::StoreError};

/// Deliveries deleted per ledger write, so that each write is short however large the backlog.
const BATCH: usize = 500;
/// Looks at least this often, so a short `keep_finished` is kept to about what it says.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// And at most this rarely, however long deliveries are kept.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

pub async fn run(state: Arc<AppState>) {
    loop {
        let keep = state.config.load().webhooks.keep_finished;
        tokio::time::sleep((keep / 4).clamp(MIN_INTERVAL, MAX_INTERVAL)).await;
        if let Err(e) = delete_expired(&state, keep).await {
            tracing::warn!(error = %e, "could not delete finished webhook deliveries");
        }
    }
}

async fn delete_expired(state: &AppState, keep: Duration) -> Result<(), StoreError> {
    let before = earlier(state.clock.now(), keep);
    let mut deleted = 0;
    loop {
        let batch = state
            .ledger
            .delete_finished_deliveries(before, BATCH)
            .await?;
        deleted += batch;
        state.metrics.webhook_deliveries_deleted.inc_by(batch);
        if batch < BATCH as u64 {
            break;
        }
    }
    if deleted > 0 {
        tracing::info!(
            deleted,
            "finished webhook deliveries past keep_finished deleted"
        );
    }
    Ok(())
}

/// `at` minus `by`, or the earliest time there is if `by` reaches past it.
fn earlier(at: DateTime<Utc>, by: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(by)
        .ok()
        .and_then(|by| at.checked_sub_signed(by))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retention_longer_than_history_reaches_back_to_the_start_of_time() {
        let now = "2026-12-01T00:00:00Z".parse().unwrap();
        let week = Duration::from_secs(7 * 24 * 3600);
        assert_eq!(
            earlier(now, week),
            "2026-11-24T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(earlier(now, Duration::MAX), DateTime::<Utc>::MIN_UTC);
        let past_the_calendar = Duration::from_secs(400_000 * 365 * 24 * 3600);
        assert_eq!(earlier(now, past_the_calendar), DateTime::<Utc>::MIN_UTC);
    }
}
