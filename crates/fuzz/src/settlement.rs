//! `settlement`: reading a final state and its `consumed` from a task query's answer and from a
//! callback payload's fields.
//!
//! The task query is read into borrowed typed fields, the callback payload from a `Value`: both
//! readings must agree on every body that has one meaning (no key twice), and `consumed` must
//! come out exact, missing, or malformed with a bounded excerpt.

use arbitrary::Unstructured;
use ketchup_domain::body::check_unique_keys;
use ketchup_domain::credits::Credits;
use ketchup_domain::ledger::FinalStatus;
use ketchup_domain::settlement::{Consumed, final_state_of_query, final_status};
use serde_json::{Map, Value, json};

use crate::generate::{below, flag, number, pick, string, value};

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let body = if flag(&mut u) {
        u.take_rest().to_vec()
    } else {
        answer(&mut u).to_string().into_bytes()
    };
    check(&body);
}

/// A task query's answer, mostly in the upstream's shape.
fn answer(u: &mut Unstructured) -> Value {
    let mut data = Map::new();
    if flag(u) {
        let status = pick(
            u,
            &[
                "success",
                "failed",
                "pending",
                "in_progress",
                "SUCCESS",
                "Failed",
                "",
            ],
        );
        data.insert("status".into(), json!(status));
    }
    if flag(u) {
        let consumed = match below(u, 4) {
            0 => json!(pick(
                u,
                &["0.50000000", "0.500000", "0", "12.3", "-1", "1e3"]
            )),
            1 => Value::String(string(u)),
            2 => number(u),
            _ => value(u, 2),
        };
        data.insert("consumed".into(), consumed);
    }
    if flag(u) {
        data.insert("task_id".into(), json!("ta_1"));
    }
    let mut answer = Map::new();
    answer.insert("code".into(), if flag(u) { json!(0) } else { value(u, 1) });
    let data = if flag(u) {
        Value::Object(data)
    } else {
        value(u, 2)
    };
    answer.insert("data".into(), data);
    Value::Object(answer)
}

/// The properties of one body.
pub fn check(body: &[u8]) {
    let typed = final_state_of_query(body);
    if let Some((status, consumed)) = &typed {
        bounded(status, consumed);
    }
    let Ok(parsed) = serde_json::from_slice::<Value>(body) else {
        assert_eq!(
            typed, None,
            "a final state read from a body that is not JSON"
        );
        return;
    };
    let from_value = (parsed.get("code").and_then(Value::as_i64) == Some(0))
        .then(|| parsed.get("data").and_then(final_state))
        .flatten();
    if let Some((status, consumed)) = &from_value {
        bounded(status, consumed);
    }
    if check_unique_keys(body).is_ok() {
        assert_eq!(typed, from_value, "the two readings of one body differ");
    }
    if let Some(data) = parsed.get("data") {
        // A callback payload is the task's fields themselves.
        if let Some((status, consumed)) = final_state(data) {
            bounded(&status, &consumed);
            let written = data.get("consumed");
            let amount = written.and_then(Value::as_str).map(str::parse::<Credits>);
            match (&consumed, amount) {
                (Consumed::Exact(credits), Some(Ok(amount))) => assert_eq!(*credits, amount),
                (Consumed::Malformed(_), Some(Err(_))) => {}
                (Consumed::Malformed(_), None) => assert!(written.is_some_and(|v| !v.is_null())),
                (Consumed::Missing, None) => assert!(written.is_none_or(Value::is_null)),
                (consumed, amount) => panic!("{consumed:?} read from {written:?} ({amount:?})"),
            }
        }
    }
}

/// The reference reading, from a `Value`: a final status and its `consumed` among a task's
/// fields, as a task query's `data` and a callback payload carry them.
fn final_state(data: &Value) -> Option<(FinalStatus, Consumed)> {
    let status = final_status(data.get("status")?.as_str()?)?;
    Some((status, Consumed::from_json(data.get("consumed"))))
}

/// What a final state may hold: a status from `status`, and `consumed` exactly as written, or a
/// short excerpt of what could not be read.
fn bounded(status: &FinalStatus, consumed: &Consumed) {
    assert!(matches!(status, FinalStatus::Success | FinalStatus::Failed));
    match consumed {
        Consumed::Exact(credits) => {
            assert!(credits.units() >= 0, "{credits:?}");
            let text = credits.format_places(8);
            assert_eq!(text.parse::<Credits>().ok(), Some(*credits));
        }
        Consumed::Missing => {}
        Consumed::Malformed(excerpt) => {
            assert!(excerpt.chars().count() <= 64, "an excerpt of {excerpt:?}");
        }
    }
}
