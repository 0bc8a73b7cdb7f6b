//! `Credits`: parsing amounts from text, rendering them, and their arithmetic.
//!
//! The parser is checked against a second one written here the simplest way (a grammar check,
//! then the value in 128-bit integers), so that every text gets the same verdict and value from
//! both; every accepted amount must render back to itself.

use arbitrary::Unstructured;
use ketchup_domain::credits::{Credits, CreditsParseError, SCALE};

use crate::generate::{below, flag, pick};

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    match below(&mut u, 3) {
        0 => parse(&String::from_utf8_lossy(u.take_rest())),
        1 => parse(&decimal_like(&mut u)),
        _ => arithmetic(&mut u),
    }
}

/// Text close to an amount: digits, maybe a point and more digits, maybe one stray character.
fn decimal_like(u: &mut Unstructured) -> String {
    let mut text = String::new();
    for _ in 0..below(u, 24) {
        text.push(pick(u, DIGITS));
    }
    if flag(u) {
        text.push('.');
        for _ in 0..below(u, 12) {
            text.push(pick(u, DIGITS));
        }
    }
    if flag(u) {
        let at = below(u, text.len() + 1);
        text.insert(at, pick(u, STRAY));
    }
    text
}

const DIGITS: &[char] = &['0', '1', '5', '9', '2', '3', '4', '6', '7', '8'];
const STRAY: &[char] = &[
    '-', '+', '.', 'e', 'E', ' ', '_', '\t', '\n', '\0', 'x', '\u{661}', '\u{ff11}', '\u{b9}',
];

/// What the text must parse to: the value in units, or the kind of error.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Units(i64),
    Empty,
    NotDecimal,
    TooPrecise,
    TooLarge,
}

/// The grammar `digits [ "." digits ]` with at most [`SCALE`] decimals, and a value that fits.
fn expected(text: &str) -> Expected {
    if text.is_empty() {
        return Expected::Empty;
    }
    let mut parts = text.split('.');
    let whole = parts.next().unwrap_or_default();
    let frac = parts.next();
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if parts.next().is_some() || !digits(whole) || frac.is_some_and(|frac| !digits(frac)) {
        return Expected::NotDecimal;
    }
    let frac = frac.unwrap_or_default();
    if frac.len() > SCALE as usize {
        return Expected::TooPrecise;
    }
    let mut units: u128 = 0;
    for b in whole.bytes().chain(frac.bytes()) {
        units = units
            .saturating_mul(10)
            .saturating_add(u128::from(b - b'0'));
    }
    for _ in frac.len()..SCALE as usize {
        units = units.saturating_mul(10);
    }
    i64::try_from(units).map_or(Expected::TooLarge, Expected::Units)
}

fn parse(text: &str) {
    let parsed = text.parse::<Credits>();
    let got = match &parsed {
        Ok(credits) => Expected::Units(credits.units()),
        Err(CreditsParseError::Empty) => Expected::Empty,
        Err(CreditsParseError::NotDecimal(_)) => Expected::NotDecimal,
        Err(CreditsParseError::TooPrecise(_)) => Expected::TooPrecise,
        Err(CreditsParseError::TooLarge(_)) => Expected::TooLarge,
    };
    assert_eq!(got, expected(text), "{text:?} parsed as {parsed:?}");
    match parsed {
        Ok(credits) => round_trips(credits),
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.starts_with("credit amount"),
                "{text:?}: the error names what it is about: {message}"
            );
        }
    }
}

/// A non-negative amount renders to text that parses back to it, in every form the gateway
/// writes: eight places (the wire, JSON), people's two-or-more, and fewer places where exact.
fn round_trips(credits: Credits) {
    assert!(
        credits.units() >= 0,
        "{credits:?} from text is never negative"
    );
    let wire = credits.format_places(SCALE);
    assert_eq!(wire.parse::<Credits>(), Ok(credits), "{wire}");
    let shown = credits.to_string();
    assert_eq!(shown.parse::<Credits>(), Ok(credits), "{shown}");
    let decimals = shown.split_once('.').map_or(0, |(_, d)| d.len());
    assert!((2..=SCALE as usize).contains(&decimals), "{shown}");
    for places in 0..=SCALE {
        let exact = credits.units() % 10i64.pow(SCALE - places) == 0;
        if exact {
            let text = credits.format_places(places);
            assert_eq!(text.parse::<Credits>(), Ok(credits), "{text}");
        }
    }
    let json = serde_json::to_string(&credits).expect("credits serialize");
    assert_eq!(serde_json::from_str::<Credits>(&json).ok(), Some(credits));
}

/// Checked arithmetic agrees with 128-bit arithmetic; rendering any amount, negative ones too,
/// gives its exact value back.
fn arithmetic(u: &mut Unstructured) {
    let a = Credits::from_units(units(u));
    let b = Credits::from_units(units(u));
    let factor = units(u);
    let wide = |x: Credits| i128::from(x.units());
    let fit = |x: i128| i64::try_from(x).ok().map(Credits::from_units);
    assert_eq!(a.checked_add(b), fit(wide(a) + wide(b)), "{a:?} + {b:?}");
    assert_eq!(a.checked_sub(b), fit(wide(a) - wide(b)), "{a:?} - {b:?}");
    assert_eq!(
        a.checked_mul(factor),
        fit(wide(a) * i128::from(factor)),
        "{a:?} * {factor}"
    );
    let clamped = (wide(a) - wide(b)).clamp(i128::from(i64::MIN), i128::from(i64::MAX));
    assert_eq!(
        a.saturating_sub(b).units() as i128,
        clamped,
        "{a:?} -| {b:?}"
    );
    assert_eq!(a.cmp(&b), a.units().cmp(&b.units()));
    for text in [a.format_places(SCALE), a.to_string()] {
        let (negative, digits) = match text.strip_prefix('-') {
            Some(digits) => (true, digits),
            None => (false, text.as_str()),
        };
        let magnitude = match expected(digits) {
            Expected::Units(units) => i128::from(units),
            // Only i64::MIN's magnitude is past i64::MAX.
            other => {
                assert_eq!((other, a.units()), (Expected::TooLarge, i64::MIN), "{text}");
                1i128 << 63
            }
        };
        assert_eq!(
            if negative { -magnitude } else { magnitude },
            wide(a),
            "{text}"
        );
        assert_eq!(negative, a.units() < 0, "{text}");
    }
}

/// Units, mostly near the edges where arithmetic overflows.
fn units(u: &mut Unstructured) -> i64 {
    match below(u, 4) {
        0 => pick(
            u,
            &[0, 1, -1, i64::MAX, i64::MIN, i64::MAX / 2, 100_000_000],
        ),
        1 => i64::from(u.arbitrary::<i32>().unwrap_or(0)),
        _ => u.arbitrary().unwrap_or(0),
    }
}
