//! The session: starting and stopping a trace, exit, fork children, and
//! the options that span every watch kind. These are the Python package's
//! entry points that reach across layers (`memwatch._session` calls
//! them), so they sit above everything they call.
//!
//! Locking: none of its own; the buffers' state lock and the trace's are
//! taken through the layers below, in that order. Nothing here runs in
//! signal context.

use memwatch_format::Meta;
use pyo3::prelude::*;

use crate::boundary::check_now;
use crate::deliver::output;
use crate::mem::kernel::page_size;
use crate::mem::signals::crash;
use crate::model::errors::MemwatchError;
use crate::runtime::attrib::{attributed_stack, innermost_in_scope, thread_name};
use crate::runtime::events;
use crate::runtime::fork::reset_in_child;
use crate::runtime::thread::LAST;
use crate::trace::sink::{self, spawn_flusher, unix_ns, TraceSink, SINK};
use crate::watch::buffers::end::{check_and_end, end_all};
use crate::watch::buffers::session::{after_fork_child, start_recording};
use crate::watch::buffers::state::{backend, state, STATE};
use crate::watch::objects;

/// Counters of store mode since the process started: faults stepped over,
/// faults let through (kernel writes), stores recorded, pages left open for
/// the next check, and `SIGTRAP`s handed on to the program's handler.
#[pyfunction]
pub fn _store_stats() -> std::collections::HashMap<&'static str, u64> {
    use std::sync::atomic::Ordering::Relaxed;
    let (open, pending, overflow) = crate::mem::signals::slot_states();
    [
        ("slots_open", open),
        ("slots_pending", pending),
        ("slots_overflow", overflow),
        (
            "pages_let_through",
            crate::mem::store::OPEN_COUNT.load(Relaxed) as u64,
        ),
        ("stale_events", crate::mem::engine::STALE_EVENTS.load(Relaxed)),
        ("stepped", crate::mem::store::STEPPED.load(Relaxed)),
        ("let_through", crate::mem::store::LET_THROUGH.load(Relaxed)),
        ("events", crate::mem::signals::EVENTS.load(Relaxed)),
        ("overflows", crate::mem::signals::OVERFLOWS.load(Relaxed)),
        ("foreign_traps", crate::mem::signals::FOREIGN_TRAPS.load(Relaxed)),
    ]
    .into_iter()
    .collect()
}

/// Starts recording to `path`; regions already watched are written with
/// their current contents.
///
/// `properties` go to the header beside `backend` and `mode`: a process
/// of a run (`memwatch record`, a fork child) names the run there (`run`,
/// `root`, `parent`, `rank`; see docs/format.md, "Runs of several
/// processes").
#[pyfunction]
#[pyo3(signature = (path, argv, python_version, properties=Vec::new()))]
pub fn _start(
    py: Python<'_>,
    path: std::path::PathBuf,
    argv: Vec<String>,
    python_version: String,
    properties: Vec<(String, String)>,
) -> PyResult<()> {
    if let Some(s) = sink::lock().as_ref() {
        return Err(MemwatchError::new_err(format!(
            "already recording to {}; call memwatch.stop() first",
            s.path().display()
        )));
    }
    let meta = Meta {
        pid: std::process::id(),
        argv,
        python_version,
        platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        page_size: page_size() as u32,
        start_time_ns: unix_ns(),
        writer: format!("memwatch {}", env!("CARGO_PKG_VERSION")),
        properties: vec![
            ("backend".into(), backend()),
            (
                "mode".into(),
                std::env::var("MEMWATCH_MODE").unwrap_or_else(|_| "line".into()),
            ),
        ]
        .into_iter()
        .chain(properties)
        .collect(),
    };
    let new = py
        .detach(|| TraceSink::create(&path, meta))
        .map_err(crate::model::errors::trace_error)?;
    if let Some(why) = new.journal_error() {
        py.import("warnings")?.getattr("warn")?.call1((
            format!(
                "memwatch: recording without a journal ({why}): if the program dies, \
                 its last changes (up to half a second) are lost"
            ),
            py.get_type::<pyo3::exceptions::PyRuntimeWarning>(),
        ))?;
    }
    let last = LAST.with(|l| l.get());
    check_and_end(py, last);
    let stack = attributed_stack(py, innermost_in_scope(py, false));
    let tname = thread_name(py);
    start_recording(new, &tname, &stack);
    spawn_flusher();
    Ok(())
}

/// Stops recording: reports pending changes, writes the trailer. Returns
/// `(path, changes, file_bytes)`, or `None` when nothing was recording.
#[pyfunction]
pub fn _stop(py: Python<'_>) -> PyResult<Option<(std::path::PathBuf, u64, u64)>> {
    check_now(py, LAST.with(|l| l.get()));
    let taken = {
        // Taken under the buffers' lock: no check writes to it meanwhile.
        let _st = state();
        sink::lock().take()
    };
    let Some(s) = taken else { return Ok(None) };
    let path = s.path().to_path_buf();
    let changes = s.changes;
    match py.detach(|| s.finish()) {
        Ok(bytes) => Ok(Some((path, changes, bytes))),
        Err(msg) => Err(MemwatchError::new_err(format!("{}: {msg}", path.display()))),
    }
}

/// Path of the active trace, or `None`.
#[pyfunction]
pub fn _recording() -> Option<std::path::PathBuf> {
    sink::lock().as_ref().map(|s| s.path().to_path_buf())
}

/// At interpreter exit: last check, close the trace, release every buffer.
#[pyfunction]
pub fn _shutdown(py: Python<'_>) -> PyResult<()> {
    let last = LAST.with(|l| l.get());
    objects::shutdown(py, last);
    end_all(py, last)?;
    // A recording that stopped early said so when it stopped: nothing more
    // is printed at exit.
    let warned = sink::lock().as_ref().is_some_and(|s| s.failed.is_some());
    match _stop(py) {
        Err(_) if warned => Ok(()),
        r => r.map(|_| ()),
    }
}

/// Re-evaluates scope decisions after include/exclude changed.
#[pyfunction]
pub fn _rescope(py: Python<'_>) -> PyResult<()> {
    crate::runtime::codes::rescope(py)
}

/// In a fork child: the recorder starts clean, keeping its watches. The
/// parent's trace, journal and crash area stay the parent's (nothing of
/// them is written from here), the seq starts again at 1, the history is
/// empty, and every region watched before the fork is watched again here:
/// its contents as they are now, tracked with this process's own kernel
/// registrations (userfaultfd and store-mode registrations do not survive
/// a fork). Callbacks and options stay.
///
/// Returns `(recording, problems)`: whether the parent was recording (the
/// caller then starts this process's own trace) and one line per watch
/// that could not be kept.
#[pyfunction]
pub fn _after_fork_child(py: Python<'_>) -> (bool, Vec<String>) {
    crash::after_fork();
    crate::model::change::forget_pid();
    let mut problems = Vec::new();
    let sink_ok = reset_in_child(&SINK);
    let state_ok = reset_in_child(&STATE);
    let recording = match sink::lock().take() {
        Some(s) => {
            // The parent owns the file: writing pending records from here
            // would interleave with it. Nor is its crash area ours to write.
            crash::disarm();
            std::mem::forget(s);
            true
        }
        None => {
            crash::disarm();
            !sink_ok
        }
    };
    crash::reset_seq();
    if !state_ok {
        problems.push(
            "the fork came while another thread of the parent was inside memwatch: \
             this process does not keep the parent's watches"
                .to_string(),
        );
    }
    if !output::after_fork_child() {
        problems.push(
            "the fork came while another thread of the parent was delivering a change: \
             this process starts with no on_change callbacks and default options"
                .to_string(),
        );
    }
    let kept = after_fork_child(&mut problems);
    if !kept {
        let _ = events::stop_if_idle(py);
    }
    (recording, problems)
}
