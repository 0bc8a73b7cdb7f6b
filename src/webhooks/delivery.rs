//! Delivers queued webhooks to teams.
//!
//! The outbox lives in the ledger, so a delivery survives restarts and SIGKILL. The worker claims
//! due deliveries with a lease (a replica that dies mid-attempt only delays its claims), attempts
//! each on its own task under a cap on concurrent attempts (a slow receiver holds one slot, never
//! the worker) and a smaller cap per team (receivers of one team that never answer hold only that
//! team's share, never every slot), and records the outcome: delivered, retry later with exponential backoff and
//! jitter, or dead once the deadline has passed or the target may never be called.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use super::signing::SigningKey;
use super::target::{self, Allowed, GuardedConnector};
use crate::state::AppState;
use ketchup_domain::config::Team;
use ketchup_domain::ledger::{AttemptOutcome, ClaimLimits, Delivery};

/// How often the worker looks for retries that came due, when nothing wakes it sooner.
const POLL: Duration = Duration::from_secs(1);
/// Most of a receiver's answer that is read; the rest is not wanted and not waited for.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// A claim outlives its attempt by this much, so a slow attempt is never claimed twice.
const LEASE_MARGIN: Duration = Duration::from_secs(30);

pub async fn run(state: Arc<AppState>) {
    let slots = Arc::new(Semaphore::new(
        state.config.load().webhooks.max_concurrent_deliveries,
    ));
    let in_flight = Arc::new(InFlight::default());
    loop {
        let free = slots.available_permits();
        if free > 0 {
            match claim(&state, free, in_flight.counts()).await {
                Ok(claimed) => {
                    for delivery in claimed {
                        let Ok(slot) = slots.clone().acquire_owned().await else {
                            return;
                        };
                        let counted = in_flight.start(&delivery.team);
                        let state_for_attempt = state.clone();
                        state.background.spawn(async move {
                            attempt_and_record(&state_for_attempt, delivery).await;
                            drop(counted);
                            drop(slot);
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not claim webhook deliveries"),
            }
        }
        tokio::select! {
            _ = state.webhook_wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// This process's attempts in flight, by team: what the next claim leaves out.
#[derive(Default)]
struct InFlight(Mutex<BTreeMap<String, usize>>);

/// One attempt counted in [`InFlight`] until it is dropped.
struct Counted {
    in_flight: Arc<InFlight>,
    team: String,
}

impl InFlight {
    fn start(self: &Arc<Self>, team: &str) -> Counted {
        *self.lock().entry(team.to_owned()).or_default() += 1;
        Counted {
            in_flight: self.clone(),
            team: team.to_owned(),
        }
    }

    fn counts(&self) -> BTreeMap<String, usize> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        // Every change to the map is a single step: a poisoned lock still guards a sound map.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut counts = self.in_flight.lock();
        if let Some(count) = counts.get_mut(&self.team) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.team);
            }
        }
    }
}

async fn claim(
    state: &AppState,
    free: usize,
    busy: BTreeMap<String, usize>,
) -> Result<Vec<Delivery>, String> {
    let config = state.config.load();
    let timeout = config.webhooks.attempt_timeout;
    let now = state.clock.now();
    let lease_until = now + chrono::Duration::from_std(timeout + LEASE_MARGIN).unwrap_or_default();
    let limits = ClaimLimits {
        total: free,
        per_team: config.webhooks.max_concurrent_deliveries_per_team,
        busy,
    };
    state
        .ledger
        .claim_deliveries(now, lease_until, &limits)
        .await
        .map_err(|e| e.to_string())
}

async fn attempt_and_record(state: &AppState, mut delivery: Delivery) {
    // Sent as it is: a payload can be megabytes of images, not worth a copy per attempt.
    let body = Bytes::from(std::mem::take(&mut delivery.body));
    let outcome = attempt(state, &delivery, body).await;
    let label = match &outcome {
        AttemptOutcome::Delivered => "delivered",
        AttemptOutcome::RetryAt(..) => "failed",
        AttemptOutcome::Dead(_) => "dead",
    };
    let config = state.config.load();
    state
        .metrics
        .webhook_deliveries
        .with_label_values(&[config.team_label(&delivery.team), label])
        .inc();
    match &outcome {
        AttemptOutcome::Delivered => {
            tracing::info!(webhook_id = %delivery.id, task_id = %delivery.task_id, team = %delivery.team, attempts = delivery.attempts, "webhook delivered");
        }
        AttemptOutcome::RetryAt(at, error) => {
            tracing::info!(webhook_id = %delivery.id, task_id = %delivery.task_id, team = %delivery.team, attempts = delivery.attempts, %error, retry_at = %at, "webhook attempt failed");
        }
        AttemptOutcome::Dead(error) => {
            tracing::warn!(webhook_id = %delivery.id, task_id = %delivery.task_id, team = %delivery.team, attempts = delivery.attempts, %error, "webhook dead-lettered");
        }
    }
    if let Err(e) = state
        .ledger
        .finish_attempt(&delivery.id, delivery.attempts, outcome, state.clock.now())
        .await
    {
        // The lease runs out and the delivery is attempted again: at least once, never lost.
        tracing::warn!(webhook_id = %delivery.id, error = %e, "could not record a webhook attempt");
    }
}

/// Why an attempt failed, and whether trying again could help.
enum Failure {
    Transient(String),
    Permanent(String),
}

async fn attempt(state: &AppState, delivery: &Delivery, body: Bytes) -> AttemptOutcome {
    let config = state.config.load_full();
    let now = state.clock.now();
    if now > delivery.deadline {
        return AttemptOutcome::Dead("the delivery deadline passed before this attempt".into());
    }
    let team = config.team(&delivery.team);
    let allowed = team.map_or_else(Allowed::default, |t| Allowed::new(&t.callback_hosts));
    let result = match team {
        None => Err(Failure::Permanent(format!(
            "team {:?} is no longer configured",
            delivery.team
        ))),
        // A secret that is missing or cannot be read now may be fixed by an admin: retry.
        Some(team) => match signing_key(team) {
            Err(e) => Err(Failure::Transient(e)),
            Ok(key) => {
                post(
                    delivery,
                    body,
                    &key,
                    &allowed,
                    now,
                    config.webhooks.attempt_timeout,
                )
                .await
            }
        },
    };
    match result {
        Ok(()) => AttemptOutcome::Delivered,
        Err(Failure::Permanent(error)) => AttemptOutcome::Dead(error),
        Err(Failure::Transient(error)) => {
            let next = now + backoff(&config.webhooks, delivery.attempts);
            // A retry the worker might only claim after the deadline is not scheduled: the
            // delivery dies now, with the error that killed it rather than a bare "too late".
            let claimed_by = next + chrono::Duration::from_std(POLL).unwrap_or_default();
            if claimed_by > delivery.deadline {
                AttemptOutcome::Dead(format!("{error}; the delivery deadline passed"))
            } else {
                AttemptOutcome::RetryAt(next, error)
            }
        }
    }
}

/// The team's signing key: a delivery is never sent unsigned.
fn signing_key(team: &Team) -> Result<SigningKey, String> {
    let source = team.webhook_secret.as_ref().ok_or_else(|| {
        format!(
            "team {:?} has no webhook secret, and deliveries are never sent unsigned",
            team.name
        )
    })?;
    source
        .resolve("webhook secret")
        .map_err(|e| e.to_string())
        .and_then(|secret| SigningKey::from_secret(&secret))
        .map_err(|e| format!("webhook secret unusable: {e}"))
}

/// Most of a retry's delay that is added at random, so that receivers coming back up are not
/// hit by every waiting delivery at once.
const MAX_JITTER: f64 = 0.5;

/// Wait before the attempt after `attempts` failed ones: doubling from `first_retry`, clamped to
/// `max_retry_delay`, plus up to [`MAX_JITTER`] of that at random. The clamp comes before the
/// jitter: clamped after, every delivery past the cap would retry in lockstep.
fn backoff(config: &ketchup_domain::config::WebhooksConfig, attempts: u32) -> chrono::Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    let delay = config
        .first_retry
        .saturating_mul(1 << doublings)
        .min(config.max_retry_delay);
    let jitter = delay.mul_f64(MAX_JITTER * rand::random::<f64>());
    chrono::Duration::from_std(delay.saturating_add(jitter)).unwrap_or(chrono::Duration::MAX)
}

/// One attempt at `delivery`, whose payload is `body`.
async fn post(
    delivery: &Delivery,
    body: Bytes,
    key: &SigningKey,
    allowed: &Allowed,
    now: DateTime<Utc>,
    timeout: Duration,
) -> Result<(), Failure> {
    // Checked again at each attempt: the team's allow-list may have changed since.
    let url = target::check_url(&delivery.url, allowed).map_err(Failure::Permanent)?;
    let timestamp = now.timestamp();
    let request = Request::post(url.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("ketchup-gateway/", env!("CARGO_PKG_VERSION")),
        )
        .header("webhook-id", &delivery.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header(
            "webhook-signature",
            key.sign(&delivery.id, timestamp, &body),
        )
        .body(Full::new(body))
        .map_err(|e| Failure::Permanent(format!("cannot build the request: {e}")))?;

    let client = client_for(allowed.clone(), timeout);
    let exchange = async {
        let response = client.request(request).await.map_err(|e| {
            if let Some(refused) = permission_denied(&e) {
                Failure::Permanent(refused)
            } else {
                Failure::Transient(format!("could not reach the receiver: {}", describe(&e)))
            }
        })?;
        let status = response.status();
        // Read (a bounded part of) the answer so the exchange completes; its content is unused.
        let _ = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await;
        if status.is_success() {
            Ok(())
        } else {
            Err(Failure::Transient(format!(
                "the receiver answered {status}"
            )))
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(Failure::Transient(format!("no answer within {timeout:?}"))))
}

/// A client whose connections go only where the team may send webhooks.
fn client_for(
    allowed: Allowed,
    timeout: Duration,
) -> Client<hyper_rustls::HttpsConnector<GuardedConnector>, Full<Bytes>> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(GuardedConnector::new(allowed, timeout));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(https)
}

/// The guarded connector's refusal, if that is why the request failed.
fn permission_denied(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::PermissionDenied
        {
            return Some(io.to_string());
        }
        cause = error.source();
    }
    None
}

/// The innermost cause, which says what actually happened (refused, reset, DNS…).
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    while let Some(cause) = innermost.source() {
        innermost = cause;
    }
    innermost.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ketchup_domain::config::WebhooksConfig;

    fn config() -> WebhooksConfig {
        WebhooksConfig {
            always_intercept: false,
            delivery_deadline: Duration::from_secs(24 * 3600),
            attempt_timeout: Duration::from_secs(10),
            first_retry: Duration::from_secs(5),
            max_retry_delay: Duration::from_secs(3600),
            max_concurrent_deliveries: 32,
            max_concurrent_deliveries_per_team: 8,
            max_callback_bytes: 32 << 20,
            keep_finished: Duration::from_secs(7 * 24 * 3600),
        }
    }

    fn seconds(delay: chrono::Duration) -> f64 {
        delay.to_std().unwrap().as_secs_f64()
    }

    #[test]
    fn delays_double_from_the_first_retry_with_bounded_jitter() {
        let config = config();
        for (attempts, base) in [(1, 5.0), (2, 10.0), (3, 20.0), (6, 160.0)] {
            for _ in 0..100 {
                let delay = seconds(backoff(&config, attempts));
                assert!(
                    (base..=base * (1.0 + MAX_JITTER)).contains(&delay),
                    "attempt {attempts}: {delay} s"
                );
            }
        }
    }

    #[test]
    fn delays_at_the_cap_keep_their_jitter() {
        let config = config();
        let cap = config.max_retry_delay.as_secs_f64();
        // From the 11th attempt on, 5 s doubled is past the hour; far past it, too.
        let delays: Vec<f64> = (11..200)
            .chain([u32::MAX])
            .map(|attempts| seconds(backoff(&config, attempts)))
            .collect();
        for delay in &delays {
            assert!(
                (cap..=cap * (1.0 + MAX_JITTER)).contains(delay),
                "{delay} s"
            );
        }
        let mut distinct = delays.clone();
        distinct.sort_by(f64::total_cmp);
        distinct.dedup();
        assert!(
            distinct.len() > delays.len() / 2,
            "retries past the cap must not fall into lockstep: {delays:?}"
        );
    }
}
