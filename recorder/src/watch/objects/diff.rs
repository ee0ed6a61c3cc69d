//! The changes between two states of a compared node, found by item
//! identity: [`list_changes`], [`set_changes`], [`dict_changes`] (dicts and
//! instance dicts), [`slot_changes`]; the kind of a dict watcher event
//! ([`dict_kind`], [`item_suffix`]); and what a change found is before its
//! reprs are made ([`Found`], [`Val`], [`Suffix`]). Where the state alone
//! cannot tell the kind, the method names and operators of the line decide
//! ([`Hint`], asked on demand).
//!
//! Locking: none; the functions work on shadows and references the flush
//! copied out of the state. [`Hint`] takes the monitor's `CODES` for one
//! lookup.
//!
//! Signal context: nothing here runs in a signal handler, nor in the dict
//! watcher callback. [`Hint::has`] and [`Val::render`] run Python code (the
//! `line_ops` helper, reprs): they are called at the flush.

use std::collections::{HashMap, HashSet};

use memwatch_format::ObjectChangeKind as Kind;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PySet, PyString};

use super::frames::code_at;
use super::hooks::obj_hooks;
use super::repr::bounded_repr;
use super::shadow::same;
use super::state::Shape;
use crate::runtime::thread::guarded;

/// A value of a change, before its repr is made.
pub(super) enum Val {
    None,
    Obj(Py<PyAny>),
    ListOf(Vec<Py<PyAny>>),
    SetOf(Vec<Py<PyAny>>),
    /// `(key, value)` pairs, shown as a dict.
    DictOf(Vec<(Py<PyAny>, Py<PyAny>)>),
    Text(&'static str),
}

impl Val {
    pub(super) fn render(&self, py: Python<'_>, limit: usize) -> Option<String> {
        let made: PyResult<Bound<'_, PyAny>> = match self {
            Val::None => return None,
            Val::Text(t) => return Some((*t).to_string()),
            Val::Obj(o) => Ok(o.bind(py).clone()),
            Val::ListOf(v) => PyList::new(py, v.iter().map(|o| o.bind(py))).map(Bound::into_any),
            Val::SetOf(v) => PySet::new(py, v.iter().map(|o| o.bind(py))).map(Bound::into_any),
            Val::DictOf(v) => {
                let d = PyDict::new(py);
                v.iter()
                    .try_for_each(|(k, x)| d.set_item(k.bind(py), x.bind(py)))
                    .map(|_| d.into_any())
            }
        };
        Some(match made {
            Ok(o) => bounded_repr(py, &o, limit),
            Err(e) => format!("<repr failed: {}>", e.get_type(py)),
        })
    }
}

/// Where in a node a change is.
pub(super) enum Suffix {
    None,
    Attr(String),
    Item(Py<PyAny>),
    Index(usize),
    Slice(usize, usize),
}

/// A change found, before reprs are made.
pub(super) struct Found {
    pub(super) node: u32,
    pub(super) kind: Kind,
    pub(super) suffix: Suffix,
    pub(super) old: Val,
    pub(super) new: Val,
}

// --- line hints --------------------------------------------------------------------

/// The method names and operators a line uses, looked up on demand.
pub(super) struct Hint {
    at: Option<(Py<PyAny>, u32)>,
    /// A line known by code address only, looked up on first use.
    last: Option<(usize, u32)>,
    ops: Option<HashSet<String>>,
}

impl Hint {
    pub(super) fn new(at: Option<(Py<PyAny>, u32)>) -> Hint {
        Hint {
            at,
            last: None,
            ops: None,
        }
    }

    pub(super) fn at_last(last: (usize, u32)) -> Hint {
        Hint {
            at: None,
            last: Some(last),
            ops: None,
        }
    }

    pub(super) fn has(&mut self, py: Python<'_>, names: &[&str]) -> bool {
        if self.ops.is_none() {
            if let Some(last) = self.last.take() {
                self.at = code_at(py, last);
            }
            let ops = self
                .at
                .as_ref()
                .and_then(|(code, line)| {
                    guarded(|| {
                        obj_hooks()
                            .and_then(|h| h.line_ops.bind(py).call1((code.bind(py), *line))?.extract())
                            .ok()
                    })
                })
                .unwrap_or_default();
            self.ops = Some(ops);
        }
        let ops = self.ops.as_ref().expect("just set");
        names.iter().any(|n| ops.contains(*n))
    }
}

// --- lists -----------------------------------------------------------------------------

fn refs(py: Python<'_>, s: &[Py<PyAny>]) -> Vec<Py<PyAny>> {
    s.iter().map(|o| o.clone_ref(py)).collect()
}

/// A change of the whole list `node`, from `old` to `new`.
fn whole_list(py: Python<'_>, node: u32, old: &[Py<PyAny>], new: &[Py<PyAny>], kind: Kind) -> Found {
    Found {
        node,
        kind,
        suffix: Suffix::None,
        old: Val::ListOf(old.iter().map(|o| o.clone_ref(py)).collect()),
        new: Val::ListOf(new.iter().map(|o| o.clone_ref(py)).collect()),
    }
}

/// The changes between two states of a list, by item identity:
///
/// | difference | kind |
/// |---|---|
/// | emptied (of more than one item, or by a line that calls `clear`) | `clear` |
/// | same items, other order, and the line calls `sort` | `sort` |
/// | same items, reversed order | `reverse` (unless the line assigns items) |
/// | items replaced in place (or reordered otherwise) | `setitem`, one per run of changed indices |
/// | one item added at the end | `append` (`extend` if the line calls `extend` or uses `+=`) |
/// | several added at the end | `extend` |
/// | one added elsewhere | `insert` |
/// | one removed | `remove` / `pop` / `delitem` as the line says; else `pop` at the end, `delitem` elsewhere |
/// | several removed, or any other difference | `delitem` / `setitem` of the slice |
pub(super) fn list_changes(
    py: Python<'_>,
    node: u32,
    old: &[Py<PyAny>],
    new: &[Py<PyAny>],
    hint: &mut Hint,
) -> Vec<Found> {
    let (n, m) = (old.len(), new.len());
    if n == m && old.iter().zip(new).all(|(a, b)| same(a, b)) {
        return Vec::new();
    }
    if m == 0 && (n > 1 || hint.has(py, &["clear"])) {
        return vec![Found {
            new: Val::Text("[]"),
            ..whole_list(py, node, old, new, Kind::Clear)
        }];
    }
    // How many items are the same at the front (`p`) and at the back (`s`).
    let p = old.iter().zip(new).take_while(|(a, b)| same(a, b)).count();
    let s = old[p..]
        .iter()
        .rev()
        .zip(new[p..].iter().rev())
        .take_while(|(a, b)| same(a, b))
        .count();
    if n == m {
        return reordered_or_replaced(py, node, old, new, p, s, hint);
    }
    if m > n && p + s >= n {
        return vec![inserted(py, node, new, n, p, hint)];
    }
    if m < n && p + s >= m {
        return vec![removed(py, node, old, m, p, hint)];
    }
    vec![Found {
        node,
        kind: Kind::SetItem,
        suffix: Suffix::Slice(p, n - s),
        old: Val::ListOf(refs(py, &old[p..n - s])),
        new: Val::ListOf(refs(py, &new[p..m - s])),
    }]
}

/// A list of the same length with other items (`p` the same at the front,
/// `s` at the back): `sort` or `reverse` when it holds the same items, else
/// one `setitem` per run of changed indices.
fn reordered_or_replaced(
    py: Python<'_>,
    node: u32,
    old: &[Py<PyAny>],
    new: &[Py<PyAny>],
    p: usize,
    s: usize,
    hint: &mut Hint,
) -> Vec<Found> {
    let n = old.len();
    let mut a: Vec<usize> = old.iter().map(|o| o.as_ptr() as usize).collect();
    let mut b: Vec<usize> = new.iter().map(|o| o.as_ptr() as usize).collect();
    a.sort_unstable();
    b.sort_unstable();
    if a == b {
        let reversed = old.iter().zip(new.iter().rev()).all(|(x, y)| same(x, y));
        if hint.has(py, &["sort"]) {
            return vec![whole_list(py, node, old, new, Kind::Sort)];
        }
        if reversed && !hint.has(py, &["[]="]) {
            return vec![whole_list(py, node, old, new, Kind::Reverse)];
        }
    }
    // Runs of changed indices.
    let mut out = Vec::new();
    let mut i = p;
    while i < n - s {
        if same(&old[i], &new[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < n - s && !same(&old[i], &new[i]) {
            i += 1;
        }
        out.push(if i - start == 1 {
            Found {
                node,
                kind: Kind::SetItem,
                suffix: Suffix::Index(start),
                old: Val::Obj(old[start].clone_ref(py)),
                new: Val::Obj(new[start].clone_ref(py)),
            }
        } else {
            Found {
                node,
                kind: Kind::SetItem,
                suffix: Suffix::Slice(start, i),
                old: Val::ListOf(refs(py, &old[start..i])),
                new: Val::ListOf(refs(py, &new[start..i])),
            }
        });
    }
    out
}

/// A pure insertion into a list of `n` items: the items of `new` from `p`
/// on that were not there.
fn inserted(py: Python<'_>, node: u32, new: &[Py<PyAny>], n: usize, p: usize, hint: &mut Hint) -> Found {
    let m = new.len();
    let k = m - n;
    let at_end = p == n;
    let extend = hint.has(py, &["extend", "+="]);
    match (k, at_end) {
        (1, true) if !extend => Found {
            node,
            kind: Kind::Append,
            suffix: Suffix::Index(p),
            old: Val::None,
            new: Val::Obj(new[p].clone_ref(py)),
        },
        (_, true) => Found {
            node,
            kind: Kind::Extend,
            suffix: Suffix::Slice(p, m),
            old: Val::None,
            new: Val::ListOf(refs(py, &new[p..])),
        },
        (1, false) => Found {
            node,
            kind: Kind::Insert,
            suffix: Suffix::Index(p),
            old: Val::None,
            new: Val::Obj(new[p].clone_ref(py)),
        },
        _ => Found {
            node,
            kind: Kind::SetItem,
            suffix: Suffix::Slice(p, p),
            old: Val::None,
            new: Val::ListOf(refs(py, &new[p..p + k])),
        },
    }
}

/// A pure removal from a list, leaving `m` items: the items of `old` from
/// `p` on that went.
fn removed(py: Python<'_>, node: u32, old: &[Py<PyAny>], m: usize, p: usize, hint: &mut Hint) -> Found {
    let n = old.len();
    let k = n - m;
    if k == 1 {
        let kind = if hint.has(py, &["remove"]) {
            Kind::Remove
        } else if hint.has(py, &["pop"]) {
            Kind::Pop
        } else if hint.has(py, &["del[]"]) {
            Kind::DelItem
        } else if p == n - 1 {
            Kind::Pop
        } else {
            Kind::DelItem
        };
        return Found {
            node,
            kind,
            suffix: Suffix::Index(p),
            old: Val::Obj(old[p].clone_ref(py)),
            new: Val::None,
        };
    }
    Found {
        node,
        kind: Kind::DelItem,
        suffix: Suffix::Slice(p, p + k),
        old: Val::ListOf(refs(py, &old[p..p + k])),
        new: Val::None,
    }
}

// --- sets, dicts, slots -------------------------------------------------------------------

/// The changes between two states of a set, by item identity: emptied
/// (of more than one item, or by a line that calls `clear`) -> `clear`; items added -> one `add` (one item) or `update` (several, or a
/// line that calls `update` or uses `|=`); each item removed -> `discard`
/// (`remove` or `pop` if the line calls them).
pub(super) fn set_changes(
    py: Python<'_>,
    node: u32,
    old: &[Py<PyAny>],
    new: &[Py<PyAny>],
    hint: &mut Hint,
) -> Vec<Found> {
    let a: HashSet<usize> = old.iter().map(|o| o.as_ptr() as usize).collect();
    let b: HashSet<usize> = new.iter().map(|o| o.as_ptr() as usize).collect();
    if a == b {
        return Vec::new();
    }
    if new.is_empty() && (old.len() > 1 || hint.has(py, &["clear"])) {
        return vec![Found {
            node,
            kind: Kind::Clear,
            suffix: Suffix::None,
            old: Val::SetOf(old.iter().map(|o| o.clone_ref(py)).collect()),
            new: Val::Text("set()"),
        }];
    }
    let removed: Vec<&Py<PyAny>> = old
        .iter()
        .filter(|o| !b.contains(&(o.as_ptr() as usize)))
        .collect();
    let added: Vec<&Py<PyAny>> = new
        .iter()
        .filter(|o| !a.contains(&(o.as_ptr() as usize)))
        .collect();
    let mut out = Vec::new();
    let remove_kind = if hint.has(py, &["remove"]) {
        Kind::Remove
    } else if hint.has(py, &["pop"]) {
        Kind::Pop
    } else {
        Kind::Discard
    };
    for r in removed {
        out.push(Found {
            node,
            kind: remove_kind,
            suffix: Suffix::None,
            old: Val::Obj(r.clone_ref(py)),
            new: Val::None,
        });
    }
    if added.len() == 1 && !hint.has(py, &["update", "|="]) {
        out.push(Found {
            node,
            kind: Kind::Add,
            suffix: Suffix::None,
            old: Val::None,
            new: Val::Obj(added[0].clone_ref(py)),
        });
    } else if !added.is_empty() {
        out.push(Found {
            node,
            kind: Kind::Update,
            suffix: Suffix::None,
            old: Val::None,
            new: Val::SetOf(added.iter().map(|o| o.clone_ref(py)).collect()),
        });
    }
    out
}

/// The kind of a dict item (or attribute) being set or deleted.
pub(super) fn dict_kind(py: Python<'_>, shape: Shape, deleted: bool, hint: &mut Hint) -> Kind {
    match (shape, deleted) {
        (Shape::Attrs | Shape::Slots, false) => Kind::SetAttr,
        (Shape::Attrs | Shape::Slots, true) => Kind::DelAttr,
        (_, false) if hint.has(py, &["update", "|="]) => Kind::Update,
        (_, false) => Kind::SetItem,
        (_, true) if hint.has(py, &["pop", "popitem"]) => Kind::Pop,
        (_, true) => Kind::DelItem,
    }
}

pub(super) fn item_suffix(py: Python<'_>, shape: Shape, key: &Py<PyAny>) -> Suffix {
    match shape {
        Shape::Attrs => {
            let key = key.bind(py);
            let name = match key.cast::<PyString>() {
                Ok(s) => s.to_string_lossy().into_owned(),
                Err(_) => key
                    .str()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            Suffix::Attr(name)
        }
        _ => Suffix::Item(key.clone_ref(py)),
    }
}

/// The changes between two states of a dict (or instance dict), by key and
/// value identity, in the new dict's order, deletions last.
pub(super) fn dict_changes(
    py: Python<'_>,
    node: u32,
    shape: Shape,
    old: &[(Py<PyAny>, Py<PyAny>)],
    new: &[(Py<PyAny>, Py<PyAny>)],
    hint: &mut Hint,
) -> Vec<Found> {
    if old.len() == new.len()
        && old
            .iter()
            .zip(new)
            .all(|(a, b)| same(&a.0, &b.0) && same(&a.1, &b.1))
    {
        return Vec::new();
    }
    if new.is_empty() && (old.len() > 1 || hint.has(py, &["clear"])) {
        return vec![Found {
            node,
            kind: Kind::Clear,
            suffix: Suffix::None,
            old: Val::DictOf(
                old.iter()
                    .map(|(k, v)| (k.clone_ref(py), v.clone_ref(py)))
                    .collect(),
            ),
            new: Val::Text("{}"),
        }];
    }
    let before: HashMap<usize, &Py<PyAny>> = old.iter().map(|(k, v)| (k.as_ptr() as usize, v)).collect();
    let after: HashSet<usize> = new.iter().map(|(k, _)| k.as_ptr() as usize).collect();
    let mut out = Vec::new();
    for (k, v) in new {
        let was = before.get(&(k.as_ptr() as usize));
        if was.is_some_and(|w| same(w, v)) {
            continue;
        }
        out.push(Found {
            node,
            kind: dict_kind(py, shape, false, hint),
            suffix: item_suffix(py, shape, k),
            old: was.map_or(Val::None, |w| Val::Obj(w.clone_ref(py))),
            new: Val::Obj(v.clone_ref(py)),
        });
    }
    for (k, v) in old {
        if !after.contains(&(k.as_ptr() as usize)) {
            out.push(Found {
                node,
                kind: dict_kind(py, shape, true, hint),
                suffix: item_suffix(py, shape, k),
                old: Val::Obj(v.clone_ref(py)),
                new: Val::None,
            });
        }
    }
    out
}

pub(super) fn slot_changes(
    py: Python<'_>,
    node: u32,
    names: &[String],
    old: &[Option<Py<PyAny>>],
    new: &[Option<Py<PyAny>>],
) -> Vec<Found> {
    let mut out = Vec::new();
    for ((name, a), b) in names.iter().zip(old).zip(new) {
        let (kind, old_v, new_v) = match (a, b) {
            (Some(a), Some(b)) if same(a, b) => continue,
            (None, None) => continue,
            (a, Some(b)) => (
                Kind::SetAttr,
                a.as_ref().map_or(Val::None, |a| Val::Obj(a.clone_ref(py))),
                Val::Obj(b.clone_ref(py)),
            ),
            (Some(a), None) => (Kind::DelAttr, Val::Obj(a.clone_ref(py)), Val::None),
        };
        out.push(Found {
            node,
            kind,
            suffix: Suffix::Attr(name.clone()),
            old: old_v,
            new: new_v,
        });
    }
    out
}
