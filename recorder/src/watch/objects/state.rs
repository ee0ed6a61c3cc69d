//! The state of object watching: the watches ([`ObjWatch`]) and their nodes
//! ([`Node`]: what each holds and how it is watched, [`Shape`], [`Hold`],
//! [`Shadow`]), the dict address map the dict watcher reads, the queue its
//! callback fills ([`Pending`]), and the flags a line boundary reads without
//! a lock ([`any`], and those [`refresh_flags`] keeps).
//!
//! Locking: `OBJS` (the watches and nodes), `DICTS` (dict address to nodes,
//! read by the dict watcher callback) and `PENDING` (what the callbacks
//! queued) are separate, and each is held only for short sections that run
//! no Python code and release no Python object, because releasing one can
//! run a weakref callback or `__del__` that comes back here. Nothing mutates
//! a watched dict while `DICTS` or `PENDING` is held: the callback takes them.
//!
//! Signal context: nothing here runs in a signal handler. [`push_pending`],
//! [`tid`] and [`thread_ident`] also run inside the dict watcher callback
//! (`hooks.rs`), that is inside a dict mutation: they run no Python code.

use std::cell::Cell;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::ffi;
use pyo3::prelude::*;

use super::frames::Frames;
use crate::runtime::addr::AddrMap;

/// What a node watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// An instance's `__dict__`.
    Attrs,
    /// An instance's `__slots__`.
    Slots,
    Dict,
    List,
    Set,
}

/// How a node holds its object: strongly, or through a weak reference (the
/// watched object itself, when it can be weakly referenced).
pub(super) enum Hold {
    Strong(Py<PyAny>),
    Weak(Py<PyAny>),
}

impl Hold {
    pub(super) fn get<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        match self {
            Hold::Strong(o) => Some(o.bind(py).clone()),
            Hold::Weak(w) => {
                let mut out: *mut ffi::PyObject = std::ptr::null_mut();
                // SAFETY: GIL held; `w` is a weakref; a new reference or NULL.
                let rc = unsafe { ffi::compat::PyWeakref_GetRef(w.as_ptr(), &mut out) };
                // SAFETY: `out` is a new reference when rc == 1.
                (rc == 1).then(|| unsafe { Bound::from_owned_ptr(py, out) })
            }
        }
    }

    pub(super) fn ptr(&self, py: Python<'_>) -> usize {
        self.get(py).map_or(0, |o| o.as_ptr() as usize)
    }
}

/// What a compared node held at the last boundary: references to the items,
/// compared by identity.
pub(super) enum Shadow {
    /// `(key, value)` in dict order.
    Items(Vec<(Py<PyAny>, Py<PyAny>)>),
    /// One entry per slot; `None` when unset.
    Slots(Vec<Option<Py<PyAny>>>),
    /// List items in order, set items in iteration order.
    Seq(Vec<Py<PyAny>>),
}

/// `(name, member descriptor)` per `__slots__` entry.
pub(super) type Slots = Vec<(String, Py<PyAny>)>;

pub(super) struct Node {
    pub(super) watch: u32,
    pub(super) parent: Option<u32>,
    /// Appended to the parent's path: `.name`, `['key']`, `[3]`.
    pub(super) suffix: String,
    pub(super) shape: Shape,
    pub(super) hold: Hold,
    /// Address of the dict the dict watcher reports for this node (0 when
    /// compared). Not a reference: holding an instance's dict would keep a
    /// watched object that refers to itself alive.
    pub(super) dict_ptr: usize,
    /// Slots: `(name, member descriptor)`.
    pub(super) slots: Slots,
    /// `None` for a node the dict watcher reports.
    pub(super) shadow: Option<Shadow>,
    /// How many levels below this node are watched.
    pub(super) depth_left: u32,
}

pub(super) struct ObjWatch {
    pub(super) id: u32,
    pub(super) tag: Arc<str>,
    pub(super) variable: Option<Arc<str>>,
    pub(super) repr_limit: usize,
    /// `id()` of the watched object, for `unwatch(obj)`.
    pub(super) root_id: usize,
    /// Keeps the weak reference (and so its callback) alive; never read.
    pub(super) _weakref: Option<Py<PyAny>>,
    /// True when the root is held strongly (it cannot be weakly referenced).
    pub(super) strong_root: bool,
}

#[derive(Default)]
pub(super) struct Objects {
    pub(super) watches: Vec<ObjWatch>,
    pub(super) nodes: AddrMap<u32, Node>,
}

static OBJS: Mutex<Option<Objects>> = Mutex::new(None);
/// Dict address -> nodes reporting it (through the dict watcher).
pub(super) static DICTS: Mutex<Option<AddrMap<usize, Arc<[u32]>>>> = Mutex::new(None);
pub(super) static PENDING: Mutex<Vec<Pending>> = Mutex::new(Vec::new());
pub(super) static PENDING_N: AtomicUsize = AtomicUsize::new(0);
/// True while some node needs work at every boundary (a compared node or a
/// strongly held root).
pub(super) static COMPARING: AtomicBool = AtomicBool::new(false);
pub(super) static NEXT_ID: AtomicU32 = AtomicU32::new(1);

thread_local! {
    /// This thread's id (`gettid` is a system call; a write loop asks for it
    /// per write). Reset in a fork child.
    pub(super) static TID: Cell<u64> = const { Cell::new(0) };
}

pub(super) fn tid() -> u64 {
    TID.with(|t| {
        if t.get() == 0 {
            t.set(crate::mem::kernel::gettid());
        }
        t.get()
    })
}

pub(super) fn thread_ident() -> u64 {
    // SAFETY: no preconditions.
    (unsafe { ffi::PyThread_get_thread_ident() }) as u64
}

pub(super) fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn with_objs<R>(f: impl FnOnce(&mut Objects) -> R) -> R {
    let mut g = lock(&OBJS);
    f(g.get_or_insert_with(Objects::default))
}

/// True when an object watch is named `tag` (see `runtime::watched::named`).
pub fn has_tag(tag: &str) -> bool {
    with_objs(|o| o.watches.iter().any(|w| *w.tag == *tag))
}

/// True while any object is watched.
pub fn any() -> bool {
    crate::runtime::watched::has(crate::runtime::watched::Kind::Objects)
}

/// True while some watched root is held strongly (it has no weak
/// references): a boundary checks whether memwatch holds it alone.
pub(super) static STRONG_ROOTS: AtomicBool = AtomicBool::new(false);

pub(super) fn refresh_flags(objs: &Objects) {
    crate::runtime::watched::set(crate::runtime::watched::Kind::Objects, !objs.watches.is_empty());
    let strong = objs.watches.iter().any(|w| w.strong_root);
    STRONG_ROOTS.store(strong, Ordering::Relaxed);
    let comparing = objs.nodes.values().any(|n| n.shadow.is_some()) || strong;
    COMPARING.store(comparing, Ordering::Relaxed);
}

/// The path of node `id` from its watched object (`.opts['lr']`).
pub(super) fn path_of(objs: &Objects, mut id: u32) -> String {
    if let Some(n) = objs.nodes.get(&id).filter(|n| n.parent.is_none()) {
        return n.suffix.clone();
    }
    let mut parts = Vec::new();
    while let Some(n) = objs.nodes.get(&id) {
        parts.push(n.suffix.as_str());
        match n.parent {
            Some(p) => id = p,
            None => break,
        }
    }
    parts.iter().rev().copied().collect()
}

/// Stops line events when nothing is watched any more: no object, no
/// variable, no region.
pub(super) fn stop_monitor_if_idle(py: Python<'_>) {
    if let Err(e) = crate::runtime::events::stop_if_idle(py) {
        e.write_unraisable(py, None);
    }
}

// --- queued events --------------------------------------------------------------

/// A dict watcher event on the dict of `nodes`.
pub(super) struct DictEvent {
    pub(super) nodes: Arc<[u32]>,
    pub(super) event: c_int,
    pub(super) key: Option<Py<PyAny>>,
    pub(super) old: Option<Py<PyAny>>,
    pub(super) new: Option<Py<PyAny>>,
    /// CLEARED: the items before; CLONED: the items copied in.
    pub(super) items: Option<Py<PyAny>>,
}

pub(super) enum PendingWhat {
    /// A dict watcher event.
    Dict(DictEvent),
    /// The watched object of watch `watch` was collected.
    Collected { watch: u32 },
}

pub(super) struct Pending {
    pub(super) what: PendingWhat,
    pub(super) frames: Frames,
    pub(super) tid: u64,
    pub(super) ident: u64,
}

pub(super) fn push_pending(p: Pending) {
    lock(&PENDING).push(p);
    PENDING_N.fetch_add(1, Ordering::Relaxed);
}
