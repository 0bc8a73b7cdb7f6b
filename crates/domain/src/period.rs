//! Budget periods as keys.
//!
//! A cost belongs to the calendar period (UTC) in which its task started. Periods are names
//! (`2026-11-23`, `2026-W48`, `2026-11`, `lifetime`), not counters that a job resets: a new period
//! simply has no spending yet, so a reset can never race a settlement or lose one.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};

use crate::config::BudgetPeriod;

/// The key of the period containing `at`.
pub fn period_key(period: BudgetPeriod, at: DateTime<Utc>) -> String {
    match period {
        BudgetPeriod::Daily => at.format("%Y-%m-%d").to_string(),
        BudgetPeriod::Weekly => {
            let week = at.iso_week();
            format!("{}-W{:02}", week.year(), week.week())
        }
        BudgetPeriod::Monthly => at.format("%Y-%m").to_string(),
        BudgetPeriod::Lifetime => "lifetime".to_owned(),
    }
}

/// When the period containing `at` ends; `None` for a lifetime budget.
pub fn period_end(period: BudgetPeriod, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let day = at.date_naive();
    let next = match period {
        BudgetPeriod::Daily => day + Duration::days(1),
        BudgetPeriod::Weekly => {
            day + Duration::days(7 - i64::from(day.weekday().num_days_from_monday()))
        }
        BudgetPeriod::Monthly => {
            let (year, month) = if day.month() == 12 {
                (day.year() + 1, 1)
            } else {
                (day.year(), day.month() + 1)
            };
            NaiveDate::from_ymd_opt(year, month, 1)?
        }
        BudgetPeriod::Lifetime => return None,
    };
    Some(Utc.from_utc_datetime(&next.and_hms_opt(0, 0, 0)?))
}

/// How the period reads in a sentence: "this month".
pub fn period_phrase(period: BudgetPeriod) -> &'static str {
    match period {
        BudgetPeriod::Daily => "today",
        BudgetPeriod::Weekly => "this week",
        BudgetPeriod::Monthly => "this month",
        BudgetPeriod::Lifetime => "in total",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn keys_name_calendar_periods_in_utc() {
        let t = at("2026-11-23T23:59:59Z");
        assert_eq!(period_key(BudgetPeriod::Daily, t), "2026-11-23");
        assert_eq!(period_key(BudgetPeriod::Weekly, t), "2026-W48");
        assert_eq!(period_key(BudgetPeriod::Monthly, t), "2026-11");
        assert_eq!(period_key(BudgetPeriod::Lifetime, t), "lifetime");
        // ISO weeks belong to the year of their Thursday.
        assert_eq!(
            period_key(BudgetPeriod::Weekly, at("2027-01-01T00:00:00Z")),
            "2026-W53"
        );
    }

    #[test]
    fn periods_end_at_the_next_boundary() {
        let t = at("2026-12-31T12:00:00Z");
        assert_eq!(
            period_end(BudgetPeriod::Daily, t),
            Some(at("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            period_end(BudgetPeriod::Monthly, t),
            Some(at("2027-01-01T00:00:00Z"))
        );
        // 2026-12-31 is a Thursday; the week ends at Monday 2027-01-04.
        assert_eq!(
            period_end(BudgetPeriod::Weekly, t),
            Some(at("2027-01-04T00:00:00Z"))
        );
        assert_eq!(
            period_end(BudgetPeriod::Monthly, at("2026-11-23T10:00:00Z")),
            Some(at("2026-12-01T00:00:00Z"))
        );
        assert_eq!(period_end(BudgetPeriod::Lifetime, t), None);
    }
}
