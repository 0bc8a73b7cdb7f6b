//! The circuit breaker in front of Redis, for every Redis client of the gateway: the ledger, the
//! shared rate limits and the shared status cache each hold one.
//!
//! When Redis keeps failing (every call already has a short timeout), waiting out that timeout
//! on each request only makes clients slower: after a few consecutive outages the breaker opens
//! and calls fail at once, then it lets a probe through after a jittered backoff (growing while
//! probes fail), and closes again as soon as one succeeds. failsafe does the state machine.
//!
//! Each client puts its breaker where all of its calls already pass: the one helper that bounds
//! a call by the command timeout (for the ledger, `RedisStore::bounded`). So each round trip is
//! guarded without any list of operations to keep in step with the ledger's traits, and only what
//! Redis itself did counts: a refused operation (`Conflict`) is an answer the engine reads out of
//! a reply that came back, not an outage. The SQLite ledger, a file on the gateway's own disk, has
//! none: its calls never wait out a network timeout, so failing them early would gain nothing.

use std::future::Future;
use std::time::Duration;

use failsafe::backoff::EqualJittered;
use failsafe::failure_policy::ConsecutiveFailures;
use failsafe::futures::CircuitBreaker;
use failsafe::{Config, StateMachine};

use super::StoreError;

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

/// The ledger's breaker: counts `StoreError::Unavailable` as an outage, and while open answers
/// `StoreError::NotTried` (a 503 "ledger unavailable") without running the call.
pub(crate) struct Breaker {
    machine: OutageBreaker,
}

impl Breaker {
    pub(crate) fn new() -> Breaker {
        Breaker {
            machine: outage_breaker(),
        }
    }

    /// Runs `call` unless the breaker is open; a call it refuses is never polled.
    pub(crate) async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let is_outage = |e: &StoreError| matches!(e, StoreError::Unavailable(_));
        match self.machine.call_with(is_outage, call).await {
            Ok(value) => Ok(value),
            Err(failsafe::Error::Inner(e)) => Err(e),
            Err(failsafe::Error::Rejected) => Err(StoreError::NotTried(
                "ledger store failing; calls are refused for a moment before the next try".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// The store's side of a call: fails with an outage while `down` is set, counting the calls
    /// that reach it.
    struct Flaky {
        down: AtomicBool,
        calls: AtomicU32,
    }

    impl Flaky {
        fn new(down: bool) -> Flaky {
            Flaky {
                down: AtomicBool::new(down),
                calls: AtomicU32::new(0),
            }
        }

        async fn reach(&self) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                Err(StoreError::Unavailable("connection refused".into()))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn an_outage_opens_the_breaker_and_a_recovery_closes_it() {
        let flaky = Flaky::new(true);
        let breaker = Breaker::new();
        for _ in 0..OPEN_AFTER {
            assert!(matches!(
                breaker.call(flaky.reach()).await,
                Err(StoreError::Unavailable(_))
            ));
        }
        // Open: refused without reaching the store.
        for _ in 0..20 {
            let refused = breaker.call(flaky.reach()).await.unwrap_err();
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
        while breaker.call(flaky.reach()).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "never closed again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(breaker.call(flaky.reach()).await.is_ok());
    }

    #[tokio::test]
    async fn a_refusal_is_an_answer_not_an_outage() {
        let flaky = Flaky::new(false);
        let breaker = Breaker::new();
        for _ in 0..OPEN_AFTER * 3 {
            let refused = breaker
                .call(async {
                    flaky.reach().await?;
                    Err::<(), _>(StoreError::Conflict("reservation is not reserved".into()))
                })
                .await;
            assert!(
                matches!(refused, Err(StoreError::Conflict(_))),
                "{refused:?}"
            );
        }
        assert!(breaker.call(flaky.reach()).await.is_ok());
        assert_eq!(flaky.calls.load(Ordering::SeqCst), OPEN_AFTER * 3 + 1);
    }
}
