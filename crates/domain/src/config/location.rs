//! Names a place in the file the way the admin wrote it, such as `[store] kind` or
//! `[[teams]] name = "design": budget.period`. The TOML reader reports where a value it refused
//! sits only as a byte offset (the key path it keeps has no way to tell one team from another),
//! so the place is found again in the document's syntax tree.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step from the document's root towards a place.
#[derive(Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    /// A table in an array of tables, such as one `[[teams]]`, with its `name` if it has one.
    Table(Option<&'a str>),
    /// Any other array element.
    Item,
}

/// The place at `offset` in `source`, or `None` at the top level or outside any key.
///
/// A key the reader dropped (the second of a repeated key) is in no table of the document it
/// kept; its place is then the table whose header comes last before it, which is the table it
/// was written in (a repeated key in an inline table is inside that table's value, found above).
pub(super) fn describe(source: &str, offset: usize) -> Option<String> {
    let (document, _) = DeTable::parse_recoverable(source);
    let mut path = Vec::new();
    if let Some(is_table) = find_in_table(document.get_ref(), offset, &mut path) {
        return render(&path, is_table);
    }
    let mut last = None;
    last_header_before(document.get_ref(), source, offset, &mut path, &mut last);
    let mut place = last.map(|(_, path)| path).unwrap_or_default();
    let written = key_before(source, offset).unwrap_or_default();
    place.extend(written.iter().map(|key| Step::Key(key)));
    render(&place, written.is_empty())
}

/// The key written before `offset` on its line when the value after its `=` is missing or
/// unreadable (and so the key is in no table either): the line up to an `=`, read again with a
/// stand-in value, for the first `=` that ends a key.
fn key_before(source: &str, offset: usize) -> Option<Vec<String>> {
    let before = source.get(..offset)?;
    let line = &before[before.rfind('\n').map_or(0, |i| i + 1)..];
    line.match_indices('=')
        .find_map(|(at, _)| key_alone(&format!("{}0", &line[..=at])))
}

/// The key of `line`, a lone `key = value` (dotted keys in order), if it is one.
fn key_alone(line: &str) -> Option<Vec<String>> {
    let (read, errors) = DeTable::parse_recoverable(line);
    if !errors.is_empty() {
        return None;
    }
    let mut keys = Vec::new();
    let mut table = read.get_ref();
    loop {
        let mut entries = table.iter();
        let (key, value) = entries.next()?;
        if entries.next().is_some() {
            return None;
        }
        keys.push(key.get_ref().to_string());
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => return Some(keys),
        }
    }
}

/// Keeps in `last` the start and the path of the table whose `[header]` (or `[[header]]`) is
/// the last one before `offset`.
fn last_header_before<'a>(
    table: &'a DeTable<'_>,
    source: &str,
    offset: usize,
    path: &mut Vec<Step<'a>>,
    last: &mut Option<(usize, Vec<Step<'a>>)>,
) {
    for (key, value) in table {
        path.push(Step::Key(key.get_ref()));
        let items: Vec<&Spanned<DeValue<'_>>> = match value.get_ref() {
            DeValue::Array(items) => items.iter().collect(),
            _ => vec![value],
        };
        let in_array = matches!(value.get_ref(), DeValue::Array(_));
        for item in items {
            let DeValue::Table(inner) = item.get_ref() else {
                continue;
            };
            if in_array {
                path.push(Step::Table(
                    inner.get("name").and_then(|n| n.get_ref().as_str()),
                ));
            }
            let start = item.span().start;
            let header = source.as_bytes().get(start) == Some(&b'[');
            if header && start <= offset && last.as_ref().is_none_or(|(at, _)| start >= *at) {
                *last = Some((start, path.clone()));
            }
            last_header_before(inner, source, offset, path, last);
            if in_array {
                path.pop();
            }
        }
        path.pop();
    }
}

/// Pushes the steps to the innermost key of `table` whose key or value holds `offset`; returns
/// whether that place is a table. The steps stop at the table when `offset` is on a key's name:
/// what is wrong there is the key itself (unknown, or repeated), which the message names.
fn find_in_table<'a>(
    table: &'a DeTable<'_>,
    offset: usize,
    path: &mut Vec<Step<'a>>,
) -> Option<bool> {
    for (key, value) in table {
        if key.span().contains(&offset) {
            return Some(true);
        }
        path.push(Step::Key(key.get_ref()));
        if let Some(is_table) = find_in_value(value, offset, path) {
            return Some(is_table);
        }
        path.pop();
    }
    None
}

/// Like [`find_in_table`], for a value. A table's own span is only its header, so every child
/// is searched whether or not the span holds `offset`.
fn find_in_value<'a>(
    value: &'a Spanned<DeValue<'_>>,
    offset: usize,
    path: &mut Vec<Step<'a>>,
) -> Option<bool> {
    let found = match value.get_ref() {
        DeValue::Table(table) => find_in_table(table, offset, path),
        DeValue::Array(items) => items.iter().find_map(|item| {
            path.push(match item.get_ref() {
                DeValue::Table(table) => {
                    Step::Table(table.get("name").and_then(|name| name.get_ref().as_str()))
                }
                _ => Step::Item,
            });
            let found = find_in_value(item, offset, path);
            if found.is_none() {
                path.pop();
            }
            found
        }),
        _ => None,
    };
    found.or_else(|| {
        value
            .span()
            .contains(&offset)
            .then(|| value.get_ref().is_table())
    })
}

/// `[a.b] c` for a key, `[a.b]` for a table, and `[[a]] name = "x": c.d` inside an array of
/// tables; items of further arrays are left out, the line and column tell them apart.
fn render(path: &[Step<'_>], is_table: bool) -> Option<String> {
    let keys = |steps: &[Step<'_>]| {
        steps
            .iter()
            .filter_map(|step| match step {
                Step::Key(key) => Some(quoted(key)),
                Step::Table(_) | Step::Item => None,
            })
            .collect::<Vec<_>>()
    };
    if let Some(at) = path.iter().position(|step| matches!(step, Step::Table(_))) {
        let mut place = format!("[[{}]]", keys(&path[..at]).join("."));
        if let Step::Table(Some(name)) = path[at] {
            place.push_str(&format!(" name = {name:?}"));
        }
        let inside = keys(&path[at + 1..]);
        if !inside.is_empty() {
            place.push_str(&format!(": {}", inside.join(".")));
        }
        return Some(place);
    }
    let keys = keys(path);
    match keys.split_last()? {
        _ if is_table => Some(format!("[{}]", keys.join("."))),
        (key, []) => Some(key.clone()),
        (key, table) => Some(format!("[{}] {key}", table.join("."))),
    }
}

/// A key as TOML needs it written: bare when it can be, else quoted.
fn quoted(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}
