//! `[models."…"]`: the upstream models teams may use and what a request for each reserves.
//!
//! A model is one of two kinds, never half of each: an asynchronous one (`reserve`: what a task
//! holds until it settles at its `consumed`) or a text one (prices per million input and output
//! tokens: a request reserves its worst case and settles at its usage when the answer ends).

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use crate::credits::Credits;
use crate::pricing::{Reserve, TextPrices};

/// Output tokens a text request that sets no limit of its own reserves, unless the model's
/// `max_output_tokens` says otherwise.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u32 = 8192;

/// One `[models."…"]` table as written: the keys of both kinds, sorted out by [`models`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    reserve: Option<Reserve>,
    input_per_million: Option<Credits>,
    output_per_million: Option<Credits>,
    max_output_tokens: Option<Spanned<u32>>,
    max_input_tokens: Option<Spanned<u32>>,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    pub kind: ModelKind,
}

/// What kind of endpoint serves a model, and so how a request for it is priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelKind {
    /// An asynchronous generation: the most a task may cost, from the request's fields.
    Task(Reserve),
    /// A text model answered at once (chat completions, messages, generateContent).
    Text(TextPrices),
}

impl Model {
    /// The reserve of an asynchronous model; `None` for a text one.
    pub fn task_reserve(&self) -> Option<&Reserve> {
        match &self.kind {
            ModelKind::Task(reserve) => Some(reserve),
            ModelKind::Text(_) => None,
        }
    }

    /// The prices of a text model; `None` for an asynchronous one.
    pub fn text_prices(&self) -> Option<&TextPrices> {
        match &self.kind {
            ModelKind::Text(prices) => Some(prices),
            ModelKind::Task(_) => None,
        }
    }
}

/// The models by upstream id; at least one, since a gateway without one could serve nothing.
pub(super) fn models(
    raw: BTreeMap<String, Spanned<RawModel>>,
) -> Result<BTreeMap<String, Model>, Invalid> {
    if raw.is_empty() {
        return Err(Invalid::new(
            None,
            "no [models.\"…\"] table: list at least one model with its reserve or its prices",
        ));
    }
    raw.into_iter()
        .map(|(name, raw)| {
            let span = raw.span();
            let kind = kind(&name, raw.into_inner(), span)?;
            Ok((name.clone(), Model { name, kind }))
        })
        .collect()
}

fn kind(name: &str, raw: RawModel, span: Range<usize>) -> Result<ModelKind, Invalid> {
    let table = format!("[models.{name:?}]");
    let RawModel {
        reserve,
        input_per_million,
        output_per_million,
        max_output_tokens,
        max_input_tokens,
    } = raw;
    let text_keys = input_per_million.is_some()
        || output_per_million.is_some()
        || max_output_tokens.is_some()
        || max_input_tokens.is_some();
    match (reserve, input_per_million, output_per_million) {
        (Some(reserve), None, None) if !text_keys => Ok(ModelKind::Task(reserve)),
        (Some(_), _, _) => Err(Invalid::at(
            span,
            format!(
                "{table} has `reserve` (an asynchronous model) beside text prices \
                 (input_per_million, output_per_million, max_output_tokens, max_input_tokens): \
                 a model is one or the other"
            ),
        )),
        (None, Some(input), Some(output)) => {
            let positive = |tokens: Option<Spanned<u32>>, key: &str| match tokens {
                Some(tokens) if *tokens.get_ref() == 0 => Err(Invalid::at(
                    tokens.span(),
                    format!("{table} {key} must be at least 1"),
                )),
                tokens => Ok(tokens.map(Spanned::into_inner)),
            };
            Ok(ModelKind::Text(TextPrices {
                input_per_million: input,
                output_per_million: output,
                max_output_tokens: positive(max_output_tokens, "max_output_tokens")?
                    .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS),
                max_input_tokens: positive(max_input_tokens, "max_input_tokens")?,
            }))
        }
        (None, None, None) if !text_keys => Err(Invalid::at(
            span,
            format!(
                "{table} needs `reserve` (an asynchronous model) or `input_per_million` and \
                 `output_per_million` (a text model)"
            ),
        )),
        (None, _, _) => Err(Invalid::at(
            span,
            format!(
                "{table} is a text model: it needs both input_per_million and output_per_million"
            ),
        )),
    }
}
