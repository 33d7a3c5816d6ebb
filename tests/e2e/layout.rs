//! The source layout's rules, checked on the text of `src/` (no build, no services):
//! no cycle between the top-level modules of `src/`, none between the files of any directory
//! of it, no file over [`MAX_LINES`] lines (before its `#[cfg(test)]` module) without a
//! first-line reason, anywhere under [`STRICT_DIRS`], and no read of the unvalidated config
//! (`.raw`) outside `src/config/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longer files need a first line `//! Longer than 500 lines because …`.
const MAX_LINES: usize = 500;

/// Where an over-long file without a reason fails the test: everywhere under `src/`.
const STRICT_DIRS: &[&str] = &["src/"];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, as (path relative to the crate, text).
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read src dir")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(&src_dir(), &mut files);
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read source");
            let rel = p.strip_prefix(root).expect("under the crate");
            (rel.to_string_lossy().replace('\\', "/"), text)
        })
        .collect()
}

/// The code of a file: before its `#[cfg(test)]` module, without `//` comments (doc links
/// are not dependencies).
fn code(text: &str) -> String {
    let body = match text.find("#[cfg(test)]\nmod ") {
        Some(at) => &text[..at],
        None => text,
    };
    body.lines()
        .map(|line| {
            // A `//` inside a string is rare in paths we look for; good enough for this check.
            match line.find("//") {
                Some(at) if !line[..at].contains('"') => &line[..at],
                _ => line,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths a file names after `prefix` (`crate::`, `super::`): the first segment of each,
/// and each first segment inside a `prefix{…}` group.
fn named_after(code: &str, prefix: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before_ok = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !is_ident(c) && c != ':');
        let after = &rest[at + prefix.len()..];
        if before_ok {
            if let Some(group) = after.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for part in group[..end].split(',') {
                    let mut segs = part.trim().split("::").map(str::trim);
                    if let Some(first) = segs.next().filter(|s| !s.is_empty()) {
                        out.push((first.to_string(), segs.next().map(str::to_string)));
                    }
                }
            } else {
                let first: String = after.chars().take_while(|c| is_ident(*c)).collect();
                let second = after[first.len()..]
                    .strip_prefix("::")
                    .map(|s| s.chars().take_while(|c| is_ident(*c)).collect::<String>())
                    .filter(|s| !s.is_empty());
                if !first.is_empty() {
                    out.push((first, second));
                }
            }
        }
        rest = after;
    }
    out
}

/// The top-level module of a file under `src/` (`src/admin/keys.rs` → `admin`).
fn top_module(rel: &str) -> Option<String> {
    let inner = rel.strip_prefix("src/")?;
    let first = inner.split('/').next()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// A cycle of `graph` (node names in order), if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|m| m.keys()) {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|n| n == next).expect("on the stack");
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(node, graph, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

/// Names each edge of a cycle with the files that make it.
fn describe(cycle: &[String], graph: &Graph) -> String {
    cycle
        .windows(2)
        .map(|w| {
            let files = &graph[&w[0]][&w[1]];
            format!(
                "{} -> {} ({})",
                w[0],
                w[1],
                files.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn add(graph: &mut Graph, from: &str, to: &str, file: &str) {
    if from != to {
        graph
            .entry(from.to_string())
            .or_default()
            .entry(to.to_string())
            .or_default()
            .insert(file.to_string());
    }
}

#[test]
fn no_cycle_between_top_level_modules() {
    let files = sources();
    let tops: BTreeSet<String> = files
        .iter()
        .filter_map(|(rel, _)| top_module(rel))
        .collect();
    let mut graph = Graph::new();
    for (rel, text) in &files {
        let Some(from) = top_module(rel) else {
            continue;
        };
        for (to, _) in named_after(&code(text), "crate::") {
            if tops.contains(&to) {
                add(&mut graph, &from, &to, rel);
            }
        }
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "the top-level modules of src/ form a cycle: {}",
            describe(&cycle, &graph)
        );
    }
}

#[test]
fn no_cycle_between_the_files_of_any_directory() {
    let files = sources();
    let dirs: BTreeSet<String> = files
        .iter()
        .filter_map(|(rel, _)| rel.rsplit_once('/').map(|(dir, _)| dir.to_string()))
        .filter(|dir| dir != "src")
        .collect();
    let mut cycles = Vec::new();
    for dir in &dirs {
        let module = dir.trim_start_matches("src/");
        let in_dir: Vec<&(String, String)> = files
            .iter()
            .filter(|(rel, _)| {
                rel.strip_prefix(&format!("{dir}/"))
                    .is_some_and(|f| !f.contains('/'))
            })
            .collect();
        let name = |rel: &str| -> String {
            let f = rel.rsplit('/').next().unwrap_or(rel);
            f.strip_suffix(".rs").unwrap_or(f).to_string()
        };
        let siblings: BTreeSet<String> = in_dir.iter().map(|(rel, _)| name(rel)).collect();
        let mut graph = Graph::new();
        for (rel, text) in &in_dir {
            let from = name(rel);
            let code = code(text);
            let mut targets: Vec<String> = Vec::new();
            if from == "mod" {
                // mod.rs names its children with `self::`/plain paths; its edges go down.
                continue;
            }
            targets.extend(named_after(&code, "super::").into_iter().map(|(t, _)| t));
            targets.extend(
                named_after(&code, "crate::")
                    .into_iter()
                    .filter(|(t, _)| t == module)
                    .filter_map(|(_, second)| second),
            );
            for to in targets {
                if siblings.contains(&to) && to != "mod" {
                    add(&mut graph, &from, &to, rel);
                }
            }
        }
        if let Some(cycle) = find_cycle(&graph) {
            cycles.push(format!(
                "the files of {dir} form a cycle: {}",
                describe(&cycle, &graph)
            ));
        }
    }
    assert!(cycles.is_empty(), "{}", cycles.join("\n"));
}

/// `.raw` as a field access (not `.raw_x`), also when the field is named on the next line.
fn reads_raw(line: &str) -> bool {
    line.match_indices(".raw")
        .any(|(at, m)| !line[at + m.len()..].chars().next().is_some_and(is_ident))
}

#[test]
fn only_config_reads_the_raw_config() {
    let mut found = Vec::new();
    for (rel, text) in sources() {
        if rel.starts_with("src/config/") {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            // Up to the first `//` outside a string literal (an even number of quotes before it).
            let code = line
                .match_indices("//")
                .find(|(at, _)| line[..*at].matches('"').count() % 2 == 0)
                .map_or(line, |(at, _)| &line[..at]);
            if reads_raw(code) {
                found.push(format!("{rel}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "outside src/config/, the config is read through its validated types' accessors \
         (e.g. src/config/tier.rs), never `.raw`:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn long_files_say_why() {
    let mut listed = Vec::new();
    let mut failing = Vec::new();
    for (rel, text) in sources() {
        let body = match text.find("#[cfg(test)]\nmod ") {
            Some(at) => &text[..at],
            None => text.as_str(),
        };
        let lines = body.lines().count();
        let reasoned = text
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("//! Longer than 500 lines because"));
        if lines > MAX_LINES && !reasoned {
            let entry = format!("{rel} ({lines} lines)");
            if STRICT_DIRS.iter().any(|d| rel.starts_with(d)) {
                failing.push(entry.clone());
            }
            listed.push(entry);
        }
    }
    if !listed.is_empty() {
        eprintln!(
            "files over {MAX_LINES} lines without a reason on their first line:\n  {}",
            listed.join("\n  ")
        );
    }
    assert!(
        failing.is_empty(),
        "over {MAX_LINES} lines without a first line `//! Longer than 500 lines because …`: {}",
        failing.join(", ")
    );
}
