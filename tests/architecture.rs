//! The layout's rules that the compiler cannot check by itself (ARCHITECTURE.md):
//! - no import cycle between the top-level modules of any crate, so each module can be read,
//!   tested and moved with only what it imports below it;
//! - the domain crate has no HTTP framework among its dependencies;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const MAX_LINES: usize = 800;

/// Every crate's `src/`: the root package's and each one under `crates/`.
fn source_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![Path::new(ROOT).join("src")];
    let crates = fs::read_dir(Path::new(ROOT).join("crates")).expect("crates/ exists");
    for entry in crates {
        let src = entry.expect("readable crates/").path().join("src");
        if src.is_dir() {
            dirs.push(src);
        }
    }
    dirs.sort();
    dirs
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).expect("readable source directory") {
        let path = entry.expect("readable entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The top-level module a file belongs to (`ledger` for `src/ledger/sqlite.rs`); `None` for the
/// crate root, which declares the modules and may name them all.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).expect("file under src");
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// Code without its comments, so that a doc line mentioning `crate::x` is no import.
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names a path prefix reaches: `x` in `prefix::x`, and every top-level item of a group
/// `prefix::{x, y::{…}}`.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let identifier = |text: &str| -> Option<String> {
        let name: String = text
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        (!name.is_empty() && name != "self").then_some(name)
    };
    for (at, _) in code.match_indices(prefix) {
        let preceded_by_identifier = code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if preceded_by_identifier {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut item) = (0usize, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.extend(identifier(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            names.extend(identifier(&item));
        } else {
            names.extend(identifier(rest));
        }
    }
    names
}

/// Which top-level modules each top-level module of a crate names.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(src) {
        let Some(module) = top_module(src, &file) else {
            continue;
        };
        let code = without_comments(&fs::read_to_string(&file).expect("readable source"));
        // In a top-level file, `super::` is the crate root too.
        let depth = file.strip_prefix(src).unwrap().components().count();
        let at_top = depth == 1 || file.ends_with("mod.rs") && depth == 2;
        let mut named = names_after(&code, "crate::");
        if at_top {
            named.extend(names_after(&code, "super::"));
        }
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(named.into_iter().filter(|name| *name != module));
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for edges in graph.values_mut() {
        edges.retain(|name| modules.contains(name));
    }
    graph
}

/// A cycle in the graph, if there is one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        module: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(module) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|m| m == module).unwrap();
                let mut cycle = path[start..].to_vec();
                cycle.push(module.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(module.to_owned(), Mark::Open);
        path.push(module.to_owned());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(module.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|module| visit(module, graph, &mut marks, &mut Vec::new()))
}

#[test]
fn no_crate_has_an_import_cycle_between_its_top_level_modules() {
    let mut checked = 0;
    for src in source_dirs() {
        let graph = module_graph(&src);
        checked += graph.len();
        if let Some(cycle) = find_cycle(&graph) {
            panic!("import cycle in {}: {}", src.display(), cycle.join(" -> "));
        }
    }
    assert!(checked > 20, "only {checked} modules found to check");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", &["b"][..]),
        ("b", &["c"][..]),
        ("c", &["a"][..]),
        ("d", &[][..]),
    ]
    .into_iter()
    .map(|(m, e)| (m.to_owned(), e.iter().map(|s| s.to_string()).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let code = "use crate::{a::X, b::{Y, Z}, self};\nfn f() { crate::c::g(); my_crate::d(); }";
    assert_eq!(
        names_after(code, "crate::"),
        ["a", "b", "c"].map(String::from).into()
    );
}

#[test]
fn the_domain_crate_has_no_http_framework() {
    let manifest = fs::read_to_string(Path::new(ROOT).join("crates/domain/Cargo.toml"))
        .expect("the domain crate's manifest");
    let dependencies = manifest
        .split("[dependencies]")
        .nth(1)
        .expect("a [dependencies] table")
        .split("\n[")
        .next()
        .unwrap_or_default();
    for framework in [
        "axum",
        "hyper",
        "tower",
        "http",
        "reqwest",
        "ketchup-gateway",
    ] {
        assert!(
            !dependencies
                .lines()
                .any(|line| line.split([' ', '=']).next() == Some(framework)),
            "ketchup-domain depends on {framework}"
        );
    }
}

#[test]
fn no_source_file_needs_more_than_800_lines() {
    let mut long = Vec::new();
    for src in source_dirs() {
        for file in rust_files(&src) {
            let lines = fs::read_to_string(&file).expect("readable").lines().count();
            if lines > MAX_LINES {
                long.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:#?}");
}
