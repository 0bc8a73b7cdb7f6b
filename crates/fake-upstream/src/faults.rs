//! Fault injection: the failures a real upstream shows now and then, on demand.
//!
//! Tests queue exact faults for the next requests ([`Faults::inject_generate`],
//! [`Faults::inject_query`]); benchmarks and the demo set probabilities ([`FaultRates`]). A queued
//! fault always wins over the rates. Faults hit generations and queries only (not `/api/user`),
//! and are drawn for every request that arrives, before authentication and validation: a
//! real server error does not care whether the request was any good. Every fault drawn is
//! counted ([`FaultCounts`]), so a chaos run can say how many it suffered.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer `500 {"code":1,"message":"internal server error"}`. A generation creates no task.
    Status500,
    /// Wait this long, then answer normally. A generation creates its task *before* waiting, so a
    /// client that times out is left with an unknown outcome, as with the real service.
    Slow(Duration),
    /// Close the TCP connection without any HTTP response. A generation creates no task.
    DropConnection,
    /// The created task ends `failed` ("content policy violation", consumed zero). Only
    /// generations have a task to fail: a query with this fault is answered normally.
    FailTask,
}

/// Per-request probabilities from 0.0 to 1.0 (above 1 acts as 1; below 0 and NaN act as 0).
/// Checked in the order `status_500`, `drop_connection`, `slow`: the first hit wins.
/// `fail_task` is rolled on its own for every generation that creates a task.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRates {
    pub status_500: f64,
    pub drop_connection: f64,
    pub slow: f64,
    /// How long a `slow` hit waits.
    pub slow_for_ms: u64,
    pub fail_task: f64,
}

/// How many faults were drawn, queued and rolled alike, by endpoint and kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts {
    pub generate_500: u64,
    pub generate_dropped: u64,
    pub generate_slow: u64,
    /// Generations drawn to end `failed` (if they create a task).
    pub failed_tasks: u64,
    pub query_500: u64,
    pub query_dropped: u64,
    pub query_slow: u64,
}

impl FaultCounts {
    /// Every fault counted, of any kind.
    pub fn total(&self) -> u64 {
        self.generate_500
            + self.generate_dropped
            + self.generate_slow
            + self.failed_tasks
            + self.query_500
            + self.query_dropped
            + self.query_slow
    }
}

/// The fault plan of one fake upstream, shared by all its connections.
#[derive(Debug, Default)]
pub struct Faults {
    generate: FaultQueue,
    query: FaultQueue,
    rates: RwLock<FaultRates>,
    /// The faults drawn so far, in the slots [`Faults::draw`] gives each kind.
    drawn: [AtomicU64; 7],
}

/// Which endpoint a fault is being drawn for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Generate,
    Query,
}

impl Faults {
    /// The next `times` `POST /api/image/gen` requests get `fault`, after any already queued.
    pub fn inject_generate(&self, fault: Fault, times: usize) {
        self.generate.push(fault, times);
    }

    /// The next `times` `GET /api/task/query` requests get `fault`, after any already queued.
    pub fn inject_query(&self, fault: Fault, times: usize) {
        self.query.push(fault, times);
    }

    /// Replaces the probabilistic faults; `FaultRates::default()` turns them off.
    pub fn set_rates(&self, rates: FaultRates) {
        *self.rates.write().unwrap_or_else(PoisonError::into_inner) = rates;
    }

    /// The current probabilistic faults.
    pub fn rates(&self) -> FaultRates {
        self.rates
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many faults were drawn since the start or the last [`Faults::reset_counts`].
    pub fn counts(&self) -> FaultCounts {
        let [g500, gdrop, gslow, q500, qdrop, qslow, failed] =
            self.drawn.each_ref().map(|n| n.load(Ordering::Relaxed));
        FaultCounts {
            generate_500: g500,
            generate_dropped: gdrop,
            generate_slow: gslow,
            failed_tasks: failed,
            query_500: q500,
            query_dropped: qdrop,
            query_slow: qslow,
        }
    }

    pub(crate) fn reset_counts(&self) {
        for count in &self.drawn {
            count.store(0, Ordering::Relaxed);
        }
    }

    /// Draws the fault for one request, a queued one first, else a roll of the rates, and
    /// counts it.
    pub(crate) fn draw(&self, endpoint: Endpoint) -> Option<Fault> {
        let fault = self.pick(endpoint);
        let slot = match (endpoint, fault?) {
            (Endpoint::Generate, Fault::Status500) => 0,
            (Endpoint::Generate, Fault::DropConnection) => 1,
            (Endpoint::Generate, Fault::Slow(_)) => 2,
            (Endpoint::Query, Fault::Status500) => 3,
            (Endpoint::Query, Fault::DropConnection) => 4,
            (Endpoint::Query, Fault::Slow(_)) => 5,
            (Endpoint::Generate, Fault::FailTask) => 6,
            // A query with this fault is answered normally: nothing was injected.
            (Endpoint::Query, Fault::FailTask) => return fault,
        };
        self.drawn[slot].fetch_add(1, Ordering::Relaxed);
        fault
    }

    fn pick(&self, endpoint: Endpoint) -> Option<Fault> {
        let queue = match endpoint {
            Endpoint::Generate => &self.generate,
            Endpoint::Query => &self.query,
        };
        if let Some(fault) = queue.pop() {
            return Some(fault);
        }
        let rates = self.rates.read().unwrap_or_else(PoisonError::into_inner);
        if hit(rates.status_500) {
            Some(Fault::Status500)
        } else if hit(rates.drop_connection) {
            Some(Fault::DropConnection)
        } else if hit(rates.slow) {
            Some(Fault::Slow(Duration::from_millis(rates.slow_for_ms)))
        } else if endpoint == Endpoint::Generate && hit(rates.fail_task) {
            Some(Fault::FailTask)
        } else {
            None
        }
    }
}

/// True with probability `rate`; never panics, whatever the rate.
fn hit(rate: f64) -> bool {
    rate > 0.0 && rand::random::<f64>() < rate
}

/// Queued faults plus their count, so the common empty case costs one atomic load, not a lock.
#[derive(Debug, Default)]
struct FaultQueue {
    len: AtomicUsize,
    faults: Mutex<VecDeque<Fault>>,
}

impl FaultQueue {
    fn push(&self, fault: Fault, times: usize) {
        let mut faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        faults.extend(std::iter::repeat_n(fault, times));
        self.len.store(faults.len(), Ordering::Release);
    }

    fn pop(&self) -> Option<Fault> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        let fault = faults.pop_front();
        self.len.store(faults.len(), Ordering::Release);
        fault
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_faults_come_out_in_order_and_per_endpoint() {
        let faults = Faults::default();
        faults.inject_generate(Fault::Status500, 2);
        faults.inject_generate(Fault::FailTask, 1);
        faults.inject_query(Fault::DropConnection, 1);
        assert_eq!(faults.draw(Endpoint::Query), Some(Fault::DropConnection));
        assert_eq!(faults.draw(Endpoint::Query), None);
        assert_eq!(faults.draw(Endpoint::Generate), Some(Fault::Status500));
        assert_eq!(faults.draw(Endpoint::Generate), Some(Fault::Status500));
        assert_eq!(faults.draw(Endpoint::Generate), Some(Fault::FailTask));
        assert_eq!(faults.draw(Endpoint::Generate), None);
    }

    #[test]
    fn certain_rates_always_hit_and_fail_task_is_generate_only() {
        let faults = Faults::default();
        faults.set_rates(FaultRates {
            slow: 1.0,
            slow_for_ms: 7,
            ..FaultRates::default()
        });
        assert_eq!(
            faults.draw(Endpoint::Query),
            Some(Fault::Slow(Duration::from_millis(7)))
        );
        faults.set_rates(FaultRates {
            fail_task: 1.0,
            ..FaultRates::default()
        });
        assert_eq!(faults.draw(Endpoint::Generate), Some(Fault::FailTask));
        assert_eq!(faults.draw(Endpoint::Query), None);
    }

    #[test]
    fn every_fault_drawn_is_counted_by_endpoint_and_kind() {
        let faults = Faults::default();
        faults.inject_generate(Fault::Status500, 2);
        faults.inject_generate(Fault::DropConnection, 1);
        faults.inject_generate(Fault::Slow(Duration::ZERO), 1);
        faults.inject_generate(Fault::FailTask, 1);
        faults.inject_query(Fault::Status500, 1);
        faults.inject_query(Fault::DropConnection, 2);
        faults.inject_query(Fault::Slow(Duration::ZERO), 3);
        faults.inject_query(Fault::FailTask, 1);
        while faults.draw(Endpoint::Generate).is_some() {}
        while faults.draw(Endpoint::Query).is_some() {}
        let counts = FaultCounts {
            generate_500: 2,
            generate_dropped: 1,
            generate_slow: 1,
            failed_tasks: 1,
            query_500: 1,
            query_dropped: 2,
            query_slow: 3,
        };
        assert_eq!(faults.counts(), counts);
        assert_eq!(counts.total(), 11);
        faults.reset_counts();
        assert_eq!(faults.counts(), FaultCounts::default());
    }

    #[test]
    fn nonsense_rates_do_not_panic() {
        let faults = Faults::default();
        faults.set_rates(FaultRates {
            status_500: f64::NAN,
            drop_connection: -3.0,
            slow: f64::INFINITY,
            slow_for_ms: u64::MAX,
            fail_task: 2.0,
        });
        assert_eq!(
            faults.draw(Endpoint::Generate),
            Some(Fault::Slow(Duration::from_millis(u64::MAX)))
        );
    }
}
