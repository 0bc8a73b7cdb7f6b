//! Whether reservations fit what tasks cost: the distribution of `consumed` the gateway settled,
//! per model and value of its cost field, set against what the configuration reserves.
//!
//! A reservation too low lets a team overrun its budget: each task in flight may cost more than
//! it held. One too high refuses work a budget could pay for. Operators tune `reserve` from this.
//!
//! What is kept, in the ledger (so every replica adds to one record and a restart loses nothing):
//! per UTC day, model and cost-field value, the count of settled tasks, how many of them cost
//! more than they reserved, the exact largest cost, and a histogram of costs whose buckets are
//! amounts of three significant decimal digits ([`bucket`]). Days older than [`WINDOW_DAYS`] are
//! deleted as new ones are written. Storage is bounded whatever the traffic: the keys are the
//! configured models and the values their reserves price (a per-unit count as a number, so `05`
//! and `5` are one), and a key holds at most 900 buckets per power of ten its costs span (under
//! 20 000 in all, a handful in practice).
//!
//! The error bound: the count, the over-reservation count and the largest cost are exact; a
//! quantile is the upper bound of its bucket, never below the true quantile and less than 1 %
//! above it (exact for costs of at most three significant digits, as `0.0125` or `1.50`), and
//! never above the largest cost. Costs are per output: a task of `n` outputs counts its
//! `consumed / n`, rounded up to the next unit of 10⁻⁸, which is above the reservation of one
//! output exactly when the task cost more than it reserved.
//!
//! Only tasks whose `consumed` the upstream reported are counted: one settled at its reservation
//! (expired, or `consumed` missing) tells nothing about the price. Text requests, priced per
//! token up to a worst case, are not counted.

use std::collections::BTreeMap;

use chrono::{DateTime, Days, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::credits::Credits;
use crate::pricing::Reserve;

/// Days of settled costs the distribution covers, today included.
pub const WINDOW_DAYS: u64 = 30;

/// What a task's cost is set against when it settles, recorded with its reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostKey {
    /// The value of the model's cost field the reservation priced (as the price table names it,
    /// or the units of a per-unit price); `None` for a flat reserve.
    pub value: Option<String>,
    /// The request's count `n`: the reservation is `n` times the price of one output.
    pub count: i64,
}

/// One settled task's cost, as the calibration records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostSample {
    pub model: String,
    pub value: Option<String>,
    /// `consumed` per output, rounded up.
    pub each: Credits,
    /// Whether the task cost more than it reserved.
    pub over: bool,
    pub at: DateTime<Utc>,
}

impl CostSample {
    /// The sample of a task of `model` settled at `at` for `consumed`, having reserved
    /// `reserved` under `key`; `None` for a count that is not positive.
    pub fn new(
        model: &str,
        key: &CostKey,
        reserved: Credits,
        consumed: Credits,
        at: DateTime<Utc>,
    ) -> Option<CostSample> {
        if key.count < 1 || consumed < Credits::ZERO {
            return None;
        }
        let each = consumed.units().div_euclid(key.count)
            + i64::from(consumed.units().rem_euclid(key.count) != 0);
        Some(CostSample {
            model: model.to_owned(),
            value: key.value.clone(),
            each: Credits::from_units(each),
            over: consumed > reserved,
            at,
        })
    }
}

/// What one store record holds for a day, model and value (or several merged).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CostHistogram {
    pub settled: u64,
    pub over: u64,
    pub max: Credits,
    /// Bucket upper bound ([`bucket`]) → tasks in it.
    pub buckets: BTreeMap<Credits, u64>,
}

impl CostHistogram {
    pub fn merge(&mut self, other: &CostHistogram) {
        self.settled += other.settled;
        self.over += other.over;
        self.max = self.max.max(other.max);
        for (bound, count) in &other.buckets {
            *self.buckets.entry(*bound).or_default() += count;
        }
    }

    /// The smallest bucket bound that at least `per_mille`/1000 of the tasks are at or below
    /// (nearest rank), never above the largest cost.
    fn quantile(&self, per_mille: u64) -> Credits {
        let rank = (self.settled * per_mille).div_ceil(1000).max(1);
        let mut seen = 0;
        for (bound, count) in &self.buckets {
            seen += count;
            if seen >= rank {
                return (*bound).min(self.max);
            }
        }
        self.max
    }

    pub fn summary(&self) -> Observed {
        Observed {
            settled: self.settled,
            over_reservation: self.over,
            p50: self.quantile(500),
            p99: self.quantile(990),
            max: self.max,
        }
    }
}

/// A model and cost-field value (`None`: a flat reserve), which the distribution is kept by.
pub type CostKeyOf = (String, Option<String>);

/// Sums per-day records into one per model and value.
pub fn merge_days(
    days: impl IntoIterator<Item = (CostKeyOf, CostHistogram)>,
) -> BTreeMap<CostKeyOf, CostHistogram> {
    let mut merged: BTreeMap<CostKeyOf, CostHistogram> = BTreeMap::new();
    for (key, histogram) in days {
        merged.entry(key).or_default().merge(&histogram);
    }
    merged
}

/// The bucket of a cost: rounded up to three significant decimal digits of units of 10⁻⁸.
pub fn bucket(cost: Credits) -> Credits {
    let units = cost.units().max(0);
    let mut step: i64 = 1;
    while units / step >= 1000 {
        step *= 10;
    }
    let up = units.div_euclid(step) + i64::from(units % step != 0);
    Credits::from_units(up.saturating_mul(step))
}

/// The first day the distribution covers when it is read at `now`.
pub fn window_start(now: DateTime<Utc>) -> NaiveDate {
    let today = now.date_naive();
    today
        .checked_sub_days(Days::new(WINDOW_DAYS - 1))
        .unwrap_or(today)
}

/// A day as the stores key it.
pub fn day_key(day: NaiveDate) -> String {
    day.format("%Y-%m-%d").to_string()
}

/// The settled costs of one model and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub settled: u64,
    /// Tasks that cost more than they reserved when they ran.
    pub over_reservation: u64,
    pub p50: Credits,
    pub p99: Credits,
    pub max: Credits,
}

/// One line of the table: a model and cost-field value, what a configuration reserves for one
/// output of it, and what was settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub model: String,
    /// The request field the model's price depends on; `None` for a flat reserve.
    pub field: Option<String>,
    pub value: Option<String>,
    /// What one output reserves under the configuration; `None` when it no longer prices this
    /// model or value.
    pub reservation: Option<Credits>,
    /// `None` when nothing was settled in the window.
    pub observed: Option<Observed>,
}

/// How a reservation compares with what was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fit {
    /// Nothing settled to compare with.
    NoData,
    /// At least the largest settled cost.
    Covers,
    /// Below the largest settled cost, at least the p99.
    BelowMax,
    /// Below the p99: more than one task in a hundred costs more than it holds.
    BelowP99,
    /// Not reserved by this configuration (a model or value it no longer prices).
    NotPriced,
}

impl Fit {
    pub fn as_str(self) -> &'static str {
        match self {
            Fit::NoData => "no data",
            Fit::Covers => "ok",
            Fit::BelowMax => "below max",
            Fit::BelowP99 => "below p99",
            Fit::NotPriced => "not priced",
        }
    }

    /// Settled costs exceed what is reserved.
    pub fn exceeded(self) -> bool {
        matches!(self, Fit::BelowMax | Fit::BelowP99)
    }
}

/// A line of the table as `GET /admin/models` gives it: amounts as exact decimal strings,
/// the figures `null` where nothing was settled. Read back by `check-config --against`, which
/// takes a line with fields it does not know, as a newer gateway may answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub model: String,
    pub field: Option<String>,
    pub value: Option<String>,
    pub reservation: Option<Credits>,
    pub settled: u64,
    pub over_reservation: u64,
    pub p50: Option<Credits>,
    pub p99: Option<Credits>,
    pub max: Option<Credits>,
    pub fit: Fit,
    /// Settled costs exceed the reservation: the largest one is above it.
    pub exceeds_reservation: bool,
}

impl Line {
    /// What was settled, as the gateway that answered saw it; `None` when nothing was.
    pub fn observed(&self) -> Option<Observed> {
        match (self.p50, self.p99, self.max) {
            (Some(p50), Some(p99), Some(max)) if self.settled > 0 => Some(Observed {
                settled: self.settled,
                over_reservation: self.over_reservation,
                p50,
                p99,
                max,
            }),
            _ => None,
        }
    }
}

/// The observations of a table's lines, keyed to set them against another configuration.
pub fn observed_of(lines: &[Line]) -> BTreeMap<CostKeyOf, Observed> {
    lines
        .iter()
        .filter_map(|line| {
            let key = (line.model.clone(), line.value.clone());
            line.observed().map(|seen| (key, seen))
        })
        .collect()
}

impl Row {
    pub fn line(&self) -> Line {
        let fit = self.fit();
        let seen = self.observed.as_ref();
        Line {
            model: self.model.clone(),
            field: self.field.clone(),
            value: self.value.clone(),
            reservation: self.reservation,
            settled: seen.map_or(0, |s| s.settled),
            over_reservation: seen.map_or(0, |s| s.over_reservation),
            p50: seen.map(|s| s.p50),
            p99: seen.map(|s| s.p99),
            max: seen.map(|s| s.max),
            fit,
            exceeds_reservation: fit.exceeded(),
        }
    }

    pub fn fit(&self) -> Fit {
        match (self.reservation, &self.observed) {
            (None, _) => Fit::NotPriced,
            (Some(_), None) => Fit::NoData,
            (Some(reserve), Some(seen)) if reserve < seen.p99 => Fit::BelowP99,
            (Some(reserve), Some(seen)) if reserve < seen.max => Fit::BelowMax,
            (Some(_), Some(_)) => Fit::Covers,
        }
    }
}

/// The table of `config`'s asynchronous models against `observed`: a line per flat model, per
/// priced value of a price table, per observed unit count of a per-unit price (its default, or
/// `max`, when none was observed), then the observed ones the configuration does not price.
pub fn rows(config: &Config, observed: &BTreeMap<CostKeyOf, Observed>) -> Vec<Row> {
    let mut rows = Vec::new();
    for (name, model) in &config.models {
        let Some(reserve) = model.task_reserve() else {
            continue;
        };
        let field = reserve.field().map(str::to_owned);
        let seen_values = observed
            .range((name.clone(), None)..)
            .take_while(|((model, _), _)| model == name)
            .filter_map(|((_, value), _)| value.clone());
        let priced: Vec<(Option<String>, Option<Credits>)> = match reserve {
            Reserve::Flat(amount) => vec![(None, Some(*amount))],
            Reserve::ByValue { prices, .. } => prices
                .iter()
                .map(|(value, price)| (Some(value.clone()), Some(*price)))
                .collect(),
            Reserve::PerUnit {
                unit, max, default, ..
            } => {
                let price = |units: &str| {
                    units
                        .parse::<u32>()
                        .ok()
                        .filter(|units| (1..=*max).contains(units))
                        .and_then(|units| unit.checked_mul(i64::from(units)))
                };
                let mut values: Vec<String> = seen_values.filter(|v| price(v).is_some()).collect();
                if values.is_empty() {
                    values.push(default.unwrap_or(*max).to_string());
                }
                values.sort_by_key(|v| v.parse::<u32>().unwrap_or(u32::MAX));
                values
                    .into_iter()
                    .map(|value| {
                        let reserve = price(&value);
                        (Some(value), reserve)
                    })
                    .collect()
            }
        };
        for (value, reservation) in priced {
            let key = (name.clone(), value.clone());
            rows.push(Row {
                model: name.clone(),
                field: field.clone(),
                value,
                reservation,
                observed: observed.get(&key).copied(),
            });
        }
    }
    for ((model, value), seen) in observed {
        if !rows.iter().any(|r| &r.model == model && &r.value == value) {
            let field = config
                .models
                .get(model)
                .and_then(|m| m.task_reserve())
                .and_then(Reserve::field);
            rows.push(Row {
                model: model.clone(),
                field: field.map(str::to_owned),
                value: value.clone(),
                reservation: None,
                observed: Some(*seen),
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(text: &str) -> Credits {
        text.parse().unwrap()
    }

    #[test]
    fn buckets_keep_three_significant_digits_rounding_up() {
        assert_eq!(bucket(c("0.00000999")), c("0.00000999"));
        assert_eq!(bucket(c("0.0125")), c("0.0125"));
        assert_eq!(bucket(c("1.50")), c("1.50"));
        assert_eq!(bucket(c("1.501")), c("1.51"));
        assert_eq!(bucket(c("0.12345678")), c("0.124"));
        assert_eq!(bucket(c("999")), c("999"));
        assert_eq!(bucket(c("999.1")), c("1000"));
        assert_eq!(bucket(Credits::ZERO), Credits::ZERO);
        assert_eq!(
            bucket(Credits::from_units(i64::MAX)),
            Credits::from_units(i64::MAX)
        );
        // Never below the cost, less than 1 % above it.
        for units in [1_001, 123_456_789, 100_000_001, 999_999_999_999] {
            let b = bucket(Credits::from_units(units)).units();
            assert!(b >= units && (b - units) * 100 < units, "{units} → {b}");
        }
    }

    #[test]
    fn a_sample_is_per_output_and_knows_whether_it_overran() {
        let at = Utc::now();
        let key = |count| CostKey {
            value: Some("10".into()),
            count,
        };
        let s = CostSample::new("m", &key(3), c("3.00"), c("3.10"), at).unwrap();
        assert_eq!((s.each, s.over), (Credits::from_units(103_333_334), true));
        let s = CostSample::new("m", &key(2), c("2.00"), c("2.00"), at).unwrap();
        assert_eq!((s.each, s.over), (c("1.00"), false));
        assert!(CostSample::new("m", &key(0), c("1"), c("1"), at).is_none());
    }

    #[test]
    fn quantiles_are_nearest_rank_bucket_bounds_capped_by_the_max() {
        let mut h = CostHistogram::default();
        for (cost, times) in [("0.10", 50), ("0.20", 49), ("0.12345678", 1)] {
            let mut day = CostHistogram {
                settled: times,
                max: c(cost),
                ..Default::default()
            };
            day.buckets.insert(bucket(c(cost)), times);
            h.merge(&day);
        }
        let s = h.summary();
        assert_eq!(
            (s.settled, s.p50, s.p99, s.max),
            (100, c("0.10"), c("0.20"), c("0.20"))
        );
        let single = CostHistogram {
            settled: 1,
            over: 1,
            max: c("0.12345678"),
            buckets: [(c("0.124"), 1)].into(),
        };
        assert_eq!(single.summary().p99, c("0.12345678"));
    }

    fn seen(max: &str) -> Observed {
        Observed {
            settled: 3,
            over_reservation: 0,
            p50: c(max),
            p99: c(max),
            max: c(max),
        }
    }

    #[test]
    fn the_table_has_a_line_per_priced_value_then_what_is_no_longer_priced() {
        let config = Config::parse(
            std::path::Path::new("gateway.toml"),
            r#"
[upstream]
token_env = "KETCHUP_UPSTREAM_TOKEN"

[models."seedance-2.0"]
reserve = { by = "duration", per_unit = "0.12", max = 15 }

[models."wan"]
reserve = { by = "duration", per_unit = "0.10", max = 10, default = 5 }

[models."gpt-5"]
input_per_million = "1.00"
output_per_million = "2.00"

[[teams]]
name = "design"
keys = [{ sha256 = "c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2", label = "prod" }]
"#,
        )
        .unwrap();
        let observed: BTreeMap<CostKeyOf, Observed> = [
            (("seedance-2.0".into(), Some("10".into())), seen("1.10")),
            (("seedance-2.0".into(), Some("5".into())), seen("0.70")),
            (("seedance-2.0".into(), Some("20".into())), seen("2.40")),
            (("gone".into(), None), seen("1.00")),
        ]
        .into();
        let lines: Vec<(String, Option<String>, Option<Credits>, Fit)> = rows(&config, &observed)
            .iter()
            .map(|r| (r.model.clone(), r.value.clone(), r.reservation, r.fit()))
            .collect();
        let some = |text: &str| Some(text.to_owned());
        assert_eq!(
            lines,
            [
                // Units in order as numbers; 20 is past `max`: no longer priced.
                (
                    "seedance-2.0".into(),
                    some("5"),
                    Some(c("0.60")),
                    Fit::BelowP99
                ),
                (
                    "seedance-2.0".into(),
                    some("10"),
                    Some(c("1.20")),
                    Fit::Covers
                ),
                // Nothing observed: the default.
                ("wan".into(), some("5"), Some(c("0.50")), Fit::NoData),
                ("gone".into(), None, None, Fit::NotPriced),
                ("seedance-2.0".into(), some("20"), None, Fit::NotPriced),
            ]
        );
    }
}
