//! CPython 3.11: line boundaries through a C-level trace function on each
//! thread: on every thread that exists when watching starts (through the
//! interpreter's `_PyEval_SetTrace`, found at run time), and on new threads
//! through `threading.settrace`. Call events decide scope; out-of-scope
//! frames get `f_trace_lines = False` (frames that were already running
//! get it at their first line event). The interpreter still runs its
//! tracing loop for every frame, so on 3.11 out-of-scope code is slower
//! while something is watched. Line and return events of in-scope code go
//! to `boundary::step`.
//!
//! A trace function already installed on a thread (coverage.py, a
//! debugger) is kept: memwatch's is installed on top of it, hands it every
//! event first, turns no frame's line events off, and puts it back when
//! watching stops (see `Chained`).
//!
//! State: the layout check of the interpreter's thread state
//! (`CHAIN_LAYOUT`, an atomic) and the `threading.settrace` hook that was
//! there before (`PREV_THREAD_HOOK`, a mutex held only to read or set it).
//! Nothing here runs in signal context.

use std::os::raw::c_int;
use std::sync::Mutex;

use pyo3::ffi;
use pyo3::prelude::*;

use crate::boundary::{self, Boundary, Verdict};
use crate::runtime::codes::{code_in_scope, code_info, scope_generation};
use crate::runtime::events::{self, LineEvents};
use crate::runtime::thread::GUARD;

thread_local! {
    /// The code object (by address) this thread last found in scope, and
    /// the scope generation it was found at.
    static SCOPED: std::cell::Cell<(usize, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// The C trace function family, installed by `monitor::choose`.
pub struct SetTrace;

impl LineEvents for SetTrace {
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        start_tracing(py)
    }
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        stop_tracing(py)
    }
    fn set_code_events(&self, _py: Python<'_>, _code: &Bound<'_, PyAny>, _on: bool) -> PyResult<()> {
        // Scope is decided at each call event: nothing is set per code object.
        Ok(())
    }
    fn restart_disabled(&self, _py: Python<'_>) -> PyResult<()> {
        // No event location is ever switched off here.
        Ok(())
    }
}

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
    if GUARD.with(|g| g.get()) || !events::is_active() || frame.is_null() {
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
            // The code this thread last found in scope, at the current
            // scope decisions: no look-up for a loop that stays in one
            // function.
            let key = code.as_ptr() as usize;
            let scope = scope_generation();
            if SCOPED.with(|s| s.get()) != (key, scope) {
                if !code_in_scope(key) && !matches!(code_info(py, &code), Ok((_, _, true))) {
                    if chained {
                        return 0;
                    }
                    // A frame that was running before tracing began (no
                    // call event decided its scope): no more line events
                    // for it.
                    // SAFETY: `frame` is a live frame object.
                    let f = unsafe { Bound::<PyAny>::from_borrowed_ptr(py, frame.cast()) };
                    if let Err(e) = f.setattr("f_trace_lines", false) {
                        e.write_unraisable(py, None);
                    }
                    return 0;
                }
                SCOPED.with(|s| s.set((key, scope)));
            }
            return status(
                py,
                boundary::step(py, &code, line.max(0) as u32, Boundary::Line, false),
            );
        }
        ffi::PyTrace_RETURN => {
            // SAFETY: as above.
            let code = unsafe { Bound::<PyAny>::from_owned_ptr(py, ffi::PyFrame_GetCode(frame).cast()) };
            if matches!(code_info(py, &code), Ok((_, _, true))) {
                return status(py, boundary::step(py, &code, 0, Boundary::Return, false));
            }
        }
        _ => {}
    }
    0
}

/// The trace function's status for a step's verdict: -1 with the error
/// set when a guard's action raises (the interpreter raises it in the
/// traced frame).
fn status(py: Python<'_>, verdict: Verdict) -> c_int {
    match verdict {
        Verdict::Continue | Verdict::Disable => 0,
        Verdict::Raise(e) => {
            e.restore(py);
            -1
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
