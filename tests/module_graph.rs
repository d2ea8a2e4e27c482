//! The crate's shape: its modules depend on each other one way, and no
//! logic file grows past what a reader takes in at once.
//!
//! A module depends on another when it names a path into it (`crate::…`,
//! `super::…`, `self::…`, in a `use` or inline). A parent naming its own
//! children is structure, not dependency (`mod.rs` re-exporting what its
//! files define), so those edges are left out; every other edge counts.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

type Module = Vec<String>;

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/keyed/lock.rs` is `keyed::lock`; `src/store/mod.rs` is `store`;
/// `src/lib.rs` is the root.
fn module_of(src: &Path, file: &Path) -> Module {
    let relative = file.strip_prefix(src).expect("under src");
    let mut segments: Module = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(segments.last().map(String::as_str), Some("mod" | "lib")) {
        segments.pop();
    }
    segments
}

/// The code of a file without its comments and its `#[cfg(test)]` tail.
fn code_of(text: &str) -> String {
    let logic = text.split("\n#[cfg(test)]").next().unwrap_or_default();
    logic
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path a file names, with `use` groups expanded.
fn paths_in(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut offset = 0;
    for line in code.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim_start();
        let statement = trimmed
            .strip_prefix("pub(crate) ")
            .or_else(|| trimmed.strip_prefix("pub "))
            .unwrap_or(trimmed);
        if let Some(tree) = statement.strip_prefix("use ") {
            let tree_start = start + (line.len() - tree.len());
            let end = code[tree_start..]
                .find(';')
                .map_or(code.len(), |n| tree_start + n);
            expand("", &code[tree_start..end], &mut paths);
        }
    }
    let bytes = code.as_bytes();
    for root in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(root) {
            let at = from + at;
            from = at + root.len();
            let boundary =
                at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
            if !boundary {
                continue;
            }
            let end = code[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |n| at + n);
            paths.push(code[at..end].trim_end_matches(':').to_owned());
        }
    }
    paths
}

/// `a::{b, c::{d}}` under `prefix` becomes `prefix::a::b`, `prefix::a::c::d`.
fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    let join = |tail: &str| {
        if prefix.is_empty() {
            tail.to_owned()
        } else {
            format!("{prefix}::{tail}")
        }
    };
    match tree.find('{') {
        None => out.push(join(tree.split(" as ").next().unwrap_or_default().trim())),
        Some(open) => {
            let head = join(tree[..open].trim().trim_end_matches("::"));
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            let (mut depth, mut last) = (0, 0);
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&head, &inner[last..i], out);
                        last = i + 1;
                    }
                    _ => {}
                }
            }
            expand(&head, &inner[last..], out);
        }
    }
}

/// The module a path from `from` points into, if it is one of this crate's.
fn target(
    from: &Module,
    path: &str,
    is_dir_module: bool,
    modules: &BTreeSet<Module>,
) -> Option<Module> {
    let mut segments = path.split("::").filter(|s| !s.is_empty());
    let mut absolute: Module = match segments.next()? {
        "crate" => Vec::new(),
        "self" => from.clone(),
        "super" => {
            // `super` in `a/b.rs` is `a`; in `a/mod.rs` it is `a`'s parent.
            let mut parent = from.clone();
            parent.pop();
            if is_dir_module && !from.is_empty() {
                parent = from[..from.len() - 1].to_vec();
            }
            parent
        }
        _ => return None,
    };
    absolute.extend(segments.map(str::to_owned));
    (0..=absolute.len())
        .rev()
        .map(|n| absolute[..n].to_vec())
        .find(|prefix| modules.contains(prefix))
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut edges = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        let is_dir_module = file
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let code = code_of(&fs::read_to_string(file).expect("read source"));
        let targets: BTreeSet<Module> = paths_in(&code)
            .iter()
            .filter_map(|path| target(&from, path, is_dir_module, &modules))
            .filter(|to| !to.starts_with(&from))
            .collect();
        edges.insert(from, targets);
    }
    edges
}

fn name(module: &Module) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

fn find_cycle(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        node: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        done: &mut BTreeSet<Module>,
        path: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(at) = path.iter().position(|m| m == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.clone());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut done, &mut Vec::new()))
}

#[test]
fn no_module_depends_on_a_module_that_depends_on_it() {
    let edges = graph();
    if let Some(cycle) = find_cycle(&edges) {
        let shown: Vec<String> = cycle.iter().map(name).collect();
        panic!("module cycle: {}", shown.join(" -> "));
    }
}

#[test]
fn the_graph_sees_the_request_path() {
    // Guards the check above against parsing nothing.
    let edges = graph();
    let module = |path: &str| path.split("::").map(str::to_owned).collect::<Module>();
    assert!(edges[&module("service")].contains(&module("keyed::decide")));
    assert!(edges[&module("keyed::decide")].contains(&module("keyed::first_use")));
    assert!(edges[&module("body")].contains(&module("keyed::capture")));
    assert!(edges[&module("store::memory")].contains(&module("store")));
}

#[test]
fn no_logic_file_is_over_400_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter(|file| !file.components().any(|c| c.as_os_str() == "conformance"))
        .filter_map(|file| {
            let text = fs::read_to_string(file).expect("read source");
            let logic = text.split("\n#[cfg(test)]").next().unwrap_or_default();
            let lines = logic.lines().count();
            (lines > 400).then(|| format!("{} ({lines})", file.display()))
        })
        .collect();
    assert!(long.is_empty(), "logic files over 400 lines: {long:?}");
}
