//! Ending buffer watches: `unwatch`, the end of a watch whose object only
//! memwatch still refers to (found by a check), and every watch at exit.
//! A watch's last changes are reported before it ends.
//!
//! Locking: the buffers' state lock (`super::state`) and, inside it, the
//! trace's, in short sections; the pinned export and the kept objects are
//! released after both are let go (releasing may run Python code). Nothing
//! here runs in signal context.

use memwatch_format::UnwatchReason;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::mem::signals::crash;
use crate::model::errors::NotWatchedError;
use crate::runtime::attrib::{attributed_stack, innermost_in_scope, thread_name};
use crate::runtime::events;
use crate::runtime::thread::LAST;
use crate::trace::sink::{self, EventContext};
use crate::watch::buffers::check::check_regions;
use crate::watch::buffers::state::with_state;

/// Reports what changed in watched memory since the last check, then ends
/// the watches of objects nothing but memwatch refers to any more.
pub(crate) fn check_and_end(py: Python<'_>, last: (usize, u32)) {
    let collected = check_regions(py, last);
    for id in collected {
        // Already gone if a callback unwatched it meanwhile: nothing to do.
        let _ = unwatch_region(py, id, UnwatchReason::Collected);
    }
}

/// Ends the watch of `region` (after reporting its last changes), for
/// `reason`; line events stop when nothing at all is watched any more.
pub(crate) fn unwatch_region(py: Python<'_>, region: u32, reason: UnwatchReason) -> PyResult<()> {
    let last = LAST.with(|l| l.get());
    let _ = check_regions(py, last);
    let stack = attributed_stack(py, innermost_in_scope(py, false));
    let tname = thread_name(py);
    let watch = with_state(|st| {
        let i = st.watches.iter().position(|w| w.id == region)?;
        let w = st.watches.remove(i);
        st.engine.remove(region);
        let mut sk = sink::lock();
        let seq = crash::next_seq();
        if let Some(s) = sk.as_mut() {
            let ev = EventContext::here(&tname, &stack);
            s.region_unwatched(seq, region, reason, &ev);
        }
        Some(w)
    })
    .ok_or_else(|| NotWatchedError::new_err(format!("region {region} is not watched")))?;
    if let Some(mut p) = watch.pinned {
        // SAFETY: releasing the export made in `_watch`, GIL held.
        unsafe { ffi::PyBuffer_Release(&mut *p.0) };
    }
    drop(watch.keepalive);
    events::stop_if_idle(py)
}

/// Stops watching region `region` (after reporting its last changes).
#[pyfunction]
pub fn _unwatch(py: Python<'_>, region: u32) -> PyResult<()> {
    unwatch_region(py, region, UnwatchReason::Explicit)
}

/// At exit: reports what changed, then ends every buffer watch.
pub(crate) fn end_all(py: Python<'_>, last: (usize, u32)) -> PyResult<()> {
    let ids: Vec<u32> = with_state(|st| st.watches.iter().map(|w| w.id).collect());
    let _ = check_regions(py, last);
    for id in ids {
        unwatch_region(py, id, UnwatchReason::Shutdown)?;
    }
    Ok(())
}
