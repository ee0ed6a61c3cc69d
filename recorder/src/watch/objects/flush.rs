//! The flush: at a safe point (a line boundary of in-scope code, `check()`,
//! `unwatch`, `stop`, exit), turns what the dict watcher queued and what the
//! compared nodes show into `memwatch.Change`s with reprs, and delivers them
//! ([`flush`], in phases: see `flush_attached`); and [`quiet`], the check
//! that lets a boundary skip it.
//!
//! Locking: each phase takes `OBJS` (and `PENDING`, to take the queue) only
//! for short sections that run no Python code and release no Python object;
//! what they remove goes to the flush's trash, released after the last
//! section, and reprs are made and changes delivered with no lock held. A
//! thread-local flag keeps a flush from starting inside another (a repr or
//! a release that runs Python code reaching a boundary).
//!
//! Signal context: nothing here runs in a signal handler, nor in the dict
//! watcher callback. [`quiet`] runs no Python code; [`flush`] does.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use memwatch_format::ObjectChangeKind as Kind;
use pyo3::ffi;
use pyo3::prelude::*;

use super::diff::{
    dict_changes, dict_kind, item_suffix, list_changes, set_changes, slot_changes, Found, Hint, Suffix, Val,
};
use super::frames::resolve_frames;
use super::hooks::{obj_hooks, ADDED, CLEARED, CLONED, DELETED, MODIFIED};
use super::repr::bounded_repr;
use super::shadow::{clone_shadow, matches_shadow, nested, remove_watch, resync, same_shadow, snapshot};
use super::state::{
    any, lock, path_of, stop_monitor_if_idle, tid, with_objs, DictEvent, Hold, Node, ObjWatch, Objects,
    Pending, PendingWhat, Shadow, Shape, COMPARING, PENDING, PENDING_N, STRONG_ROOTS,
};
use crate::deliver::output::{self, emit_object};
use crate::model::change::{FrameRef, ObjectInfo};
use crate::runtime::thread::guarded;

thread_local! {
    static FLUSHING: Cell<bool> = const { Cell::new(false) };
    /// An empty queue kept for its capacity (see `take_queued`).
    static SPARE: Cell<Vec<Pending>> = const { Cell::new(Vec::new()) };
}

/// True when a boundary has nothing to do for objects: none is watched, or
/// no change waits in the queue, no root is held only strongly (whose
/// collection a boundary must notice), and every compared node still holds
/// what its shadow says (checked in place). Runs no Python code.
pub fn quiet(py: Python<'_>) -> bool {
    if !any() {
        return true;
    }
    if PENDING_N.load(Ordering::Relaxed) != 0 || STRONG_ROOTS.load(Ordering::Relaxed) {
        return false;
    }
    if !COMPARING.load(Ordering::Relaxed) {
        return true;
    }
    with_objs(|o| {
        o.nodes
            .values()
            .filter(|n| n.shadow.is_some())
            .all(|n| matches_shadow(py, n) == Some(true))
    })
}

// --- what the phases hand on ------------------------------------------------------

/// A change ready for reprs: the watch's data copied out of the state.
struct Ready {
    tag: Arc<str>,
    variable: Option<Arc<str>>,
    limit: usize,
    path: String,
    kind: Kind,
    suffix: Suffix,
    old: Val,
    new: Val,
    stack: Arc<[FrameRef]>,
    tid: u64,
    thread_name: Arc<str>,
}

/// Who made the changes of one queued event, or of the line this thread
/// just ran, and where.
struct Origin<'a> {
    stack: &'a Arc<[FrameRef]>,
    tid: u64,
    thread_name: &'a Arc<str>,
}

/// What one flush gathers, handed from phase to phase.
struct Gathered {
    /// This thread's id.
    my_tid: u64,
    /// The changes found, in order, waiting for their reprs.
    out: Vec<Ready>,
    /// Nodes whose change may add or drop child nodes: resynced after.
    changed: Vec<u32>,
    /// Nodes and watches removed, released after the last locked section.
    trash_nodes: Vec<Node>,
    trash_watches: Vec<ObjWatch>,
}

impl Gathered {
    fn new() -> Gathered {
        Gathered {
            my_tid: tid(),
            out: Vec::new(),
            changed: Vec::new(),
            trash_nodes: Vec::new(),
            trash_watches: Vec::new(),
        }
    }

    /// Adds the changes `found` that are of nodes still watched.
    fn add(&mut self, found: Vec<Found>, at: &Origin<'_>) {
        with_objs(|o| {
            self.out.extend(found.into_iter().filter_map(|f| ready(o, f, at)));
        });
    }

    /// Ends watch `watch`, whose object was collected, with a `collected`
    /// change (nothing if it had ended already).
    fn end_collected(&mut self, watch: u32, at: &Origin<'_>) {
        let r = with_objs(|o| {
            let w = remove_watch(o, watch, &mut self.trash_nodes)?;
            let r = collected(&w, at);
            self.trash_watches.push(w);
            Some(r)
        });
        self.out.extend(r);
    }
}

fn ready(objs: &Objects, f: Found, at: &Origin<'_>) -> Option<Ready> {
    let node = objs.nodes.get(&f.node)?;
    let w = objs.watches.iter().find(|w| w.id == node.watch)?;
    Some(Ready {
        tag: w.tag.clone(),
        variable: w.variable.clone(),
        limit: w.repr_limit,
        path: path_of(objs, f.node),
        kind: f.kind,
        suffix: f.suffix,
        old: f.old,
        new: f.new,
        stack: at.stack.clone(),
        tid: at.tid,
        thread_name: at.thread_name.clone(),
    })
}

fn collected(w: &ObjWatch, at: &Origin<'_>) -> Ready {
    Ready {
        tag: w.tag.clone(),
        variable: w.variable.clone(),
        limit: w.repr_limit,
        path: String::new(),
        kind: Kind::Collected,
        suffix: Suffix::None,
        old: Val::None,
        new: Val::None,
        stack: at.stack.clone(),
        tid: at.tid,
        thread_name: at.thread_name.clone(),
    }
}

/// True if a change may add or drop child nodes: its old or new value is a
/// container or an instance that could get nodes of its own.
fn may_hold_children(py: Python<'_>, f: &Found) -> bool {
    let one = |o: &Py<PyAny>| nested(o.bind(py));
    let any = |v: &Val| match v {
        Val::None | Val::Text(_) => false,
        Val::Obj(o) => one(o),
        Val::ListOf(v) | Val::SetOf(v) => v.iter().any(one),
        Val::DictOf(v) => v.iter().any(|(_, x)| one(x)),
    };
    any(&f.old) || any(&f.new) || matches!(f.kind, Kind::Sort | Kind::Reverse)
}

// --- the flush ----------------------------------------------------------------------

/// Reports what changed in watched objects: queued dict watcher events
/// first, then compared nodes (attributed to `last`, the line this thread
/// ran before), then collected objects. Called at every line boundary of
/// in-scope code while an object is watched, and by `check`, `unwatch`,
/// `stop` and at exit.
pub fn flush(py: Python<'_>, last: (usize, u32)) {
    if !any() {
        return;
    }
    if PENDING_N.load(Ordering::Relaxed) == 0 && !COMPARING.load(Ordering::Relaxed) {
        return;
    }
    if FLUSHING.with(|f| f.replace(true)) {
        return;
    }
    // The 3.11 trace function reaches here without pyo3 knowing the GIL is
    // held, and pyo3 would then defer every release of a reference to some
    // later call: a collected list would be noticed late. Attaching (the
    // GIL is already ours) makes releases immediate.
    Python::attach(|py| flush_attached(py, last));
    FLUSHING.with(|f| f.set(false));
    if !any() {
        stop_monitor_if_idle(py);
    }
}

/// The flush, in phases: take what the callbacks queued; report it; compare
/// the nodes compared at boundaries (and notice strongly held roots only
/// memwatch still holds); follow rebinding below the nodes that changed;
/// release the queue and what was removed; make the reprs and deliver.
fn flush_attached(py: Python<'_>, last: (usize, u32)) {
    let mut acc = Gathered::new();
    let pending = take_queued();
    report_queued(py, &pending, &mut acc);
    if COMPARING.load(Ordering::Relaxed) {
        compare_nodes(py, last, &mut acc);
    }
    let Gathered {
        out,
        changed,
        mut trash_nodes,
        trash_watches,
        ..
    } = acc;
    follow_rebinding(py, changed, &mut trash_nodes);
    release_queue(pending);
    drop(trash_nodes);
    drop(trash_watches);
    deliver(py, out);
}

/// Phase 1: takes the queued dict watcher events and collections.
/// Swapped with this thread's spare queue: both keep their capacity, so
/// a store a line queues no allocation.
fn take_queued() -> Vec<Pending> {
    let mut pending = SPARE.with(|s| s.take());
    std::mem::swap(&mut pending, &mut *lock(&PENDING));
    PENDING_N.store(0, Ordering::Relaxed);
    pending
}

/// Phase 2: the changes the queued dict watcher events describe, and the
/// watches whose object was collected, each attributed to the stack and
/// thread that queued it.
fn report_queued(py: Python<'_>, pending: &[Pending], acc: &mut Gathered) {
    let mut my_name: Option<Arc<str>> = None;
    for p in pending {
        let (stack, at) = resolve_frames(py, &p.frames, p.tid == acc.my_tid);
        let tname = queued_thread_name(py, p, acc.my_tid, &mut my_name);
        let mut hint = Hint::new(at);
        let origin = Origin {
            stack: &stack,
            tid: p.tid,
            thread_name: &tname,
        };
        match &p.what {
            PendingWhat::Dict(ev) => {
                for &id in ev.nodes.iter() {
                    report_dict_event(py, id, ev, &mut hint, &origin, acc);
                }
            }
            PendingWhat::Collected { watch } => acc.end_collected(*watch, &origin),
        }
    }
}

/// The name of the thread that queued `p`: this thread's (asked once per
/// flush), else what the `thread_name` helper says of its ident, or `?`.
fn queued_thread_name(py: Python<'_>, p: &Pending, my_tid: u64, my_name: &mut Option<Arc<str>>) -> Arc<str> {
    if p.tid == my_tid {
        my_name
            .get_or_insert_with(|| crate::runtime::attrib::thread_name(py))
            .clone()
    } else {
        guarded(|| {
            obj_hooks()
                .and_then(|h| {
                    h.thread_name
                        .bind(py)
                        .call1((p.ident,))?
                        .extract::<Option<String>>()
                })
                .ok()
                .flatten()
        })
        .map_or_else(|| "?".into(), Arc::from)
    }
}

/// The changes dict watcher event `ev` made to node `id` (none if the node
/// is gone).
fn report_dict_event(
    py: Python<'_>,
    id: u32,
    ev: &DictEvent,
    hint: &mut Hint,
    at: &Origin<'_>,
    acc: &mut Gathered,
) {
    let Some(shape) = with_objs(|o| o.nodes.get(&id).map(|n| n.shape)) else {
        return;
    };
    let clone = |v: &Option<Py<PyAny>>| v.as_ref().map_or(Val::None, |v| Val::Obj(v.clone_ref(py)));
    let pairs = || -> Vec<(Py<PyAny>, Py<PyAny>)> {
        ev.items
            .as_ref()
            .and_then(|l| l.bind(py).extract::<Vec<(Py<PyAny>, Py<PyAny>)>>().ok())
            .unwrap_or_default()
    };
    let found: Vec<Found> = match ev.event {
        ADDED | MODIFIED | DELETED => {
            // One change (every store): no list for it.
            let Some(k) = &ev.key else { return };
            let f = Found {
                node: id,
                kind: dict_kind(py, shape, ev.event == DELETED, hint),
                suffix: item_suffix(py, shape, k),
                old: clone(&ev.old),
                new: clone(&ev.new),
            };
            if may_hold_children(py, &f) {
                acc.changed.push(id);
            }
            with_objs(|o| acc.out.extend(ready(o, f, at)));
            return;
        }
        CLEARED => vec![Found {
            node: id,
            kind: Kind::Clear,
            suffix: Suffix::None,
            old: Val::DictOf(pairs()),
            new: Val::Text("{}"),
        }],
        CLONED => pairs()
            .into_iter()
            .map(|(k, v)| Found {
                node: id,
                kind: if shape == Shape::Attrs {
                    Kind::SetAttr
                } else {
                    Kind::Update
                },
                suffix: item_suffix(py, shape, &k),
                old: Val::None,
                new: Val::Obj(v),
            })
            .collect(),
        _ => Vec::new(),
    };
    if found.iter().any(|f| may_hold_children(py, f)) {
        acc.changed.push(id);
    }
    acc.add(found, at);
}

/// What the flush learned about one node, copied out under the lock.
struct NodeView {
    id: u32,
    shape: Shape,
    slot_names: Vec<String>,
}

/// Phase 3: compared nodes whose contents differ from their shadows, and
/// strongly held roots only memwatch still holds (ended as collected), all
/// attributed to `last`, the line this thread ran before.
fn compare_nodes(py: Python<'_>, last: (usize, u32), acc: &mut Gathered) {
    // Where and who, worked out only when something changed: most
    // boundaries find nothing.
    let mut hint = Hint::at_last(last);
    let here = std::cell::OnceCell::new();
    let ctx = || {
        here.get_or_init(|| {
            (
                crate::runtime::attrib::attributed_stack(py, last),
                crate::runtime::attrib::thread_name(py),
            )
        })
    };
    let my_tid = acc.my_tid;
    for (view, before, now) in take_changed_shadows(py) {
        let (Some(before), Some(now)) = (before, now) else {
            continue;
        };
        let found = shadow_changes(py, &view, &before, &now, &mut hint);
        if found.iter().any(|f| may_hold_children(py, f)) {
            acc.changed.push(view.id);
        }
        if !found.is_empty() {
            let (stack, tname) = ctx();
            let origin = Origin {
                stack,
                tid: my_tid,
                thread_name: tname,
            };
            acc.add(found, &origin);
        }
    }
    for watch in unreferenced_strong_roots() {
        // Python code (the stack's scope) runs here, never under the lock.
        let (stack, tname) = ctx();
        let origin = Origin {
            stack,
            tid: my_tid,
            thread_name: tname,
        };
        acc.end_collected(watch, &origin);
    }
}

/// The compared nodes that no longer match their shadows, with the shadow
/// taken out (`before`, to diff and drop afterwards) and a copy of the new
/// one that replaced it. Snapshots read objects (no Python code): done
/// under the lock.
fn take_changed_shadows(py: Python<'_>) -> Vec<(NodeView, Option<Shadow>, Option<Shadow>)> {
    with_objs(|o| {
        let ids: Vec<u32> = o
            .nodes
            .iter()
            .filter(|(_, n)| n.shadow.is_some())
            .map(|(k, _)| *k)
            .collect();
        // Parents before children (ids grow down the tree): a stable order.
        let mut ids = ids;
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| {
                let n = o.nodes.get_mut(&id)?;
                if matches_shadow(py, n) == Some(true) {
                    return None;
                }
                let now = snapshot(py, n);
                if let (Some(a), Some(b)) = (&n.shadow, &now) {
                    if same_shadow(a, b) {
                        // Unchanged (the usual case). Dropping `now`
                        // here frees nothing: the object still holds
                        // every item it refers to.
                        return None;
                    }
                }
                let before = match now {
                    Some(_) => n.shadow.take(),
                    None => None,
                };
                let view = NodeView {
                    id,
                    shape: n.shape,
                    slot_names: n.slots.iter().map(|(s, _)| s.clone()).collect(),
                };
                let copy = now.as_ref().map(|s| clone_shadow(py, s));
                if now.is_some() {
                    n.shadow = now;
                }
                Some((view, before, copy))
            })
            .collect()
    })
}

/// The changes between two shadows of a node, by its shape.
fn shadow_changes(
    py: Python<'_>,
    view: &NodeView,
    before: &Shadow,
    now: &Shadow,
    hint: &mut Hint,
) -> Vec<Found> {
    match (before, now) {
        (Shadow::Items(a), Shadow::Items(b)) => dict_changes(py, view.id, view.shape, a, b, hint),
        (Shadow::Slots(a), Shadow::Slots(b)) => slot_changes(py, view.id, &view.slot_names, a, b),
        (Shadow::Seq(a), Shadow::Seq(b)) if view.shape == Shape::List => {
            list_changes(py, view.id, a, b, hint)
        }
        (Shadow::Seq(a), Shadow::Seq(b)) => set_changes(py, view.id, a, b, hint),
        _ => Vec::new(),
    }
}

/// The watches of strongly held roots that only memwatch still holds (the
/// root's reference count is the number of its nodes).
fn unreferenced_strong_roots() -> Vec<u32> {
    with_objs(|o| {
        let gone: Vec<u32> = o
            .watches
            .iter()
            .filter(|w| w.strong_root)
            .filter(|w| {
                let roots: Vec<&Node> = o
                    .nodes
                    .values()
                    .filter(|n| n.watch == w.id && n.parent.is_none())
                    .collect();
                let held = roots.len() as isize;
                roots.first().is_some_and(|n| match &n.hold {
                    // SAFETY: GIL held; reading a reference count.
                    Hold::Strong(obj) => (unsafe { ffi::Py_REFCNT(obj.as_ptr()) }) <= held,
                    Hold::Weak(_) => false,
                })
            })
            .map(|w| w.id)
            .collect();
        gone
    })
}

/// Phase 4: follows rebinding below the nodes that changed (`obj.items =
/// [...]` moves the watch to the new list); removed nodes go to `trash`.
fn follow_rebinding(py: Python<'_>, mut changed: Vec<u32>, trash: &mut Vec<Node>) {
    changed.sort_unstable();
    changed.dedup();
    for id in changed {
        if let Err(e) = resync(py, id, trash) {
            e.write_unraisable(py, None);
        }
    }
}

/// Phase 5: releases what the queue holds and gives it back as this
/// thread's spare. Releasing the references may run Python code (which may
/// queue more): the queue is out of the cell until it is empty again.
fn release_queue(mut pending: Vec<Pending>) {
    pending.clear();
    SPARE.with(|s| s.replace(pending));
}

/// Phase 6: the reprs of each change (its key, old and new values), then
/// its delivery as a `Change`, in the order found.
fn deliver(py: Python<'_>, out: Vec<Ready>) {
    for r in out {
        let key = key_of(py, r.path, &r.suffix, r.limit);
        let info = ObjectInfo {
            kind: r.kind,
            key,
            old: r.old.render(py, r.limit),
            new: r.new.render(py, r.limit),
        };
        let origin = output::Origin {
            stack: r.stack,
            thread_id: r.tid,
            thread_name: r.thread_name,
        };
        emit_object(py, r.tag, r.variable, info, origin);
    }
}

/// The key of a change: the node's path, then where in the node (an item's
/// key as its repr); `None` for the watched object itself.
fn key_of(py: Python<'_>, path: String, suffix: &Suffix, limit: usize) -> Option<String> {
    use std::fmt::Write;
    let mut k = path;
    let _ = match suffix {
        Suffix::None => Ok(()),
        Suffix::Attr(a) => {
            k.reserve_exact(1 + a.len());
            k.push('.');
            k.push_str(a);
            Ok(())
        }
        Suffix::Item(o) => write!(k, "[{}]", bounded_repr(py, o.bind(py), limit)),
        Suffix::Index(i) => write!(k, "[{i}]"),
        Suffix::Slice(a, b) => write!(k, "[{a}:{b}]"),
    };
    (!k.is_empty()).then_some(k)
}
