//! Watching Python objects (`memwatch.watch_object`): attribute and
//! container changes, delivered as `memwatch.Change`s whose `kind`, `key`,
//! `old_repr` and `new_repr` say what happened, through the same callbacks,
//! history, live report and trace as buffer changes.
//!
//! A watch is a small tree of *nodes*, one per thing that can change: the
//! attributes of an instance (its `__dict__`, or its `__slots__`) and the
//! items of a `dict`, `list` or `set`. With `depth=n`, the containers and
//! plain instances (of classes defined in Python) held by the watched
//! object's attributes or items, down to `n` levels, get nodes too; the tree
//! follows rebinding (`obj.items = [...]` moves the watch to the new list).
//!
//! How changes are found:
//!
//! - Dicts (instance `__dict__`s and plain dicts) on CPython 3.12+: a dict
//!   watcher (`PyDict_AddWatcher`; one watcher id for the process, claimed
//!   at the first watch and freed at shutdown). Its callback runs inside the
//!   mutation, before it happens, where running Python code could corrupt
//!   the dict, so it only takes references (key, old and new value) and the
//!   raw stack; reprs are made and the change delivered at the next safe
//!   point: a line boundary of in-scope code, `check()`, `unwatch`, `stop`
//!   or exit. Instance dicts that CPython keeps inline are materialised
//!   first (`PyObject_GenericGetDict`, what reading `obj.__dict__` does),
//!   which changes nothing a program can see.
//! - Lists, sets, `__slots__`, and dicts on 3.11: compared at line
//!   boundaries of in-scope code against a shallow copy (the identities of
//!   the items), so a change is the net effect of one line, attributed to
//!   it like a buffer change. The kind is derived from the difference (see
//!   `list_changes` and `set_changes`); where the state alone cannot
//!   tell (`pop(i)`, `remove(x)` and `del l[i]` leave the same list), the
//!   method names and operators the line's code uses decide.
//!
//! Reprs are bounded (`repr_limit` characters) and made at the safe point,
//! so a mutable value shows its state at the end of the line that stored it;
//! a failing `__repr__` gives `<repr failed: ExcType>`.
//!
//! A watched object that can be weakly referenced is held weakly: when it
//! is collected the watch ends with a `collected` change. Other objects
//! (`list`, `dict`, `set`, classes with `__slots__` and no `__weakref__`) are
//! held strongly, and the watch ends with a `collected` change at the first
//! line boundary at which memwatch holds the only reference.
//!
//! Locking: `OBJS` (the watches and nodes), `DICTS` (dict address to
//! nodes, read by the dict watcher callback) and `PENDING` (what the
//! callbacks queued) are separate and each is held only for short sections
//! that run no Python code and release no Python object, because releasing
//! one can run a weakref callback or `__del__` that comes back here.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use memwatch_format::ObjectChangeKind as Kind;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyList, PySet, PyString, PyTuple, PyType, PyWeakrefReference};

use crate::api;
use crate::change::{Change, FrameRef, ObjectInfo};
use crate::engine::Layout;
use crate::errors::MemwatchError;
use crate::monitor::{self, guarded, AddrMap, GUARD, LAST};

// --- hooks from memwatch._objects ---------------------------------------------

/// Python helpers the flush calls (never the dict watcher callback).
struct ObjHooks {
    /// `slots_of(obj) -> list[(name, member_descriptor)]`.
    slots_of: Py<PyAny>,
    /// `line_ops(code, line) -> frozenset[str]`: method names and operators
    /// the line uses.
    line_ops: Py<PyAny>,
    /// `bounded_repr(value, limit) -> str`, never raising.
    repr: Py<PyAny>,
    /// `thread_name(ident) -> str | None`.
    thread_name: Py<PyAny>,
    /// `probe() -> instance` and `probe_store(instance)` (four attribute
    /// stores, generic and specialised): see [`attrs_notify`].
    probe: Py<PyAny>,
    probe_store: Py<PyAny>,
}

static OBJ_HOOKS: OnceLock<ObjHooks> = OnceLock::new();

/// Receives the helpers from `memwatch._objects`.
#[pyfunction]
pub fn _set_object_hooks(
    slots_of: Py<PyAny>,
    line_ops: Py<PyAny>,
    repr: Py<PyAny>,
    thread_name: Py<PyAny>,
    probe: Py<PyAny>,
    probe_store: Py<PyAny>,
) {
    let _ = OBJ_HOOKS.set(ObjHooks {
        slots_of,
        line_ops,
        repr,
        thread_name,
        probe,
        probe_store,
    });
}

fn obj_hooks() -> PyResult<&'static ObjHooks> {
    OBJ_HOOKS
        .get()
        .ok_or_else(|| MemwatchError::new_err("memwatch._objects was not imported"))
}

// --- the dict watcher API (CPython 3.12+), found at run time -------------------

// PyDict_WatchEvent, the same on 3.12 and 3.13.
const ADDED: c_int = 0;
const MODIFIED: c_int = 1;
const DELETED: c_int = 2;
const CLONED: c_int = 3;
const CLEARED: c_int = 4;
const DEALLOCATED: c_int = 5;

type WatchCallback =
    unsafe extern "C" fn(c_int, *mut ffi::PyObject, *mut ffi::PyObject, *mut ffi::PyObject) -> c_int;

struct DictApi {
    add_watcher: unsafe extern "C" fn(WatchCallback) -> c_int,
    clear_watcher: unsafe extern "C" fn(c_int) -> c_int,
    watch: unsafe extern "C" fn(c_int, *mut ffi::PyObject) -> c_int,
    unwatch: unsafe extern "C" fn(c_int, *mut ffi::PyObject) -> c_int,
}

/// The dict watcher functions, or `None` before CPython 3.12. Looked up by
/// name so that one build of this module loads on 3.11 too.
fn dict_api() -> Option<&'static DictApi> {
    static API: OnceLock<Option<DictApi>> = OnceLock::new();
    API.get_or_init(|| {
        let sym = |name: &std::ffi::CStr| {
            // SAFETY: dlsym with a NUL-terminated name; NULL when missing.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        let (a, c, w, u) = (
            sym(c"PyDict_AddWatcher")?,
            sym(c"PyDict_ClearWatcher")?,
            sym(c"PyDict_Watch")?,
            sym(c"PyDict_Unwatch")?,
        );
        // SAFETY: these are the C API functions of these names, whose
        // signatures are the ones declared in DictApi.
        unsafe {
            Some(DictApi {
                add_watcher: std::mem::transmute::<
                    *mut libc::c_void,
                    unsafe extern "C" fn(WatchCallback) -> c_int,
                >(a),
                clear_watcher: std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn(c_int) -> c_int>(
                    c,
                ),
                watch: std::mem::transmute::<
                    *mut libc::c_void,
                    unsafe extern "C" fn(c_int, *mut ffi::PyObject) -> c_int,
                >(w),
                unwatch: std::mem::transmute::<
                    *mut libc::c_void,
                    unsafe extern "C" fn(c_int, *mut ffi::PyObject) -> c_int,
                >(u),
            })
        }
    })
    .as_ref()
}

/// Our dict watcher id, or -1.
static WATCHER: AtomicI32 = AtomicI32::new(-1);

/// Claims a dict watcher id (once). `Ok(None)` where there are no dict
/// watchers (3.11).
fn watcher_id(py: Python<'_>) -> PyResult<Option<c_int>> {
    let Some(api) = dict_api() else { return Ok(None) };
    let id = WATCHER.load(Ordering::Relaxed);
    if id >= 0 {
        return Ok(Some(id));
    }
    // SAFETY: GIL held; the callback lives as long as the process.
    let id = unsafe { (api.add_watcher)(on_dict_event) };
    if id < 0 {
        let cause = PyErr::take(py).map(|e| e.to_string()).unwrap_or_default();
        return Err(MemwatchError::new_err(format!(
            "memwatch needs one of CPython's 8 dict watcher slots and none is free ({cause})"
        )));
    }
    WATCHER.store(id, Ordering::Relaxed);
    Ok(Some(id))
}

/// The dict the probe of [`attrs_notify`] watches, and the events it saw.
static PROBE_DICT: AtomicUsize = AtomicUsize::new(0);
static PROBE_HITS: AtomicUsize = AtomicUsize::new(0);

/// True if attribute stores on an instance whose `__dict__` was
/// materialised reach the dict watcher. CPython 3.12 does; 3.13.0 does not
/// (the dict shares the instance's inline values and stores to them notify
/// no one), so there instance dicts are compared at line boundaries. Tried
/// once on a probe instance, through `setattr` and a specialised store.
fn attrs_notify(py: Python<'_>, watcher: c_int) -> bool {
    static RESULT: OnceLock<bool> = OnceLock::new();
    *RESULT.get_or_init(|| {
        let Some(api) = dict_api() else { return false };
        let tried = || -> PyResult<bool> {
            let hooks = obj_hooks()?;
            let probe = hooks.probe.bind(py).call0()?;
            let Some(d) = instance_dict(&probe) else {
                return Ok(false);
            };
            PROBE_HITS.store(0, Ordering::Relaxed);
            PROBE_DICT.store(d.as_ptr() as usize, Ordering::Relaxed);
            // SAFETY: GIL held; `d` is a dict we hold.
            unsafe { (api.watch)(watcher, d.as_ptr()) };
            let stored = probe
                .setattr("x", 1)
                .and_then(|_| hooks.probe_store.bind(py).call1((&probe,)).map(|_| ()));
            // SAFETY: as above.
            unsafe { (api.unwatch)(watcher, d.as_ptr()) };
            PROBE_DICT.store(0, Ordering::Relaxed);
            stored?;
            Ok(PROBE_HITS.load(Ordering::Relaxed) == 4)
        };
        tried().unwrap_or(false)
    })
}

// --- state --------------------------------------------------------------------

/// What a node watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
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
enum Hold {
    Strong(Py<PyAny>),
    Weak(Py<PyAny>),
}

impl Hold {
    fn get<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
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

    fn ptr(&self, py: Python<'_>) -> usize {
        self.get(py).map_or(0, |o| o.as_ptr() as usize)
    }
}

/// What a compared node held at the last boundary: references to the items,
/// compared by identity.
enum Shadow {
    /// `(key, value)` in dict order.
    Items(Vec<(Py<PyAny>, Py<PyAny>)>),
    /// One entry per slot; `None` when unset.
    Slots(Vec<Option<Py<PyAny>>>),
    /// List items in order, set items in iteration order.
    Seq(Vec<Py<PyAny>>),
}

/// `(name, member descriptor)` per `__slots__` entry.
type Slots = Vec<(String, Py<PyAny>)>;

struct Node {
    watch: u32,
    parent: Option<u32>,
    /// Appended to the parent's path: `.name`, `['key']`, `[3]`.
    suffix: String,
    shape: Shape,
    hold: Hold,
    /// Address of the dict the dict watcher reports for this node (0 when
    /// compared). Not a reference: holding an instance's dict would keep a
    /// watched object that refers to itself alive.
    dict_ptr: usize,
    /// Slots: `(name, member descriptor)`.
    slots: Slots,
    /// `None` for a node the dict watcher reports.
    shadow: Option<Shadow>,
    /// How many levels below this node are watched.
    depth_left: u32,
}

struct ObjWatch {
    id: u32,
    tag: Arc<str>,
    variable: Option<Arc<str>>,
    repr_limit: usize,
    /// `id()` of the watched object, for `unwatch(obj)`.
    root_id: usize,
    /// Keeps the weak reference (and so its callback) alive; never read.
    _weakref: Option<Py<PyAny>>,
    /// True when the root is held strongly (it cannot be weakly referenced).
    strong_root: bool,
}

#[derive(Default)]
struct Objects {
    watches: Vec<ObjWatch>,
    nodes: AddrMap<u32, Node>,
}

static OBJS: Mutex<Option<Objects>> = Mutex::new(None);
/// Dict address -> nodes reporting it (through the dict watcher).
static DICTS: Mutex<Option<AddrMap<usize, Arc<[u32]>>>> = Mutex::new(None);
static PENDING: Mutex<Vec<Pending>> = Mutex::new(Vec::new());
static PENDING_N: AtomicUsize = AtomicUsize::new(0);
/// True while any object is watched.
static ANY: AtomicBool = AtomicBool::new(false);
/// True while some node needs work at every boundary (a compared node or a
/// strongly held root).
static COMPARING: AtomicBool = AtomicBool::new(false);
static NEXT_ID: AtomicU32 = AtomicU32::new(1);

thread_local! {
    static FLUSHING: Cell<bool> = const { Cell::new(false) };
    /// An empty queue kept for its capacity (see `flush_attached`).
    static SPARE: Cell<Vec<Pending>> = const { Cell::new(Vec::new()) };
    /// This thread's id (`gettid` is a system call; a write loop asks for it
    /// per write). Reset in a fork child.
    static TID: Cell<u64> = const { Cell::new(0) };
}

fn tid() -> u64 {
    TID.with(|t| {
        if t.get() == 0 {
            t.set(crate::kernel::gettid());
        }
        t.get()
    })
}

fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn with_objs<R>(f: impl FnOnce(&mut Objects) -> R) -> R {
    let mut g = lock(&OBJS);
    f(g.get_or_insert_with(Objects::default))
}

/// True while any object is watched.
pub fn any() -> bool {
    ANY.load(Ordering::Relaxed)
}

/// True when a boundary has nothing to do for objects: none is watched, or
/// no change waits in the queue, no root is held only strongly (whose
/// collection a boundary must notice), and every compared node still holds
/// what its shadow says (checked in place). Runs no Python code.
pub fn quiet(py: Python<'_>) -> bool {
    if !ANY.load(Ordering::Relaxed) {
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

/// True while some watched root is held strongly (it has no weak
/// references): a boundary checks whether memwatch holds it alone.
static STRONG_ROOTS: AtomicBool = AtomicBool::new(false);

fn refresh_flags(objs: &Objects) {
    ANY.store(!objs.watches.is_empty(), Ordering::Relaxed);
    let strong = objs.watches.iter().any(|w| w.strong_root);
    STRONG_ROOTS.store(strong, Ordering::Relaxed);
    let comparing = objs.nodes.values().any(|n| n.shadow.is_some()) || strong;
    COMPARING.store(comparing, Ordering::Relaxed);
}

/// The path of node `id` from its watched object (`.opts['lr']`).
fn path_of(objs: &Objects, mut id: u32) -> String {
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

// --- queued events --------------------------------------------------------------

enum PendingWhat {
    /// A dict watcher event on the dict of `nodes`.
    Dict {
        nodes: Arc<[u32]>,
        event: c_int,
        key: Option<Py<PyAny>>,
        old: Option<Py<PyAny>>,
        new: Option<Py<PyAny>>,
        /// CLEARED: the items before; CLONED: the items copied in.
        items: Option<Py<PyAny>>,
    },
    /// The watched object of watch `watch` was collected.
    Collected { watch: u32 },
}

struct Pending {
    what: PendingWhat,
    frames: Frames,
    tid: u64,
    ident: u64,
}

fn push_pending(p: Pending) {
    lock(&PENDING).push(p);
    PENDING_N.fetch_add(1, Ordering::Relaxed);
}

// --- stacks of queued events ------------------------------------------------------

/// The stack of a queued event.
enum Frames {
    /// Resolved when queued, from this thread's [`StackMemo`]: the frames
    /// from the innermost in-scope one out, and that frame's code and line.
    Resolved(Arc<[FrameRef]>, Option<CodeLine>),
    /// `(code object, instruction offset)`, innermost first: resolved at
    /// the flush, where looking a code object up may run Python code.
    Raw(Vec<(Py<PyAny>, i32)>),
}

/// The stack last resolved for a queued event of this thread, by its raw
/// frames. A loop that stores to a watched object queues the same stack
/// at every store: the callback compares the raw frames and shares the
/// resolved stack instead of holding a reference per frame, and the flush
/// resolves nothing.
///
/// Its code objects are held, so that their addresses cannot be reused
/// while it is here. It is only replaced at a flush, never in the dict
/// watcher callback: releasing a code object there could run Python code.
struct StackMemo {
    /// [`monitor::scope_generation`] when resolved: which frames are in
    /// scope decides where the stack starts.
    scope: u64,
    raw: Vec<(usize, i32)>,
    _codes: Vec<Py<PyAny>>,
    stack: Arc<[FrameRef]>,
    at: Option<(usize, u32)>,
}

thread_local! {
    static MEMO: std::cell::RefCell<Option<StackMemo>> = const { std::cell::RefCell::new(None) };
    /// The walk of the current event's stack (kept for its capacity).
    static WALKED: std::cell::RefCell<Vec<(usize, i32)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The calling thread's stack for a queued event. Runs no Python code and
/// releases no reference (it is called inside the dict watcher callback).
fn capture_frames(py: Python<'_>) -> Frames {
    WALKED.with(|w| {
        let Ok(mut walked) = w.try_borrow_mut() else {
            return Frames::Raw(Vec::new());
        };
        walked.clear();
        crate::pyframes::walk(py, &mut |code, lasti| {
            walked.push((code, lasti));
            true
        });
        let known = MEMO.with(|m| {
            let m = m.try_borrow().ok()?;
            let m = m.as_ref()?;
            (m.scope == monitor::scope_generation() && m.raw == *walked).then(|| {
                // SAFETY: GIL held; the memo holds the code object.
                let at = m.at.map(|(c, l)| {
                    (
                        unsafe { Bound::from_borrowed_ptr(py, c as *mut ffi::PyObject) }.unbind(),
                        l,
                    )
                });
                Frames::Resolved(m.stack.clone(), at)
            })
        });
        known.unwrap_or_else(|| {
            Frames::Raw(
                walked
                    .iter()
                    .map(|&(code, lasti)| {
                        // SAFETY: the code object of a frame that is still
                        // running (GIL held, no Python code ran since the walk).
                        (
                            unsafe { Bound::from_borrowed_ptr(py, code as *mut ffi::PyObject) }.unbind(),
                            lasti,
                        )
                    })
                    .collect(),
            )
        })
    })
}

/// The resolved stack of a queued event and its attributed code and line;
/// a raw stack queued by this thread becomes its [`StackMemo`].
fn resolve_frames(py: Python<'_>, frames: &Frames, mine: bool) -> (Arc<[FrameRef]>, Option<CodeLine>) {
    let raw = match frames {
        Frames::Resolved(stack, at) => {
            return (stack.clone(), at.as_ref().map(|(c, l)| (c.clone_ref(py), *l)))
        }
        Frames::Raw(raw) => raw,
    };
    let lined: Vec<(Py<PyAny>, u32)> = raw
        .iter()
        .map(|(code, lasti)| (code.clone_ref(py), api::line_at(code.bind(py), *lasti)))
        .collect();
    let scope = monitor::scope_generation();
    let (stack, at) = resolve_stack(py, &lined);
    if mine {
        let memo = StackMemo {
            scope,
            raw: raw.iter().map(|(c, o)| (c.as_ptr() as usize, *o)).collect(),
            _codes: lined.into_iter().map(|(c, _)| c).collect(),
            stack: stack.clone(),
            at: at.as_ref().map(|(c, l)| (c.as_ptr() as usize, *l)),
        };
        // The memo replaced is released after the cell is let go: that may
        // run Python code (a code object's last reference).
        let old = MEMO.with(|m| m.try_borrow_mut().ok().map(|mut m| m.replace(memo)));
        drop(old);
    }
    (stack, at)
}

fn thread_ident() -> u64 {
    // SAFETY: no preconditions.
    (unsafe { ffi::PyThread_get_thread_ident() }) as u64
}

/// The dict watcher callback. It runs inside the mutation, before it
/// happens: it runs no Python code, only takes references.
unsafe extern "C" fn on_dict_event(
    event: c_int,
    dict: *mut ffi::PyObject,
    key: *mut ffi::PyObject,
    new: *mut ffi::PyObject,
) -> c_int {
    if dict as usize == PROBE_DICT.load(Ordering::Relaxed) {
        PROBE_HITS.fetch_add(1, Ordering::Relaxed);
        return 0;
    }
    if GUARD.with(|g| g.get()) {
        return 0;
    }
    let nodes = {
        let mut g = lock(&DICTS);
        let Some(map) = g.as_mut() else { return 0 };
        if event == DEALLOCATED {
            map.remove(&(dict as usize));
            return 0;
        }
        match map.get(&(dict as usize)) {
            Some(v) => v.clone(),
            None => return 0,
        }
    };
    // SAFETY: dict watcher callbacks are called with the GIL held.
    let py = unsafe { Python::assume_attached() };
    let saved = take_error(py);
    let own = |p: *mut ffi::PyObject| -> Option<Py<PyAny>> {
        // SAFETY: a borrowed reference the callback was given (or NULL).
        (!p.is_null()).then(|| unsafe { Bound::from_borrowed_ptr(py, p) }.unbind())
    };
    let what = match event {
        ADDED => Some((own(key), None, own(new), None)),
        MODIFIED | DELETED => {
            // SAFETY: GIL held; a borrowed reference or NULL.
            let old = unsafe { ffi::PyDict_GetItemWithError(dict, key) };
            let old = own(old);
            let _ = take_error(py);
            Some((own(key), old, own(new), None))
        }
        // SAFETY: GIL held; `dict` (CLEARED) and `key` (CLONED: the source)
        // are dicts; PyDict_Items returns a new list of pairs, no hashing.
        CLEARED => Some((None, None, None, unsafe { own_new(py, ffi::PyDict_Items(dict)) })),
        CLONED => Some((None, None, None, unsafe { own_new(py, ffi::PyDict_Items(key)) })),
        _ => None,
    };
    if let Some((key, old, new, items)) = what {
        push_pending(Pending {
            what: PendingWhat::Dict {
                nodes,
                event,
                key,
                old,
                new,
                items,
            },
            frames: capture_frames(py),
            tid: tid(),
            ident: thread_ident(),
        });
    }
    let _ = take_error(py);
    if let Some(e) = saved {
        e.restore(py);
    }
    0
}

/// The error set, if any, taken (asking first: most calls find none).
fn take_error(py: Python<'_>) -> Option<PyErr> {
    // SAFETY: GIL held.
    if unsafe { ffi::PyErr_Occurred() }.is_null() {
        return None;
    }
    PyErr::take(py)
}

/// A new reference, or `None` (and the error cleared) for NULL.
unsafe fn own_new(py: Python<'_>, p: *mut ffi::PyObject) -> Option<Py<PyAny>> {
    if p.is_null() {
        let _ = PyErr::take(py);
        return None;
    }
    // SAFETY: the caller passes a new reference.
    Some(unsafe { Bound::from_owned_ptr(py, p) }.unbind())
}

// --- building nodes -------------------------------------------------------------

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

/// The instance dict of `obj` (materialised if CPython keeps it inline),
/// without running `__getattribute__`; `None` if it has none.
fn instance_dict<'py>(obj: &Bound<'py, PyAny>) -> Option<Bound<'py, PyAny>> {
    let py = obj.py();
    // SAFETY: GIL held; a new reference or NULL with an error set.
    let d = unsafe { ffi::PyObject_GenericGetDict(obj.as_ptr(), std::ptr::null_mut()) };
    if d.is_null() {
        let _ = PyErr::take(py);
        return None;
    }
    // SAFETY: a new reference.
    let d = unsafe { Bound::from_owned_ptr(py, d) };
    d.is_exact_instance_of::<PyDict>().then_some(d)
}

/// Whether node `n` still holds exactly what its shadow says (the same
/// objects, in the same order), read in place: no snapshot is built, no
/// reference taken. `None` when it cannot tell this way (a set, slots, a
/// list being sorted, a node whose object is gone): take a snapshot then.
/// Runs no Python code.
fn matches_shadow(py: Python<'_>, n: &Node) -> Option<bool> {
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

fn snapshot(py: Python<'_>, n: &Node) -> Option<Shadow> {
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

/// True if `v` can get nodes of its own below a watched object: a list,
/// dict or set, or an instance of a class defined in Python.
fn nested(v: &Bound<'_, PyAny>) -> bool {
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

/// Which dicts the dict watcher reports (the others are compared).
#[derive(Debug, Clone, Copy)]
struct How {
    dicts: bool,
    attrs: bool,
}

/// How dicts are watched in this interpreter.
fn how(py: Python<'_>) -> PyResult<How> {
    Ok(match watcher_id(py)? {
        Some(id) => How {
            dicts: true,
            attrs: attrs_notify(py, id),
        },
        None => How {
            dicts: false,
            attrs: false,
        },
    })
}

/// Builds the nodes for `obj` (and, depth allowing, for what it holds);
/// returns them with their ids. `hold` overrides how the first nodes hold
/// `obj` (the root's weak reference). Runs Python code (the slots helper):
/// never called with a lock held.
#[allow(clippy::too_many_arguments)]
fn build(
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
fn insert_nodes(objs: &mut Objects, nodes: Vec<(u32, Node)>) {
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
fn remove_subtree(objs: &mut Objects, id: u32, trash: &mut Vec<Node>) {
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

// --- reprs and keys --------------------------------------------------------------

/// `v` in decimal, as `repr(int)` writes it.
fn decimal(v: i64) -> String {
    let mut buf = [0u8; 20];
    let digits = crate::kernel::decimal_digits(v.unsigned_abs(), &mut buf);
    let mut out = String::with_capacity(digits.len() + 1);
    if v < 0 {
        out.push('-');
    }
    // The bytes are ASCII digits.
    out.extend(digits.iter().map(|&d| d as char));
    out
}

/// `repr(value)`, at most `limit` characters; never fails.
fn bounded_repr(py: Python<'_>, value: &Bound<'_, PyAny>, limit: usize) -> String {
    // An int that fits in 64 bits, the most common value: written here,
    // without a string object in between.
    // SAFETY: GIL held; an exact type check, then a conversion that cannot
    // fail for an exact int except by overflow (reported, not raised).
    let small = unsafe {
        let p = value.as_ptr();
        let mut overflow: c_int = 0;
        (ffi::PyLong_CheckExact(p) != 0)
            .then(|| ffi::PyLong_AsLongLongAndOverflow(p, &mut overflow))
            .filter(|_| overflow == 0 && ffi::PyErr_Occurred().is_null())
    };
    if let Some(v) = small {
        let text = decimal(v);
        if text.len() <= limit {
            return text;
        }
    }
    // The common scalars: their repr is C code that cannot fail, made here
    // without a call into Python (cut the same way as `_bounded_repr`).
    // SAFETY: GIL held; exact type checks.
    let scalar = unsafe {
        let p = value.as_ptr();
        ffi::PyLong_CheckExact(p) != 0
            || ffi::PyFloat_CheckExact(p) != 0
            || ffi::PyBool_Check(p) != 0
            || p == ffi::Py_None()
            || (ffi::PyUnicode_CheckExact(p) != 0 && ffi::PyUnicode_GetLength(p) < limit as ffi::Py_ssize_t)
    };
    if scalar {
        if let Ok(r) = value.repr() {
            if let Ok(text) = r.to_str() {
                // Bytes bound characters: count them only when it matters.
                if text.len() <= limit || text.chars().count() <= limit {
                    return text.to_owned();
                }
            }
        }
    }
    guarded(|| {
        obj_hooks()
            .and_then(|h| h.repr.bind(py).call1((value, limit))?.extract())
            .unwrap_or_else(|e| format!("<repr failed: {}>", e.get_type(py)))
    })
}

/// A value of a change, before its repr is made.
enum Val {
    None,
    Obj(Py<PyAny>),
    ListOf(Vec<Py<PyAny>>),
    SetOf(Vec<Py<PyAny>>),
    /// `(key, value)` pairs, shown as a dict.
    DictOf(Vec<(Py<PyAny>, Py<PyAny>)>),
    Text(&'static str),
}

impl Val {
    fn render(&self, py: Python<'_>, limit: usize) -> Option<String> {
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
enum Suffix {
    None,
    Attr(String),
    Item(Py<PyAny>),
    Index(usize),
    Slice(usize, usize),
}

/// A change found, before reprs are made.
struct Found {
    node: u32,
    kind: Kind,
    suffix: Suffix,
    old: Val,
    new: Val,
}

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

// --- line hints --------------------------------------------------------------------

/// The method names and operators a line uses, looked up on demand.
struct Hint {
    at: Option<(Py<PyAny>, u32)>,
    /// A line known by code address only, looked up on first use.
    last: Option<(usize, u32)>,
    ops: Option<HashSet<String>>,
}

impl Hint {
    fn new(at: Option<(Py<PyAny>, u32)>) -> Hint {
        Hint {
            at,
            last: None,
            ops: None,
        }
    }

    fn at_last(last: (usize, u32)) -> Hint {
        Hint {
            at: None,
            last: Some(last),
            ops: None,
        }
    }

    fn has(&mut self, py: Python<'_>, names: &[&str]) -> bool {
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

/// The code object at address `code` (known to the monitor) and `line`.
fn code_at(py: Python<'_>, (code, line): (usize, u32)) -> Option<(Py<PyAny>, u32)> {
    let g = monitor::CODES.lock().unwrap_or_else(|p| p.into_inner());
    g.as_ref()?.get(&code).map(|i| (i.code.clone_ref(py), line))
}

// --- diffs ---------------------------------------------------------------------------

fn same(a: &Py<PyAny>, b: &Py<PyAny>) -> bool {
    a.as_ptr() == b.as_ptr()
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
fn list_changes(
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
    let whole = |kind| Found {
        node,
        kind,
        suffix: Suffix::None,
        old: Val::ListOf(old.iter().map(|o| o.clone_ref(py)).collect()),
        new: Val::ListOf(new.iter().map(|o| o.clone_ref(py)).collect()),
    };
    if m == 0 && (n > 1 || hint.has(py, &["clear"])) {
        return vec![Found {
            new: Val::Text("[]"),
            ..whole(Kind::Clear)
        }];
    }
    let refs = |s: &[Py<PyAny>]| -> Vec<Py<PyAny>> { s.iter().map(|o| o.clone_ref(py)).collect() };
    let p = old.iter().zip(new).take_while(|(a, b)| same(a, b)).count();
    let s = old[p..]
        .iter()
        .rev()
        .zip(new[p..].iter().rev())
        .take_while(|(a, b)| same(a, b))
        .count();
    if n == m {
        let mut a: Vec<usize> = old.iter().map(|o| o.as_ptr() as usize).collect();
        let mut b: Vec<usize> = new.iter().map(|o| o.as_ptr() as usize).collect();
        a.sort_unstable();
        b.sort_unstable();
        if a == b {
            let reversed = old.iter().zip(new.iter().rev()).all(|(x, y)| same(x, y));
            if hint.has(py, &["sort"]) {
                return vec![whole(Kind::Sort)];
            }
            if reversed && !hint.has(py, &["[]="]) {
                return vec![whole(Kind::Reverse)];
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
                    old: Val::ListOf(refs(&old[start..i])),
                    new: Val::ListOf(refs(&new[start..i])),
                }
            });
        }
        return out;
    }
    if m > n && p + s >= n {
        // Pure insertion of k items at p.
        let k = m - n;
        let at_end = p == n;
        let extend = hint.has(py, &["extend", "+="]);
        return vec![match (k, at_end) {
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
                new: Val::ListOf(refs(&new[p..])),
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
                new: Val::ListOf(refs(&new[p..p + k])),
            },
        }];
    }
    if m < n && p + s >= m {
        // Pure removal of k items at p.
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
            return vec![Found {
                node,
                kind,
                suffix: Suffix::Index(p),
                old: Val::Obj(old[p].clone_ref(py)),
                new: Val::None,
            }];
        }
        return vec![Found {
            node,
            kind: Kind::DelItem,
            suffix: Suffix::Slice(p, p + k),
            old: Val::ListOf(refs(&old[p..p + k])),
            new: Val::None,
        }];
    }
    vec![Found {
        node,
        kind: Kind::SetItem,
        suffix: Suffix::Slice(p, n - s),
        old: Val::ListOf(refs(&old[p..n - s])),
        new: Val::ListOf(refs(&new[p..m - s])),
    }]
}

/// The changes between two states of a set, by item identity: emptied
/// (of more than one item, or by a line that calls `clear`) -> `clear`; items added -> one `add` (one item) or `update` (several, or a
/// line that calls `update` or uses `|=`); each item removed -> `discard`
/// (`remove` or `pop` if the line calls them).
fn set_changes(
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
fn dict_kind(py: Python<'_>, shape: Shape, deleted: bool, hint: &mut Hint) -> Kind {
    match (shape, deleted) {
        (Shape::Attrs | Shape::Slots, false) => Kind::SetAttr,
        (Shape::Attrs | Shape::Slots, true) => Kind::DelAttr,
        (_, false) if hint.has(py, &["update", "|="]) => Kind::Update,
        (_, false) => Kind::SetItem,
        (_, true) if hint.has(py, &["pop", "popitem"]) => Kind::Pop,
        (_, true) => Kind::DelItem,
    }
}

fn item_suffix(py: Python<'_>, shape: Shape, key: &Py<PyAny>) -> Suffix {
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
fn dict_changes(
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

fn slot_changes(
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

// --- the flush ----------------------------------------------------------------------

/// A code object and a line in it.
type CodeLine = (Py<PyAny>, u32);

/// Resolves a raw stack: the frames from the innermost in-scope one out
/// (all of them when none is in scope), and that frame's code and line.
fn resolve_stack(py: Python<'_>, frames: &[(Py<PyAny>, u32)]) -> (Arc<[FrameRef]>, Option<CodeLine>) {
    let bound: Vec<(&Bound<'_, PyAny>, u32)> = frames.iter().map(|(c, l)| (c.bind(py), *l)).collect();
    let refs = api::frame_refs(py, &bound);
    let first = refs.iter().position(|(_, _, in_scope)| *in_scope);
    let i = first.unwrap_or(0);
    let at = first.map(|i| (frames[i].0.clone_ref(py), frames[i].1));
    (
        refs.into_iter()
            .skip(i)
            .map(|(_, f, _)| f)
            .collect::<Vec<_>>()
            .into(),
        at,
    )
}

/// What the flush learned about one node, copied out under the lock.
struct NodeView {
    id: u32,
    shape: Shape,
    slot_names: Vec<String>,
}

fn ready(
    objs: &Objects,
    f: Found,
    stack: &Arc<[FrameRef]>,
    tid: u64,
    thread_name: &Arc<str>,
) -> Option<Ready> {
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
        stack: stack.clone(),
        tid,
        thread_name: thread_name.clone(),
    })
}

/// Reports what changed in watched objects: queued dict watcher events
/// first, then compared nodes (attributed to `last`, the line this thread
/// ran before), then collected objects. Called at every line boundary of
/// in-scope code while an object is watched, and by `check`, `unwatch`,
/// `stop` and at exit.
pub fn flush(py: Python<'_>, last: (usize, u32)) {
    if !ANY.load(Ordering::Relaxed) {
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

fn flush_attached(py: Python<'_>, last: (usize, u32)) {
    let mut out: Vec<Ready> = Vec::new();
    let mut changed: Vec<u32> = Vec::new();
    let mut trash_nodes: Vec<Node> = Vec::new();
    let mut trash_watches: Vec<ObjWatch> = Vec::new();
    let my_tid = tid();

    // 1. Queued dict watcher events and collections.
    // Swapped with this thread's spare queue: both keep their capacity, so
    // a store a line queues no allocation.
    let mut pending = SPARE.with(|s| s.take());
    std::mem::swap(&mut pending, &mut *lock(&PENDING));
    PENDING_N.store(0, Ordering::Relaxed);
    let mut my_name: Option<Arc<str>> = None;
    for p in &pending {
        let (stack, at) = resolve_frames(py, &p.frames, p.tid == my_tid);
        let tname: Arc<str> = if p.tid == my_tid {
            my_name.get_or_insert_with(|| api::thread_name(py)).clone()
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
        };
        let mut hint = Hint::new(at);
        match &p.what {
            PendingWhat::Dict {
                nodes,
                event,
                key,
                old,
                new,
                items,
            } => {
                for &id in nodes.iter() {
                    let Some(shape) = with_objs(|o| o.nodes.get(&id).map(|n| n.shape)) else {
                        continue;
                    };
                    let clone =
                        |v: &Option<Py<PyAny>>| v.as_ref().map_or(Val::None, |v| Val::Obj(v.clone_ref(py)));
                    let pairs = || -> Vec<(Py<PyAny>, Py<PyAny>)> {
                        items
                            .as_ref()
                            .and_then(|l| l.bind(py).extract::<Vec<(Py<PyAny>, Py<PyAny>)>>().ok())
                            .unwrap_or_default()
                    };
                    let found: Vec<Found> = match *event {
                        ADDED | MODIFIED | DELETED => {
                            // One change (every store): no list for it.
                            let Some(k) = key else { continue };
                            let f = Found {
                                node: id,
                                kind: dict_kind(py, shape, *event == DELETED, &mut hint),
                                suffix: item_suffix(py, shape, k),
                                old: clone(old),
                                new: clone(new),
                            };
                            if may_hold_children(py, &f) {
                                changed.push(id);
                            }
                            with_objs(|o| out.extend(ready(o, f, &stack, p.tid, &tname)));
                            continue;
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
                        changed.push(id);
                    }
                    with_objs(|o| {
                        out.extend(
                            found
                                .into_iter()
                                .filter_map(|f| ready(o, f, &stack, p.tid, &tname)),
                        );
                    });
                }
            }
            PendingWhat::Collected { watch } => {
                let r = with_objs(|o| {
                    let i = o.watches.iter().position(|w| w.id == *watch)?;
                    let w = o.watches.remove(i);
                    let roots: Vec<u32> = o
                        .nodes
                        .iter()
                        .filter(|(_, n)| n.watch == *watch)
                        .map(|(k, _)| *k)
                        .collect();
                    for id in roots {
                        remove_subtree(o, id, &mut trash_nodes);
                    }
                    refresh_flags(o);
                    let r = collected(&w, stack.clone(), p.tid, &tname);
                    trash_watches.push(w);
                    Some(r)
                });
                out.extend(r);
            }
        }
    }

    // 2. Compared nodes, and strongly held roots only memwatch still holds.
    if COMPARING.load(Ordering::Relaxed) {
        // Where and who, worked out only when something changed: most
        // boundaries find nothing.
        let mut hint = Hint::at_last(last);
        let here = std::cell::OnceCell::new();
        let ctx = || here.get_or_init(|| (api::attributed_stack(py, last), api::thread_name(py)));
        let work: Vec<(NodeView, Option<Shadow>, Option<Shadow>)> = {
            // Snapshots read objects (no Python code): done under the lock,
            // the old shadows taken out to diff and drop afterwards.
            let mut g = lock(&OBJS);
            let o = g.get_or_insert_with(Objects::default);
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
        };
        for (view, before, now) in work {
            let (Some(before), Some(now)) = (before, now) else {
                continue;
            };
            let found = match (&before, &now) {
                (Shadow::Items(a), Shadow::Items(b)) => {
                    dict_changes(py, view.id, view.shape, a, b, &mut hint)
                }
                (Shadow::Slots(a), Shadow::Slots(b)) => slot_changes(py, view.id, &view.slot_names, a, b),
                (Shadow::Seq(a), Shadow::Seq(b)) if view.shape == Shape::List => {
                    list_changes(py, view.id, a, b, &mut hint)
                }
                (Shadow::Seq(a), Shadow::Seq(b)) => set_changes(py, view.id, a, b, &mut hint),
                _ => Vec::new(),
            };
            if found.iter().any(|f| may_hold_children(py, f)) {
                changed.push(view.id);
            }
            if !found.is_empty() {
                let (stack, tname) = ctx();
                with_objs(|o| {
                    out.extend(
                        found
                            .into_iter()
                            .filter_map(|f| ready(o, f, stack, my_tid, tname)),
                    );
                });
            }
        }
        let gone = with_objs(|o| {
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
        });
        for watch in gone {
            // Python code (the stack's scope) runs here, never under the lock.
            let (stack, tname) = ctx();
            let r = with_objs(|o| {
                let i = o.watches.iter().position(|w| w.id == watch)?;
                let w = o.watches.remove(i);
                let roots: Vec<u32> = o
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.watch == watch)
                    .map(|(k, _)| *k)
                    .collect();
                for id in roots {
                    remove_subtree(o, id, &mut trash_nodes);
                }
                refresh_flags(o);
                let r = collected(&w, stack.clone(), my_tid, tname);
                trash_watches.push(w);
                Some(r)
            });
            out.extend(r);
        }
    }

    // 3. Follow rebinding below the nodes that changed.
    changed.sort_unstable();
    changed.dedup();
    for id in changed {
        if let Err(e) = resync(py, id, &mut trash_nodes) {
            e.write_unraisable(py, None);
        }
    }
    // Releasing the references may run Python code (which may queue more):
    // the queue is out of the cell until it is empty again.
    pending.clear();
    SPARE.with(|s| s.replace(pending));
    drop(trash_nodes);
    drop(trash_watches);

    // 4. Reprs, then delivery.
    for r in out {
        let key = {
            use std::fmt::Write;
            let mut k = r.path;
            let _ = match &r.suffix {
                Suffix::None => Ok(()),
                Suffix::Attr(a) => {
                    k.reserve_exact(1 + a.len());
                    k.push('.');
                    k.push_str(a);
                    Ok(())
                }
                Suffix::Item(o) => write!(k, "[{}]", bounded_repr(py, o.bind(py), r.limit)),
                Suffix::Index(i) => write!(k, "[{i}]"),
                Suffix::Slice(a, b) => write!(k, "[{a}:{b}]"),
            };
            (!k.is_empty()).then_some(k)
        };
        let info = ObjectInfo {
            kind: r.kind,
            key,
            old: r.old.render(py, r.limit),
            new: r.new.render(py, r.limit),
        };
        api::emit_object(
            py,
            Change {
                seq: 0,
                time_ns: crate::sink::unix_ns(),
                pid: crate::change::live_pid(),
                rank: crate::change::live_rank(),
                tag: r.tag,
                variable: r.variable,
                region_start: 0,
                ranges: Vec::new(),
                layout: Layout::none(),
                stack: r.stack,
                thread_id: r.tid,
                thread_name: r.thread_name,
                object: Some(info),
                op: None,
            },
        );
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

/// True if two shadows hold the same items (by identity) in the same order.
fn same_shadow(a: &Shadow, b: &Shadow) -> bool {
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

fn clone_shadow(py: Python<'_>, s: &Shadow) -> Shadow {
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

fn collected(w: &ObjWatch, stack: Arc<[FrameRef]>, tid: u64, thread_name: &Arc<str>) -> Ready {
    Ready {
        tag: w.tag.clone(),
        variable: w.variable.clone(),
        limit: w.repr_limit,
        path: String::new(),
        kind: Kind::Collected,
        suffix: Suffix::None,
        old: Val::None,
        new: Val::None,
        stack,
        tid,
        thread_name: thread_name.clone(),
    }
}

/// Makes node `id`'s children match what it holds now: keeps children whose
/// object is still there (updating their suffix), drops the others, builds
/// nodes for new containers.
fn resync(py: Python<'_>, id: u32, trash: &mut Vec<Node>) -> PyResult<()> {
    // Read the current contents; children are built without the lock.
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
    let Some((shadow, slots, obj, shape, depth_left, watch)) = current else {
        return Ok(());
    };
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
    let wanted = child_candidates(py, &probe, &shadow);
    let missing: Vec<(String, Bound<'_, PyAny>)> = with_objs(|o| {
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
    });
    trash.push(probe);
    let how = how(py)?;
    let mut built = Vec::new();
    for (suffix, child) in &missing {
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

fn stop_monitor_if_idle(py: Python<'_>) {
    if !any() && !crate::vars::any() && api::_regions().is_empty() {
        if let Err(e) = monitor::stop(py) {
            e.write_unraisable(py, None);
        }
    }
}

// --- the Python API ------------------------------------------------------------------

/// A watched Python object, as `watch_object` returns it.
#[pyclass(module = "memwatch", frozen, name = "ObjectWatchHandle")]
pub struct ObjectWatchHandle {
    #[pyo3(get)]
    pub watch: u32,
    #[pyo3(get)]
    pub tag: String,
    #[pyo3(get)]
    pub variable: Option<String>,
    #[pyo3(get)]
    pub depth: u32,
    #[pyo3(get)]
    pub repr_limit: usize,
    /// How dicts are watched: `"dict-watcher"` (CPython 3.12: dicts and
    /// instance dicts), `"dict-watcher+compare"` (3.13.0: dicts through the
    /// watcher, instance dicts compared at line boundaries) or `"compare"`
    /// (3.11). Lists, sets and `__slots__` are always compared.
    #[pyo3(get)]
    pub mechanism: &'static str,
}

#[pymethods]
impl ObjectWatchHandle {
    fn __repr__(&self) -> String {
        format!(
            "<memwatch.ObjectWatchHandle tag={:?} depth={} mechanism={}>",
            self.tag, self.depth, self.mechanism
        )
    }
}

/// Starts watching a Python object. Called by `memwatch.watch_object`
/// after it resolved the arguments; see its docstring.
#[pyfunction]
pub fn _watch_object(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    tag: String,
    variable: Option<String>,
    depth: u32,
    repr_limit: usize,
) -> PyResult<ObjectWatchHandle> {
    if tag.is_empty() {
        return Err(PyValueError::new_err("name must not be empty"));
    }
    let tname = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    if let Ok(cls) = obj.cast::<PyType>() {
        let name = cls.name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        return Err(PyTypeError::new_err(format!(
            "cannot watch the class {name}: watch_object() watches instances, dicts, lists and sets"
        )));
    }
    let taken =
        with_objs(|o| o.watches.iter().any(|w| *w.tag == *tag)) || api::_regions().iter().any(|r| r.1 == tag);
    if taken {
        return Err(PyValueError::new_err(format!(
            "'{tag}' is already watched; pass another name= or unwatch it first"
        )));
    }
    let how = how(py)?;
    // Report what changed before, so this watch's baseline is now.
    flush(py, LAST.with(|l| l.get()));
    let watch = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    // SAFETY: GIL held; reading the type's weakref support.
    let weakrefable = unsafe { (*ffi::Py_TYPE(obj.as_ptr())).tp_weaklistoffset } != 0;
    let weakref: Option<Py<PyAny>> = if weakrefable {
        let cb = PyCFunction::new_closure(
            py,
            Some(c"memwatch_collected"),
            None,
            move |args: &Bound<'_, PyTuple>, _kw: Option<&Bound<'_, PyDict>>| {
                let py = args.py();
                push_pending(Pending {
                    what: PendingWhat::Collected { watch },
                    frames: capture_frames(py),
                    tid: tid(),
                    ident: thread_ident(),
                });
            },
        )?;
        Some(PyWeakrefReference::new_with(obj, cb)?.into_any().unbind())
    } else {
        None
    };
    let mut nodes = Vec::new();
    build(py, obj, "", depth, watch, None, weakref.as_ref(), how, &mut nodes)?;
    if nodes.is_empty() {
        let a = if tname.starts_with(['a', 'e', 'i', 'o', 'u', 'A', 'E', 'I', 'O', 'U']) {
            "an"
        } else {
            "a"
        };
        return Err(PyTypeError::new_err(format!(
            "cannot watch {a} {tname}: watch_object() watches attributes (__dict__ or __slots__) and \
             the items of a dict, list or set, and {a} {tname} has none that can change \
             (for a buffer, use watch())"
        )));
    }
    // Learn the calling code objects, so line events reach them once on.
    let here = api::innermost_in_scope(py, false);
    with_objs(|o| {
        o.watches.push(ObjWatch {
            id: watch,
            tag: tag.as_str().into(),
            variable: variable.as_deref().map(Into::into),
            repr_limit,
            root_id: obj.as_ptr() as usize,
            _weakref: weakref,
            strong_root: !weakrefable,
        });
        insert_nodes(o, nodes);
    });
    if let Err(e) = monitor::start(py).and_then(|()| monitor::restart_disabled(py)) {
        let _ = unwatch_object(py, watch);
        return Err(e);
    }
    crate::monitor::set_last(here);
    Ok(ObjectWatchHandle {
        watch,
        tag,
        variable,
        depth,
        repr_limit,
        mechanism: match (how.dicts, how.attrs) {
            (true, true) => "dict-watcher",
            (true, false) => "dict-watcher+compare",
            _ => "compare",
        },
    })
}

/// Ends watch `watch` after reporting its pending changes; false if it was
/// not watched (it may end during that report, when it was collected).
fn unwatch_object(py: Python<'_>, watch: u32) -> bool {
    if !with_objs(|o| o.watches.iter().any(|w| w.id == watch)) {
        return false;
    }
    flush(py, LAST.with(|l| l.get()));
    let mut trash = Vec::new();
    let w = with_objs(|o| {
        let i = o.watches.iter().position(|w| w.id == watch)?;
        let w = o.watches.remove(i);
        let ids: Vec<u32> = o
            .nodes
            .iter()
            .filter(|(_, n)| n.watch == watch)
            .map(|(k, _)| *k)
            .collect();
        for id in ids {
            remove_subtree(o, id, &mut trash);
        }
        refresh_flags(o);
        Some(w)
    });
    drop(trash);
    drop(w);
    stop_monitor_if_idle(py);
    true
}

/// Stops watching object watch `watch` (after reporting its last changes).
#[pyfunction]
pub fn _unwatch_object(py: Python<'_>, watch: u32) -> PyResult<()> {
    if unwatch_object(py, watch) {
        Ok(())
    } else {
        Err(crate::errors::NotWatchedError::new_err(format!(
            "object watch {watch} is not watched"
        )))
    }
}

/// `(watch, tag, id of the watched object)` for every object watch.
#[pyfunction]
pub fn _object_watches() -> Vec<(u32, String, usize)> {
    with_objs(|o| {
        o.watches
            .iter()
            .map(|w| (w.id, w.tag.to_string(), w.root_id))
            .collect()
    })
}

/// At exit: report what is pending, end every object watch, give the dict
/// watcher id back.
pub fn shutdown(py: Python<'_>, last: (usize, u32)) {
    flush(py, last);
    let ids: Vec<u32> = with_objs(|o| o.watches.iter().map(|w| w.id).collect());
    for id in ids {
        unwatch_object(py, id);
    }
    let id = WATCHER.swap(-1, Ordering::Relaxed);
    if let (Some(api), true) = (dict_api(), id >= 0) {
        // SAFETY: GIL held; every dict we watched was unwatched above.
        if unsafe { (api.clear_watcher)(id) } < 0 {
            let _ = PyErr::take(py);
        }
    }
}

/// In a fork child: forget every object watch (the parent keeps them).
#[pyfunction]
pub fn _objects_after_fork_child(py: Python<'_>) {
    TID.with(|t| t.set(0));
    let ids: Vec<u32> = with_objs(|o| o.watches.iter().map(|w| w.id).collect());
    let taken = std::mem::take(&mut *lock(&PENDING));
    PENDING_N.store(0, Ordering::Relaxed);
    drop(taken);
    for id in ids {
        let mut trash = Vec::new();
        with_objs(|o| {
            o.watches.retain(|w| w.id != id);
            let nodes: Vec<u32> = o
                .nodes
                .iter()
                .filter(|(_, n)| n.watch == id)
                .map(|(k, _)| *k)
                .collect();
            for n in nodes {
                remove_subtree(o, n, &mut trash);
            }
            refresh_flags(o);
        });
        drop(trash);
    }
    stop_monitor_if_idle(py);
}

#[cfg(test)]
mod tests {
    use super::decimal;

    #[test]
    fn decimal_writes_ints_as_repr_does() {
        for v in [
            0,
            7,
            -7,
            10,
            99,
            -100,
            123_456_789,
            i64::MAX,
            i64::MIN,
            i64::MIN + 1,
        ] {
            assert_eq!(decimal(v), v.to_string());
        }
    }
}
