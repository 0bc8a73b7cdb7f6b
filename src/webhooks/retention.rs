//! Deletes finished webhook deliveries once `[webhooks] keep_finished` has passed.
//!
//! Without it the outbox would keep every delivery ever made. Their bodies go as soon as they
//! finish (see `Outbox::finish_attempt`); this takes the rows, after admins have had time
//! to look at them in `GET /admin/webhooks`. Every replica runs it: deleting is idempotent.

use std::sync::Arc;
use std::time::Duration;

use crate::state::AppState;
use ketchup_domain::{clock, ledger::StoreError};

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
    let before = clock::earlier(state.clock.now(), keep);
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
