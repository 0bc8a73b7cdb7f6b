//! A circuit breaker in front of a ledger store reached over the network.
//!
//! When the store keeps failing (every call already has a short timeout), waiting out that
//! timeout on each request only makes clients slower: after a few consecutive outages the
//! breaker opens and calls fail at once with `StoreError::Unavailable` (a 503 "ledger
//! unavailable"), then lets a probe through after a jittered backoff (growing while probes fail), and closes again as soon as
//! one succeeds. A refused operation (`Conflict`) is an answer, not an outage, and does not
//! count. failsafe does the state machine.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use failsafe::backoff::EqualJittered;
use failsafe::failure_policy::ConsecutiveFailures;
use failsafe::futures::CircuitBreaker;
use failsafe::{Config, StateMachine};

use super::*;

/// Consecutive outages that open the breaker.
pub const OPEN_AFTER: u32 = 3;
/// How long it stays open before the first probe (about half to all of it, jittered so replicas
/// do not probe in step), growing to the maximum while probes fail.
const FIRST_PROBE: Duration = Duration::from_secs(2);
const MAX_PROBE: Duration = Duration::from_secs(8);

/// The breaker state machine; every Redis client of the gateway uses one.
pub type OutageBreaker = StateMachine<ConsecutiveFailures<EqualJittered>, ()>;

pub fn outage_breaker() -> OutageBreaker {
    let policy = failsafe::failure_policy::consecutive_failures(
        OPEN_AFTER,
        failsafe::backoff::equal_jittered(FIRST_PROBE, MAX_PROBE),
    );
    Config::new().failure_policy(policy).build()
}

pub struct Breaker {
    inner: Arc<dyn LedgerStore>,
    breaker: OutageBreaker,
}

impl Breaker {
    pub fn new(inner: Arc<dyn LedgerStore>) -> Breaker {
        Breaker {
            inner,
            breaker: outage_breaker(),
        }
    }

    async fn guard<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let is_outage = |e: &StoreError| matches!(e, StoreError::Unavailable(_));
        match self.breaker.call_with(is_outage, call).await {
            Ok(value) => Ok(value),
            Err(failsafe::Error::Inner(e)) => Err(e),
            Err(failsafe::Error::Rejected) => Err(StoreError::NotTried(
                "ledger store failing; calls are refused for a moment before the next try".into(),
            )),
        }
    }
}

#[async_trait]
impl LedgerStore for Breaker {
    async fn ping(&self) -> Result<(), StoreError> {
        self.guard(self.inner.ping()).await
    }

    async fn reserve(&self, reservation: NewReservation) -> Result<ReserveOutcome, StoreError> {
        self.guard(self.inner.reserve(reservation)).await
    }

    async fn attach_task(&self, id: ReservationId, task_id: &str) -> Result<(), StoreError> {
        self.guard(self.inner.attach_task(id, task_id)).await
    }

    async fn release(&self, id: ReservationId) -> Result<(), StoreError> {
        self.guard(self.inner.release(id)).await
    }

    async fn mark_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError> {
        self.guard(self.inner.mark_unknown_outcome(id)).await
    }

    async fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.guard(self.inner.task(task_id)).await
    }

    async fn newest_tasks_start(&self, count: u64) -> Result<TaskCursor, StoreError> {
        self.guard(self.inner.newest_tasks_start(count)).await
    }

    async fn tasks_from(
        &self,
        from: TaskCursor,
        limit: usize,
    ) -> Result<(Vec<TaskRecord>, Option<TaskCursor>), StoreError> {
        self.guard(self.inner.tasks_from(from, limit)).await
    }

    async fn settle(
        &self,
        task_id: &str,
        settlement: Settlement,
    ) -> Result<SettleOutcome, StoreError> {
        self.guard(self.inner.settle(task_id, settlement)).await
    }

    async fn expire(&self, task_id: &str, at: DateTime<Utc>) -> Result<SettleOutcome, StoreError> {
        self.guard(self.inner.expire(task_id, at)).await
    }

    async fn mark_observed(&self, task_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.guard(self.inner.mark_observed(task_id, at)).await
    }

    async fn unobserved_open_tasks(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        self.guard(self.inner.unobserved_open_tasks(before, limit))
            .await
    }

    async fn abandon_stale_reservations(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.guard(self.inner.abandon_stale_reservations(before))
            .await
    }

    async fn standing(&self, team: &str, period: &str) -> Result<Standing, StoreError> {
        self.guard(self.inner.standing(team, period)).await
    }

    async fn in_flight(&self, team: &str) -> Result<u64, StoreError> {
        self.guard(self.inner.in_flight(team)).await
    }

    async fn reservations(
        &self,
        state: TaskState,
        limit: usize,
    ) -> Result<Vec<ReservationRecord>, StoreError> {
        self.guard(self.inner.reservations(state, limit)).await
    }

    async fn release_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError> {
        self.guard(self.inner.release_unknown_outcome(id)).await
    }

    async fn usage(
        &self,
        team: Option<&str>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        self.guard(self.inner.usage(team, from, to)).await
    }

    async fn callback_target(
        &self,
        token_digest: &str,
    ) -> Result<Option<CallbackTarget>, StoreError> {
        self.guard(self.inner.callback_target(token_digest)).await
    }

    async fn enqueue_delivery(&self, delivery: NewDelivery) -> Result<bool, StoreError> {
        self.guard(self.inner.enqueue_delivery(delivery)).await
    }

    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limits: &ClaimLimits,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.guard(self.inner.claim_deliveries(now, lease_until, limits))
            .await
    }

    async fn finish_attempt(
        &self,
        id: &str,
        attempt: u32,
        outcome: AttemptOutcome,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.guard(self.inner.finish_attempt(id, attempt, outcome, at))
            .await
    }

    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.guard(self.inner.deliveries(state, limit)).await
    }

    async fn delete_finished_deliveries(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        self.guard(
            self.inner
                .delete_finished_deliveries(finished_before, limit),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// A store whose `ping` fails while `down` is set, counting the calls that reach it.
    struct Flaky {
        down: AtomicBool,
        calls: AtomicU32,
        sqlite: sqlite::SqliteStore,
    }

    impl Flaky {
        fn reach(&self) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                Err(StoreError::Unavailable("connection refused".into()))
            } else {
                Ok(())
            }
        }
    }

    #[async_trait]
    impl LedgerStore for Flaky {
        async fn ping(&self) -> Result<(), StoreError> {
            self.reach()
        }
        async fn reserve(&self, r: NewReservation) -> Result<ReserveOutcome, StoreError> {
            self.reach()?;
            self.sqlite.reserve(r).await
        }
        async fn attach_task(&self, id: ReservationId, task_id: &str) -> Result<(), StoreError> {
            self.reach()?;
            self.sqlite.attach_task(id, task_id).await
        }
        async fn release(&self, id: ReservationId) -> Result<(), StoreError> {
            self.reach()?;
            self.sqlite.release(id).await
        }
        async fn mark_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError> {
            self.sqlite.mark_unknown_outcome(id).await
        }
        async fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
            self.sqlite.task(task_id).await
        }
        async fn newest_tasks_start(&self, count: u64) -> Result<TaskCursor, StoreError> {
            self.sqlite.newest_tasks_start(count).await
        }
        async fn tasks_from(
            &self,
            from: TaskCursor,
            limit: usize,
        ) -> Result<(Vec<TaskRecord>, Option<TaskCursor>), StoreError> {
            self.sqlite.tasks_from(from, limit).await
        }
        async fn settle(&self, t: &str, s: Settlement) -> Result<SettleOutcome, StoreError> {
            self.sqlite.settle(t, s).await
        }
        async fn expire(&self, t: &str, at: DateTime<Utc>) -> Result<SettleOutcome, StoreError> {
            self.sqlite.expire(t, at).await
        }
        async fn mark_observed(&self, t: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
            self.sqlite.mark_observed(t, at).await
        }
        async fn unobserved_open_tasks(
            &self,
            before: DateTime<Utc>,
            limit: usize,
        ) -> Result<Vec<TaskRecord>, StoreError> {
            self.sqlite.unobserved_open_tasks(before, limit).await
        }
        async fn abandon_stale_reservations(&self, b: DateTime<Utc>) -> Result<u64, StoreError> {
            self.sqlite.abandon_stale_reservations(b).await
        }
        async fn standing(&self, team: &str, period: &str) -> Result<Standing, StoreError> {
            self.sqlite.standing(team, period).await
        }
        async fn in_flight(&self, team: &str) -> Result<u64, StoreError> {
            self.sqlite.in_flight(team).await
        }
        async fn reservations(
            &self,
            state: TaskState,
            limit: usize,
        ) -> Result<Vec<ReservationRecord>, StoreError> {
            self.sqlite.reservations(state, limit).await
        }
        async fn release_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError> {
            self.sqlite.release_unknown_outcome(id).await
        }
        async fn usage(
            &self,
            team: Option<&str>,
            from: DateTime<Utc>,
            to: DateTime<Utc>,
        ) -> Result<Vec<UsageRow>, StoreError> {
            self.sqlite.usage(team, from, to).await
        }
        async fn callback_target(&self, d: &str) -> Result<Option<CallbackTarget>, StoreError> {
            self.sqlite.callback_target(d).await
        }
        async fn enqueue_delivery(&self, d: NewDelivery) -> Result<bool, StoreError> {
            self.sqlite.enqueue_delivery(d).await
        }
        async fn claim_deliveries(
            &self,
            now: DateTime<Utc>,
            lease_until: DateTime<Utc>,
            limits: &ClaimLimits,
        ) -> Result<Vec<Delivery>, StoreError> {
            self.sqlite.claim_deliveries(now, lease_until, limits).await
        }
        async fn finish_attempt(
            &self,
            id: &str,
            attempt: u32,
            outcome: AttemptOutcome,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            self.sqlite.finish_attempt(id, attempt, outcome, at).await
        }
        async fn deliveries(
            &self,
            state: DeliveryState,
            limit: usize,
        ) -> Result<Vec<DeliveryRecord>, StoreError> {
            self.sqlite.deliveries(state, limit).await
        }
        async fn delete_finished_deliveries(
            &self,
            finished_before: DateTime<Utc>,
            limit: usize,
        ) -> Result<u64, StoreError> {
            self.sqlite
                .delete_finished_deliveries(finished_before, limit)
                .await
        }
    }

    #[tokio::test]
    async fn an_outage_opens_the_breaker_and_a_recovery_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky {
            down: AtomicBool::new(true),
            calls: AtomicU32::new(0),
            sqlite: sqlite::SqliteStore::open(&dir.path().join("ledger.db")).unwrap(),
        });
        let breaker = Breaker::new(flaky.clone());
        for _ in 0..OPEN_AFTER {
            assert!(matches!(
                breaker.ping().await,
                Err(StoreError::Unavailable(_))
            ));
        }
        // Open: refused without reaching the store.
        for _ in 0..20 {
            let refused = breaker.ping().await.unwrap_err();
            assert!(matches!(refused, StoreError::NotTried(_)), "{refused:?}");
            assert!(
                refused.to_string().contains("refused for a moment"),
                "{refused}"
            );
        }
        assert_eq!(flaky.calls.load(Ordering::SeqCst), OPEN_AFTER);

        // The store comes back; after the backoff a probe gets through and closes the breaker.
        flaky.down.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + MAX_PROBE * 2;
        while breaker.ping().await.is_err() {
            assert!(std::time::Instant::now() < deadline, "never closed again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(breaker.ping().await.is_ok());
    }

    #[tokio::test]
    async fn a_refusal_is_an_answer_not_an_outage() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky {
            down: AtomicBool::new(false),
            calls: AtomicU32::new(0),
            sqlite: sqlite::SqliteStore::open(&dir.path().join("ledger.db")).unwrap(),
        });
        let breaker = Breaker::new(flaky);
        for _ in 0..OPEN_AFTER * 3 {
            let refused = breaker.release(ReservationId::new()).await;
            assert!(
                matches!(refused, Err(StoreError::Conflict(_))),
                "{refused:?}"
            );
        }
        assert!(breaker.ping().await.is_ok());
    }
}
