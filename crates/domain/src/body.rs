//! One meaning per request body. The gateway checks and prices a body, then forwards its bytes
//! untouched, so the upstream must read the same fields the gateway read. JSON leaves two
//! readings open: a key written twice (serde_json keeps the last, other parsers the first) and
//! keys equal but for case (Go's `encoding/json` matches names without case, and folds a few
//! non-ASCII letters onto ASCII ones). A body with either, where it could matter, is refused
//! rather than guessed at.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Refuses a body (already known to be valid JSON) with a key twice in any one object, at any
/// depth; `Err` is a 400's detail naming the key. serde_json bounds the depth of the walk.
pub fn check_unique_keys(body: &[u8]) -> Result<(), String> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    UniqueKeys
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end())
        .map_err(|e| e.to_string())
}

/// Refuses a top-level key that differs only in case from a field the gateway reads, so no
/// upstream can take it for that field; `Err` is a 400's detail naming both.
pub fn check_case<'a>(
    fields: &Map<String, Value>,
    read: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    for name in read {
        if let Some(key) = case_variant(fields, name) {
            return Err(case_detail(key, name));
        }
    }
    Ok(())
}

/// A key of `fields` other than `name` that a reader matching names without case takes for
/// `name`.
pub fn case_variant<'a>(fields: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    fields
        .keys()
        .find(|key| *key != name && same_but_case(key, name))
        .map(String::as_str)
}

/// A 400's detail for a key [`case_variant`] found.
pub fn case_detail(key: &str, name: &str) -> String {
    format!("{key:?} differs from {name:?} only in case")
}

/// Whether Go's `encoding/json` takes `a` and `b` for one name: it compares names folded
/// character by character to `ToUpper(ToLower(c))` with Unicode's one-character mappings, which
/// beyond ASCII case makes the Kelvin sign `K` a `K`, the long `ſ` an `S`, and both `İ` and `ı`
/// an `I`, so that `imageſ` is `images` and `callbac\u{212a}_url` is `callback_url` to it.
fn same_but_case(a: &str, b: &str) -> bool {
    a.chars().map(fold).eq(b.chars().map(fold))
}

fn fold(c: char) -> char {
    match c {
        c if c.is_ascii() => c.to_ascii_uppercase(),
        '\u{130}' | '\u{131}' => 'I',
        '\u{17f}' => 'S',
        '\u{212a}' => 'K',
        c => {
            let lower = single(c.to_lowercase()).unwrap_or(c);
            single(lower.to_uppercase()).unwrap_or(lower)
        }
    }
}

/// The one character of a case mapping, `None` when it maps to several.
fn single(mut chars: impl Iterator<Item = char>) -> Option<char> {
    let first = chars.next()?;
    chars.next().is_none().then_some(first)
}

/// Walks any JSON value, keeping nothing but the keys of the object being read.
struct UniqueKeys;

impl<'de> DeserializeSeed<'de> for UniqueKeys {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        while items.next_element_seed(UniqueKeys)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = entries.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate key {key:?} in the request body"
                )));
            }
            entries.next_value_seed(UniqueKeys)?;
            seen.insert(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique(body: &str) -> Result<(), String> {
        check_unique_keys(body.as_bytes())
    }

    #[test]
    fn distinct_keys_pass_at_every_depth() {
        for body in [
            "{}",
            r#"{"model":"a","n":1}"#,
            r#"{"a":{"x":1},"b":{"x":1},"c":[{"x":1},{"x":2}]}"#,
            r#"{"a":[1,2.5,-3,"s",true,null,[],{}]}"#,
            r#"{"Model":"a","model":"b"}"#,
            "[1,[2,[3]]]",
        ] {
            assert_eq!(unique(body), Ok(()), "{body}");
        }
    }

    #[test]
    fn a_key_twice_in_one_object_is_named_at_any_depth() {
        for (body, key) in [
            (r#"{"model":"cheap","prompt":"x","model":"dear"}"#, "model"),
            (r#"{"n":1,"n":4}"#, "n"),
            (r#"{"a":{"b":{"c":1,"c":1}}}"#, "c"),
            (
                r#"{"content":[{"text":"x"},{"text":"y","text":"z"}]}"#,
                "text",
            ),
            (r#"[{"x":null,"x":null}]"#, "x"),
            // An escape spells the same key.
            (r#"{"model":"a","mo\u0064el":"b"}"#, "model"),
        ] {
            let detail = unique(body).unwrap_err();
            assert!(
                detail.starts_with(&format!("duplicate key {key:?} in the request body")),
                "{body}: {detail}"
            );
        }
    }

    #[test]
    fn nesting_is_bounded_by_serde_json() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(unique(&deep).unwrap_err().contains("recursion limit"));
    }

    #[test]
    fn a_case_variant_of_a_read_field_is_named() {
        let fields = |body: &str| serde_json::from_str::<Map<String, Value>>(body).unwrap();
        let read = ["model", "n", "callback_url"];
        assert_eq!(
            check_case(&fields(r#"{"model":"a","Model":"b"}"#), read),
            Err(r#""Model" differs from "model" only in case"#.into())
        );
        assert_eq!(
            check_case(&fields(r#"{"N":4}"#), read),
            Err(r#""N" differs from "n" only in case"#.into())
        );
        assert_eq!(
            check_case(&fields(r#"{"CALLBACK_URL":"http://a"}"#), read),
            Err(r#""CALLBACK_URL" differs from "callback_url" only in case"#.into())
        );
        // Letters beyond ASCII that Go folds onto ASCII ones, and others in any case.
        for (key, name) in [
            ("callbac\u{212a}_url", "callback_url"),
            ("image\u{17f}", "images"),
            ("\u{130}mages", "images"),
            ("durat\u{131}on", "duration"),
            ("MOD\u{c8}LE", "mod\u{e8}le"),
        ] {
            let body = serde_json::json!({ key: "x" });
            assert_eq!(
                check_case(body.as_object().unwrap(), [name]),
                Err(format!("{key:?} differs from {name:?} only in case"))
            );
        }
        assert_eq!(
            check_case(
                &fields(r#"{"mod\u00e9l":"a","\u00df":"b"}"#),
                ["model", "ss"]
            ),
            Ok(())
        );
        // Fields the gateway does not read are the upstream's to interpret.
        assert_eq!(
            check_case(&fields(r#"{"model":"a","Size":"1k","size":"4k"}"#), read),
            Ok(())
        );
    }
}
