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
//!   is watched. A trace function already installed on a thread (coverage.py,
//!   a debugger) is kept: memwatch's is installed on top of it, hands it
//!   every event first, turns no frame's line events off, and puts it back
//!   when watching stops (see `Chained`).
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
    /// `display_name(path)`: the name a code object's file is recorded
    /// under (`cell [3]` for an IPython cell, else the path itself).
    pub display_name: Py<PyAny>,
}

pub static HOOKS: OnceLock<Hooks> = OnceLock::new();

/// Receives the hooks from `memwatch._session`.
#[pyfunction]
pub fn _set_hooks(in_scope: Py<PyAny>, current_thread: Py<PyAny>, sys: Py<PyAny>, display_name: Py<PyAny>) {
    let _ = HOOKS.set(Hooks {
        in_scope,
        current_thread,
        sys,
        display_name,
    });
}

/// The hooks, or an error if the Python package did not set them.
pub fn hooks() -> PyResult<&'static Hooks> {
    HOOKS
        .get()
        .ok_or_else(|| crate::errors::MemwatchError::new_err("memwatch._session was not imported"))
}

/// What we know about a code object.
pub struct CodeInfo {
    /// Keeps the code object (and so the map's key) alive.
    pub code: Py<PyAny>,
    /// The file as recorded and reported (see [`Hooks::display_name`]).
    pub file: Arc<str>,
    /// The code object's own (normalized) file name, which scope decides on.
    pub path: Arc<str>,
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

/// Moves this thread's last in-scope line to `last` (and tells the
/// fatal-signal handler, which cannot read thread-locals).
#[inline]
pub fn set_last(last: (usize, u32)) {
    LAST.with(|l| l.set(last));
    crate::signals::crash::note_line(last.0, last.1);
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
    let path = normalize(&code.getattr("co_filename")?.extract::<String>()?);
    let function: String = code
        .getattr("co_qualname")
        .or_else(|_| code.getattr("co_name"))?
        .extract()?;
    let (in_scope, file) = guarded(|| -> PyResult<(bool, String)> {
        let h = hooks()?;
        let in_scope = h.in_scope.bind(py).call1((&path,))?.extract()?;
        let file = h.display_name.bind(py).call1((&path,))?.extract()?;
        Ok((in_scope, file))
    })?;
    let info = CodeInfo {
        code: code.clone().unbind(),
        file: file.into(),
        path: path.into(),
        function: function.into(),
        in_scope,
    };
    let out = (info.file.clone(), info.function.clone(), info.in_scope);
    crate::signals::crash::learn_code(key, &info.file, &info.function);
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
                .map(|(k, i)| (*k, i.code.clone_ref(py), i.path.clone(), i.in_scope))
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
pub fn _mon_line(py: Python<'_>, code: &Bound<'_, PyAny>, line: u32) -> PyResult<Py<PyAny>> {
    if GUARD.with(|g| g.get()) || !is_active() {
        return Ok(py.None());
    }
    let verdict = disable_unless_needed(py, code);
    if verdict.is_none(py) {
        crate::api::at_boundary(py, code.as_ptr() as usize, line, Boundary::Line);
        // A guard's raise leaves here, raised in the running frame.
        crate::guard::fire(py)?;
    }
    Ok(verdict)
}

/// `PY_RETURN` callback.
#[pyfunction]
pub fn _mon_py_return(
    py: Python<'_>,
    code: &Bound<'_, PyAny>,
    _offset: i64,
    _retval: &Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    if GUARD.with(|g| g.get()) || !is_active() {
        return Ok(py.None());
    }
    if !crate::guard::any_waiting() && crate::fastline::line_unchanged(py) {
        // Nothing to check: only the line moves on, to the caller's.
        set_last(crate::api::innermost_in_scope(py, true));
        return Ok(py.None());
    }
    let verdict = disable_unless_needed(py, code);
    if verdict.is_none(py) {
        crate::api::at_boundary(py, code.as_ptr() as usize, 0, Boundary::Return);
        crate::guard::fire(py)?;
    }
    Ok(verdict)
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

/// The trace function (and its object) that was installed on a thread
/// when memwatch installed its own there: memwatch's trace object is a
/// capsule holding it, and every event goes to it first. The object is a
/// strong reference, released with the capsule.
struct Chained {
    func: ffi::Py_tracefunc,
    obj: *mut ffi::PyObject,
}

const CHAINED: &std::ffi::CStr = c"memwatch.chained_tracer";

/// `PyThreadState.c_tracefunc` and `.c_traceobj` on CPython 3.11 (from its
/// `cpython/pystate.h`, with `offsetof`). Read only once [`chain_layout`]
/// found them where `sys.gettrace()` says the trace object is.
const TS_TRACEFUNC_311: usize = 72;
const TS_TRACEOBJ_311: usize = 88;

/// Whether this interpreter keeps its trace function at the 3.11 offsets:
/// decided at the first install on a thread that has a trace function.
static CHAIN_LAYOUT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

unsafe extern "C" fn drop_chained(capsule: *mut ffi::PyObject) {
    // SAFETY: our capsule (its destructor); the pointer is a leaked Box.
    unsafe {
        let p = ffi::PyCapsule_GetPointer(capsule, CHAINED.as_ptr()).cast::<Chained>();
        if p.is_null() {
            ffi::PyErr_Clear();
            return;
        }
        let c = Box::from_raw(p);
        ffi::Py_XDECREF(c.obj);
    }
}

/// The trace function installed on thread state `ts`, as the interpreter
/// holds it (`None`: none, or the layout is not known to be 3.11's).
///
/// # Safety
/// GIL held; `ts` a live thread state of this interpreter.
unsafe fn installed_on(ts: *mut ffi::PyThreadState) -> Option<(ffi::Py_tracefunc, *mut ffi::PyObject)> {
    if CHAIN_LAYOUT.load(std::sync::atomic::Ordering::Relaxed) != 1 {
        return None;
    }
    // SAFETY: the layout was checked on this interpreter; both fields lie
    // well inside the thread state.
    unsafe {
        let func = *((ts as usize + TS_TRACEFUNC_311) as *const Option<ffi::Py_tracefunc>);
        let obj = *((ts as usize + TS_TRACEOBJ_311) as *const *mut ffi::PyObject);
        func.map(|f| (f, obj))
    }
}

/// Decides [`CHAIN_LAYOUT`] once, on the calling thread: the trace object
/// at the 3.11 offset must be the one `sys.gettrace()` returns, with a
/// function beside it. A thread without a trace function gets a probe
/// (`sys.settrace` with an object that is never called: no event can
/// happen before it is taken off again) for the check.
fn chain_layout(py: Python<'_>) {
    if CHAIN_LAYOUT.load(std::sync::atomic::Ordering::Relaxed) != 0 || py.version_info().minor != 11 {
        return;
    }
    let check = || -> PyResult<bool> {
        let sys = py.import("sys")?;
        let mut current = sys.getattr("gettrace")?.call0()?;
        let probe = current.is_none();
        if probe {
            current = sys.getattr("gettrace")?;
            sys.getattr("settrace")?.call1((&current,))?;
        }
        // SAFETY: GIL held; reads two words of our own thread state, which
        // is far larger than these offsets.
        let ok = unsafe {
            let ts = ffi::PyThreadState_Get() as usize;
            let func = *((ts + TS_TRACEFUNC_311) as *const usize);
            let obj = *((ts + TS_TRACEOBJ_311) as *const *mut ffi::PyObject);
            func != 0 && obj == current.as_ptr()
        };
        if probe {
            sys.getattr("settrace")?.call1((py.None(),))?;
        }
        Ok(ok)
    };
    let ok = check().unwrap_or(false);
    CHAIN_LAYOUT.store(if ok { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// The trace object to install memwatch's trace function with on `ts`: a
/// capsule chaining to the trace function found there (a new reference),
/// or NULL when there is none. Memwatch's own is never chained to: a
/// thread that has it keeps what it chains to.
///
/// # Safety
/// GIL held; `ts` a live thread state of this interpreter.
unsafe fn chain_for(ts: *mut ffi::PyThreadState) -> *mut ffi::PyObject {
    // SAFETY: as the caller promises.
    let Some((func, obj)) = (unsafe { installed_on(ts) }) else {
        return std::ptr::null_mut();
    };
    if func as usize == trace_func as *const () as usize {
        // Already ours: keep its chain.
        // SAFETY: GIL held; a new reference to the installed object.
        return unsafe { ffi::Py_XNewRef(obj) };
    }
    // SAFETY: GIL held; the chained object gets its own reference, released
    // by the capsule's destructor.
    unsafe {
        ffi::Py_XINCREF(obj);
        let p = Box::into_raw(Box::new(Chained { func, obj }));
        let capsule = ffi::PyCapsule_New(p.cast(), CHAINED.as_ptr(), Some(drop_chained));
        if capsule.is_null() {
            ffi::PyErr_Clear();
            let c = Box::from_raw(p);
            ffi::Py_XDECREF(c.obj);
        }
        capsule
    }
}

/// What to put back on `ts` when memwatch stops: the trace function its
/// own chains to (`None` when there is none, or memwatch's is not the one
/// installed: whoever replaced it keeps their place).
///
/// # Safety
/// GIL held; `ts` a live thread state of this interpreter.
unsafe fn unchain_for(
    ts: *mut ffi::PyThreadState,
) -> Option<(Option<ffi::Py_tracefunc>, *mut ffi::PyObject)> {
    // SAFETY: as the caller promises.
    let (func, obj) = unsafe { installed_on(ts) }?;
    if func as usize != trace_func as *const () as usize {
        return None;
    }
    if obj.is_null() {
        return Some((None, std::ptr::null_mut()));
    }
    // SAFETY: our own trace object, a `CHAINED` capsule.
    let c = unsafe { ffi::PyCapsule_GetPointer(obj, CHAINED.as_ptr()).cast::<Chained>() };
    if c.is_null() {
        // SAFETY: GIL held.
        unsafe { ffi::PyErr_Clear() };
        return Some((None, std::ptr::null_mut()));
    }
    // SAFETY: a live `Chained` owned by the capsule, which is installed.
    let c = unsafe { &*c };
    Some((Some(c.func), c.obj))
}

extern "C" fn trace_func(
    obj: *mut ffi::PyObject,
    frame: *mut ffi::PyFrameObject,
    what: c_int,
    arg: *mut ffi::PyObject,
) -> c_int {
    // A trace function that was there first sees every event, first.
    let chained = !obj.is_null();
    if chained {
        // SAFETY: memwatch installs this function only with NULL or a
        // `CHAINED` capsule, which the interpreter keeps alive while it is
        // installed; the chained function gets its own object and our
        // arguments unchanged, as it would have without us.
        let rc = unsafe {
            let c = ffi::PyCapsule_GetPointer(obj, CHAINED.as_ptr()).cast::<Chained>();
            match c.as_ref() {
                Some(c) => (c.func)(c.obj, frame, what, arg),
                None => {
                    ffi::PyErr_Clear();
                    0
                }
            }
        };
        if rc != 0 {
            return rc;
        }
    }
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
                // The chained trace function may want this frame's lines.
                Ok((_, _, false)) if chained => {}
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
            if LAST.with(|l| l.get().0) == key
                && !crate::guard::any_waiting()
                && crate::fastline::line_unchanged(py)
            {
                set_last((key, line.max(0) as u32));
                return 0;
            }
            if !code_in_scope(key) && !matches!(code_info(py, &code), Ok((_, _, true))) {
                if chained {
                    return 0;
                }
                // A frame that was running before tracing began (no call
                // event decided its scope): no more line events for it.
                // SAFETY: `frame` is a live frame object.
                let f = unsafe { Bound::<PyAny>::from_borrowed_ptr(py, frame.cast()) };
                if let Err(e) = f.setattr("f_trace_lines", false) {
                    e.write_unraisable(py, None);
                }
                return 0;
            }
            return on_boundary(key, line.max(0) as u32, Boundary::Line);
        }
        ffi::PyTrace_RETURN => {
            // SAFETY: as above.
            let code = unsafe { Bound::<PyAny>::from_owned_ptr(py, ffi::PyFrame_GetCode(frame).cast()) };
            if matches!(code_info(py, &code), Ok((_, _, true))) {
                if !crate::guard::any_waiting() && crate::fastline::line_unchanged(py) {
                    set_last(crate::api::innermost_in_scope(py, true));
                    return 0;
                }
                return on_boundary(code.as_ptr() as usize, 0, Boundary::Return);
            }
        }
        _ => {}
    }
    0
}

/// A boundary of the C trace function that takes the full check, inside
/// pyo3's attach scope. A trace function is called with the GIL held but
/// outside any pyo3 entry point, so pyo3 does not know the thread is
/// attached: every `Py` dropped there (a change handed to the history and
/// let go, say) would wait in pyo3's reference pool until the next entry
/// point, and with it the shadow snapshot the change's bytes point into,
/// so the next check of a large region could not reuse its snapshot
/// buffer and took a fresh one (CPython 3.11 paid 1.4-1.8x for history
/// on a 100 MB rewrite for this; `sys.monitoring` callbacks are pyo3
/// functions and never did).
#[inline(never)]
///
/// Returns the trace function's status: -1 with the error set when a
/// guard's action raises (the interpreter raises it in the traced frame).
fn on_boundary(code: usize, line: u32, kind: Boundary) -> c_int {
    let fired = Python::try_attach(|py| {
        crate::api::at_boundary(py, code, line, kind);
        crate::guard::fire(py).map_err(|e| e.restore(py)).is_err()
    });
    match fired {
        Some(true) => -1,
        Some(false) => 0,
        None => {
            // The interpreter is finalizing: check all the same, as before.
            // SAFETY: trace functions are called with the GIL held.
            crate::api::at_boundary(unsafe { Python::assume_attached() }, code, line, kind);
            0
        }
    }
}

/// Installs the C trace function on the calling thread, on top of the
/// trace function there (chained to it).
#[pyfunction]
pub fn _install_tracer(py: Python<'_>) {
    chain_layout(py);
    // SAFETY: GIL held (a pyfunction); our own thread state.
    unsafe {
        let obj = chain_for(ffi::PyThreadState_Get());
        ffi::PyEval_SetTrace(Some(trace_func), obj);
        ffi::Py_XDECREF(obj);
    }
}

/// The `threading.settrace` hook that was set when tracing started: new
/// threads still get it, before memwatch's trace function.
static PREV_THREAD_HOOK: Mutex<Option<Py<PyAny>>> = Mutex::new(None);

/// `threading.settrace` hook: installs the C tracer in a new thread. A
/// hook that was set before memwatch's runs first, as `threading` would
/// have run it (it may install a trace function of its own, which
/// memwatch's then chains to); its result is returned as its would be.
#[pyfunction]
pub fn _thread_trace_hook(
    py: Python<'_>,
    frame: &Bound<'_, PyAny>,
    event: &Bound<'_, PyAny>,
    arg: &Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    let sys = py.import("sys")?;
    let prev = PREV_THREAD_HOOK
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|h| h.clone_ref(py));
    let result = match prev {
        Some(prev) => {
            sys.getattr("settrace")?.call1((&prev,))?;
            prev.bind(py).call1((frame, event, arg))?.unbind()
        }
        None => {
            sys.getattr("settrace")?.call1((py.None(),))?;
            py.None()
        }
    };
    _install_tracer(py);
    Ok(result)
}

fn start_tracing(py: Python<'_>) -> PyResult<()> {
    let sys = py.import("sys")?;
    let threading = py.import("threading")?;
    chain_layout(py);
    if !sys.getattr("gettrace")?.call0()?.is_none()
        && CHAIN_LAYOUT.load(std::sync::atomic::Ordering::Relaxed) != 1
    {
        py.import("warnings")?.getattr("warn")?.call1((
            "memwatch replaces this thread's trace function (sys.settrace) on CPython 3.11 \
             (it could not find where this interpreter keeps it); a debugger or coverage tool \
             using it stops seeing events while memwatch watches",
            py.get_type::<pyo3::exceptions::PyRuntimeWarning>(),
        ))?;
    }
    _install_tracer(py);
    set_other_threads_trace(true);
    let hook = py.import("memwatch._memwatch")?.getattr("_thread_trace_hook")?;
    let prev = threading.getattr("gettrace")?.call0()?;
    if !prev.is_none() && !prev.eq(&hook)? {
        *PREV_THREAD_HOOK.lock().unwrap_or_else(|p| p.into_inner()) = Some(prev.unbind());
    }
    threading.getattr("settrace")?.call1((hook,))?;
    Ok(())
}

extern "C" {
    fn PyInterpreterState_Get() -> *mut ffi::PyInterpreterState;
    fn PyInterpreterState_ThreadHead(interp: *mut ffi::PyInterpreterState) -> *mut ffi::PyThreadState;
    fn PyThreadState_Next(tstate: *mut ffi::PyThreadState) -> *mut ffi::PyThreadState;
}

type SetTraceFor =
    unsafe extern "C" fn(*mut ffi::PyThreadState, Option<ffi::Py_tracefunc>, *mut ffi::PyObject) -> c_int;

/// Puts memwatch's trace function on (chained to what is there) or takes
/// it off (putting back what it chained to) the thread state `ts`, through
/// `set` (`_PyEval_SetTrace`).
///
/// # Safety
/// GIL held; `ts` a live thread state of this interpreter.
unsafe fn trace_on(ts: *mut ffi::PyThreadState, on: bool, set: SetTraceFor) {
    // SAFETY (all below): as the caller promises.
    unsafe {
        if on {
            let obj = chain_for(ts);
            if set(ts, Some(trace_func), obj) < 0 {
                ffi::PyErr_Clear();
            }
            ffi::Py_XDECREF(obj);
            return;
        }
        if CHAIN_LAYOUT.load(std::sync::atomic::Ordering::Relaxed) != 1 {
            // Nothing was chained: take ours off.
            if set(ts, None, std::ptr::null_mut()) < 0 {
                ffi::PyErr_Clear();
            }
            return;
        }
        let Some((func, obj)) = unchain_for(ts) else {
            return;
        };
        // `_PyEval_SetTrace` releases the old object (our capsule, and with
        // it the capsule's reference to `obj`) before it takes its own
        // reference to the new one: hold `obj` across.
        ffi::Py_XINCREF(obj);
        if set(ts, func, obj) < 0 {
            ffi::PyErr_Clear();
        }
        ffi::Py_XDECREF(obj);
    }
}

fn set_trace_for() -> Option<SetTraceFor> {
    // SAFETY: dlsym with a NUL-terminated name; the symbol, when present,
    // has the signature of CPython 3.11's `_PyEval_SetTrace`.
    unsafe {
        let p = libc::dlsym(libc::RTLD_DEFAULT, c"_PyEval_SetTrace".as_ptr());
        (!p.is_null()).then(|| std::mem::transmute::<*mut libc::c_void, SetTraceFor>(p))
    }
}

/// Puts memwatch's trace function on (or takes it off) every thread of
/// the interpreter but the calling one, as 3.12's
/// `PyEval_SetTraceAllThreads` does. Uses the interpreter's
/// `_PyEval_SetTrace`, looked up at run time; does nothing where it is
/// missing. Called with the GIL held.
fn set_other_threads_trace(on: bool) {
    let Some(set) = set_trace_for() else { return };
    // SAFETY: GIL held: the thread list cannot change while we walk it, and
    // setting another thread's trace function is what CPython itself does
    // for `PyEval_SetTraceAllThreads`.
    unsafe {
        let me = ffi::PyThreadState_Get();
        let mut ts = PyInterpreterState_ThreadHead(PyInterpreterState_Get());
        while !ts.is_null() {
            if ts != me {
                trace_on(ts, on, set);
            }
            ts = PyThreadState_Next(ts);
        }
    }
}

fn stop_tracing(py: Python<'_>) -> PyResult<()> {
    // A trace function set after memwatch's replaced it on this thread:
    // memwatch saw nothing here since. Said, not left silent.
    // SAFETY: GIL held; our own thread state.
    let replaced = unsafe { installed_on(ffi::PyThreadState_Get()) }
        .is_some_and(|(f, _)| f as usize != trace_func as *const () as usize);
    if replaced {
        py.import("warnings")?.getattr("warn")?.call1((
            "memwatch: a trace function set after memwatch started (sys.settrace: a debugger, \
             a coverage tool) replaced memwatch's on this thread, so changes made here since \
             were not seen; start such a tool before memwatch on CPython 3.11",
            py.get_type::<pyo3::exceptions::PyRuntimeWarning>(),
        ))?;
    }
    match set_trace_for() {
        // SAFETY: GIL held; our own thread state.
        Some(set) => unsafe { trace_on(ffi::PyThreadState_Get(), false, set) },
        // SAFETY: GIL held.
        None => unsafe { ffi::PyEval_SetTrace(None, std::ptr::null_mut()) },
    }
    set_other_threads_trace(false);
    let prev = PREV_THREAD_HOOK.lock().unwrap_or_else(|p| p.into_inner()).take();
    let threading = py.import("threading")?;
    match prev {
        Some(prev) => threading.getattr("settrace")?.call1((prev,))?,
        None => threading.getattr("settrace")?.call1((py.None(),))?,
    };
    Ok(())
}
