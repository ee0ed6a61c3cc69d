//! Conditions and actions on watches: `watch(..., condition=, action=)`,
//! `memwatch.frozen`, `freeze` and `unfreeze`.
//!
//! This module owns which tags have a guard (a condition and an action
//! other than "record"), and the changes whose action waits for a thread's
//! next boundary: a `MutationError` to raise, or `sys.breakpointhook()` to
//! call, in the thread that wrote. What a guard is (its condition, its
//! action, what it reports) lives in Python (`memwatch._guard`): this side
//! only asks it about each change of a guarded tag
//! (`on_change`) and fires what it answered (`fire`).
//!
//! A change is seen at the boundary after the line that made it, so the
//! raise (or the breakpoint) comes there: the memory already holds the new
//! value. The raise leaves the boundary step (`crate::boundary`) as its
//! error, which the interpreter raises in the running frame.
//!
//! Locking: one mutex (`STATE`) guards the guarded tags and the waiting
//! actions; it is held only to read or update them, never while Python code
//! runs. `WAITING` counts the waiting actions and `TAGS` the guarded tags,
//! so that the boundary's quick path reads an atomic only. Nothing
//! here runs in signal context.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use pyo3::prelude::*;

use crate::mem::kernel::gettid;

#[derive(Default)]
struct State {
    tags: HashSet<String>,
    /// `(thread, change)`: an action for that thread's next boundary.
    waiting: Vec<(u64, Py<PyAny>)>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
static TAGS: AtomicUsize = AtomicUsize::new(0);
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// `memwatch._guard._on_change` and `memwatch._guard._fire`.
static HOOKS: OnceLock<(Py<PyAny>, Py<PyAny>)> = OnceLock::new();

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// True when the change of `tag` must be shown to its guard.
pub(crate) fn guarded(tag: &str) -> bool {
    TAGS.load(Ordering::Relaxed) > 0 && state().as_ref().is_some_and(|s| s.tags.contains(tag))
}

/// True when some thread has an action waiting (the line fast path must
/// then take the full boundary).
pub(crate) fn any_waiting() -> bool {
    WAITING.load(Ordering::Relaxed) > 0
}

/// Shows `change` (a `memwatch.Change` of a guarded tag) to its guard; an
/// action it asks for waits for the boundary of the thread it names.
/// Called with memwatch's re-entry guard set (`runtime::thread::guarded`).
pub(crate) fn on_change(py: Python<'_>, change: &Py<PyAny>) {
    let Some((hook, _)) = HOOKS.get() else {
        return;
    };
    match hook.call1(py, (change.clone_ref(py),)) {
        Ok(tid) if tid.is_none(py) => {}
        Ok(tid) => match tid.extract::<u64>(py) {
            Ok(tid) => {
                let mut g = state();
                g.get_or_insert_with(State::default)
                    .waiting
                    .push((tid, change.clone_ref(py)));
                WAITING.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => e.write_unraisable(py, Some(hook.bind(py))),
        },
        Err(e) => e.write_unraisable(py, Some(hook.bind(py))),
    }
}

/// Fires the actions waiting for this thread, oldest first: a breakpoint
/// is called here, a raise ends the boundary with its `MutationError` (and
/// the rest wait for the next one). Call at the end of a boundary, outside
/// memwatch's re-entry guard, where an error is raised in the running frame.
pub(crate) fn fire(py: Python<'_>) -> PyResult<()> {
    if !any_waiting() {
        return Ok(());
    }
    let Some((_, fire)) = HOOKS.get() else {
        return Ok(());
    };
    let tid = gettid();
    loop {
        let next = {
            let mut g = state();
            let Some(s) = g.as_mut() else { return Ok(()) };
            match s.waiting.iter().position(|(t, _)| *t == tid) {
                Some(i) => {
                    WAITING.fetch_sub(1, Ordering::Relaxed);
                    Some(s.waiting.remove(i).1)
                }
                None => None,
            }
        };
        let Some(change) = next else { return Ok(()) };
        // `_fire` answers the exception to raise, "breakpoint", or "later"
        // (not at this point of the code: at the thread's next boundary);
        // the breakpoint hook is called from here so that no frame of
        // memwatch's stands between it and the frame that wrote.
        let what = crate::runtime::thread::guarded(|| fire.call1(py, (change.clone_ref(py),)))?;
        if what.is_none(py) {
            continue;
        }
        if what.extract::<&str>(py).is_ok_and(|s| s == "later") {
            let mut g = state();
            g.get_or_insert_with(State::default)
                .waiting
                .insert(0, (tid, change));
            WAITING.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if what
            .bind(py)
            .is_instance_of::<pyo3::exceptions::PyBaseException>()
        {
            return Err(PyErr::from_value(what.into_bound(py)));
        }
        let sys = py.import("sys")?;
        sys.getattr("breakpointhook")?.call0()?;
    }
}

/// Drops the actions waiting for threads that are gone (`alive`: the
/// native ids of the threads still running), so that they do not keep the
/// fast path off.
pub(crate) fn forget_threads(alive: &[u64]) {
    let mut g = state();
    if let Some(s) = g.as_mut() {
        let before = s.waiting.len();
        s.waiting.retain(|(t, _)| alive.contains(t));
        WAITING.fetch_sub(before - s.waiting.len(), Ordering::Relaxed);
    }
}

/// Registers the Python side: `on_change(change) -> thread id | None` and
/// `fire(change) -> exception | "breakpoint" | None`.
#[pyfunction]
pub fn _set_guard_hooks(on_change: Py<PyAny>, fire: Py<PyAny>) {
    let _ = HOOKS.set((on_change, fire));
}

/// Marks `tag` as guarded (`on`) or not.
#[pyfunction]
pub fn _set_guarded(tag: String, on: bool) {
    let mut g = state();
    let s = g.get_or_insert_with(State::default);
    if on {
        s.tags.insert(tag);
    } else {
        s.tags.remove(&tag);
    }
    TAGS.store(s.tags.len(), Ordering::Relaxed);
}

/// Reports `exc` as an error nobody can catch (`sys.unraisablehook`),
/// raised by `obj`.
#[pyfunction]
pub fn _unraisable(exc: Bound<'_, PyAny>, obj: Bound<'_, PyAny>) {
    PyErr::from_value(exc).write_unraisable(obj.py(), Some(&obj));
}

/// Drops the waiting actions of threads not in `alive` (native ids).
#[pyfunction]
pub fn _forget_threads(alive: Vec<u64>) {
    forget_threads(&alive);
}
