//! Settles tasks that no client polls to the end.
//!
//! Every `interval` it asks the ledger for open tasks nobody has read for `settle_after` and reads
//! their status from the upstream itself (under a global cap of `max_reads_per_second`, and at
//! most once per `settle_after` per task, which is at least a second). Tasks past `max_task_age`
//! settle at their reservation as `expired`; reservations that never got the upstream's answer
//! (the gateway stopped mid-request) become `unknown_outcome` if they were dispatched, and are
//! given back if they never were. It also deletes expired Idempotency-Key claims and admin actions
//! past `[admin] keep_audit`. All its state is in the ledger, so after a restart it simply
//! carries on.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::{state::AppState, status_cache::Answer};
use ketchup_domain::{
    clock,
    ledger::{SettleOutcome, TaskRecord},
    settlement,
};

pub async fn run(state: Arc<AppState>) {
    let config = state.config.load().reconciler.clone();
    let reads: DefaultDirectRateLimiter =
        RateLimiter::direct(Quota::per_second(config.max_reads_per_second));
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(e) = pass(&state, &reads).await {
            tracing::warn!(error = %e, "reconciler pass failed; retrying at the next interval");
        }
    }
}

/// One look at the ledger; returns how many tasks it read or closed.
async fn pass(state: &AppState, reads: &DefaultDirectRateLimiter) -> Result<usize, String> {
    let config = state.config.load().reconciler.clone();
    let now = state.clock.now();
    let ago = |d: Duration| clock::earlier(now, d);

    let abandoned = state
        .ledger
        .abandon_stale_reservations(ago(config.abandon_after))
        .await
        .map_err(|e| e.to_string())?;
    state
        .metrics
        .reconciler_abandoned
        .inc_by(abandoned.unknown_outcome);
    state.metrics.reconciler_released.inc_by(abandoned.released);
    if abandoned.unknown_outcome > 0 {
        tracing::warn!(
            abandoned = abandoned.unknown_outcome,
            "reservations sent upstream without an answer recorded marked unknown_outcome"
        );
    }
    if abandoned.released > 0 {
        tracing::info!(
            released = abandoned.released,
            "reservations their gateway never sent upstream given back"
        );
    }
    purge_expired_keys(state, now).await?;
    delete_old_admin_actions(state, ago(state.config.load().admin.keep_audit)).await?;

    // A pass reads what the cap allows in one interval, so the backlog drains at the cap.
    let batch = (f64::from(config.max_reads_per_second.get()) * config.interval.as_secs_f64())
        .ceil()
        .max(1.0) as usize;
    let due = state
        .ledger
        .unobserved_open_tasks(ago(config.settle_after), batch)
        .await
        .map_err(|e| e.to_string())?;
    let count = due.len();
    state
        .metrics
        .reconciler_backlog
        .set(i64::try_from(count).unwrap_or(i64::MAX));
    for task in due {
        if task.created_at < ago(config.max_task_age) {
            expire(state, &task).await;
        } else {
            reads.until_ready().await;
            // Reconciler reads count against the upstream account like any other.
            state.rate_limits.wait_global().await;
            observe(state, &task).await;
        }
    }
    Ok(count)
}

/// Expired Idempotency-Key claims deleted per ledger write: each write is short, however many
/// expired since the last pass.
const PURGE_BATCH: usize = 1000;

/// Deletes every claim expired by `now`, a batch at a time, so what the claims hold stays bounded
/// by what `server.idempotency_ttl` keeps.
async fn purge_expired_keys(state: &AppState, now: DateTime<Utc>) -> Result<(), String> {
    loop {
        let purged = state
            .ledger
            .purge_expired_keys(now, PURGE_BATCH)
            .await
            .map_err(|e| e.to_string())?;
        if purged < PURGE_BATCH as u64 {
            return Ok(());
        }
    }
}

/// Deletes every admin action made before `before` (`[admin] keep_audit` ago), a batch at a time,
/// so the audit trail holds what its retention keeps and no more.
async fn delete_old_admin_actions(state: &AppState, before: DateTime<Utc>) -> Result<(), String> {
    let mut deleted = 0;
    loop {
        let batch = state
            .ledger
            .delete_admin_actions(before, PURGE_BATCH)
            .await
            .map_err(|e| e.to_string())?;
        deleted += batch;
        if batch < PURGE_BATCH as u64 {
            break;
        }
    }
    if deleted > 0 {
        tracing::info!(deleted, "admin actions past [admin] keep_audit deleted");
    }
    Ok(())
}

async fn expire(state: &AppState, task: &TaskRecord) {
    match state.ledger.expire(&task.task_id, state.clock.now()).await {
        Ok(SettleOutcome::Settled(settled)) => {
            state.metrics.reconciler_expirations.inc();
            state
                .settler
                .count_finished(&state.config.load(), &settled, "expired");
            tracing::warn!(
                task_id = %task.task_id,
                team = %settled.team,
                charged = %settled.consumed,
                "task expired without a final state: charged its reservation"
            );
            state.owners.record(&task.task_id, &task.team, true);
        }
        Ok(SettleOutcome::AlreadyClosed) => state.owners.record(&task.task_id, &task.team, true),
        Ok(SettleOutcome::NotOpen) => {}
        Err(e) => tracing::warn!(task_id = %task.task_id, error = %e, "could not expire task"),
    }
}

async fn observe(state: &AppState, task: &TaskRecord) {
    let request_id = format!("reconciler-{}", uuid::Uuid::now_v7());
    match state.query_task(&task.task_id, &request_id).await {
        Ok(answer) if answer.status.is_success() => {
            if let Some((status, consumed)) = settlement::final_state_of_query(&answer.body) {
                match state
                    .settler
                    .settle(&state.config.load(), task, status, consumed)
                    .await
                {
                    Ok(SettleOutcome::Settled(_)) => state.metrics.reconciler_settlements.inc(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(task_id = %task.task_id, error = %e, "could not settle task");
                    }
                }
                // The next client to ask gets the final status without an upstream read.
                let final_answer = Answer {
                    status: answer.status,
                    content_type: answer.content_type,
                    body: answer.body,
                    is_final: true,
                };
                state.status_cache.insert(&task.task_id, final_answer).await;
                return;
            }
        }
        Ok(answer) => {
            tracing::debug!(task_id = %task.task_id, status = %answer.status, "reconciler read not answered");
        }
        Err(e) => tracing::debug!(task_id = %task.task_id, error = %e, "reconciler read failed"),
    }
    // A failed read counts as a read too: the task waits `settle_after` before the next one, so
    // a struggling upstream is not read harder.
    if let Err(e) = state
        .ledger
        .mark_observed(&task.task_id, state.clock.now())
        .await
    {
        tracing::warn!(task_id = %task.task_id, error = %e, "could not note the reconciler's read");
    }
}
