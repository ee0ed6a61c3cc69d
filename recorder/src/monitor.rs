//! Line boundaries: where the recorder looks for changes.
//!
//! A check runs at every line of in-scope code and when an in-scope
//! function returns; the changes it finds are attributed to the line the
//! thread executed before (the innermost in-scope line that led to them).
//! Out-of-scope code gets no line events at all.
//!
//! - CPython 3.12+: `sys.monitoring`, under a tool id of our own. `PY_START`
//!   is enabled globally; its callback decides once per code object whether
//!   it is in scope, enables `LINE` and `PY_RETURN` on that code object only,
//!   and returns `DISABLE` so `PY_START` never fires for it again.
//! - CPython 3.11: a C-level trace function on each thread: on every
//!   thread that exists when watching starts (through the interpreter's
//!   `_PyEval_SetTrace`, found at run time), and on new threads through
//!   `threading.settrace`. Call events decide scope; out-of-scope frames get
//!   `f_trace_lines = False` (frames that were already running get it at
//!   their first line event). The interpreter still runs its tracing loop
//!   for every frame, so on 3.11 out-of-scope code is slower while something
//!   is watched.
//!
//! Nothing here runs in signal context.

use std::cell::Cell;
use std::collections::HashMap;
use std::os::raw::c_int;
use std::sync::{Arc, Mutex, OnceLock};

use pyo3::ffi;
use pyo3::prelude::*;

/// Python functions the hot paths call, handed over once by the Python
/// package at import (`_set_hooks`). Callbacks must never import: the
/// frame they run in may have no `__builtins__` (code made by `exec`).
pub struct Hooks {
    pub in_scope: Py<PyAny>,
    pub current_thread: Py<PyAny>,
    pub sys: Py<PyAny>,
}

pub static HOOKS: OnceLock<Hooks> = OnceLock::new();

/// Receives the hooks from `memwatch._api`.
#[pyfunction]
pub fn _set_hooks(in_scope: Py<PyAny>, current_thread: Py<PyAny>, sys: Py<PyAny>) {
    let _ = HOOKS.set(Hooks {
        in_scope,
        current_thread,
        sys,
    });
}

/// The hooks, or an error if the Python package did not set them.
pub fn hooks() -> PyResult<&'static Hooks> {
    HOOKS
        .get()
        .ok_or_else(|| crate::errors::MemwatchError::new_err("memwatch._api was not imported"))
}

/// What we know about a code object.
pub struct CodeInfo {
    /// Keeps the code object (and so the map's key) alive.
    pub code: Py<PyAny>,
    pub file: Arc<str>,
    pub function: Arc<str>,
    pub in_scope: bool,
}

/// Hashes object addresses (and small tuples of them) for the maps looked
/// up on every boundary: one multiply instead of SipHash, which is built to
/// resist chosen keys; ours are addresses the allocator picked.
#[derive(Default, Clone, Copy)]
pub struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
    fn write_i32(&mut self, x: i32) {
        self.write_u64(x as u32 as u64);
    }
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }
}

/// A `HashMap` keyed by addresses, with [`AddrHasher`].
pub type AddrMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<AddrHasher>>;

/// Code objects seen, by address. Entries hold a reference to their code
/// object, so an address is never reused while it is a key.
pub static CODES: Mutex<Option<AddrMap<usize, CodeInfo>>> = Mutex::new(None);

thread_local! {
    /// The in-scope line this thread executed last: (code address, line).
    pub static LAST: Cell<(usize, u32)> = const { Cell::new((0, 0)) };
    /// Set while memwatch itself runs Python code (callbacks, reports), so
    /// that it never records itself.
    pub static GUARD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the reentrancy guard set.
pub fn guarded<R>(f: impl FnOnce() -> R) -> R {
    let was = GUARD.with(|g| g.replace(true));
    let r = f();
    GUARD.with(|g| g.set(was));
    r
}

fn codes() -> std::sync::MutexGuard<'static, Option<AddrMap<usize, CodeInfo>>> {
    CODES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Looks up (or learns) the code object `code`. `decide` says whether a
/// file is in scope; it is only called for code objects not seen before.
pub fn code_info(py: Python<'_>, code: &Bound<'_, PyAny>) -> PyResult<(Arc<str>, Arc<str>, bool)> {
    let key = code.as_ptr() as usize;
    if let Some(i) = codes().as_ref().and_then(|m| m.get(&key)) {
        return Ok((i.file.clone(), i.function.clone(), i.in_scope));
    }
    let file = normalize(&code.getattr("co_filename")?.extract::<String>()?);
    let function: String = code
        .getattr("co_qualname")
        .or_else(|_| code.getattr("co_name"))?
        .extract()?;
    let in_scope = guarded(|| -> PyResult<bool> { hooks()?.in_scope.bind(py).call1((&file,))?.extract() })?;
    let info = CodeInfo {
        code: code.clone().unbind(),
        file: file.into(),
        function: function.into(),
        in_scope,
    };
    let out = (info.file.clone(), info.function.clone(), info.in_scope);
    codes().get_or_insert_with(AddrMap::default).insert(key, info);
    Ok(out)
}

/// `a/b/../c` -> `a/c`, lexically, for absolute paths (what a program run as
/// `python ../train.py` from another folder records).
fn normalize(file: &str) -> String {
    if !file.starts_with('/') || !(file.contains("/./") || file.contains("/../")) {
        return file.to_string();
    }
    let mut parts: Vec<&str> = Vec::new();
    for p in file.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// File and function of a code object we already know, by address.
pub fn known_code(key: usize) -> Option<(Arc<str>, Arc<str>)> {
    codes()
        .as_ref()
        .and_then(|m| m.get(&key))
        .map(|i| (i.file.clone(), i.function.clone()))
}

/// A known code object's file, function and whether it is in scope.
pub type Described = (Arc<str>, Arc<str>, bool);

/// File, function and scope of each code object in `keys` that is known,
/// with one look-up of the map for all of them (a stack's frames).
pub fn describe(keys: &[usize]) -> Vec<Option<Described>> {
    let g = codes();
    keys.iter()
        .map(|k| {
            g.as_ref()
                .and_then(|m| m.get(k))
                .map(|i| (i.file.clone(), i.function.clone(), i.in_scope))
        })
        .collect()
}

/// True if the code object at `key` is known and in scope.
pub fn code_in_scope(key: usize) -> bool {
    codes()
        .as_ref()
        .and_then(|m| m.get(&key))
        .is_some_and(|i| i.in_scope)
}

/// Bumped whenever scope decisions may change (`rescope`).
static SCOPE_GEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The generation of scope decisions: what was worked out from them (where
/// a stack starts) holds while it is unchanged.
pub fn scope_generation() -> u64 {
    SCOPE_GEN.load(std::sync::atomic::Ordering::Relaxed)
}

/// Forgets every scope decision (after `configure(include=..., exclude=...)`);
/// returns the code objects that were in scope.
pub fn rescope(py: Python<'_>) -> PyResult<()> {
    // Scope decisions feed the line fast path's shortcuts: start it over.
    crate::fastline::invalidate();
    SCOPE_GEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let entries: Vec<(usize, Py<PyAny>, Arc<str>, bool)> = codes()
        .as_ref()
        .map(|m| {
            m.iter()
                .map(|(k, i)| (*k, i.code.clone_ref(py), i.file.clone(), i.in_scope))
                .collect()
        })
        .unwrap_or_default();
    let scope = hooks()?.in_scope.bind(py);
    for (key, code, file, was) in entries {
        let now: bool = guarded(|| scope.call1((&*file,)).and_then(|v| v.extract()))?;
        if now != was {
            if let Some(i) = codes().as_mut().and_then(|m| m.get_mut(&key)) {
                i.in_scope = now;
            }
            if is_active() {
                set_code_events(py, code.bind(py), now)?;
            }
        }
    }
    Ok(())
}

// --- CPython 3.12+: sys.monitoring -------------------------------------------

struct Monitoring {
    tool: u8,
    set_local_events: Py<PyAny>,
    disable: Py<PyAny>,
    code_events: i64,
}

static MONITORING: OnceLock<Mutex<Option<Monitoring>>> = OnceLock::new();

fn monitoring() -> std::sync::MutexGuard<'static, Option<Monitoring>> {
    MONITORING
        .get_or_init(|| Mutex::new(None))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

static RUNNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True while line events are on.
pub fn is_active() -> bool {
    RUNNING.load(std::sync::atomic::Ordering::Relaxed)
}

fn set_code_events(py: Python<'_>, code: &Bound<'_, PyAny>, on: bool) -> PyResult<()> {
    let (tool, f, events) = {
        let m = monitoring();
        match m.as_ref() {
            Some(m) => (m.tool, m.set_local_events.clone_ref(py), m.code_events),
            None => return Ok(()),
        }
    };
    f.bind(py).call1((tool, code, if on { events } else { 0 }))?;
    Ok(())
}

fn has_sys_monitoring(py: Python<'_>) -> bool {
    py.version_info() >= (3, 12)
}

/// Turns line events on (idempotent).
pub fn start(py: Python<'_>) -> PyResult<()> {
    if is_active() {
        return Ok(());
    }
    if has_sys_monitoring(py) {
        start_monitoring(py)?;
    } else {
        start_tracing(py)?;
    }
    RUNNING.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Turns line events off (idempotent).
pub fn stop(py: Python<'_>) -> PyResult<()> {
    if !is_active() {
        return Ok(());
    }
    RUNNING.store(false, std::sync::atomic::Ordering::Relaxed);
    if has_sys_monitoring(py) {
        stop_monitoring(py)
    } else {
        stop_tracing(py)
    }
}

fn start_monitoring(py: Python<'_>) -> PyResult<()> {
    let mon = py.import("sys")?.getattr("monitoring")?;
    let events = mon.getattr("events")?;
    let ev = |name: &str| -> PyResult<i64> { events.getattr(name)?.extract() };
    let (py_start, line, py_return) = (ev("PY_START")?, ev("LINE")?, ev("PY_RETURN")?);
    let existing = monitoring().as_ref().map(|m| m.tool);
    let tool = if let Some(tool) = existing {
        tool
    } else {
        // Prefer ids nobody names: 0 debugger, 1 coverage, 2 profiler, 5 optimizer.
        let mut chosen = None;
        for id in [3u8, 4, 2, 5, 0, 1] {
            if mon.getattr("get_tool")?.call1((id,))?.is_none() {
                chosen = Some(id);
                break;
            }
        }
        let Some(id) = chosen else {
            return Err(crate::errors::MemwatchError::new_err(
                "every sys.monitoring tool id is taken by other tools; memwatch needs one",
            ));
        };
        mon.getattr("use_tool_id")?.call1((id, "memwatch"))?;
        *monitoring() = Some(Monitoring {
            tool: id,
            set_local_events: mon.getattr("set_local_events")?.unbind(),
            disable: mon.getattr("DISABLE")?.unbind(),
            code_events: line | py_return,
        });
        id
    };
    let module = py.import("memwatch._memwatch")?;
    let register = mon.getattr("register_callback")?;
    register.call1((tool, py_start, module.getattr("_mon_py_start")?))?;
    let on_line = crate::fastline::line_callback(py, module.getattr("_mon_line")?)?;
    register.call1((tool, line, on_line))?;
    register.call1((tool, py_return, module.getattr("_mon_py_return")?))?;
    mon.getattr("set_events")?.call1((tool, py_start))?;
    // Code objects seen in an earlier watching period had PY_START disabled;
    // turn their line events back on directly.
    set_in_scope_events(py, true)?;
    // Frames already running, on any thread, started before PY_START was
    // on: turn line events on for their in-scope code objects now (the
    // script's module body, a thread waiting in the middle of a function).
    let frames = py.import("sys")?.getattr("_current_frames")?.call0()?;
    for top in frames.call_method0("values")?.try_iter()? {
        let mut frame = top?;
        while !frame.is_none() {
            let code = frame.getattr("f_code")?;
            if let Ok((_, _, true)) = code_info(py, &code) {
                set_code_events(py, &code, true)?;
            }
            frame = frame.getattr("f_back")?;
        }
    }
    Ok(())
}

/// Turns line events on or off for every in-scope code object seen so far.
fn set_in_scope_events(py: Python<'_>, on: bool) -> PyResult<()> {
    let in_scope: Vec<Py<PyAny>> = codes()
        .as_ref()
        .map(|m| {
            m.values()
                .filter(|i| i.in_scope)
                .map(|i| i.code.clone_ref(py))
                .collect()
        })
        .unwrap_or_default();
    for code in in_scope {
        set_code_events(py, code.bind(py), on)?;
    }
    Ok(())
}

fn stop_monitoring(py: Python<'_>) -> PyResult<()> {
    let Some(tool) = monitoring().as_ref().map(|m| m.tool) else {
        return Ok(());
    };
    let mon = py.import("sys")?.getattr("monitoring")?;
    mon.getattr("set_events")?.call1((tool, 0))?;
    set_in_scope_events(py, false)?;
    Ok(())
}

/// `PY_START` callback: decide scope once per code object.
#[pyfunction]
pub fn _mon_py_start(py: Python<'_>, code: &Bound<'_, PyAny>, _offset: i64) -> PyResult<Py<PyAny>> {
    let disable = monitoring()
        .as_ref()
        .map(|m| m.disable.clone_ref(py))
        .unwrap_or_else(|| py.None());
    if GUARD.with(|g| g.get()) {
        return Ok(py.None());
    }
    let (_, _, in_scope) = code_info(py, code)?;
    if in_scope {
        set_code_events(py, code, true)?;
    }
    Ok(disable)
}

/// `DISABLE` for a line or return of code that only watched variables
/// could need and that binds none of them: that event location stops
/// firing until [`restart_disabled`]. `None` otherwise.
fn disable_unless_needed(py: Python<'_>, code: &Bound<'_, PyAny>) -> Py<PyAny> {
    if crate::vars::wants_events(py, code) {
        return py.None();
    }
    monitoring()
        .as_ref()
        .map(|m| m.disable.clone_ref(py))
        .unwrap_or_else(|| py.None())
}

/// Turns the event locations that `disable_unless_needed` switched off back on
/// (a buffer or object is now watched, or another variable): CPython 3.12+.
pub fn restart_disabled(py: Python<'_>) -> PyResult<()> {
    if monitoring().is_some() {
        py.import("sys")?
            .getattr("monitoring")?
            .call_method0("restart_events")?;
    }
    Ok(())
}

/// `LINE` callback.
#[pyfunction]
pub fn _mon_line(py: Python<'_>, code: &Bound<'_, PyAny>, line: u32) -> Py<PyAny> {
    if GUARD.with(|g| g.get()) || !is_active() {
        return py.None();
    }
    let verdict = disable_unless_needed(py, code);
    if verdict.is_none(py) {
        crate::api::at_boundary(py, code.as_ptr() as usize, line, Boundary::Line);
    }
    verdict
}

/// `PY_RETURN` callback.
#[pyfunction]
pub fn _mon_py_return(
    py: Python<'_>,
    code: &Bound<'_, PyAny>,
    _offset: i64,
    _retval: &Bound<'_, PyAny>,
) -> Py<PyAny> {
    if GUARD.with(|g| g.get()) || !is_active() {
        return py.None();
    }
    if crate::fastline::line_unchanged(py) {
        // Nothing to check: only the line moves on, to the caller's.
        LAST.with(|l| l.set(crate::api::innermost_in_scope(py, true)));
        return py.None();
    }
    let verdict = disable_unless_needed(py, code);
    if verdict.is_none(py) {
        crate::api::at_boundary(py, code.as_ptr() as usize, 0, Boundary::Return);
    }
    verdict
}

/// Which event reached a boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// A new line starts: `(code, line)` is it.
    Line,
    /// The current frame returns.
    Return,
}

// --- CPython 3.11: a C trace function -----------------------------------------

extern "C" fn trace_func(
    _obj: *mut ffi::PyObject,
    frame: *mut ffi::PyFrameObject,
    what: c_int,
    _arg: *mut ffi::PyObject,
) -> c_int {
    if GUARD.with(|g| g.get()) || !is_active() || frame.is_null() {
        return 0;
    }
    // SAFETY: the interpreter calls trace functions with the GIL held.
    let py = unsafe { Python::assume_attached() };
    match what {
        ffi::PyTrace_CALL => {
            // SAFETY: `frame` is a live frame; PyFrame_GetCode returns a new reference.
            let code = unsafe { Bound::from_owned_ptr(py, ffi::PyFrame_GetCode(frame).cast()) };
            match code_info(py, &code) {
                Ok((_, _, true)) => {}
                Ok((_, _, false)) => {
                    // SAFETY: `frame` is a live frame object.
                    let f = unsafe { Bound::<PyAny>::from_borrowed_ptr(py, frame.cast()) };
                    if let Err(e) = f.setattr("f_trace_lines", false) {
                        e.write_unraisable(py, None);
                    }
                }
                Err(e) => e.write_unraisable(py, None),
            }
        }
        ffi::PyTrace_LINE => {
            // SAFETY: as above.
            let (code, line) = unsafe {
                let code = Bound::<PyAny>::from_owned_ptr(py, ffi::PyFrame_GetCode(frame).cast());
                (code, ffi::PyFrame_GetLineNumber(frame))
            };
            // Fast path: the code of the last in-scope line (so in scope
            // itself) and nothing changed.
            let key = code.as_ptr() as usize;
            if LAST.with(|l| l.get().0) == key && crate::fastline::line_unchanged(py) {
                LAST.with(|l| l.set((key, line.max(0) as u32)));
                return 0;
            }
            if !code_in_scope(key) && !matches!(code_info(py, &code), Ok((_, _, true))) {
                // A frame that was running before tracing began (no call
                // event decided its scope): no more line events for it.
                // SAFETY: `frame` is a live frame object.
                let f = unsafe { Bound::<PyAny>::from_borrowed_ptr(py, frame.cast()) };
                if let Err(e) = f.setattr("f_trace_lines", false) {
                    e.write_unraisable(py, None);
                }
                return 0;
            }
            crate::api::at_boundary(py, key, line.max(0) as u32, Boundary::Line);
        }
        ffi::PyTrace_RETURN => {
            // SAFETY: as above.
            let code = unsafe { Bound::<PyAny>::from_owned_ptr(py, ffi::PyFrame_GetCode(frame).cast()) };
            if matches!(code_info(py, &code), Ok((_, _, true))) {
                if crate::fastline::line_unchanged(py) {
                    LAST.with(|l| l.set(crate::api::innermost_in_scope(py, true)));
                    return 0;
                }
                crate::api::at_boundary(py, code.as_ptr() as usize, 0, Boundary::Return);
            }
        }
        _ => {}
    }
    0
}

/// Installs the C trace function on the calling thread.
#[pyfunction]
pub fn _install_tracer() {
    // SAFETY: called with the GIL held (a pyfunction).
    unsafe { ffi::PyEval_SetTrace(Some(trace_func), std::ptr::null_mut()) };
}

/// `threading.settrace` hook: installs the C tracer in a new thread.
#[pyfunction]
pub fn _thread_trace_hook(
    py: Python<'_>,
    _frame: &Bound<'_, PyAny>,
    _event: &str,
    _arg: &Bound<'_, PyAny>,
) -> Py<PyAny> {
    _install_tracer();
    py.None()
}

fn start_tracing(py: Python<'_>) -> PyResult<()> {
    let sys = py.import("sys")?;
    if !sys.getattr("gettrace")?.call0()?.is_none() {
        py.import("warnings")?.getattr("warn")?.call1((
            "memwatch replaces this thread's trace function (sys.settrace) on CPython 3.11; \
             a debugger or coverage tool using it stops seeing events while memwatch watches",
            py.get_type::<pyo3::exceptions::PyRuntimeWarning>(),
        ))?;
    }
    _install_tracer();
    set_other_threads_trace(Some(trace_func));
    let hook = py.import("memwatch._memwatch")?.getattr("_thread_trace_hook")?;
    py.import("threading")?.getattr("settrace")?.call1((hook,))?;
    Ok(())
}

extern "C" {
    fn PyInterpreterState_Get() -> *mut ffi::PyInterpreterState;
    fn PyInterpreterState_ThreadHead(interp: *mut ffi::PyInterpreterState) -> *mut ffi::PyThreadState;
    fn PyThreadState_Next(tstate: *mut ffi::PyThreadState) -> *mut ffi::PyThreadState;
}

type SetTraceFor =
    unsafe extern "C" fn(*mut ffi::PyThreadState, Option<ffi::Py_tracefunc>, *mut ffi::PyObject) -> c_int;

/// Sets (or clears) the trace function of every thread of the interpreter
/// but the calling one, as 3.12's `PyEval_SetTraceAllThreads` does. Uses
/// the interpreter's `_PyEval_SetTrace`, looked up at run time; does
/// nothing where it is missing. Called with the GIL held.
fn set_other_threads_trace(func: Option<ffi::Py_tracefunc>) {
    // SAFETY: dlsym with a NUL-terminated name; the symbol, when present,
    // has the signature of CPython 3.11's `_PyEval_SetTrace`.
    let set: Option<SetTraceFor> = unsafe {
        let p = libc::dlsym(libc::RTLD_DEFAULT, c"_PyEval_SetTrace".as_ptr());
        (!p.is_null()).then(|| std::mem::transmute::<*mut libc::c_void, SetTraceFor>(p))
    };
    let Some(set) = set else { return };
    // SAFETY: GIL held: the thread list cannot change while we walk it, and
    // setting another thread's trace function is what CPython itself does
    // for `PyEval_SetTraceAllThreads`.
    unsafe {
        let me = ffi::PyThreadState_Get();
        let mut ts = PyInterpreterState_ThreadHead(PyInterpreterState_Get());
        while !ts.is_null() {
            if ts != me && set(ts, func, std::ptr::null_mut()) < 0 {
                ffi::PyErr_Clear();
            }
            ts = PyThreadState_Next(ts);
        }
    }
}

fn stop_tracing(py: Python<'_>) -> PyResult<()> {
    // SAFETY: GIL held.
    unsafe { ffi::PyEval_SetTrace(None, std::ptr::null_mut()) };
    set_other_threads_trace(None);
    py.import("threading")?.getattr("settrace")?.call1((py.None(),))?;
    Ok(())
}
