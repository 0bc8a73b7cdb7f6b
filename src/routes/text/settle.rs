//! Settling a text answer once it ends: at the cost its usage reports (tokens × the model's
//! prices, or the answer's own `consumed`), or at its reservation when no usage came, which is
//! logged and counted, never silently zero. In the background, so that neither a client that
//! left nor a ledger that hiccups loses the charge; a ledger that stays away leaves the
//! reservation to the reconciler, which charges it as an unknown outcome.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::metrics;
use crate::state::AppState;
use ketchup_domain::{
    credits::Credits,
    ledger::{FinalStatus, ReservationId, SettleOutcome, Settlement, StoreError},
    pricing::TextPrices,
    settlement::Consumed,
};

/// How an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The upstream finished it.
    Complete,
    /// The upstream broke it off, or ended it with its own error.
    UpstreamError,
    /// The upstream fell silent for longer than the idle timeout.
    UpstreamTimeout,
    /// The client went away first.
    ClientLeft,
}

impl End {
    /// The `reason` label when the answer is charged its reservation.
    fn reason(self) -> &'static str {
        match self {
            End::Complete => "no_usage",
            End::UpstreamError => "upstream_error",
            End::UpstreamTimeout => "upstream_timeout",
            End::ClientLeft => "client_left",
        }
    }

    /// What the client's stream is told when it ends this way.
    pub fn describe(self) -> &'static str {
        match self {
            End::UpstreamTimeout => "the upstream stopped sending the answer (upstream timeout)",
            _ => "the upstream's answer broke off (upstream unavailable)",
        }
    }
}

/// What an answer reported by its end.
#[derive(Debug, Clone)]
pub struct Charge {
    pub end: End,
    /// Input and output tokens, when the answer reported its final count.
    pub tokens: Option<(u64, u64)>,
    /// `consumed`, as the answer wrote it.
    pub consumed: Option<Value>,
}

/// Everything needed to settle one text request's reservation.
pub struct Settle {
    pub state: Arc<AppState>,
    pub reservation: ReservationId,
    pub reserved: Credits,
    pub team: String,
    pub model: String,
    pub prices: TextPrices,
}

/// Between tries of the settlement while the ledger is unavailable: from the first to the last,
/// doubling.
const RETRY_WHILE_UNAVAILABLE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

impl Settle {
    /// Settles in the background, where it outlives the request.
    pub fn run(self, charge: Charge) {
        let background = self.state.background.clone();
        background.spawn(self.settle(charge));
    }

    /// The amount and status charged for what the answer reported.
    fn amount(&self, charge: &Charge) -> (Credits, Option<&'static str>) {
        if let Consumed::Exact(consumed) = Consumed::from_json(charge.consumed.as_ref()) {
            return (consumed, None);
        }
        match charge
            .tokens
            .and_then(|(input, output)| self.prices.cost(input, output))
        {
            Some(cost) => (cost, None),
            None => (self.reserved, Some(charge.end.reason())),
        }
    }

    async fn settle(self, charge: Charge) {
        let (amount, at_reservation) = self.amount(&charge);
        let status = if charge.end == End::Complete {
            FinalStatus::Success
        } else {
            FinalStatus::Failed
        };
        let settlement = Settlement {
            status,
            consumed: amount,
            at: self.state.clock.now(),
        };
        let config = self.state.config.load_full();
        let team = config.team_label(&self.team);
        let model = config.model_label(&self.model);
        let metrics = &self.state.metrics;
        if let Some(reason) = at_reservation {
            tracing::warn!(
                reservation = %self.reservation.0, team, model, reason,
                "a text answer reported no usage: charged its reservation"
            );
            metrics
                .text_settled_at_reservation
                .with_label_values(&[team, reason])
                .inc();
        } else if let Some((input, output)) = charge.tokens {
            metrics
                .text_tokens
                .with_label_values(&[team, model, "input"])
                .inc_by(input);
            metrics
                .text_tokens
                .with_label_values(&[team, model, "output"])
                .inc_by(output);
        }
        let ledger = self.state.ledger.clone();
        let id = self.reservation;
        let settled = keep_trying(&self.state, id, "settle a text answer", || {
            ledger.settle_reservation(id, settlement)
        })
        .await;
        match settled {
            Some(SettleOutcome::Settled(settled)) => {
                let settlement_metrics = &metrics.settlement;
                settlement_metrics
                    .credits_consumed
                    .with_label_values(&[team, model])
                    .inc_by(metrics::credits(settled.consumed));
                self.state.settler.count_spent(&config, &settled);
                let error = settled.consumed.units() - settled.reserved.units();
                settlement_metrics
                    .reservation_error
                    .with_label_values(&[model])
                    .observe(metrics::credits(Credits::from_units(error)));
            }
            Some(outcome) => {
                tracing::debug!(reservation = %id.0, ?outcome, "text reservation closed before");
            }
            None => {}
        }
    }
}

/// Gives a reservation back in the background (the upstream never took the request, or
/// refused it).
pub fn release_in_background(state: &Arc<AppState>, id: ReservationId) {
    let task_state = state.clone();
    state.background.spawn(async move {
        let ledger = task_state.ledger.clone();
        keep_trying(&task_state, id, "release a text reservation", || {
            ledger.release(id)
        })
        .await;
    });
}

/// Runs a ledger write about a reservation, and again while the ledger is unavailable, until it
/// is applied (its answer), refused as a conflict, or `reconciler.abandon_after` has passed: the
/// reconciler then takes the reservation over.
async fn keep_trying<T, F>(
    state: &AppState,
    id: ReservationId,
    what: &'static str,
    mut write: impl FnMut() -> F,
) -> Option<T>
where
    F: Future<Output = Result<T, StoreError>>,
{
    let patience = state.config.load().reconciler.abandon_after;
    let give_up = tokio::time::Instant::now() + patience;
    let mut wait = RETRY_WHILE_UNAVAILABLE.0;
    loop {
        match write().await {
            Ok(answer) => return Some(answer),
            Err(StoreError::Conflict(e)) => {
                tracing::debug!(reservation = %id.0, error = %e, "ledger write not needed: {what}");
                return None;
            }
            Err(e) if tokio::time::Instant::now() + wait < give_up => {
                tracing::warn!(reservation = %id.0, error = %e, "could not {what}; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_WHILE_UNAVAILABLE.1);
            }
            Err(e) => {
                tracing::error!(reservation = %id.0, error = %e, "could not {what}; the reconciler will take the reservation over");
                return None;
            }
        }
    }
}
