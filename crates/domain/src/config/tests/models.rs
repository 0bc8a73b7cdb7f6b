//! `[models."…"]`: each model is an asynchronous one or a text one, never half of each.

use super::*;
use crate::pricing::{Reserve, TextPrices};

fn with_model(table: &str) -> String {
    format!("{MINIMAL}\n[models.\"openai/gpt-5.2\"]\n{table}\n")
}

#[test]
fn a_text_model_has_prices_per_million_and_bounds_with_defaults() {
    let config = parse(&with_model(
        "input_per_million = \"2.00\"\noutput_per_million = \"10.00\"",
    ))
    .unwrap();
    let model = &config.models["openai/gpt-5.2"];
    assert_eq!(
        model.kind,
        ModelKind::Text(TextPrices {
            input_per_million: "2.00".parse().unwrap(),
            output_per_million: "10.00".parse().unwrap(),
            max_output_tokens: DEFAULT_MAX_OUTPUT_TOKENS,
            max_input_tokens: None,
        })
    );
    assert!(model.task_reserve().is_none());
    let image = &config.models["google/gempix2"];
    assert_eq!(
        image.task_reserve(),
        Some(&Reserve::Flat("0.50".parse().unwrap()))
    );
    assert!(image.text_prices().is_none());

    let bounded = parse(&with_model(
        "input_per_million = \"2.00\"\noutput_per_million = \"10.00\"\n\
         max_output_tokens = 512\nmax_input_tokens = 1000",
    ))
    .unwrap();
    let prices = bounded.models["openai/gpt-5.2"]
        .text_prices()
        .copied()
        .unwrap();
    assert_eq!(
        (prices.max_output_tokens, prices.max_input_tokens),
        (512, Some(1000))
    );
}

#[test]
fn a_model_that_is_neither_or_both_kinds_is_refused_naming_its_table() {
    for (table, wanted) in [
        (
            "reserve = \"0.10\"\ninput_per_million = \"2.00\"\noutput_per_million = \"1.00\"",
            "gateway.toml:13:1: [models.\"openai/gpt-5.2\"] has `reserve` (an asynchronous model) \
             beside text prices",
        ),
        (
            "reserve = \"0.10\"\nmax_output_tokens = 10",
            "has `reserve` (an asynchronous model) beside text prices",
        ),
        (
            "input_per_million = \"2.00\"",
            "[models.\"openai/gpt-5.2\"] is a text model: it needs both input_per_million and \
             output_per_million",
        ),
        ("max_input_tokens = 5", "is a text model: it needs both"),
        (
            "input_per_million = \"2.00\"\noutput_per_million = \"1.00\"\nmax_output_tokens = 0",
            "gateway.toml:16:21: [models.\"openai/gpt-5.2\"] max_output_tokens must be at least 1",
        ),
        (
            "input_per_million = \"-2.00\"\noutput_per_million = \"1.00\"",
            "plain decimal number",
        ),
        (
            "input_per_million = \"2.00\"\noutput_per_million = \"1.00\"\nprice = 1",
            "unknown field `price`",
        ),
    ] {
        let error = error_of(&with_model(table));
        assert!(error.contains(wanted), "{table}: {error}");
    }
    let neither = error_of(&format!("{MINIMAL}\n[models.\"empty\"]\n"));
    assert!(
        neither.contains(
            "[models.\"empty\"] needs `reserve` (an asynchronous model) or `input_per_million` \
             and `output_per_million` (a text model)"
        ),
        "{neither}"
    );
}

#[test]
fn text_limits_default_and_inherit_like_the_others() {
    let config = parse(MINIMAL).unwrap();
    let limits = config.teams[0].limits;
    assert_eq!(limits.text.count.get(), 120);
    assert_eq!(limits.text.per, Duration::from_secs(60));
    assert_eq!(limits.text_burst.get(), 20);
    let own =
        parse(&MINIMAL.replace("budget = {", "limits = { text = \"5/s\" }\nbudget = {")).unwrap();
    let limits = own.teams[0].limits;
    assert_eq!((limits.text.count.get(), limits.text_burst.get()), (5, 5));
}
