//! What object watching uses of CPython and of `memwatch._objects`: the
//! Python helpers ([`ObjHooks`], received by [`_set_object_hooks`]), the
//! dict watcher API found at run time ([`DictApi`]), the process's dict
//! watcher id ([`WATCHER`]) and its callback ([`on_dict_event`]), the probe
//! that tells whether attribute stores reach it ([`attrs_notify`]), and so
//! how dicts are watched in this interpreter ([`How`]).
//!
//! Locking: the callback takes `DICTS` and then `PENDING` (`state.rs`), one
//! at a time, for a lookup and a push. Everything else here takes no lock.
//!
//! Signal context: nothing here runs in a signal handler. [`on_dict_event`]
//! runs inside a dict mutation, before it happens, where running Python code
//! could corrupt the dict: it runs no Python code and releases no reference
//! (it only takes references and the raw stack), and it leaves the error
//! indicator as it found it. The helpers of [`ObjHooks`] run Python code
//! and are called only at safe points (building nodes, the probe, reprs,
//! the flush), never by the callback.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::OnceLock;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::frames::capture_frames;
use super::state::{lock, push_pending, thread_ident, tid, DictEvent, Pending, PendingWhat, DICTS};
use crate::model::errors::MemwatchError;
use crate::runtime::thread::GUARD;

// --- hooks from memwatch._objects ---------------------------------------------

/// Python helpers the flush calls (never the dict watcher callback).
pub(super) struct ObjHooks {
    /// `slots_of(obj) -> list[(name, member_descriptor)]`.
    pub(super) slots_of: Py<PyAny>,
    /// `line_ops(code, line) -> frozenset[str]`: method names and operators
    /// the line uses.
    pub(super) line_ops: Py<PyAny>,
    /// `bounded_repr(value, limit) -> str`, never raising.
    pub(super) repr: Py<PyAny>,
    /// `thread_name(ident) -> str | None`.
    pub(super) thread_name: Py<PyAny>,
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

pub(super) fn obj_hooks() -> PyResult<&'static ObjHooks> {
    OBJ_HOOKS
        .get()
        .ok_or_else(|| MemwatchError::new_err("memwatch._objects was not imported"))
}

// --- the dict watcher API (CPython 3.12+), found at run time -------------------

// PyDict_WatchEvent, the same on 3.12 and 3.13.
pub(super) const ADDED: c_int = 0;
pub(super) const MODIFIED: c_int = 1;
pub(super) const DELETED: c_int = 2;
pub(super) const CLONED: c_int = 3;
pub(super) const CLEARED: c_int = 4;
const DEALLOCATED: c_int = 5;

type WatchCallback =
    unsafe extern "C" fn(c_int, *mut ffi::PyObject, *mut ffi::PyObject, *mut ffi::PyObject) -> c_int;

pub(super) struct DictApi {
    add_watcher: unsafe extern "C" fn(WatchCallback) -> c_int,
    pub(super) clear_watcher: unsafe extern "C" fn(c_int) -> c_int,
    pub(super) watch: unsafe extern "C" fn(c_int, *mut ffi::PyObject) -> c_int,
    pub(super) unwatch: unsafe extern "C" fn(c_int, *mut ffi::PyObject) -> c_int,
}

/// The dict watcher functions, or `None` before CPython 3.12. Looked up by
/// name so that one build of this module loads on 3.11 too.
pub(super) fn dict_api() -> Option<&'static DictApi> {
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
pub(super) static WATCHER: AtomicI32 = AtomicI32::new(-1);

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

/// The instance dict of `obj` (materialised if CPython keeps it inline),
/// without running `__getattribute__`; `None` if it has none.
pub(super) fn instance_dict<'py>(obj: &Bound<'py, PyAny>) -> Option<Bound<'py, PyAny>> {
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

/// Which dicts the dict watcher reports (the others are compared).
#[derive(Debug, Clone, Copy)]
pub(super) struct How {
    pub(super) dicts: bool,
    pub(super) attrs: bool,
}

/// How dicts are watched in this interpreter.
pub(super) fn how(py: Python<'_>) -> PyResult<How> {
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

// --- the dict watcher callback -----------------------------------------------------

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
            what: PendingWhat::Dict(DictEvent {
                nodes,
                event,
                key,
                old,
                new,
                items,
            }),
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
