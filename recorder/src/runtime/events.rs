//! Line events on or off, whichever interpreter family delivers them.
//!
//! The families live above every watch kind (`crate::monitor`: one module
//! for CPython 3.12+'s `sys.monitoring`, one for 3.11's C trace function),
//! but watching and unwatching must start and stop their events. So the
//! family is chosen once, when the extension module is initialised
//! (`monitor::choose`), and installed here as a [`LineEvents`]; the watch
//! kinds call [`start`], [`stop`] and [`restart_disabled`] without naming
//! it.
//!
//! State: the installed family (a `OnceLock`) and whether events are on
//! (an atomic). No lock; nothing here runs in signal context.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use pyo3::prelude::*;

/// What an interpreter family does to deliver line boundaries. Every
/// method is called with the GIL held.
pub trait LineEvents: Sync {
    /// Turns line and return events on for in-scope code.
    fn start(&self, py: Python<'_>) -> PyResult<()>;
    /// Turns them off everywhere.
    fn stop(&self, py: Python<'_>) -> PyResult<()>;
    /// Turns line and return events of one code object on or off (after
    /// its scope decision changed).
    fn set_code_events(&self, py: Python<'_>, code: &Bound<'_, PyAny>, on: bool) -> PyResult<()>;
    /// Turns back on the event locations switched off as needing nothing
    /// (`boundary::Verdict::Disable`), where the family can switch them off.
    fn restart_disabled(&self, py: Python<'_>) -> PyResult<()>;
}

static FAMILY: OnceLock<&'static dyn LineEvents> = OnceLock::new();
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Installs the family chosen for this interpreter (once; later calls
/// keep the first).
pub fn install(family: &'static dyn LineEvents) {
    let _ = FAMILY.set(family);
}

fn family() -> PyResult<&'static dyn LineEvents> {
    FAMILY.get().copied().ok_or_else(|| {
        crate::model::errors::MemwatchError::new_err(
            "memwatch: no line-event mechanism was chosen for this interpreter (the extension \
             module was not initialised)",
        )
    })
}

/// True while line events are on.
#[inline]
pub fn is_active() -> bool {
    RUNNING.load(Ordering::Relaxed)
}

/// Turns line events on (idempotent).
pub fn start(py: Python<'_>) -> PyResult<()> {
    if is_active() {
        return Ok(());
    }
    family()?.start(py)?;
    RUNNING.store(true, Ordering::Relaxed);
    Ok(())
}

/// Turns line events off (idempotent).
pub fn stop(py: Python<'_>) -> PyResult<()> {
    if !is_active() {
        return Ok(());
    }
    RUNNING.store(false, Ordering::Relaxed);
    family()?.stop(py)
}

/// Turns line events off when nothing at all is watched any more.
pub fn stop_if_idle(py: Python<'_>) -> PyResult<()> {
    if crate::runtime::watched::anything() {
        return Ok(());
    }
    stop(py)
}

/// See [`LineEvents::set_code_events`].
pub fn set_code_events(py: Python<'_>, code: &Bound<'_, PyAny>, on: bool) -> PyResult<()> {
    family()?.set_code_events(py, code, on)
}

/// See [`LineEvents::restart_disabled`].
pub fn restart_disabled(py: Python<'_>) -> PyResult<()> {
    family()?.restart_disabled(py)
}
