//! The one boundary step: what runs at a line of in-scope code and when an
//! in-scope function returns, whichever interpreter family delivered the
//! event (`crate::monitor`: CPython 3.12+'s `sys.monitoring` callbacks and
//! 3.11's C trace function both call [`step`] and nothing else), and the
//! checks made on request (`check()`, a torch op through
//! `watch(t, via="dispatch")`, stopping a trace).
//!
//! [`step`] runs in phases, each a function named for it:
//!
//! 1. *skip*: memwatch's own Python code is running (the re-entry guard),
//!    or line events are off.
//! 2. `quick`: watched memory is as the last check left it
//!    (`watch::buffers::fast::unchanged`, no lock taken) and no guard action
//!    waits. Object changes queued or found in place are reported (the
//!    only work left), and unless a watched variable may have been rebound
//!    the line just moves on. Most lines end here.
//! 3. `disabled`: only variables are watched and this code binds none of
//!    them: where the family can (3.12+), the event location is switched
//!    off for good and the line does not move.
//! 4. `full`: inside pyo3's attach scope, [`at_boundary`] (report object
//!    changes, check buffers, check variables, move the line, note the
//!    thread's line for store mode), then the guard actions due in this
//!    thread (`deliver::guard::fire`).
//!
//! A quick boundary is the same as a full one that found nothing: that is
//! what lets it skip the rest, and why both are written here once.
//!
//! State: none of its own (the thread's last line is `runtime::thread`'s).
//! Nothing here runs in signal context.

use pyo3::prelude::*;

use crate::deliver::guard;
use crate::runtime::attrib::{innermost, innermost_in_scope, note_thread_line};
use crate::runtime::codes::code_in_scope;
use crate::runtime::events;
use crate::runtime::thread::{set_last, GUARD, LAST};
use crate::runtime::watched::{self, Kind};
use crate::watch::buffers::check::with_op;
use crate::watch::buffers::end::check_and_end;
use crate::watch::buffers::fast;
use crate::watch::buffers::state::with_state;
use crate::watch::{objects, vars};

/// Which event reached a boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// A new line starts: `(code, line)` is it.
    Line,
    /// The current frame returns.
    Return,
}

/// What the interpreter family does after a step.
pub enum Verdict {
    /// Carry on.
    Continue,
    /// Switch this event location off (`sys.monitoring.DISABLE`); only
    /// answered to a family that can.
    Disable,
    /// Raise this in the running frame (a guard's `MutationError`).
    Raise(PyErr),
}

/// The boundary step, for the in-scope code object `code` at `line` (0 for
/// a return). `can_disable`: the family can switch an event location off.
#[inline]
pub fn step(
    py: Python<'_>,
    code: &Bound<'_, PyAny>,
    line: u32,
    kind: Boundary,
    can_disable: bool,
) -> Verdict {
    if GUARD.with(|g| g.get()) || !events::is_active() {
        return Verdict::Continue;
    }
    let key = code.as_ptr() as usize;
    if quick(py, key, line, kind) {
        return Verdict::Continue;
    }
    if can_disable && disabled(py, code) {
        return Verdict::Disable;
    }
    full(py, key, line, kind)
}

/// Phase 2: true when the boundary is done without a check (see the module
/// docs). Runs no Python code unless an object change is reported.
#[inline]
fn quick(py: Python<'_>, code: usize, line: u32, kind: Boundary) -> bool {
    if guard::any_waiting() || !fast::unchanged(py) {
        return false;
    }
    // Watched memory is as the last check left it: only objects may have
    // something to report (a queued change, a compared node that differs),
    // and reporting it is all the full step would do before moving the
    // line on.
    if !objects::quiet(py) {
        // In pyo3's attach scope, so that what the flush lets go of is
        // freed now, not at pyo3's next entry point (none while the
        // interpreter finalizes: the full step handles that).
        if Python::try_attach(|py| objects::flush(py, LAST.with(|l| l.get()))).is_none() {
            return false;
        }
        // A change it reported may have armed a guard (a frozen dict), or
        // a callback may have written watched memory: the full step gives
        // the raise at this boundary and attributes the write to `last`.
        if guard::any_waiting() || !fast::unchanged(py) {
            return false;
        }
    }
    let vars_watched = watched::has(Kind::Variables);
    match kind {
        Boundary::Line => {
            // Watched variables: the line moves on here only if the frame
            // still binds what was seen at its last check. With nothing but
            // variables watched, a line of code that binds none of them
            // must not become the thread's last line: a rebinding belongs
            // to the frame that made it, and this code's return will not be
            // seen (its events are switched off, phase 3).
            if vars_watched
                && (!vars::line_unchanged(py, code)
                    || (!watched::has(Kind::Objects)
                        && fast::none(py)
                        && vars::binds_watched(code) == Some(false)))
            {
                return false;
            }
            set_last((code, line));
            true
        }
        Boundary::Return => {
            // With variables watched a return is checked: the frame's
            // bindings are compared a last time.
            if vars_watched {
                return false;
            }
            // Only the line moves on, to the caller's.
            set_last(innermost_in_scope(py, true));
            true
        }
    }
}

/// Phase 3: true when only variables are watched and `code` binds none of
/// them (learnt once per code object).
#[inline]
fn disabled(py: Python<'_>, code: &Bound<'_, PyAny>) -> bool {
    !vars::wants_events(py, code)
}

/// Phase 4: the full boundary and the guard actions due, in pyo3's attach
/// scope. An interpreter callback is called with the GIL held but may be
/// outside any pyo3 entry point (3.11's C trace function, 3.12's C `LINE`
/// callback), so pyo3 would not know the thread is attached: every `Py`
/// dropped there (a change handed to the history and let go, say) would
/// wait in pyo3's reference pool until the next entry point, and with it
/// the shadow snapshot the change's bytes point into, so the next check
/// of a large region could not reuse its snapshot buffer and took a fresh
/// one (CPython 3.11 paid 1.4-1.8x for history on a 100 MB rewrite for
/// this).
#[inline(never)]
fn full(py: Python<'_>, code: usize, line: u32, kind: Boundary) -> Verdict {
    let fired = Python::try_attach(|py| {
        at_boundary(py, code, line, kind);
        guard::fire(py)
    });
    match fired {
        Some(Ok(())) => Verdict::Continue,
        Some(Err(e)) => Verdict::Raise(e),
        None => {
            // The interpreter is finalizing: check all the same.
            at_boundary(py, code, line, kind);
            Verdict::Continue
        }
    }
}

/// The full boundary: finds what changed since the last check and reports
/// it, attributed to the line this thread ran before, then moves the line
/// on (`code` is the code of the frame the new line is in, or of the one
/// returning).
pub fn at_boundary(py: Python<'_>, code: usize, line: u32, kind: Boundary) {
    let last = LAST.with(|l| l.get());
    check_now(py, last);
    vars::at_boundary(py, code, kind == Boundary::Return, last);
    match kind {
        Boundary::Line => set_last((code, line)),
        Boundary::Return => {
            let caller = if watched::only_variables() {
                // Only variables watched: the caller whose line a rebinding
                // can belong to (code that binds none has its events off).
                innermost_binding_caller(py)
            } else {
                innermost_in_scope(py, true)
            };
            set_last(caller);
        }
    }
    if crate::mem::store::active() {
        note_thread_line(py, LAST.with(|l| l.get()));
    }
}

/// The innermost in-scope frame under the current one whose code may bind
/// a watched variable (known to, or not yet known not to), and its line.
fn innermost_binding_caller(py: Python<'_>) -> (usize, u32) {
    innermost(py, true, |code| {
        code_in_scope(code) && vars::binds_watched(code) != Some(false)
    })
}

/// Reports what changed in watched objects and memory now, attributed to
/// `last`; ends the watches of buffers only memwatch still refers to.
pub fn check_now(py: Python<'_>, last: (usize, u32)) {
    objects::flush(py, last);
    check_and_end(py, last);
}

/// Looks for changes now (attributed to the last in-scope line of this
/// thread) instead of waiting for the next line boundary.
#[pyfunction]
pub fn check(py: Python<'_>) -> PyResult<()> {
    check_now(py, LAST.with(|l| l.get()));
    guard::fire(py)
}

/// Looks for changes now, as `check` does, right after torch op `op` wrote
/// the memory of the watched `regions` (`memwatch._torch_dispatch`): their
/// changes carry the op (`Change.op`, and an `op` note in the trace). On a
/// thread that ran no in-scope line (an autograd worker thread), the
/// change's stack leaves out the caller's `skip` innermost frames. Returns
/// those of `regions` that are not watched any more.
#[pyfunction]
#[pyo3(signature = (regions, op, skip=0))]
pub fn _check_op(py: Python<'_>, regions: Vec<u32>, op: String, skip: usize) -> PyResult<Vec<u32>> {
    let mut last = LAST.with(|l| l.get());
    if last.0 == 0 {
        last = innermost_in_scope(py, false);
    }
    let ((), regions) = with_op(regions, &op, skip, || check_now(py, last));
    let gone = with_state(|st| {
        regions
            .into_iter()
            .filter(|r| !st.watches.iter().any(|w| w.id == *r))
            .collect()
    });
    guard::fire(py)?;
    Ok(gone)
}
