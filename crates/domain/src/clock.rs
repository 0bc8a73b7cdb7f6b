//! Wall-clock time as a dependency, so business rules that hang on the calendar (budget periods,
//! the grace period for young tasks, task expiry, the fake upstream's render schedule) can be
//! tested by moving a manual clock instead of sleeping.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

pub type SharedClock = Arc<dyn Clock>;

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// `at` minus `by`, or the earliest time there is if `by` reaches past it: a cutoff "this long
/// ago" that no setting can make overflow the calendar.
pub fn earlier(at: DateTime<Utc>, by: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(by)
        .ok()
        .and_then(|by| at.checked_sub_signed(by))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Arc<Self> {
        Arc::new(Self {
            now: Mutex::new(start),
        })
    }

    pub fn advance(&self, by: std::time::Duration) {
        let by = chrono::Duration::from_std(by).expect("duration fits in chrono");
        *self.now.lock().expect("clock lock") += by;
    }

    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock().expect("clock lock") = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().expect("clock lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_cutoff_longer_than_history_reaches_back_to_the_start_of_time() {
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
