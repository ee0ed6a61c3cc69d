//! Watched variables (`memwatch.watch_var`): every rebinding of a chosen
//! local or global name in in-scope code.
//!
//! A name is rebound by code that stores to it (`x = ...`, `x += ...`,
//! `for x in ...`, `del x`, `global x; x = ...`). The Python side
//! (`memwatch._vars`) reads each code object's store instructions once and
//! says which watched names it binds. At each line boundary (and return) of
//! such code, and only such code, it compares those names' values with the
//! ones seen at the last boundary of the same frame (by identity); each
//! difference is a change of kind `rebind` or `unbind`, attributed to the
//! line that ran before, like every other change. Code that binds no
//! watched name pays one hash lookup per line boundary while a variable is
//! watched, and nothing otherwise.
//!
//! Fingerprint watches (`watch_object(obj, key=...)`) ride on the same
//! hook: while one exists every in-scope boundary computes the key and
//! compares it with the last one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use memwatch_format::ObjectChangeKind;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::api;
use crate::change::{Change, ObjectInfo};
use crate::engine::Layout;
use crate::kernel::gettid;
use crate::monitor::{self, guarded};

/// True while at least one variable is watched.
static ANY: AtomicBool = AtomicBool::new(false);

/// Whether each code object (by address; `monitor::CODES` keeps every code
/// object that reaches a boundary alive, so an address is not reused)
/// binds a watched name. Cleared whenever the set of watched variables
/// changes.
static RELEVANT: Mutex<Option<HashMap<usize, bool>>> = Mutex::new(None);

/// `memwatch._vars._relevant` and `memwatch._vars._check`.
static HOOKS: OnceLock<(Py<PyAny>, Py<PyAny>)> = OnceLock::new();

fn relevant_map() -> MutexGuard<'static, Option<HashMap<usize, bool>>> {
    RELEVANT.lock().unwrap_or_else(PoisonError::into_inner)
}

/// True while a variable is watched.
pub fn any() -> bool {
    ANY.load(Ordering::Relaxed)
}

/// Called by `memwatch._vars` when the set of watched variables changes:
/// `active` says whether any is left. Starts line events for in-scope code
/// when the first variable is watched and stops them when nothing at all
/// is watched any more.
#[pyfunction]
pub fn _vars_changed(py: Python<'_>, relevant: Py<PyAny>, check: Py<PyAny>, active: bool) -> PyResult<()> {
    let _ = HOOKS.set((relevant, check));
    *relevant_map() = None;
    let was = ANY.swap(active, Ordering::AcqRel);
    if active && !was {
        if let Err(e) = monitor::start(py) {
            ANY.store(false, Ordering::Release);
            return Err(e);
        }
        monitor::LAST.with(|l| l.set(api::innermost_in_scope(py, false)));
    }
    if active {
        // Lines switched off as needing nothing may bind a new pattern.
        monitor::restart_disabled(py)?;
    } else if !active && was && !crate::objects::any() && api::_regions().is_empty() {
        monitor::stop(py)?;
    }
    Ok(())
}

/// Whether in-scope `code` needs line and return events: always while a
/// buffer or object is watched, and otherwise (only variables watched)
/// only if it binds a watched variable. Learnt once per event location:
/// CPython 3.12+ then disables the events it does not need.
pub fn wants_events(py: Python<'_>, code: &Bound<'_, PyAny>) -> bool {
    if !any() || crate::objects::any() || api::any_regions() {
        return true;
    }
    relevant(py, code.as_ptr() as usize, || Ok(code.clone()))
}

/// Whether the code at `code` binds a watched variable (cached).
fn relevant<'py>(py: Python<'py>, code: usize, get: impl FnOnce() -> PyResult<Bound<'py, PyAny>>) -> bool {
    if let Some(b) = relevant_map().as_ref().and_then(|m| m.get(&code).copied()) {
        return b;
    }
    let Some((relevant, _)) = HOOKS.get() else {
        return false;
    };
    let b = guarded(|| {
        get()
            .and_then(|c| relevant.bind(py).call1((c,)))
            .and_then(|r| r.is_truthy())
    })
    .unwrap_or_else(|e| {
        e.write_unraisable(py, None);
        false
    });
    relevant_map().get_or_insert_with(HashMap::new).insert(code, b);
    b
}

/// At a line boundary (`returning`: a return) of the code at `code` in this
/// thread's current frame: reports the watched variables that code rebound
/// since its frame's last boundary, attributed to `last`.
pub fn at_boundary(py: Python<'_>, code: usize, returning: bool, last: (usize, u32)) {
    if !any() || code == 0 {
        return;
    }
    let Some((_, check)) = HOOKS.get() else { return };
    // SAFETY: GIL held; a borrowed reference to the running frame, or NULL.
    let frame = unsafe { ffi::PyEval_GetFrame() };
    if frame.is_null() {
        return;
    }
    // SAFETY: non-NULL borrowed frame, GIL held.
    let frame = unsafe { Bound::from_borrowed_ptr(py, frame.cast::<ffi::PyObject>()) };
    if !relevant(py, code, || frame.getattr("f_code")) {
        return;
    }
    let found = guarded(|| {
        check.bind(py).call1((&frame, returning))?.extract::<Vec<(
            String,
            String,
            String,
            Option<String>,
            Option<String>,
        )>>()
    });
    let found = match found {
        Ok(f) if f.is_empty() => return,
        Ok(f) => f,
        Err(e) => {
            e.write_unraisable(py, None);
            return;
        }
    };
    let stack = api::attributed_stack(py, last);
    let thread_name = api::thread_name(py);
    let tid = gettid();
    for (tag, name, kind, old, new) in found {
        let info = ObjectInfo {
            kind: ObjectChangeKind::from_name(&kind).unwrap_or(ObjectChangeKind::Other),
            key: (!name.is_empty()).then(|| name.clone()),
            old,
            new,
        };
        api::emit_object(
            py,
            Change {
                seq: 0,
                time_ns: crate::sink::unix_ns(),
                tag: tag.into(),
                variable: (!name.is_empty()).then(|| name.into()),
                region_start: 0,
                ranges: Vec::new(),
                layout: Layout::none(),
                stack: stack.clone(),
                thread_id: tid,
                thread_name: thread_name.clone(),
                object: Some(info),
            },
        );
    }
}
