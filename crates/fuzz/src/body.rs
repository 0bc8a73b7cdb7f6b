//! `body`: the duplicate-key and case-variant checks over any bytes and nested JSON.
//!
//! A body has one meaning when every reader takes the same fields from it. The oracle reads the
//! body into a tree that keeps every key of every object, in order, and compares the reading
//! that keeps the first of a repeated key with the one that keeps the last (what serde_json
//! does); a body the check accepts must read the same both ways, and one it refuses must have a
//! key twice. For case, a reader that matches names as Go's `encoding/json` does must find
//! each field the gateway reads under its own name only.

use std::fmt;

use arbitrary::Unstructured;
use ketchup_domain::body::{check_case, check_unique_keys};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::generate::{FIELDS, below, flag, key, number, pick, string};

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let body = if flag(&mut u) {
        u.take_rest().to_vec()
    } else {
        let mut text = String::new();
        write_value(&mut u, 4, &mut text);
        text.into_bytes()
    };
    check(&body);
}

/// The properties of one body.
pub fn check(body: &[u8]) {
    let verdict = check_unique_keys(body);
    let tree = serde_json::from_slice::<Node>(body);
    match (&verdict, &tree) {
        (Ok(()), Ok(tree)) => {
            assert_eq!(tree.repeated(), None, "accepted with a key twice");
            let value: Value = serde_json::from_slice(body).expect("an accepted body is JSON");
            assert_eq!(
                tree.first_wins(),
                value,
                "the first and last of a key differ"
            );
        }
        (Ok(()), Err(error)) => panic!("accepted a body that is not JSON: {error}"),
        (Err(detail), Ok(tree)) => {
            let key = tree
                .repeated()
                .unwrap_or_else(|| panic!("refused a body without a key twice: {detail}"));
            assert!(
                detail.starts_with("duplicate key "),
                "the detail names the key: {detail} ({key:?} is repeated)"
            );
        }
        (Err(_), Err(_)) => {}
    }
    if verdict.is_ok()
        && let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body)
    {
        case(&fields);
    }
}

/// Whether a reader that matches names as Go's `encoding/json` does takes `key` for the ASCII
/// field `name`: it compares `ToUpper(ToLower(c))` of each character, which makes the Kelvin sign
/// a `K`, the long s an `S`, and both dotted capital and dotless small i an `I`.
pub fn reads_as(key: &str, name: &str) -> bool {
    let fold = |c: char| match c {
        '\u{212a}' => 'K',
        '\u{17f}' => 'S',
        '\u{130}' | '\u{131}' => 'I',
        c => c.to_ascii_uppercase(),
    };
    key.chars().count() == name.chars().count()
        && key
            .chars()
            .zip(name.chars())
            .all(|(k, n)| fold(k) == n.to_ascii_uppercase())
}

/// `check_case` refuses exactly the objects in which a read field is also written another way.
fn case(fields: &Map<String, Value>) {
    let variant = FIELDS.iter().find_map(|name| {
        fields
            .keys()
            .find(|key| *key != name && reads_as(key, name))
            .map(|key| (key, name))
    });
    match (check_case(fields, FIELDS.iter().copied()), variant) {
        (Ok(()), None) => {}
        (Ok(()), Some((key, name))) => {
            panic!("{key:?} reads as {name:?} to a case-insensitive reader, yet passed")
        }
        (Err(detail), Some(_)) => assert!(detail.contains("only in case"), "{detail}"),
        (Err(detail), None) => panic!("refused without a case variant: {detail}"),
    }
}

/// Writes JSON text whose objects often repeat a key, spelled plainly or with escapes.
fn write_value(u: &mut Unstructured, depth: usize, out: &mut String) {
    space(u, out);
    match below(u, if depth == 0 { 3 } else { 5 }) {
        0 => out.push_str(pick(u, &["null", "true", "false"])),
        1 => out.push_str(&number(u).to_string()),
        2 => out.push_str(&Value::String(string(u)).to_string()),
        3 => {
            out.push('[');
            for i in 0..below(u, 4) {
                if i > 0 {
                    out.push(',');
                }
                write_value(u, depth - 1, out);
            }
            out.push(']');
        }
        _ => {
            out.push('{');
            let mut written: Vec<String> = Vec::new();
            for i in 0..below(u, 6) {
                if i > 0 {
                    out.push(',');
                }
                let name = match written.last() {
                    Some(earlier) if flag(u) => earlier.clone(),
                    _ => key(u),
                };
                space(u, out);
                write_key(u, &name, out);
                space(u, out);
                out.push(':');
                write_value(u, depth - 1, out);
                written.push(name);
            }
            out.push('}');
        }
    }
    space(u, out);
}

/// A key as a JSON string, some characters written as `\u` escapes.
fn write_key(u: &mut Unstructured, name: &str, out: &mut String) {
    out.push('"');
    for c in name.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || flag(u) && (c as u32) < 0x10000 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn space(u: &mut Unstructured, out: &mut String) {
    if flag(u) {
        out.push_str(pick(u, &[" ", "\n", "\t", "\r\n "]));
    }
}

/// A JSON value with every key of every object kept, in order.
#[derive(Debug)]
enum Node {
    Leaf(Value),
    Array(Vec<Node>),
    Object(Vec<(String, Node)>),
}

impl Node {
    /// A key written twice in one object, at any depth.
    fn repeated(&self) -> Option<&str> {
        match self {
            Node::Leaf(_) => None,
            Node::Array(items) => items.iter().find_map(Node::repeated),
            Node::Object(entries) => entries
                .iter()
                .enumerate()
                .find(|(i, (key, _))| entries[..*i].iter().any(|(earlier, _)| earlier == key))
                .map(|(_, (key, _))| key.as_str())
                .or_else(|| entries.iter().find_map(|(_, node)| node.repeated())),
        }
    }

    /// The value read keeping the first of each key.
    fn first_wins(&self) -> Value {
        match self {
            Node::Leaf(value) => value.clone(),
            Node::Array(items) => Value::Array(items.iter().map(Node::first_wins).collect()),
            Node::Object(entries) => {
                let mut map = Map::new();
                for (key, node) in entries {
                    map.entry(key.clone()).or_insert_with(|| node.first_wins());
                }
                Value::Object(map)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Leaf(Value::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Leaf(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Leaf(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Leaf(v.into()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Leaf(v.into()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Node, A::Error> {
        let mut nodes = Vec::new();
        while let Some(node) = items.next_element()? {
            nodes.push(node);
        }
        Ok(Node::Array(nodes))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Node, A::Error> {
        let mut nodes = Vec::new();
        while let Some(entry) = entries.next_entry()? {
            nodes.push(entry);
        }
        Ok(Node::Object(nodes))
    }
}
