//! TOML text → [`raw::Config`], reporting every unknown field and bad value in one run.
//!
//! serde stops at the first error, which made a typo hide every other mistake. So the parsed
//! document is repaired and deserialized again: each offending key is removed (and, when its
//! removal leaves a required field missing, the table that needed it), until it deserializes or
//! cannot be repaired any further. Lines are looked up in the original text, so removals never
//! shift them. The repaired config is still validated, so reference errors are reported too,
//! except those under a removed item (they would only echo the first report).

use std::collections::{BTreeMap, BTreeSet};

use super::raw;

/// Gives up repairing after this many problems: a file that bad needs reading, not a longer list.
const MAX_PROBLEMS: usize = 200;
/// Every round removes an item or tries the next stand-in value; this bounds a pathological file.
const MAX_ROUNDS: usize = 2_000;

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// Renders a path as the rest of the config code names fields: `routes[2].pricing.reserve`.
pub(super) fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// What deserialization found: the config when the file could be repaired, every problem as
/// `field: reason (line N)`, and the (original) paths of what was removed to get there.
pub(super) struct Parsed {
    pub raw: Option<raw::Config>,
    pub problems: Vec<String>,
    pub removed: Vec<String>,
}

/// Deserializes `exact` (TOML whose floats already carry their literal text), collecting every
/// type error and unknown field. A syntax error is returned as is: nothing after it can be read.
pub(super) fn parse(exact: &str) -> Result<Parsed, String> {
    let doc: toml::Table = exact.parse().map_err(|e: toml::de::Error| {
        let location = e
            .span()
            .map(|s| format!(" (line {})", super::line_of(exact, s.start)))
            .unwrap_or_default();
        format!("{}{location}", e.message().trim_end())
    })?;
    let lines = Lines::new(exact);
    let mut removed_elems: BTreeMap<Vec<Seg>, BTreeSet<usize>> = BTreeMap::new();
    let mut removed: Vec<Vec<Seg>> = Vec::new();
    let mut doc = toml::Value::Table(doc);
    let mut stand_ins: BTreeMap<Vec<Seg>, usize> = BTreeMap::new();
    let mut problems = Vec::new();
    for _ in 0..MAX_ROUNDS {
        let error = match serde_path_to_error::deserialize::<_, raw::Config>(doc.clone()) {
            Ok(raw) => {
                return Ok(Parsed {
                    raw: Some(raw),
                    problems,
                    removed: removed.iter().map(|p| render(p)).collect(),
                })
            }
            Err(e) => e,
        };
        let mut path: Vec<Seg> = Vec::new();
        for segment in error.path() {
            match segment {
                serde_path_to_error::Segment::Map { key } => path.push(Seg::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => path.push(Seg::Index(*index)),
                serde_path_to_error::Segment::Enum { .. } => {}
                serde_path_to_error::Segment::Unknown => break,
            }
        }
        let message = error.into_inner().message().trim_end().to_string();

        let missing = quoted_after(&message, "missing field `");
        let unknown = quoted_after(&message, "unknown field `");
        if let Some(field) = &unknown {
            if path.last() != Some(&Seg::Key(field.clone())) {
                path.push(Seg::Key(field.clone()));
            }
        }
        // A required field we removed, a field missing from the file, or a stand-in of ours
        // that did not fit: the field gets the next stand-in value, so the table that needs it
        // (maybe `[server]` itself) can still be read and validated.
        let stand_in_at = match &missing {
            Some(field) => {
                let mut child = path.clone();
                child.push(Seg::Key(field.clone()));
                Some(child)
            }
            None if stand_ins.contains_key(&path) => Some(path.clone()),
            None => None,
        };
        let ours = stand_in_at.as_ref().is_some_and(|at| {
            stand_ins.contains_key(at) || removed.contains(&original(at, &removed_elems))
        });
        if !ours {
            let shown = original(&path, &removed_elems);
            let location = lines
                .line(&shown)
                .map(|l| format!(" (line {l})"))
                .unwrap_or_default();
            let field = render(&shown);
            problems.push(if field.is_empty() {
                format!("{message}{location}")
            } else {
                format!("{field}: {message}{location}")
            });
        }
        if problems.len() >= MAX_PROBLEMS {
            break;
        }
        if let Some(at) = stand_in_at {
            let tried = stand_ins.entry(at.clone()).or_insert(0);
            if let Some(value) = STAND_INS.get(*tried).map(|make| make()) {
                *tried += 1;
                let original_at = original(&at, &removed_elems);
                if !removed.contains(&original_at) {
                    removed.push(original_at);
                }
                if set(&mut doc, &at, value) {
                    continue;
                }
            }
            break;
        }
        let original_target = original(&path, &removed_elems);
        if path.is_empty() || !remove(&mut doc, &path) {
            break;
        }
        if let Some((Seg::Index(i), parent)) = original_target.split_last() {
            removed_elems.entry(parent.to_vec()).or_default().insert(*i);
        }
        removed.push(original_target);
    }
    Ok(Parsed {
        raw: None,
        problems,
        removed: removed.iter().map(|p| render(p)).collect(),
    })
}

/// Values tried, in turn, for a required field that is missing or had a bad value: one of them
/// fits every field type of the config (strings, numbers, credits, flags, lists, tables).
const STAND_INS: [fn() -> toml::Value; 5] = [
    || toml::Value::String(String::new()),
    || toml::Value::Integer(0),
    || toml::Value::Boolean(false),
    || toml::Value::Array(Vec::new()),
    || toml::Value::Table(toml::Table::new()),
];

/// The text between `prefix` and the next backtick, when the message starts with `prefix`.
fn quoted_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?;
    rest.find('`').map(|end| rest[..end].to_string())
}

/// Maps a path in the repaired document back to the original one (removed array elements shift
/// the indices after them).
fn original(path: &[Seg], removed_elems: &BTreeMap<Vec<Seg>, BTreeSet<usize>>) -> Vec<Seg> {
    let mut out: Vec<Seg> = Vec::with_capacity(path.len());
    for seg in path {
        match seg {
            Seg::Key(k) => out.push(Seg::Key(k.clone())),
            Seg::Index(i) => {
                let gone = removed_elems.get(&out);
                let mut seen = 0;
                let mut index = 0;
                loop {
                    if !gone.is_some_and(|g| g.contains(&index)) {
                        if seen == *i {
                            break;
                        }
                        seen += 1;
                    }
                    index += 1;
                }
                out.push(Seg::Index(index));
            }
        }
    }
    out
}

/// The value at `path`.
fn at_mut<'v>(root: &'v mut toml::Value, path: &[Seg]) -> Option<&'v mut toml::Value> {
    path.iter().try_fold(root, |node, seg| match (seg, node) {
        (Seg::Key(k), toml::Value::Table(t)) => t.get_mut(k),
        (Seg::Index(i), toml::Value::Array(a)) => a.get_mut(*i),
        _ => None,
    })
}

/// Removes the item at `path`; false when there is nothing there to remove.
fn remove(root: &mut toml::Value, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    match (last, at_mut(root, parents)) {
        (Seg::Key(k), Some(toml::Value::Table(t))) => t.remove(k).is_some(),
        (Seg::Index(i), Some(toml::Value::Array(a))) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    }
}

/// Puts `value` at `path` (replacing what is there); false when its parent is not there.
fn set(root: &mut toml::Value, path: &[Seg], value: toml::Value) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    match (last, at_mut(root, parents)) {
        (Seg::Key(k), Some(toml::Value::Table(t))) => {
            t.insert(k.clone(), value);
            true
        }
        (Seg::Index(i), Some(toml::Value::Array(a))) if *i < a.len() => {
            a[*i] = value;
            true
        }
        _ => false,
    }
}

/// Line numbers of the original text's keys and array elements.
pub(super) struct Lines<'a> {
    text: &'a str,
    doc: Option<toml_edit::Document<&'a str>>,
}

/// A place in the original document while a path is followed.
#[derive(Clone, Copy)]
enum Node<'d> {
    Item(&'d toml_edit::Item),
    Value(&'d toml_edit::Value),
    Table(&'d toml_edit::Table),
}

impl<'d> Node<'d> {
    /// The child at `seg`, with the span that names it (its key, or the element itself).
    fn child(self, seg: &Seg) -> Option<(Node<'d>, Option<std::ops::Range<usize>>)> {
        match seg {
            Seg::Key(k) => {
                let table: &dyn toml_edit::TableLike = match self {
                    Node::Item(i) => i.as_table_like()?,
                    Node::Value(v) => v.as_inline_table()?,
                    Node::Table(t) => t,
                };
                let (key, item) = table.get_key_value(k)?;
                Some((Node::Item(item), key.span().or(item.span())))
            }
            Seg::Index(i) => match self {
                Node::Item(item) => {
                    if let Some(tables) = item.as_array_of_tables() {
                        let t = tables.get(*i)?;
                        Some((Node::Table(t), t.span()))
                    } else {
                        let v = item.as_array()?.get(*i)?;
                        Some((Node::Value(v), v.span()))
                    }
                }
                Node::Value(v) => {
                    let v = v.as_array()?.get(*i)?;
                    Some((Node::Value(v), v.span()))
                }
                Node::Table(_) => None,
            },
        }
    }
}

impl<'a> Lines<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Lines {
            text,
            doc: toml_edit::Document::parse(text).ok(),
        }
    }

    /// The line of the deepest part of `path` found in the document.
    pub(super) fn line(&self, path: &[Seg]) -> Option<usize> {
        let mut node = Node::Table(self.doc.as_ref()?.as_table());
        let mut span = None;
        for seg in path {
            let Some((next, s)) = node.child(seg) else {
                break;
            };
            node = next;
            span = s.or(span);
        }
        span.map(|s| super::line_of(self.text, s.start))
    }
}
