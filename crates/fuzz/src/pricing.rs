//! `pricing`: what a generation reserves (`Reserve::for_request`), for reserves read from the
//! TOML an admin writes and bodies with any value in the priced field.
//!
//! The reservation is recomputed here from the reserve's own terms; it is never negative, grows
//! with `n`, and a request refused for one `n` is refused for every larger one. A refusal names
//! the priced field or `n`, and a reserve refused at load says why without panicking.

use std::collections::BTreeMap;

use arbitrary::Unstructured;
use ketchup_domain::credits::Credits;
use ketchup_domain::pricing::Reserve;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::generate::{below, flag, number, object, pick, string, value};

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let written = reserve_text(&mut u);
    #[derive(Deserialize)]
    struct Model {
        reserve: Reserve,
    }
    let reserve = match toml::from_str::<Model>(&format!("reserve = {written}")) {
        Ok(model) => model.reserve,
        Err(error) => {
            assert!(!error.message().is_empty(), "{written}");
            return;
        }
    };
    let mut fields = object(&mut u, 2);
    if let Some(field) = reserve.field()
        && flag(&mut u)
    {
        let priced = match below(&mut u, 3) {
            0 => json!(amount_key(&mut u)),
            1 => number(&mut u),
            _ => value(&mut u, 1),
        };
        fields.insert(field.to_owned(), priced);
    }
    let count = match below(&mut u, 3) {
        0 => pick(&mut u, &[1, 2, 3, 10, i64::MAX, i64::MAX / 2]),
        1 => 1 + below(&mut u, 64) as i64,
        _ => u.int_in_range(1..=i64::MAX).unwrap_or(1),
    };
    check(&reserve, &fields, count);
}

/// A `reserve = …` value: an amount, a price table or a unit price, mostly well-formed.
fn reserve_text(u: &mut Unstructured) -> String {
    let by = pick(u, &["duration", "image_size", "n", "", " ", "model"]);
    match below(u, 4) {
        0 => format!("{:?}", amount(u)),
        1 => {
            let prices: Vec<String> = (0..below(u, 4))
                .map(|_| format!("{:?} = {:?}", amount_key(u), amount(u)))
                .collect();
            let mut table = format!("{{ by = {by:?}, prices = {{ {} }}", prices.join(", "));
            if flag(u) {
                table.push_str(&format!(", default = {:?}", amount_key(u)));
            }
            if flag(u) {
                table.push_str(", max = 3");
            }
            table + " }"
        }
        2 => {
            let mut table = format!("{{ by = {by:?}, per_unit = {:?}", amount(u));
            if flag(u) {
                let max = pick(u, &[0, 1, 15, 25, u32::MAX]);
                table.push_str(&format!(", max = {max}"));
            }
            if flag(u) {
                match below(u, 3) {
                    0 => table.push_str(&format!(", default = {}", pick(u, &[0, 1, 10, 16]))),
                    1 => table.push_str(&format!(", default = {:?}", amount_key(u))),
                    _ => table.push_str(", default = -1"),
                }
            }
            table + " }"
        }
        _ => string(u),
    }
}

fn amount(u: &mut Unstructured) -> &'static str {
    pick(
        u,
        &[
            "0.50",
            "0",
            "1.00",
            "0.00000001",
            "92233720368.54775807",
            "1e3",
            "-1",
            "0.12",
        ],
    )
}

fn amount_key(u: &mut Unstructured) -> &'static str {
    pick(
        u,
        &[
            "10",
            "15",
            "25",
            "1k",
            "4k",
            "010",
            "",
            "4294967296",
            "5",
            "+5",
            " 5",
            "\u{665}",
        ],
    )
}

/// The properties of one request against one reserve.
pub fn check(reserve: &Reserve, fields: &Map<String, Value>, count: i64) {
    let got = reserve.for_request("m", fields, count);
    let expected = one(reserve, fields).map(|one| i128::from(one.units()) * i128::from(count));
    match (&got, expected) {
        (Ok(credits), Some(units)) => {
            assert_eq!(
                i128::from(credits.units()),
                units,
                "{reserve:?} for {fields:?}"
            );
            assert!(credits.units() >= 0);
        }
        (Err(detail), Some(units)) => {
            assert!(units > i128::from(i64::MAX), "{detail}: {units} units fit");
            assert!(detail.contains("too large"), "{detail}");
        }
        (Err(detail), None) => {
            let field = reserve
                .field()
                .expect("only a priced field refuses a value");
            assert!(detail.starts_with(field), "{detail:?} names {field:?}");
        }
        (Ok(credits), None) => panic!("{credits:?} reserved for an unpriced {fields:?}"),
    }
    if count < i64::MAX {
        let more = reserve.for_request("m", fields, count + 1);
        match (&got, &more) {
            (Ok(less), Ok(more)) => assert!(more >= less, "{more:?} for n + 1 < {less:?}"),
            (Err(_), Ok(_)) => panic!("refused for n = {count}, accepted for n + 1"),
            _ => {}
        }
    }
}

/// What one result costs under the reserve's terms; `None` when the value is not priced.
fn one(reserve: &Reserve, fields: &Map<String, Value>) -> Option<Credits> {
    let present = |name: &str| fields.get(name).filter(|v| !v.is_null());
    let key = |value: &Value| match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => number.as_u64().map(|n| n.to_string()),
        _ => None,
    };
    match reserve {
        Reserve::Flat(amount) => Some(*amount),
        Reserve::ByValue {
            field,
            prices,
            default,
        } => match present(field) {
            Some(value) => key(value).and_then(|key| prices.get(&key).copied()),
            None => Some(match default {
                Some(value) => prices[value],
                None => dearest(prices),
            }),
        },
        Reserve::PerUnit {
            field,
            unit,
            max,
            default,
        } => {
            let units = match present(field) {
                Some(value) => key(value)
                    .filter(|key| !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|key| key.parse::<u32>().ok())
                    .filter(|units| (1..=*max).contains(units))?,
                None => default.unwrap_or(*max),
            };
            i64::try_from(i128::from(unit.units()) * i128::from(units))
                .ok()
                .map(Credits::from_units)
        }
    }
}

fn dearest(prices: &BTreeMap<String, Credits>) -> Credits {
    prices
        .values()
        .copied()
        .max()
        .expect("a price table prices a value")
}
