//! The node tree of a watch: building the nodes for an object and what it
//! holds ([`build`], [`insert_nodes`]), removing them ([`remove_subtree`],
//! [`remove_watch`]), following rebinding below a node that changed
//! ([`resync`]), and the shadows of compared nodes: taking one
//! ([`snapshot`]), checking one in place ([`matches_shadow`]), comparing and
//! copying them ([`same_shadow`], [`clone_shadow`]).
//!
//! Locking: functions that take `&mut Objects` run under the `OBJS` lock
//! their caller holds, and take `DICTS` inside it (register or drop a dict
//! with the watcher); they run no Python code and release nothing (removed
//! nodes go to the caller's trash, released after the lock). [`build`] and
//! [`resync`] run Python code (the slots helper, reprs of keys) and so take
//! `OBJS` only for short sections of their own, never across a call.
//!
//! Signal context: nothing here runs in a signal handler, nor in the dict
//! watcher callback.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PySet};

use super::hooks::{dict_api, how, instance_dict, obj_hooks, How, WATCHER};
use super::repr::bounded_repr;
use super::state::{
    lock, refresh_flags, with_objs, Hold, Node, ObjWatch, Objects, Shadow, Shape, Slots, DICTS, NEXT_ID,
};
use crate::runtime::addr::AddrMap;
use crate::runtime::thread::guarded;

fn is_heap_instance(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: GIL held; reading the type's flags.
    unsafe {
        ffi::PyType_Check(obj.as_ptr()) == 0
            && ffi::PyType_HasFeature(ffi::Py_TYPE(obj.as_ptr()), ffi::Py_TPFLAGS_HEAPTYPE) != 0
    }
}

fn is_set(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: GIL held; a type check (PySet_Check excludes frozenset).
    unsafe { ffi::PySet_Check(obj.as_ptr()) != 0 }
}

// --- shadows ----------------------------------------------------------------------

/// Whether node `n` still holds exactly what its shadow says (the same
/// objects, in the same order), read in place: no snapshot is built, no
/// reference taken. `None` when it cannot tell this way (a set, slots, a
/// list being sorted, a node whose object is gone): take a snapshot then.
/// Runs no Python code.
pub(super) fn matches_shadow(py: Python<'_>, n: &Node) -> Option<bool> {
    let shadow = n.shadow.as_ref()?;
    match (n.shape, shadow) {
        (Shape::Attrs | Shape::Dict, Shadow::Items(items)) => {
            let obj = n.hold.get(py)?;
            let d = if n.shape == Shape::Attrs {
                instance_dict(&obj)?
            } else {
                obj
            };
            if !d.is_exact_instance_of::<PyDict>() {
                return None;
            }
            // SAFETY: an exact dict, GIL held; PyDict_Next hands out
            // borrowed references and runs no Python code.
            unsafe {
                if ffi::PyDict_Size(d.as_ptr()) != items.len() as ffi::Py_ssize_t {
                    return Some(false);
                }
                let (mut pos, mut k, mut v) = (0, std::ptr::null_mut(), std::ptr::null_mut());
                for (sk, sv) in items {
                    if ffi::PyDict_Next(d.as_ptr(), &mut pos, &mut k, &mut v) == 0
                        || k != sk.as_ptr()
                        || v != sv.as_ptr()
                    {
                        return Some(false);
                    }
                }
            }
            Some(true)
        }
        (Shape::List, Shadow::Seq(items)) => {
            let obj = n.hold.get(py)?;
            let l = obj.as_ptr().cast::<ffi::PyListObject>();
            // SAFETY: node of shape List holds a list; GIL held. While
            // list.sort runs `allocated` is -1 (see `snapshot`).
            unsafe {
                if (*l).allocated < 0 {
                    return None;
                }
                let len = ffi::PyList_GET_SIZE(obj.as_ptr());
                if len != items.len() as ffi::Py_ssize_t {
                    return Some(false);
                }
                Some(
                    items
                        .iter()
                        .enumerate()
                        .all(|(i, x)| *(*l).ob_item.add(i) == x.as_ptr()),
                )
            }
        }
        _ => None,
    }
}

pub(super) fn snapshot(py: Python<'_>, n: &Node) -> Option<Shadow> {
    match n.shape {
        Shape::Attrs | Shape::Dict => {
            let obj = n.hold.get(py)?;
            let d = if n.shape == Shape::Attrs {
                instance_dict(&obj)?
            } else {
                obj
            };
            let d = d.cast::<PyDict>().ok()?;
            Some(Shadow::Items(
                d.iter().map(|(k, v)| (k.unbind(), v.unbind())).collect(),
            ))
        }
        Shape::Slots => {
            let obj = n.hold.get(py)?;
            let ty = obj.get_type();
            Some(Shadow::Slots(
                n.slots
                    .iter()
                    .map(|(_, d)| {
                        d.bind(py)
                            .call_method1("__get__", (&obj, &ty))
                            .ok()
                            .map(Bound::unbind)
                    })
                    .collect(),
            ))
        }
        Shape::List => {
            let obj = n.hold.get(py)?;
            // SAFETY: a list; `allocated` is -1 while list.sort runs (it
            // empties the list meanwhile), when there is nothing to compare.
            if unsafe { (*obj.as_ptr().cast::<ffi::PyListObject>()).allocated } < 0 {
                return None;
            }
            let l = obj.cast::<PyList>().ok()?;
            Some(Shadow::Seq(l.iter().map(Bound::unbind).collect()))
        }
        Shape::Set => {
            let obj = n.hold.get(py)?;
            let s = obj.cast::<PySet>().ok()?;
            Some(Shadow::Seq(s.iter().map(Bound::unbind).collect()))
        }
    }
}

pub(super) fn same(a: &Py<PyAny>, b: &Py<PyAny>) -> bool {
    a.as_ptr() == b.as_ptr()
}

/// True if two shadows hold the same items (by identity) in the same order.
pub(super) fn same_shadow(a: &Shadow, b: &Shadow) -> bool {
    match (a, b) {
        (Shadow::Items(a), Shadow::Items(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(&x.0, &y.0) && same(&x.1, &y.1))
        }
        (Shadow::Slots(a), Shadow::Slots(b)) => {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| match (x, y) {
                    (Some(x), Some(y)) => same(x, y),
                    (None, None) => true,
                    _ => false,
                })
        }
        (Shadow::Seq(a), Shadow::Seq(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y)),
        _ => false,
    }
}

pub(super) fn clone_shadow(py: Python<'_>, s: &Shadow) -> Shadow {
    match s {
        Shadow::Items(v) => Shadow::Items(
            v.iter()
                .map(|(k, x)| (k.clone_ref(py), x.clone_ref(py)))
                .collect(),
        ),
        Shadow::Slots(v) => Shadow::Slots(v.iter().map(|x| x.as_ref().map(|x| x.clone_ref(py))).collect()),
        Shadow::Seq(v) => Shadow::Seq(v.iter().map(|x| x.clone_ref(py)).collect()),
    }
}

// --- building and removing nodes ----------------------------------------------------

/// True if `v` can get nodes of its own below a watched object: a list,
/// dict or set, or an instance of a class defined in Python.
pub(super) fn nested(v: &Bound<'_, PyAny>) -> bool {
    v.is_instance_of::<PyList>() || v.is_instance_of::<PyDict>() || is_set(v) || is_heap_instance(v)
}

/// The values of a node that may get child nodes, with their suffixes.
fn child_candidates<'py>(py: Python<'py>, n: &Node, shadow: &Shadow) -> Vec<(String, Bound<'py, PyAny>)> {
    let keep = |v: &Bound<'py, PyAny>| nested(v);
    let mut out = Vec::new();
    match shadow {
        Shadow::Items(items) => {
            for (k, v) in items {
                let v = v.bind(py);
                if keep(v) {
                    let suffix = match n.shape {
                        Shape::Attrs => {
                            format!(".{}", k.bind(py).str().map(|s| s.to_string()).unwrap_or_default())
                        }
                        _ => format!("[{}]", bounded_repr(py, k.bind(py), 60)),
                    };
                    out.push((suffix, v.clone()));
                }
            }
        }
        Shadow::Slots(vals) => {
            for ((name, _), v) in n.slots.iter().zip(vals) {
                if let Some(v) = v.as_ref().map(|v| v.bind(py)).filter(|v| keep(v)) {
                    out.push((format!(".{name}"), v.clone()));
                }
            }
        }
        Shadow::Seq(items) if n.shape == Shape::List => {
            for (i, v) in items.iter().enumerate() {
                let v = v.bind(py);
                if keep(v) {
                    out.push((format!("[{i}]"), v.clone()));
                }
            }
        }
        Shadow::Seq(_) => {}
    }
    out
}

/// Builds the nodes for `obj` (and, depth allowing, for what it holds);
/// returns them with their ids. `hold` overrides how the first nodes hold
/// `obj` (the root's weak reference). Runs Python code (the slots helper):
/// never called with a lock held.
#[allow(clippy::too_many_arguments)]
pub(super) fn build(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    suffix: &str,
    depth_left: u32,
    watch: u32,
    parent: Option<u32>,
    weak: Option<&Py<PyAny>>,
    how: How,
    out: &mut Vec<(u32, Node)>,
) -> PyResult<()> {
    let hold = || match weak {
        Some(w) => Hold::Weak(w.clone_ref(py)),
        None => Hold::Strong(obj.clone().unbind()),
    };
    let mut mine: Vec<(Shape, usize, Slots)> = Vec::new();
    if obj.is_instance_of::<PyDict>() {
        mine.push((Shape::Dict, obj.as_ptr() as usize, Vec::new()));
    } else if obj.is_instance_of::<PyList>() {
        mine.push((Shape::List, 0, Vec::new()));
    } else if is_set(obj) {
        mine.push((Shape::Set, 0, Vec::new()));
    } else {
        if let Some(d) = instance_dict(obj) {
            mine.push((Shape::Attrs, d.as_ptr() as usize, Vec::new()));
        }
        let slots: Vec<(String, Py<PyAny>)> =
            guarded(|| obj_hooks()?.slots_of.bind(py).call1((obj,))?.extract())?;
        if !slots.is_empty() {
            mine.push((Shape::Slots, 0, slots));
        }
    }
    for (shape, dict_ptr, slots) in mine {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let compared = match shape {
            Shape::Dict => !how.dicts,
            Shape::Attrs => !how.attrs,
            _ => true,
        };
        let mut node = Node {
            watch,
            parent,
            suffix: suffix.to_string(),
            shape,
            hold: hold(),
            dict_ptr: if compared { 0 } else { dict_ptr },
            slots,
            shadow: None,
            depth_left,
        };
        let current = snapshot(py, &node);
        if depth_left > 0 {
            if let Some(sh) = &current {
                for (s, child) in child_candidates(py, &node, sh) {
                    build(py, &child, &s, depth_left - 1, watch, Some(id), None, how, out)?;
                }
            }
        }
        if compared {
            node.shadow = current;
        }
        out.push((id, node));
    }
    Ok(())
}

/// Adds built nodes to the state, and their dicts to the dict watcher.
pub(super) fn insert_nodes(objs: &mut Objects, nodes: Vec<(u32, Node)>) {
    let watcher = WATCHER.load(Ordering::Relaxed);
    for (id, node) in nodes {
        if node.dict_ptr != 0 && watcher >= 0 {
            if let Some(api) = dict_api() {
                let mut g = lock(&DICTS);
                let entry = g
                    .get_or_insert_with(AddrMap::default)
                    .entry(node.dict_ptr)
                    .or_insert_with(|| Arc::from([]));
                if entry.is_empty() {
                    // SAFETY: GIL held; the dict is alive: the caller holds
                    // the object it belongs to.
                    unsafe { (api.watch)(watcher, node.dict_ptr as *mut ffi::PyObject) };
                }
                *entry = entry.iter().copied().chain([id]).collect();
            }
        }
        objs.nodes.insert(id, node);
    }
    refresh_flags(objs);
}

/// Removes node `id` and its descendants; they go to `trash`.
pub(super) fn remove_subtree(objs: &mut Objects, id: u32, trash: &mut Vec<Node>) {
    let children: Vec<u32> = objs
        .nodes
        .iter()
        .filter(|(_, n)| n.parent == Some(id))
        .map(|(k, _)| *k)
        .collect();
    for c in children {
        remove_subtree(objs, c, trash);
    }
    if let Some(node) = objs.nodes.remove(&id) {
        if node.dict_ptr != 0 {
            let mut g = lock(&DICTS);
            if let Some(map) = g.as_mut() {
                let key = node.dict_ptr;
                if let Some(v) = map.get_mut(&key) {
                    *v = v.iter().copied().filter(|n| *n != id).collect();
                    if v.is_empty() {
                        map.remove(&key);
                        let watcher = WATCHER.load(Ordering::Relaxed);
                        if let (Some(api), true) = (dict_api(), watcher >= 0) {
                            // SAFETY: GIL held; the dict is alive: a dead one
                            // left the map at its DEALLOCATED event.
                            unsafe { (api.unwatch)(watcher, key as *mut ffi::PyObject) };
                        }
                    }
                }
            }
        }
        trash.push(node);
    }
}

/// Removes watch `watch` and all its nodes (they go to `trash`); the watch
/// removed, or `None` if it is not watched.
pub(super) fn remove_watch(objs: &mut Objects, watch: u32, trash: &mut Vec<Node>) -> Option<ObjWatch> {
    let i = objs.watches.iter().position(|w| w.id == watch)?;
    let w = objs.watches.remove(i);
    let roots: Vec<u32> = objs
        .nodes
        .iter()
        .filter(|(_, n)| n.watch == watch)
        .map(|(k, _)| *k)
        .collect();
    for id in roots {
        remove_subtree(objs, id, trash);
    }
    refresh_flags(objs);
    Some(w)
}

// --- following rebinding --------------------------------------------------------------

/// Makes node `id`'s children match what it holds now: keeps children whose
/// object is still there (updating their suffix), drops the others, builds
/// nodes for new containers.
pub(super) fn resync(py: Python<'_>, id: u32, trash: &mut Vec<Node>) -> PyResult<()> {
    let Some((shadow, probe)) = contents_of(py, id) else {
        return Ok(());
    };
    let wanted = child_candidates(py, &probe, &shadow);
    let missing = match_children(py, id, &wanted, trash);
    let (depth_left, watch) = (probe.depth_left, probe.watch);
    trash.push(probe);
    build_children(py, id, depth_left, watch, &missing)
}

/// Resync, phase 1: what node `id` holds now, and a node that stands for it
/// (holding its object strongly) to find the candidates for children by;
/// `None` if it is gone, has nothing or watches no level below. The
/// contents are read under the lock, the stand-in is made after it.
fn contents_of(py: Python<'_>, id: u32) -> Option<(Shadow, Node)> {
    let current = with_objs(|o| {
        let n = o.nodes.get(&id).filter(|n| n.depth_left > 0)?;
        Some((
            snapshot(py, n)?,
            n.slots
                .iter()
                .map(|(s, d)| (s.clone(), d.clone_ref(py)))
                .collect::<Vec<_>>(),
            n.hold.get(py)?.unbind(),
            n.shape,
            n.depth_left,
            n.watch,
        ))
    });
    let (shadow, slots, obj, shape, depth_left, watch) = current?;
    let probe = Node {
        watch,
        parent: None,
        suffix: String::new(),
        shape,
        hold: Hold::Strong(obj),
        dict_ptr: 0,
        slots,
        shadow: None,
        depth_left,
    };
    Some((shadow, probe))
}

/// Resync, phase 2 (under the lock): node `id`'s children whose object is
/// still among `wanted` take its new suffix, the others go to `trash`.
/// Returns the values of `wanted` that no child watches yet.
fn match_children<'py>(
    py: Python<'py>,
    id: u32,
    wanted: &[(String, Bound<'py, PyAny>)],
    trash: &mut Vec<Node>,
) -> Vec<(String, Bound<'py, PyAny>)> {
    with_objs(|o| {
        let children: Vec<(u32, usize)> = o
            .nodes
            .iter()
            .filter(|(_, n)| n.parent == Some(id))
            .map(|(k, n)| (*k, n.hold.ptr(py)))
            .collect();
        let mut matched = vec![false; wanted.len()];
        for (child, ptr) in children {
            match wanted.iter().position(|(_, w)| w.as_ptr() as usize == ptr) {
                Some(i) => {
                    matched[i] = true;
                    if let Some(n) = o.nodes.get_mut(&child) {
                        n.suffix = wanted[i].0.clone();
                    }
                }
                None => remove_subtree(o, child, trash),
            }
        }
        refresh_flags(o);
        wanted
            .iter()
            .zip(matched)
            .filter(|(_, m)| !m)
            .map(|((s, w), _)| (s.clone(), w.clone()))
            .collect()
    })
}

/// Resync, phase 3: builds nodes for the values of `missing` (without the
/// lock: it runs Python code), then adds them below node `id` unless `id`
/// was removed meanwhile (then they are released after the lock).
fn build_children(
    py: Python<'_>,
    id: u32,
    depth_left: u32,
    watch: u32,
    missing: &[(String, Bound<'_, PyAny>)],
) -> PyResult<()> {
    let how = how(py)?;
    let mut built = Vec::new();
    for (suffix, child) in missing {
        build(
            py,
            child,
            suffix,
            depth_left - 1,
            watch,
            Some(id),
            None,
            how,
            &mut built,
        )?;
    }
    if !built.is_empty() {
        with_objs(|o| {
            if o.nodes.contains_key(&id) {
                insert_nodes(o, built);
                Vec::new()
            } else {
                built
            }
        });
    }
    Ok(())
}
