//! Exact credit amounts.
//!
//! The upstream reports `consumed` as a decimal string with six places in callbacks and eight in
//! task queries. Credits are held as integer units of 10⁻⁸ and parsed from the string directly:
//! a float never touches money.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Number of decimal places one unit represents.
pub const SCALE: u32 = 8;
const UNITS_PER_CREDIT: i64 = 10i64.pow(SCALE);

/// An exact, non-negative-by-construction-from-text amount of credits, in units of 10⁻⁸.
///
/// Arithmetic is on the raw units; negative values only arise from differences (e.g. the
/// accuracy of a reservation, `consumed − reserved`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Credits(i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreditsParseError {
    #[error("credit amount is empty")]
    Empty,
    #[error("credit amount {0:?} is not a plain decimal number such as \"0.50\"")]
    NotDecimal(String),
    #[error("credit amount {0:?} has more than {SCALE} decimal places")]
    TooPrecise(String),
    #[error("credit amount {0:?} is too large")]
    TooLarge(String),
}

impl Credits {
    pub const ZERO: Credits = Credits(0);

    pub const fn from_units(units: i64) -> Self {
        Credits(units)
    }

    pub const fn units(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Credits) -> Option<Credits> {
        self.0.checked_add(other.0).map(Credits)
    }

    pub fn checked_sub(self, other: Credits) -> Option<Credits> {
        self.0.checked_sub(other.0).map(Credits)
    }

    pub fn checked_mul(self, factor: i64) -> Option<Credits> {
        self.0.checked_mul(factor).map(Credits)
    }

    pub fn saturating_sub(self, other: Credits) -> Credits {
        Credits(self.0.saturating_sub(other.0))
    }

    /// Renders with exactly `places` decimals (at most [`SCALE`]); digits beyond `places` must be
    /// zero, which holds for every amount the fake upstream prints.
    pub fn format_places(self, places: u32) -> String {
        assert!(places <= SCALE, "at most {SCALE} decimal places");
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / UNITS_PER_CREDIT as u64;
        let frac = abs % UNITS_PER_CREDIT as u64;
        if places == 0 {
            return format!("{sign}{whole}");
        }
        let frac = frac / 10u64.pow(SCALE - places);
        format!("{sign}{whole}.{frac:0width$}", width = places as usize)
    }

    /// Value in credits as a float, for Prometheus gauges only (never for accounting).
    pub fn as_f64_for_metrics(self) -> f64 {
        self.0 as f64 / UNITS_PER_CREDIT as f64
    }
}

impl FromStr for Credits {
    type Err = CreditsParseError;

    /// Accepts `digits` or `digits.digits` with at most eight decimals. Signs, exponents,
    /// whitespace, underscores and empty parts are refused: an amount the upstream sends in any
    /// other shape is suspicious and must not be guessed at.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(CreditsParseError::Empty);
        }
        let not_decimal = || CreditsParseError::NotDecimal(text.to_owned());
        let (whole, frac) = match text.split_once('.') {
            Some((whole, frac)) => (whole, frac),
            None => (text, ""),
        };
        let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !all_digits(whole) || !all_digits(frac) {
            return Err(not_decimal());
        }
        if text.contains('.') && frac.is_empty() {
            return Err(not_decimal());
        }
        if frac.len() > SCALE as usize {
            return Err(CreditsParseError::TooPrecise(text.to_owned()));
        }
        let too_large = || CreditsParseError::TooLarge(text.to_owned());
        let whole: i64 = whole.parse().map_err(|_| too_large())?;
        let mut frac_units: i64 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| not_decimal())?
        };
        frac_units *= 10i64.pow(SCALE - frac.len() as u32);
        whole
            .checked_mul(UNITS_PER_CREDIT)
            .and_then(|units| units.checked_add(frac_units))
            .map(Credits)
            .ok_or_else(too_large)
    }
}

impl fmt::Display for Credits {
    /// Two decimals at least (as admins write budgets), more only where the amount needs them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = self.format_places(SCALE);
        let trimmed = full.trim_end_matches('0');
        let decimals = trimmed.split_once('.').map_or(0, |(_, d)| d.len());
        if decimals >= 2 {
            f.write_str(trimmed)
        } else {
            f.write_str(&self.format_places(2))
        }
    }
}

impl Serialize for Credits {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.format_places(SCALE))
    }
}

impl<'de> Deserialize<'de> for Credits {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_both_upstream_forms_exactly() {
        assert_eq!("0.00100000".parse::<Credits>().unwrap().units(), 100_000);
        assert_eq!("0.500000".parse::<Credits>().unwrap().units(), 50_000_000);
        assert_eq!("250.00".parse::<Credits>().unwrap().units(), 25_000_000_000);
        assert_eq!("7".parse::<Credits>().unwrap().units(), 700_000_000);
        assert_eq!("0.00000001".parse::<Credits>().unwrap().units(), 1);
    }

    #[test]
    fn refuses_what_is_not_a_plain_decimal() {
        for bad in [
            "", "-1", "+1", "1e3", " 1", "1 ", "1.", ".5", "1..2", "0x10", "NaN", "1_000", "١",
        ] {
            assert!(bad.parse::<Credits>().is_err(), "{bad:?} must be refused");
        }
        assert_eq!(
            "0.000000001".parse::<Credits>(),
            Err(CreditsParseError::TooPrecise("0.000000001".into()))
        );
        assert!(matches!(
            "99999999999999999999".parse::<Credits>(),
            Err(CreditsParseError::TooLarge(_))
        ));
        assert!(matches!(
            "92233720368.54775808".parse::<Credits>(),
            Err(CreditsParseError::TooLarge(_))
        ));
    }

    #[test]
    fn formats_for_people_and_for_the_wire() {
        let c: Credits = "0.5".parse().unwrap();
        assert_eq!(c.to_string(), "0.50");
        assert_eq!(c.format_places(6), "0.500000");
        assert_eq!(c.format_places(8), "0.50000000");
        assert_eq!(Credits::from_units(1).to_string(), "0.00000001");
        assert_eq!(Credits::from_units(-25_000_000).to_string(), "-0.25");
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"0.50000000\"");
    }

    proptest! {
        #[test]
        fn eight_place_rendering_round_trips(units in 0i64..i64::MAX / 2) {
            let c = Credits::from_units(units);
            prop_assert_eq!(c.format_places(8).parse::<Credits>().unwrap(), c);
            prop_assert_eq!(c.to_string().parse::<Credits>().unwrap(), c);
        }
    }
}
