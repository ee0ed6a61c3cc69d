//! The Python API of object watching: [`_watch_object`] (checks the
//! object, builds its nodes, starts the monitor) and the
//! [`ObjectWatchHandle`] it returns, [`_unwatch_object`],
//! [`_object_watches`], and the ends of everything: [`shutdown`] at exit
//! (which gives the dict watcher id back) and [`_objects_after_fork_child`].
//!
//! Locking: takes `OBJS` (and, in a fork child, `PENDING`) for short
//! sections that run no Python code; removed nodes and watches are released
//! after the section. Watching, unwatching and shutdown flush first, with
//! no lock held.
//!
//! Signal context: nothing here runs in a signal handler, nor in the dict
//! watcher callback. The weak reference callback that reports a collected
//! object runs where its object is freed, which may be inside another
//! mutation: it only queues, like the dict watcher callback.

use std::sync::atomic::Ordering;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyTuple, PyType, PyWeakrefReference};

use super::flush::flush;
use super::frames::capture_frames;
use super::hooks::{dict_api, how, How, WATCHER};
use super::shadow::{build, insert_nodes, remove_subtree, remove_watch};
use super::state::{
    lock, push_pending, refresh_flags, stop_monitor_if_idle, thread_ident, tid, with_objs, ObjWatch, Pending,
    PendingWhat, NEXT_ID, PENDING, PENDING_N, TID,
};
use crate::runtime::thread::LAST;

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
    let tname = check_watchable(obj, &tag)?;
    let how = how(py)?;
    // Report what changed before, so this watch's baseline is now.
    flush(py, LAST.with(|l| l.get()));
    let watch = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    // SAFETY: GIL held; reading the type's weakref support.
    let weakrefable = unsafe { (*ffi::Py_TYPE(obj.as_ptr())).tp_weaklistoffset } != 0;
    let weakref: Option<Py<PyAny>> = if weakrefable {
        Some(collection_weakref(py, obj, watch)?)
    } else {
        None
    };
    let mut nodes = Vec::new();
    build(py, obj, "", depth, watch, None, weakref.as_ref(), how, &mut nodes)?;
    if nodes.is_empty() {
        return Err(nothing_to_watch(&tname));
    }
    // Learn the calling code objects, so line events reach them once on.
    let here = crate::runtime::attrib::innermost_in_scope(py, false);
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
    if let Err(e) =
        crate::runtime::events::start(py).and_then(|()| crate::runtime::events::restart_disabled(py))
    {
        let _ = unwatch_object(py, watch);
        return Err(e);
    }
    crate::runtime::thread::set_last(here);
    Ok(ObjectWatchHandle {
        watch,
        tag,
        variable,
        depth,
        repr_limit,
        mechanism: mechanism(how),
    })
}

/// `_watch_object`, first: the arguments are ones it can watch (a name not
/// taken, not a class); the name of the object's type.
fn check_watchable(obj: &Bound<'_, PyAny>, tag: &str) -> PyResult<String> {
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
    let taken = crate::runtime::watched::named(tag).is_some();
    if taken {
        return Err(PyValueError::new_err(format!(
            "'{tag}' is already watched; pass another name= or unwatch it first"
        )));
    }
    Ok(tname)
}

/// A weak reference to `obj` whose callback queues the end of watch
/// `watch` (reported as `collected` at the next flush).
fn collection_weakref(py: Python<'_>, obj: &Bound<'_, PyAny>, watch: u32) -> PyResult<Py<PyAny>> {
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
    Ok(PyWeakrefReference::new_with(obj, cb)?.into_any().unbind())
}

/// The error for an object of type `tname` that has nothing to watch.
fn nothing_to_watch(tname: &str) -> PyErr {
    let a = if tname.starts_with(['a', 'e', 'i', 'o', 'u', 'A', 'E', 'I', 'O', 'U']) {
        "an"
    } else {
        "a"
    };
    PyTypeError::new_err(format!(
        "cannot watch {a} {tname}: watch_object() watches attributes (__dict__ or __slots__) and \
         the items of a dict, list or set, and {a} {tname} has none that can change \
         (for a buffer, use watch())"
    ))
}

/// [`ObjectWatchHandle::mechanism`] for how dicts are watched.
fn mechanism(how: How) -> &'static str {
    match (how.dicts, how.attrs) {
        (true, true) => "dict-watcher",
        (true, false) => "dict-watcher+compare",
        _ => "compare",
    }
}

/// Ends watch `watch` after reporting its pending changes; false if it was
/// not watched (it may end during that report, when it was collected).
fn unwatch_object(py: Python<'_>, watch: u32) -> bool {
    if !with_objs(|o| o.watches.iter().any(|w| w.id == watch)) {
        return false;
    }
    flush(py, LAST.with(|l| l.get()));
    let mut trash = Vec::new();
    let w = with_objs(|o| remove_watch(o, watch, &mut trash));
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
        Err(crate::model::errors::NotWatchedError::new_err(format!(
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
