//! Line boundaries: where the recorder looks for changes.
//!
//! A check runs at every line of in-scope code and when an in-scope
//! function returns; the changes it finds are attributed to the line the
//! thread executed before (the innermost in-scope line that led to them).
//! Out-of-scope code gets no line events at all (on 3.11, none that reach
//! the recorder).
//!
//! One module per interpreter family, each a `runtime::events::LineEvents`
//! and each calling `boundary::step` at every line and return:
//!
//! - [`sys_monitoring`]: CPython 3.12+, `sys.monitoring` under a tool id of
//!   our own, with events enabled per in-scope code object.
//! - [`settrace`]: CPython 3.11, a C trace function on every thread,
//!   chained to one that was there before.
//!
//! [`choose`] picks the family once, when the extension module is
//! initialised, and installs it in `runtime::events`, through which the
//! watch kinds start and stop events. Nothing here runs in signal context.

use pyo3::prelude::*;

use crate::runtime::events;

pub mod settrace;
pub mod sys_monitoring;

/// Installs the line-event family of this interpreter (once).
pub fn choose(py: Python<'_>) {
    if py.version_info() >= (3, 12) {
        events::install(&sys_monitoring::SysMonitoring);
    } else {
        events::install(&settrace::SetTrace);
    }
}
