//! One meaning per request body. The gateway checks and prices a body, then forwards its bytes
//! untouched, so the upstream must read the same fields the gateway read. JSON leaves two
//! readings open: a key written twice (serde_json keeps the last, other parsers the first) and
//! keys equal but for ASCII case (Go's `encoding/json` matches names without case). A body with
//! either, where it could matter, is refused rather than guessed at.

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

/// Refuses a top-level key that differs only in ASCII case from a field the gateway reads, so
/// no upstream can take it for that field; `Err` is a 400's detail naming both.
pub fn check_case<'a>(
    fields: &Map<String, Value>,
    read: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    for name in read {
        if let Some(key) = fields
            .keys()
            .find(|key| *key != name && key.eq_ignore_ascii_case(name))
        {
            return Err(format!("{key:?} differs from {name:?} only in case"));
        }
    }
    Ok(())
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
        // Fields the gateway does not read are the upstream's to interpret.
        assert_eq!(
            check_case(&fields(r#"{"model":"a","Size":"1k","size":"4k"}"#), read),
            Ok(())
        );
    }
}
