//! `routes`: `Route::check` of generation bodies, on every built-in route and on routes an admin
//! configures under `[routes."/api/…"]`.
//!
//! What the check accepts is read again here by walking each field path through the body: the
//! model, count and callback it returns must be the body's, the prompt and references must meet
//! the route's rules, and every field it read must have one meaning to a case-insensitive reader
//! at every depth. What it refuses must be refused with a detail naming a field the route reads.

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Unstructured;
use ketchup_domain::body::check_case;
use ketchup_domain::route_table::{
    JsonType, ModelSource, RawRoute, Route, RouteTable, is_http_url,
};
use serde_json::{Map, Value};

use crate::body::reads_as;
use crate::generate::{FIELDS, below, flag, object, pick, text, toml_string, value, variant};

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mode = below(&mut u, 3);
    let route = if mode == 1 {
        match configured(&mut u) {
            Some(route) => route,
            None => return,
        }
    } else {
        let table = RouteTable::builtin(below(&mut u, 12));
        let routes: Vec<&Route> = table.iter().collect();
        routes[below(&mut u, routes.len())].clone()
    };
    if mode == 2 {
        // The rest as the body, as a client sent it.
        if let Ok(Value::Object(fields)) = serde_json::from_slice(u.take_rest()) {
            check(&route, &fields);
        }
        return;
    }
    let mut fields = object(&mut u, 3);
    // Give the fields the route reads a fair chance to be present.
    for name in read_paths(&route) {
        if flag(&mut u) {
            let first = name.split('.').next().unwrap_or_default();
            let first = first.trim_end_matches("[]").to_owned();
            let first = if flag(&mut u) {
                first
            } else {
                variant(&mut u, &first)
            };
            fields.insert(first, value(&mut u, 3));
        }
    }
    check(&route, &fields);
}

/// A route from `[routes."…"]` text, or `None` when the table is refused (which must not panic
/// and must say why).
fn configured(u: &mut Unstructured) -> Option<Route> {
    let family = pick(u, &["video", "image", "a b", "", "x-1_2"]);
    let mut toml = format!("family = {family:?}\n");
    if flag(u) {
        let field = if flag(u) {
            pick(u, FIELDS).to_owned()
        } else {
            text(u, 8)
        };
        toml.push_str(&format!("model_field = {}\n", toml_string(&field)));
    }
    if flag(u) {
        toml.push_str(&format!(
            "fixed_model = {:?}\n",
            pick(u, &["mj/x", " ", ""])
        ));
    }
    if flag(u) {
        toml.push_str(&format!("prompt_field = {}\n", toml_string(&path(u))));
    }
    toml.push_str(&format!("prompt_required = {}\n", flag(u)));
    let references: BTreeMap<String, String> = (0..below(u, 3))
        .map(|_| (toml_string(&path(u)), below(u, 4).to_string()))
        .collect();
    let references: Vec<String> = references
        .iter()
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    toml.push_str(&format!("references = {{ {} }}\n", references.join(", ")));
    let types: BTreeMap<&str, &str> = (0..below(u, 3))
        .map(|_| {
            (
                pick(u, FIELDS),
                pick(u, &["string", "integer", "number", "boolean"]),
            )
        })
        .collect();
    let types: Vec<String> = types
        .iter()
        .map(|(k, v)| format!("{k:?} = {v:?}"))
        .collect();
    toml.push_str(&format!("types = {{ {} }}\n", types.join(", ")));
    toml.push_str(&format!("accepts_callback = {}\n", flag(u)));
    let raw: RawRoute = toml::from_str(&toml).expect("the generated table has every key right");
    let at = pick(
        u,
        &[
            "/api/kling/gen",
            "/api/task/query",
            "/v1/x",
            "/api/a?b",
            "/api/",
        ],
    );
    match raw.into_route(at) {
        Ok(route) => Some(route),
        Err(why) => {
            assert!(!why.is_empty(), "{toml}");
            None
        }
    }
}

/// A field path as admins write them, or nearly.
fn path(u: &mut Unstructured) -> String {
    match below(u, 3) {
        0 => pick(
            u,
            &[
                "",
                "prompt",
                "content[].text",
                "content[].image_url.url",
                "images",
            ],
        )
        .to_owned(),
        1 => pick(u, &["a..b", "x[]", "[]", "a.b[].c", "a[][]", "é", "a b"]).to_owned(),
        _ => text(u, 10),
    }
}

/// The paths the route reads below the top level of the body, and its top-level fields.
fn read_paths(route: &Route) -> Vec<String> {
    let model = match &route.model {
        ModelSource::Field(name) => Some(name.clone()),
        ModelSource::Fixed(_) => None,
    };
    model
        .into_iter()
        .chain(route.prompt.iter().map(|path| path.as_str().to_owned()))
        .chain(
            route
                .references
                .iter()
                .map(|(path, _)| path.as_str().to_owned()),
        )
        .chain(route.types.keys().cloned())
        .chain(["n".to_owned(), "callback_url".to_owned()])
        .collect()
}

/// The properties of one body on one route.
pub fn check(route: &Route, fields: &Map<String, Value>) {
    let result = route.check(fields);
    let mut unread = fields.clone();
    unread.insert("zz_not_read".into(), Value::Bool(true));
    assert_eq!(
        route.check(&unread),
        result,
        "a field no route reads changed the answer"
    );
    let submission = match result {
        Ok(submission) => submission,
        Err(detail) => {
            let named = read_paths(route)
                .iter()
                .any(|path| detail.contains(path.as_str()));
            assert!(
                named,
                "the detail {detail:?} names no field {route:?} reads"
            );
            return;
        }
    };
    let present = |name: &str| fields.get(name).filter(|v| !v.is_null());
    match &route.model {
        ModelSource::Fixed(id) => assert_eq!(&submission.model, id),
        ModelSource::Field(name) => {
            assert_eq!(
                present(name).and_then(Value::as_str),
                Some(&*submission.model)
            );
        }
    }
    let count = present("n").map_or(Some(1), Value::as_i64);
    assert_eq!(Some(submission.count), count);
    assert!(submission.count >= 1);
    let callback = present("callback_url").map(|url| url.as_str().expect("a string"));
    assert_eq!(submission.callback_url.as_deref(), callback);
    assert!(callback.is_none_or(is_http_url), "{callback:?}");
    if let Some(path) = &route.prompt {
        let prompts = walk(fields, path.as_str());
        assert!(prompts.iter().all(|v| v.is_string()), "{prompts:?}");
        let written = prompts
            .iter()
            .any(|v| v.as_str().is_some_and(|t| !t.trim().is_empty()));
        assert!(written || !route.prompt_required, "no prompt in {fields:?}");
    }
    for (path, most) in &route.references {
        let references: Vec<&Value> = walk(fields, path.as_str())
            .into_iter()
            .flat_map(|v| match v {
                Value::Array(items) => items.iter().collect(),
                other => vec![other],
            })
            .collect();
        assert!(
            references.len() <= *most,
            "{} references at {path:?}",
            references.len()
        );
        for reference in references {
            let text = reference.as_str().expect("a reference is a string");
            let data_uri = text.len() >= 5
                && text.as_bytes()[..5].eq_ignore_ascii_case(b"data:")
                && text.contains(',');
            assert!(is_http_url(text) || data_uri, "{text:?}");
        }
    }
    for (name, kind) in &route.types {
        if let Some(value) = present(name) {
            let admitted = match kind {
                JsonType::String => value.is_string(),
                JsonType::Integer => value.is_i64() || value.is_u64(),
                JsonType::Number => value.is_number(),
                JsonType::Boolean => value.is_boolean(),
            };
            assert!(admitted, "{name} = {value} is not {kind:?}");
        }
    }
    if check_case(fields, route.fields_read()).is_ok() {
        one_meaning(route, fields);
    }
}

/// The values at a field path: names joined by `.`, `[]` for each element of an array.
fn walk<'a>(fields: &'a Map<String, Value>, path: &str) -> Vec<&'a Value> {
    let mut at: Vec<&Value> = Vec::new();
    let mut objects = vec![fields];
    let steps: Vec<&str> = path.split('.').collect();
    for (i, step) in steps.iter().enumerate() {
        let (name, each) = match step.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (*step, false),
        };
        let found: Vec<&Value> = objects
            .iter()
            .filter_map(|object| object.get(name).filter(|v| !v.is_null()))
            .flat_map(|v| match (each, v) {
                (true, Value::Array(items)) => items.iter().collect(),
                (true, _) => Vec::new(),
                (false, v) => vec![v],
            })
            .filter(|v| !v.is_null())
            .collect();
        if i + 1 == steps.len() {
            at = found;
        } else {
            objects = found.into_iter().filter_map(Value::as_object).collect();
        }
    }
    at
}

/// No object on any path the route read holds a key that a case-insensitive reader takes for
/// the path's name there, besides the name itself. The objects on a path are those the route
/// reads: an array's elements after a `[]` step, the value itself after any other.
fn one_meaning(route: &Route, fields: &Map<String, Value>) {
    let paths: BTreeSet<String> = read_paths(route).into_iter().collect();
    for path in &paths {
        let mut objects = vec![fields];
        for step in path.split('.') {
            let (name, each) = match step.strip_suffix("[]") {
                Some(name) => (name, true),
                None => (step, false),
            };
            for object in &objects {
                if let Some(other) = object.keys().find(|k| *k != name && reads_as(k, name)) {
                    panic!("{other:?} reads as {name:?} on the path {path:?}, yet passed");
                }
            }
            objects = objects
                .iter()
                .filter_map(|object| object.get(name))
                .flat_map(|v| match (each, v) {
                    (true, Value::Array(items)) => items.iter().collect(),
                    (true, _) => Vec::new(),
                    (false, other) => vec![other],
                })
                .filter_map(Value::as_object)
                .collect();
        }
    }
}
