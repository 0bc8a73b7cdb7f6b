//! What a generation reserves before it reaches the upstream: the most the request can cost
//! under the configuration, from the request's own fields.
//!
//! A model's `reserve` is one of:
//! - a flat amount, `reserve = "0.50"`: the most one request may cost, whatever its fields;
//! - a price for each value of a field, `reserve = { by = "duration", prices = { "10" = "1.00",
//!   "15" = "1.50" } }`, for fields with a few values (`duration` of Sora, `image_size`);
//! - a price per unit of a numeric field, `reserve = { by = "duration", per_unit = "0.12",
//!   max = 15 }`, for fields counted in units (seconds).
//!
//! Every form is multiplied by the request's count `n` (1 when absent). A value the config does
//! not price is refused, never guessed; a field the request leaves out reserves its `default`
//! if the admin named one, else the most any priced value costs, because what the upstream
//! assumes then is not known here. Settlement later charges exactly what the upstream reports.
//!
//! A text model is priced per million input and output tokens instead ([`TextPrices`]): its
//! request reserves the most its answer can cost, and settles at the tokens the answer reports.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::credits::Credits;

/// How a model's reservation is computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserve {
    /// The most one request may cost.
    Flat(Credits),
    /// A price for each value of `field` (a JSON string, or an integer written as digits).
    ByValue {
        field: String,
        prices: BTreeMap<String, Credits>,
        /// The value the upstream assumes when the field is absent; `None`: the dearest.
        default: Option<String>,
    },
    /// A price per unit of `field`, a positive integer (or a string of digits) up to `max`.
    PerUnit {
        field: String,
        unit: Credits,
        max: u32,
        /// The units the upstream assumes when the field is absent; `None`: `max`.
        default: Option<u32>,
    },
}

/// A text model's prices, and the bounds of what one request for it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextPrices {
    pub input_per_million: Credits,
    pub output_per_million: Credits,
    /// The output tokens a request that sets no limit of its own reserves.
    pub max_output_tokens: u32,
    /// The model's context: no request can be charged more input tokens than this.
    pub max_input_tokens: Option<u32>,
}

/// Units of 10⁻⁸ credit in a price per million tokens make this many per token.
const TOKENS_PER_PRICE: i128 = 1_000_000;

impl TextPrices {
    /// What `input` and `output` tokens cost, rounded up to the next unit of 10⁻⁸ credit (a
    /// price per million with more than two decimals is a fraction of a unit per token);
    /// `None` if it does not fit in an amount.
    pub fn cost(&self, input: u64, output: u64) -> Option<Credits> {
        let total = i128::from(input) * i128::from(self.input_per_million.units())
            + i128::from(output) * i128::from(self.output_per_million.units());
        let units = (total + TOKENS_PER_PRICE - 1).div_euclid(TOKENS_PER_PRICE);
        i64::try_from(units).ok().map(Credits::from_units)
    }

    /// The most a request can cost: its input estimated from `request_bytes`, the size of its
    /// body (no common tokenizer makes a token of less than one byte of the text it encodes, and
    /// the JSON around the text is more bytes than the tokens the model adds for roles and
    /// turns), capped by `max_input_tokens`; its output at `output_limit`, the request's own
    /// limit, or `max_output_tokens` without one.
    pub fn worst_case(&self, request_bytes: usize, output_limit: Option<u64>) -> Option<Credits> {
        let bytes = u64::try_from(request_bytes).unwrap_or(u64::MAX);
        let input = match self.max_input_tokens {
            Some(cap) => bytes.min(u64::from(cap)),
            None => bytes,
        };
        let output = output_limit.unwrap_or(u64::from(self.max_output_tokens));
        self.cost(input, output)
    }
}

/// The reserve of a field-priced model as written in TOML.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldReserve {
    by: String,
    prices: Option<BTreeMap<String, Credits>>,
    per_unit: Option<Credits>,
    max: Option<u32>,
    default: Option<DefaultValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DefaultValue {
    Text(String),
    Units(u32),
}

impl<'de> Deserialize<'de> for Reserve {
    /// A string is a flat amount; a table prices a field. Written by hand rather than as an
    /// untagged enum so that a mistake inside the table is reported as itself.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ReserveVisitor;
        impl<'de> Visitor<'de> for ReserveVisitor {
            type Value = Reserve;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "an amount such as \"0.50\", or a table such as { by = \"duration\", \
                     prices = { \"10\" = \"1.00\" } } or { by = \"duration\", per_unit = \"0.10\", max = 25 }",
                )
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Reserve, E> {
                text.parse().map(Reserve::Flat).map_err(E::custom)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Reserve, A::Error> {
                let raw = FieldReserve::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Reserve::from_field(raw).map_err(de::Error::custom)
            }
        }
        deserializer.deserialize_any(ReserveVisitor)
    }
}

impl Reserve {
    fn from_field(raw: FieldReserve) -> Result<Reserve, String> {
        let FieldReserve {
            by,
            prices,
            per_unit,
            max,
            default,
        } = raw;
        if by.trim().is_empty() {
            return Err("`by` must name the request field that sets the price".into());
        }
        match (prices, per_unit) {
            (Some(prices), None) => {
                if max.is_some() {
                    return Err("`max` goes with `per_unit`, not with `prices`".into());
                }
                if prices.is_empty() {
                    return Err("`prices` must price at least one value".into());
                }
                let default = default.map(|value| match value {
                    DefaultValue::Text(text) => text,
                    DefaultValue::Units(units) => units.to_string(),
                });
                if let Some(value) = &default
                    && !prices.contains_key(value)
                {
                    return Err(format!(
                        "`default` {value:?} is not one of the priced values"
                    ));
                }
                Ok(Reserve::ByValue {
                    field: by,
                    prices,
                    default,
                })
            }
            (None, Some(unit)) => {
                let max = max
                    .filter(|max| *max > 0)
                    .ok_or("`per_unit` needs `max`, the most units a request may ask for")?;
                let default = match default {
                    None => None,
                    Some(DefaultValue::Units(units)) => Some(units),
                    Some(DefaultValue::Text(text)) => Some(
                        text.parse()
                            .map_err(|_| format!("`default` {text:?} is not a number of units"))?,
                    ),
                };
                if default.is_some_and(|units| units == 0 || units > max) {
                    return Err("`default` must be from 1 to `max` units".into());
                }
                Ok(Reserve::PerUnit {
                    field: by,
                    unit,
                    max,
                    default,
                })
            }
            _ => Err("a field-priced reserve needs exactly one of `prices` or `per_unit`".into()),
        }
    }

    /// The request field the price depends on, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Reserve::Flat(_) => None,
            Reserve::ByValue { field, .. } | Reserve::PerUnit { field, .. } => Some(field),
        }
    }

    /// The value of the cost field a request with these fields is priced at, as the reserve names
    /// it (a price table's key, a number of units), the field's default or dearest value when the
    /// request leaves it out; `None` for a flat reserve. For a request [`Reserve::for_request`]
    /// accepted.
    pub fn priced_value(&self, fields: &Map<String, Value>) -> Option<String> {
        match self {
            Reserve::Flat(_) => None,
            Reserve::ByValue {
                field,
                prices,
                default,
            } => match present(fields, field) {
                Some(value) => value_key(value).map(|key| key.into_owned()),
                None => default.clone().or_else(|| {
                    prices
                        .iter()
                        .max_by_key(|(_, price)| **price)
                        .map(|(value, _)| value.clone())
                }),
            },
            Reserve::PerUnit {
                field,
                max,
                default,
                ..
            } => match present(fields, field) {
                // As a number: `"05"` and `5` are one value.
                Some(value) => value_key(value)
                    .and_then(|key| key.parse::<u32>().ok())
                    .map(|units| units.to_string()),
                None => Some(default.unwrap_or(*max).to_string()),
            },
        }
    }

    /// The reservation of a request for `model` with these fields and this count (`n`); `Err`
    /// is a 400's detail naming the field.
    pub fn for_request(
        &self,
        model: &str,
        fields: &Map<String, Value>,
        count: i64,
    ) -> Result<Credits, String> {
        let one = match self {
            Reserve::Flat(amount) => *amount,
            Reserve::ByValue {
                field,
                prices,
                default,
            } => match present(fields, field) {
                None => match default {
                    Some(value) => prices[value],
                    None => *prices.values().max().expect("prices are never empty"),
                },
                Some(value) => {
                    let key = value_key(value);
                    match key.as_deref().and_then(|key| prices.get(key)) {
                        Some(price) => *price,
                        None => {
                            let priced: Vec<String> =
                                prices.keys().map(|k| format!("{k:?}")).collect();
                            return Err(format!(
                                "{field} {} is not priced for model {model}; priced values: {}",
                                shown(value),
                                priced.join(", ")
                            ));
                        }
                    }
                }
            },
            Reserve::PerUnit {
                field,
                unit,
                max,
                default,
            } => {
                let units = match present(fields, field) {
                    None => default.unwrap_or(*max),
                    Some(value) => value_key(value)
                        .filter(|key| key.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|key| key.parse::<u32>().ok())
                        .filter(|units| (1..=*max).contains(units))
                        .ok_or_else(|| {
                            format!(
                                "{field} {} is not priced for model {model}: it must be a whole \
                                 number from 1 to {max}",
                                shown(value)
                            )
                        })?,
                };
                unit.checked_mul(i64::from(units))
                    .ok_or_else(|| format!("{field} is too large"))?
            }
        };
        one.checked_mul(count)
            .ok_or_else(|| "n is too large".into())
    }
}

/// A present, non-null field.
fn present<'a>(fields: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    fields.get(name).filter(|value| !value.is_null())
}

/// The text a priced value is looked up by: a string as it is, a whole number in digits.
fn value_key(value: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match value {
        Value::String(text) => Some(text.as_str().into()),
        Value::Number(number) if number.is_u64() => Some(number.to_string().into()),
        _ => None,
    }
}

/// A client's value, bounded for an error message.
fn shown(value: &Value) -> String {
    value.to_string().chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reserve(toml_value: &str) -> Result<Reserve, String> {
        #[derive(Deserialize)]
        struct Model {
            reserve: Reserve,
        }
        toml::from_str::<Model>(&format!("reserve = {toml_value}"))
            .map(|model| model.reserve)
            .map_err(|e| e.message().to_owned())
    }

    fn cost(reserve: &Reserve, body: Value, count: i64) -> Result<String, String> {
        reserve
            .for_request("m", body.as_object().unwrap(), count)
            .map(|credits| credits.to_string())
    }

    #[test]
    fn a_flat_reserve_is_the_most_one_request_costs_times_n() {
        let flat = reserve(r#""0.50""#).unwrap();
        assert_eq!(flat, Reserve::Flat("0.5".parse().unwrap()));
        assert_eq!(cost(&flat, json!({"duration": "99"}), 3).unwrap(), "1.50");
    }

    #[test]
    fn a_price_table_prices_each_value_and_refuses_others() {
        let sora = reserve(
            r#"{ by = "duration", prices = { "10" = "1.00", "15" = "1.50", "25" = "2.50" } }"#,
        )
        .unwrap();
        assert_eq!(cost(&sora, json!({"duration": "15"}), 1).unwrap(), "1.50");
        assert_eq!(cost(&sora, json!({"duration": 25}), 2).unwrap(), "5.00");
        // Absent: the dearest, as the upstream's own default is not known here.
        assert_eq!(cost(&sora, json!({}), 1).unwrap(), "2.50");
        assert_eq!(cost(&sora, json!({"duration": null}), 1).unwrap(), "2.50");
        let refused = cost(&sora, json!({"duration": "30"}), 1).unwrap_err();
        assert_eq!(
            refused,
            r#"duration "30" is not priced for model m; priced values: "10", "15", "25""#
        );
        assert!(cost(&sora, json!({"duration": 15.0}), 1).is_err());
        assert!(cost(&sora, json!({"duration": ["10"]}), 1).is_err());
        let sized = reserve(
            r#"{ by = "image_size", prices = { "1k" = "0.15", "4k" = "0.60" }, default = "1k" }"#,
        )
        .unwrap();
        assert_eq!(cost(&sized, json!({}), 2).unwrap(), "0.30");
    }

    #[test]
    fn a_unit_price_counts_units_up_to_its_most() {
        let seedance = reserve(r#"{ by = "duration", per_unit = "0.12", max = 15 }"#).unwrap();
        assert_eq!(cost(&seedance, json!({"duration": 10}), 1).unwrap(), "1.20");
        assert_eq!(
            cost(&seedance, json!({"duration": "5"}), 1).unwrap(),
            "0.60"
        );
        assert_eq!(cost(&seedance, json!({}), 1).unwrap(), "1.80");
        let refused = cost(&seedance, json!({"duration": 16}), 1).unwrap_err();
        assert!(
            refused.starts_with("duration 16 is not priced for model m"),
            "{refused}"
        );
        assert!(cost(&seedance, json!({"duration": 0}), 1).is_err());
        // Digits only, as the field is documented: no sign, no spaces.
        for refused in ["+5", " 5", "5 ", "\u{665}"] {
            assert!(cost(&seedance, json!({"duration": refused}), 1).is_err());
        }
        assert!(cost(&seedance, json!({"duration": -5}), 1).is_err());
    }

    #[test]
    fn the_priced_value_is_what_the_reservation_was_priced_at() {
        let value =
            |reserve: &Reserve, body: Value| reserve.priced_value(body.as_object().unwrap());
        let sora =
            reserve(r#"{ by = "duration", prices = { "10" = "1.00", "25" = "2.50" } }"#).unwrap();
        assert_eq!(value(&sora, json!({"duration": 10})), Some("10".into()));
        assert_eq!(value(&sora, json!({})), Some("25".into()));
        let seedance = reserve(r#"{ by = "duration", per_unit = "0.12", max = 15 }"#).unwrap();
        assert_eq!(
            value(&seedance, json!({"duration": "05"})),
            Some("5".into())
        );
        assert_eq!(
            value(&seedance, json!({"duration": null})),
            Some("15".into())
        );
        assert_eq!(value(&reserve(r#""0.50""#).unwrap(), json!({})), None);
    }

    #[test]
    fn text_costs_are_tokens_times_prices_rounded_up_to_a_unit() {
        let prices = TextPrices {
            input_per_million: "2.00".parse().unwrap(),
            output_per_million: "10.00".parse().unwrap(),
            max_output_tokens: 100,
            max_input_tokens: None,
        };
        // 25 × 2.00 / 1e6 + 12 × 10.00 / 1e6 = 0.00005 + 0.00012
        assert_eq!(prices.cost(25, 12).unwrap().to_string(), "0.00017");
        assert_eq!(prices.cost(0, 0).unwrap(), Credits::ZERO);
        let fine = TextPrices {
            input_per_million: "0.075".parse().unwrap(),
            ..prices
        };
        // 7.5 units a token: one token costs 8 units, two cost 15.
        assert_eq!(fine.cost(1, 0).unwrap().units(), 8);
        assert_eq!(fine.cost(2, 0).unwrap().units(), 15);
        assert!(prices.cost(u64::MAX, u64::MAX).is_none());
    }

    #[test]
    fn the_worst_case_counts_every_byte_as_a_token_up_to_the_context() {
        let mut prices = TextPrices {
            input_per_million: "1.00".parse().unwrap(),
            output_per_million: "3.00".parse().unwrap(),
            max_output_tokens: 1000,
            max_input_tokens: None,
        };
        assert_eq!(
            prices.worst_case(500, Some(200)).unwrap(),
            prices.cost(500, 200).unwrap()
        );
        assert_eq!(
            prices.worst_case(500, None).unwrap(),
            prices.cost(500, 1000).unwrap()
        );
        prices.max_input_tokens = Some(100);
        assert_eq!(
            prices.worst_case(500, None).unwrap(),
            prices.cost(100, 1000).unwrap()
        );
    }

    #[test]
    fn a_reserve_that_cannot_be_computed_is_refused_at_load() {
        for (text, wanted) in [
            (
                r#"{ by = "duration" }"#,
                "exactly one of `prices` or `per_unit`",
            ),
            (
                r#"{ by = "d", per_unit = "0.1" }"#,
                "`per_unit` needs `max`",
            ),
            (r#"{ by = "d", prices = {} }"#, "at least one value"),
            (
                r#"{ by = "d", prices = { "1" = "1" }, default = "2" }"#,
                "not one of the priced",
            ),
            (
                r#"{ by = "d", per_unit = "0.1", max = 5, default = 6 }"#,
                "from 1 to `max`",
            ),
            (
                r#"{ by = "d", prices = { "1" = "1" }, typo = 1 }"#,
                "unknown field `typo`",
            ),
            (r#""-1""#, "plain decimal number"),
        ] {
            let error = reserve(text).unwrap_err();
            assert!(error.contains(wanted), "{text}: {error}");
        }
    }
}
