//! CPython 3.12+: line boundaries through `sys.monitoring`, under a tool id
//! of our own.
//!
//! `PY_START` is enabled globally; its callback ([`_mon_py_start`]) decides
//! once per code object whether it is in scope, enables `LINE` and
//! `PY_RETURN` on that code object only, and returns `DISABLE` so
//! `PY_START` never fires for it again. The `LINE` callback is a plain
//! `METH_FASTCALL` C function (`on_line`: no argument parsing, no pyo3
//! trampoline) and the `PY_RETURN` one a pyo3 function; both call
//! `boundary::step` and map its verdict. Out-of-scope code gets no line
//! events at all.
//!
//! State: the tool id and the callables it needs (`MONITORING`, a mutex
//! held only to read or set them, never while Python code runs) and the
//! `LINE` callback's method definition (`DEF`, immutable once made).
//! Nothing here runs in signal context.

use std::sync::{Mutex, OnceLock};

use pyo3::ffi;
use pyo3::prelude::*;

use crate::boundary::{self, Boundary, Verdict};
use crate::runtime::codes::{code_info, codes};
use crate::runtime::events::LineEvents;
use crate::runtime::thread::GUARD;

/// The `sys.monitoring` family, installed by `monitor::choose`.
pub struct SysMonitoring;

impl LineEvents for SysMonitoring {
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        start_monitoring(py)
    }
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        stop_monitoring(py)
    }
    fn set_code_events(&self, py: Python<'_>, code: &Bound<'_, PyAny>, on: bool) -> PyResult<()> {
        set_code_events(py, code, on)
    }
    fn restart_disabled(&self, py: Python<'_>) -> PyResult<()> {
        if monitoring().is_some() {
            py.import("sys")?
                .getattr("monitoring")?
                .call_method0("restart_events")?;
        }
        Ok(())
    }
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
            return Err(crate::model::errors::MemwatchError::new_err(
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
    let on_line = line_callback(py)?;
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

/// `sys.monitoring.DISABLE`, or `None` before monitoring was set up.
fn disable(py: Python<'_>) -> Py<PyAny> {
    monitoring()
        .as_ref()
        .map(|m| m.disable.clone_ref(py))
        .unwrap_or_else(|| py.None())
}

/// `PY_RETURN` callback.
#[pyfunction]
pub fn _mon_py_return(
    py: Python<'_>,
    code: &Bound<'_, PyAny>,
    _offset: i64,
    _retval: &Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    match boundary::step(py, code, 0, Boundary::Return, true) {
        Verdict::Continue => Ok(py.None()),
        Verdict::Disable => Ok(disable(py)),
        Verdict::Raise(e) => Err(e),
    }
}

/// `LINE` callback (`args`: code object, line number).
///
/// # Safety
/// Called by the interpreter, with the GIL held and `nargs` arguments.
unsafe extern "C" fn on_line(
    _slf: *mut ffi::PyObject,
    args: *mut *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter calls us with the GIL held.
    let py = unsafe { Python::assume_attached() };
    if nargs != 2 {
        // SAFETY: returning a new reference to None.
        return unsafe { ffi::Py_NewRef(ffi::Py_None()) };
    }
    // SAFETY: two arguments, as checked: a code object and the line (an
    // int), borrowed for the call.
    let (code, line) = unsafe {
        (
            Bound::from_borrowed_ptr(py, *args),
            ffi::PyLong_AsLong(*args.add(1)),
        )
    };
    if line < 0 {
        // SAFETY: GIL held; clears the conversion error, if any.
        unsafe {
            ffi::PyErr_Clear();
            return ffi::Py_NewRef(ffi::Py_None());
        }
    }
    // A panic must not unwind into the interpreter (this is a C function,
    // not a pyo3 one): it is raised as pyo3's `PanicException`, as a pyo3
    // callback would raise it.
    let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        boundary::step(py, &code, line as u32, Boundary::Line, true)
    }))
    .unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic in memwatch's LINE callback".to_string());
        Verdict::Raise(pyo3::panic::PanicException::new_err(what))
    });
    match verdict {
        // SAFETY: returning a new reference to None.
        Verdict::Continue => unsafe { ffi::Py_NewRef(ffi::Py_None()) },
        Verdict::Disable => disable(py).into_ptr(),
        Verdict::Raise(e) => {
            e.restore(py);
            std::ptr::null_mut()
        }
    }
}

static DEF: OnceLock<SyncDef> = OnceLock::new();

struct SyncDef(ffi::PyMethodDef);

// SAFETY: the definition is immutable after creation; the interpreter only
// reads it.
unsafe impl Sync for SyncDef {}
// SAFETY: as above.
unsafe impl Send for SyncDef {}

/// The `LINE` callback to register: [`on_line`] as a Python callable.
fn line_callback(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let def = DEF.get_or_init(|| {
        SyncDef(ffi::PyMethodDef {
            ml_name: c"_mon_line".as_ptr(),
            ml_meth: ffi::PyMethodDefPointer {
                PyCFunctionFast: on_line,
            },
            ml_flags: ffi::METH_FASTCALL,
            ml_doc: c"memwatch's sys.monitoring LINE callback.".as_ptr(),
        })
    });
    // SAFETY: `def` lives for the rest of the process; GIL held.
    unsafe {
        let f = ffi::PyCFunction_NewEx(
            std::ptr::from_ref(&def.0).cast_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        Bound::from_owned_ptr_or_err(py, f)
    }
}
