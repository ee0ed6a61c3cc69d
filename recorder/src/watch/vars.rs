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
//!
//! The comparison is Python code (`memwatch._vars._check`), and a call to
//! it costs about a microsecond. On CPython 3.12+ a boundary of a function
//! (or module body) first compares, here, the values it binds with the
//! ones `_check` saw there last (a mirror of its state); only a difference (or a first
//! boundary, a return, a fingerprint) calls `_check`. So a line of a
//! function that binds a watched name, but did not rebind it, costs a few
//! reads instead of a call into Python.
//!
//! Locking: `RELEVANT` (which code binds a watched name) and `SEEN` (the
//! mirror of `_check`'s state) are separate mutexes, each held only to read
//! or update entries, never while Python code runs. Whether a variable is
//! watched at all is `runtime::watched`'s flag. Nothing here runs in
//! signal context.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use memwatch_format::ObjectChangeKind;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::deliver::output::{emit_object, Origin};
use crate::mem::kernel::gettid;
use crate::model::change::ObjectInfo;
use crate::runtime::addr::AddrMap;
use crate::runtime::attrib::{attributed_stack, innermost_in_scope, thread_name};
use crate::runtime::events;
use crate::runtime::thread::{guarded, set_last};
use crate::runtime::watched::{self, Kind};

/// Whether each code object (by address; `runtime::codes::CODES` keeps every code
/// object that reaches a boundary alive, so an address is not reused)
/// binds a watched name. Cleared whenever the set of watched variables
/// changes.
static RELEVANT: Mutex<Option<AddrMap<usize, bool>>> = Mutex::new(None);

/// `memwatch._vars._relevant` and `memwatch._vars._check`.
static HOOKS: OnceLock<(Py<PyAny>, Py<PyAny>)> = OnceLock::new();

/// `memwatch._vars._bound_names`: `code -> [(name, is_global)]`.
static NAMES: OnceLock<Py<PyAny>> = OnceLock::new();

/// `memwatch._vars._MISSING`: what `_check` says an unbound name holds.
static MISSING: OnceLock<Py<PyAny>> = OnceLock::new();

/// What `memwatch._vars._check` last saw, mirrored: where every value a
/// frame binds is still the one `_check` saw there (and, for a global, the
/// one it saw last anywhere), calling it again would report nothing.
/// Kept in step with `_check`'s own state: filled right after each call
/// (before anything else runs), emptied whenever `_check` forgets (the
/// watched set changed, finished frames dropped), and a frame's entry goes
/// at its return. Every value is held, as `_check` holds it, so that an
/// identity cannot be a reused address.
#[derive(Default)]
struct Seen {
    /// True while a fingerprint is watched: every boundary runs `_check`.
    keyed: bool,
    /// Per code object (by address; kept alive by `runtime::codes::CODES`).
    binds: AddrMap<usize, Arc<Binds>>,
    /// Per frame (by address; the frame is held): the values of its local
    /// binds, in `Binds::names` order (`None`: unbound, or a global).
    frames: AddrMap<usize, FrameSeen>,
    /// Per globals dict (by address; the dict is held), per name: the value.
    globals: AddrMap<usize, GlobalsSeen>,
}

/// A frame (held) and the values of its local binds.
type FrameSeen = (Py<PyAny>, Vec<Option<Py<PyAny>>>);

/// A globals dict (held) and, per watched name, its value.
type GlobalsSeen = (Py<PyAny>, HashMap<Arc<str>, Option<Py<PyAny>>>);

/// The watched names a code object binds.
struct Binds {
    /// `(name, its text, whether it is a global there)`.
    names: Vec<(Py<PyString>, Arc<str>, bool)>,
    /// A function's code (`CO_OPTIMIZED`: locals live in the frame).
    optimized: bool,
}

static SEEN: Mutex<Option<Seen>> = Mutex::new(None);

fn seen() -> MutexGuard<'static, Option<Seen>> {
    SEEN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `PyFrame_GetVar` (CPython 3.12+: a local's value read from the frame,
/// no locals dict made), found at run time.
type GetVar = unsafe extern "C" fn(*mut ffi::PyObject, *mut ffi::PyObject) -> *mut ffi::PyObject;

fn get_var() -> Option<GetVar> {
    static GET_VAR: OnceLock<usize> = OnceLock::new();
    let p = *GET_VAR.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name.
        (unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"PyFrame_GetVar".as_ptr()) }) as usize
    });
    // SAFETY: the symbol, when present, has PyFrame_GetVar's signature.
    (p != 0).then(|| unsafe { std::mem::transmute::<usize, GetVar>(p) })
}

/// `co_flags & CO_OPTIMIZED`: a function's code.
const CO_OPTIMIZED: i64 = 0x1;

/// Where `frame` keeps its binds: its globals dict (only fetched when a
/// bind lives there) and whether it is a function (locals in the frame;
/// otherwise a module body, every name in the globals dict). `None` for a
/// frame the mirror leaves to `_check` (a class body, `exec` with its own
/// locals). Runs no Python code.
fn frame_scope<'py>(
    py: Python<'py>,
    frame: &Bound<'py, PyAny>,
    binds: &Binds,
) -> Option<(Option<Bound<'py, PyAny>>, bool)> {
    if binds.optimized && !binds.names.iter().any(|(_, _, global)| *global) {
        return Some((None, true));
    }
    // SAFETY: GIL held; `frame` is a frame object; a new reference.
    let globals =
        unsafe { Bound::from_owned_ptr_or_opt(py, ffi::PyFrame_GetGlobals(frame.as_ptr().cast())) }?;
    if binds.optimized {
        return Some((Some(globals), true));
    }
    let locals = frame.getattr(pyo3::intern!(py, "f_locals")).ok()?;
    locals.is(&globals).then_some((Some(globals), false))
}

/// The current value of each bind of `frame` (a new reference, or NULL
/// when unbound), or `None` when one cannot be read. Runs no Python code:
/// the names are `str`, looked up in a frame's fast locals or a dict.
fn read_binds(
    frame: *mut ffi::PyObject,
    globals: *mut ffi::PyObject,
    function: bool,
    binds: &Binds,
    get_var: GetVar,
) -> Option<Vec<*mut ffi::PyObject>> {
    let mut out: Vec<*mut ffi::PyObject> = Vec::with_capacity(binds.names.len());
    for (name, _, global) in &binds.names {
        // SAFETY: GIL held; `frame` a live frame, `globals` its dict.
        let v = unsafe {
            if *global || !function {
                let v = ffi::PyDict_GetItemWithError(globals, name.as_ptr());
                if v.is_null() && !ffi::PyErr_Occurred().is_null() {
                    ffi::PyErr_Clear();
                    out.into_iter().for_each(|p| ffi::Py_XDECREF(p));
                    return None;
                }
                ffi::Py_XNewRef(v)
            } else {
                let v = get_var(frame, name.as_ptr());
                if v.is_null() {
                    // NameError: unbound (deleted, or not set yet).
                    ffi::PyErr_Clear();
                }
                v
            }
        };
        out.push(v);
    }
    Some(out)
}

/// True when `frame` (running `code`) binds the values `_check` saw at its
/// last boundary there (a global: the value it saw last anywhere): calling
/// it would report nothing.
fn unchanged_since_check(py: Python<'_>, frame: &Bound<'_, PyAny>, code: usize) -> bool {
    let Some(get_var) = get_var() else { return false };
    let f = frame.as_ptr() as usize;
    let now: Vec<*mut ffi::PyObject>;
    let same = {
        // One look at the mirror; the reads under it run no Python code.
        let g = seen();
        let Some(st) = g.as_ref() else { return false };
        if st.keyed {
            return false;
        }
        let (Some((_, values)), Some(binds)) = (st.frames.get(&f), st.binds.get(&code)) else {
            return false;
        };
        let Some((globals, function)) = frame_scope(py, frame, binds) else {
            return false;
        };
        let gptr = globals.as_ref().map_or(std::ptr::null_mut(), |g| g.as_ptr());
        let Some(read) = read_binds(frame.as_ptr(), gptr, function, binds, get_var) else {
            return false;
        };
        now = read;
        let dict = st.globals.get(&(gptr as usize)).map(|(_, m)| m);
        binds
            .names
            .iter()
            .zip(&now)
            .enumerate()
            .all(|(i, ((_, text, global), v))| {
                let was = if *global || !function {
                    dict.and_then(|m| m.get(&**text))
                } else {
                    values.get(i)
                };
                // Not seen (a first boundary for that global): ask `_check`.
                was.is_some_and(|w| w.as_ref().map_or(std::ptr::null_mut(), |w| w.as_ptr()) == *v)
            })
    };
    // SAFETY: GIL held; our own new references. Each value is still bound
    // in the frame or dict, so none of these releases is the last.
    now.into_iter().for_each(|p| unsafe { ffi::Py_XDECREF(p) });
    same
}

/// The binds of `code` (the code of `frame`), learnt once from Python.
fn binds_of(py: Python<'_>, frame: &Bound<'_, PyAny>, code: usize) -> Option<Arc<Binds>> {
    if let Some(b) = seen().as_ref().and_then(|st| st.binds.get(&code).cloned()) {
        return Some(b);
    }
    let names = NAMES.get()?;
    let code_obj = frame.getattr(pyo3::intern!(py, "f_code")).ok()?;
    let flags: i64 = code_obj
        .getattr(pyo3::intern!(py, "co_flags"))
        .ok()?
        .extract()
        .ok()?;
    let fetched = guarded(|| {
        names
            .bind(py)
            .call1((&code_obj,))?
            .extract::<Vec<(Bound<'_, PyString>, bool)>>()
    })
    .ok()?;
    let b = Arc::new(Binds {
        names: fetched
            .into_iter()
            .map(|(n, g)| {
                let text: Arc<str> = n.to_string_lossy().into();
                (n.unbind(), text, g)
            })
            .collect(),
        optimized: flags & CO_OPTIMIZED != 0,
    });
    seen()
        .get_or_insert_with(Seen::default)
        .binds
        .insert(code, b.clone());
    Some(b)
}

/// After `_check` ran at a boundary of `frame` (running `code`): records
/// the values it saw (`seen`, one per bind, `missing` for unbound), or
/// (`returning`) forgets the frame as `_check` did. What is replaced is
/// released after the lock is let go (releasing a value can run Python
/// code that reaches a boundary).
fn after_check(
    py: Python<'_>,
    frame: &Bound<'_, PyAny>,
    code: usize,
    returning: bool,
    seen_values: Vec<Bound<'_, PyAny>>,
) {
    if get_var().is_none() {
        return;
    }
    let f = frame.as_ptr() as usize;
    if returning {
        let gone = seen().as_mut().and_then(|st| st.frames.remove(&f));
        drop(gone);
        return;
    }
    if seen().as_ref().is_some_and(|st| st.keyed) {
        return;
    }
    let Some(binds) = binds_of(py, frame, code) else {
        return;
    };
    let Some((globals, function)) = frame_scope(py, frame, &binds) else {
        return;
    };
    let Some(missing) = MISSING.get() else { return };
    if seen_values.len() != binds.names.len() {
        // Not the binds `_check` used: leave this frame to it.
        return;
    }
    // Exactly what `_check` compared with: a value read here instead could
    // be one another thread stored after `_check` read its own.
    let now: Vec<Option<Py<PyAny>>> = seen_values
        .into_iter()
        .map(|v| (!v.is(missing.bind(py))).then(|| v.unbind()))
        .collect();
    // Replaced entries, released once the lock is let go.
    let mut old_values: Vec<Option<Py<PyAny>>> = Vec::new();
    let mut old_frames: Vec<FrameSeen> = Vec::new();
    let mut g = seen();
    let st = g.get_or_insert_with(Seen::default);
    let mut values = Vec::with_capacity(now.len());
    for ((_, text, global), v) in binds.names.iter().zip(now) {
        match &globals {
            Some(d) if *global || !function => {
                let (_, m) = st
                    .globals
                    .entry(d.as_ptr() as usize)
                    .or_insert_with(|| (d.clone().unbind(), HashMap::new()));
                old_values.extend(m.insert(text.clone(), v));
                values.push(None);
            }
            _ => values.push(v),
        }
    }
    if st.frames.len() >= 64 {
        // Frames that finished without a return event (an exception): held
        // by nothing but this table (and perhaps `_check`'s). Dropping one
        // that still runs only costs it a call to `_check`.
        // SAFETY: GIL held; reading reference counts.
        let done: Vec<usize> = st
            .frames
            .iter()
            .filter(|(_, (fr, _))| unsafe { ffi::Py_REFCNT(fr.as_ptr()) } <= 2)
            .map(|(k, _)| *k)
            .collect();
        old_frames.extend(done.iter().filter_map(|k| st.frames.remove(k)));
    }
    old_frames.extend(st.frames.insert(f, (frame.clone().unbind(), values)));
    drop(g);
    drop(old_frames);
    drop(old_values);
}

/// Forgets the mirrored frames (`frames_only`) or everything (what
/// `_check` forgot). What it held is released after the lock is let go.
fn forget(frames_only: bool, keyed: Option<bool>) {
    let old = {
        let mut g = seen();
        let st = g.get_or_insert_with(Seen::default);
        if let Some(k) = keyed {
            st.keyed = k;
        }
        let frames = std::mem::take(&mut st.frames);
        if frames_only {
            (frames, AddrMap::default(), AddrMap::default())
        } else {
            (
                frames,
                std::mem::take(&mut st.globals),
                std::mem::take(&mut st.binds),
            )
        }
    };
    drop(old);
}

/// Called by `memwatch._vars` when `_check` dropped the frames it kept.
#[pyfunction]
pub fn _vars_forgot_frames() {
    forget(true, None);
}

fn relevant_map() -> MutexGuard<'static, Option<AddrMap<usize, bool>>> {
    RELEVANT.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether the code at `code` binds a watched variable, when that is
/// known already (one lookup, no Python code).
pub fn binds_watched(code: usize) -> Option<bool> {
    relevant_map().as_ref().and_then(|m| m.get(&code).copied())
}

/// True while a variable is watched.
pub fn any() -> bool {
    watched::has(Kind::Variables)
}

/// Called by `memwatch._vars` when the set of watched variables changes:
/// `active` says whether any is left. Starts line events for in-scope code
/// when the first variable is watched and stops them when nothing at all
/// is watched any more.
#[pyfunction]
#[pyo3(signature = (relevant, check, active, names, missing, keyed))]
pub fn _vars_changed(
    py: Python<'_>,
    relevant: Py<PyAny>,
    check: Py<PyAny>,
    active: bool,
    names: Py<PyAny>,
    missing: Py<PyAny>,
    keyed: bool,
) -> PyResult<()> {
    let _ = HOOKS.set((relevant, check));
    let _ = NAMES.set(names);
    let _ = MISSING.set(missing);
    *relevant_map() = None;
    forget(false, Some(keyed));
    let was = watched::set(Kind::Variables, active);
    if active && !was {
        if let Err(e) = events::start(py) {
            watched::set(Kind::Variables, false);
            return Err(e);
        }
        set_last(innermost_in_scope(py, false));
    }
    if active {
        // Lines switched off as needing nothing may bind a new pattern.
        events::restart_disabled(py)?;
    } else if was {
        events::stop_if_idle(py)?;
    }
    Ok(())
}

/// Whether in-scope `code` needs line and return events: always while a
/// buffer or object is watched, and otherwise (only variables watched)
/// only if it binds a watched variable. Learnt once per event location:
/// CPython 3.12+ then disables the events it does not need.
pub fn wants_events(py: Python<'_>, code: &Bound<'_, PyAny>) -> bool {
    if !watched::only_variables() {
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
    relevant_map()
        .get_or_insert_with(AddrMap::default)
        .insert(code, b);
    b
}

/// For the line fast path: true when a line of the code at `code` in this
/// thread's current frame has nothing to report for watched variables (the
/// code binds none, or the frame binds what `_check` saw last). Runs no
/// Python code once the code's binds are known.
pub fn line_unchanged(py: Python<'_>, code: usize) -> bool {
    if !any() {
        return true;
    }
    // SAFETY: GIL held; a borrowed reference to the running frame, or NULL.
    let frame = unsafe { ffi::PyEval_GetFrame() };
    if frame.is_null() {
        return false;
    }
    // SAFETY: non-NULL borrowed frame, GIL held.
    let frame = unsafe { Bound::from_borrowed_ptr(py, frame.cast::<ffi::PyObject>()) };
    if !relevant(py, code, || frame.getattr("f_code")) {
        return true;
    }
    unchanged_since_check(py, &frame, code)
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
    if !returning && unchanged_since_check(py, &frame, code) {
        return;
    }
    type Found = Vec<(String, String, String, Option<String>, Option<String>)>;
    let checked = guarded(|| {
        check
            .bind(py)
            .call1((&frame, returning))?
            .extract::<(Found, Vec<Bound<'_, PyAny>>)>()
    });
    let found = checked.map(|(found, seen_values)| {
        after_check(py, &frame, code, returning, seen_values);
        found
    });
    let found = match found {
        Ok(f) if f.is_empty() => return,
        Ok(f) => f,
        Err(e) => {
            e.write_unraisable(py, None);
            return;
        }
    };
    let stack = attributed_stack(py, last);
    let thread_name = thread_name(py);
    let tid = gettid();
    for (tag, name, kind, old, new) in found {
        let info = ObjectInfo {
            kind: ObjectChangeKind::from_name(&kind).unwrap_or(ObjectChangeKind::Other),
            key: (!name.is_empty()).then(|| name.clone()),
            old,
            new,
        };
        let origin = Origin {
            stack: stack.clone(),
            thread_id: tid,
            thread_name: thread_name.clone(),
        };
        let variable = (!name.is_empty()).then(|| name.into());
        emit_object(py, tag.into(), variable, info, origin);
    }
}
