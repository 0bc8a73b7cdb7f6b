//! Inputs built from the fuzzer's bytes. Every helper gives a value even when the bytes have run
//! out (the first choice, zero, false), so an input of any length is some input.

use arbitrary::Unstructured;

/// One of `items` (not empty).
pub fn pick<T: Copy>(u: &mut Unstructured, items: &[T]) -> T {
    items[below(u, items.len())]
}

/// A number in `0..n` (`n` above zero).
pub fn below(u: &mut Unstructured, n: usize) -> usize {
    u.int_in_range(0..=n - 1).unwrap_or(0)
}

pub fn flag(u: &mut Unstructured) -> bool {
    u.arbitrary().unwrap_or(false)
}

/// Arbitrary text of at most `most` characters.
pub fn text(u: &mut Unstructured, most: usize) -> String {
    let text: String = u.arbitrary().unwrap_or_default();
    text.chars().take(most).collect()
}

/// Every field name a route or a reserve reads, so that generated bodies hit them.
pub const FIELDS: &[&str] = &[
    "model",
    "mv",
    "prompt",
    "images",
    "image",
    "content",
    "text",
    "image_url",
    "url",
    "type",
    "duration",
    "n",
    "callback_url",
    "image_size",
];

/// Strings that are, or are nearly, what the checks look for.
const STRINGS: &[&str] = &[
    "",
    " \t",
    "x",
    "a cat",
    "10",
    "15",
    "25",
    "0",
    "-5",
    "1k",
    "4k",
    "0.50",
    "https://a/b.png",
    "http://h",
    "HTTPS://H/X",
    "https://",
    "http://[::1]:8/x",
    "https://user:pw@h/",
    "data:image/png;base64,AAAA",
    "DATA:x,y",
    "data:nocomma",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "ftp://x",
    "sora-2",
    "google/gempix2",
    "seedance-2.0",
    "chirp-v4-5",
    "success",
    "failed",
];

/// A field name: one the domain reads, a case variant of one, or any text.
pub fn key(u: &mut Unstructured) -> String {
    match below(u, 4) {
        0 | 1 => pick(u, FIELDS).to_owned(),
        2 => {
            let name = pick(u, FIELDS);
            variant(u, name)
        }
        _ => text(u, 12),
    }
}

/// `name` with some letters changed into what a case-insensitive reader takes for them: the
/// other ASCII case, or a non-ASCII letter that Go's `encoding/json` folds onto it.
pub fn variant(u: &mut Unstructured, name: &str) -> String {
    name.chars()
        .map(|c| {
            if !flag(u) {
                return c.to_string();
            }
            let lookalike = match c {
                'k' | 'K' => Some('\u{212a}'),
                's' | 'S' => Some('\u{17f}'),
                'i' | 'I' => Some(pick(u, &['\u{130}', '\u{131}'])),
                _ => None,
            };
            match lookalike {
                Some(other) if flag(u) => other.to_string(),
                _ if c.is_ascii_lowercase() => c.to_ascii_uppercase().to_string(),
                _ => c.to_ascii_lowercase().to_string(),
            }
        })
        .collect()
}

/// A JSON string: a telling one or any text.
pub fn string(u: &mut Unstructured) -> String {
    if flag(u) {
        pick(u, STRINGS).to_owned()
    } else {
        text(u, 40)
    }
}

/// A JSON number near the edges the checks care about.
pub fn number(u: &mut Unstructured) -> serde_json::Value {
    use serde_json::json;
    match below(u, 5) {
        0 => json!(pick(u, &[0, 1, 2, 3, 4, 5, 9, 10, 15, 16, 25, -1, -5])),
        1 => json!(pick(u, &[i64::MAX, i64::MIN, i64::from(u32::MAX), 1 << 40])),
        2 => json!(pick(u, &[u64::MAX, 1u64 << 63])),
        3 => json!(pick(u, &[0.5, 10.0, -0.0, 1e300, 15.000_000_1])),
        _ => json!(u.arbitrary::<i64>().unwrap_or(0)),
    }
}

/// Any JSON value, nested at most `depth` deep, with keys from [`key`].
pub fn value(u: &mut Unstructured, depth: usize) -> serde_json::Value {
    use serde_json::Value;
    let kinds = if depth == 0 { 4 } else { 6 };
    match below(u, kinds) {
        0 => Value::Null,
        1 => Value::Bool(flag(u)),
        2 => number(u),
        3 => Value::String(string(u)),
        4 => Value::Array((0..below(u, 5)).map(|_| value(u, depth - 1)).collect()),
        _ => Value::Object(object(u, depth - 1)),
    }
}

/// A JSON object of up to seven fields.
pub fn object(u: &mut Unstructured, depth: usize) -> serde_json::Map<String, serde_json::Value> {
    (0..below(u, 8))
        .map(|_| (key(u), value(u, depth)))
        .collect()
}

/// `text` as a one-line TOML basic string, so that it can be a key as well as a value.
pub fn toml_string(text: &str) -> String {
    let mut out = String::from('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
