//! The in-process side of memwatch, and its Python module `memwatch._memwatch`.
//!
//! This crate owns what runs inside the watched program: the engine that
//! finds changes to watched memory ([`engine`], over the kernel mechanism in
//! [`kernel`]), the line boundaries where it looks ([`monitor`]), the Python
//! API that turns them into `memwatch.Change`s for callbacks, history and
//! the live report ([`api`], [`change`]), watching Python objects
//! ([`objects`]), and recording to a trace through
//! `memwatch-format` ([`sink`]). It does not own the file layout
//! (`memwatch-format`) or offline analysis (`memwatch-analyzer`).
//!
//! Signal context: only [`signals`]. Once a region is watched with
//! `mode="store"` ([`store`]): a real-time signal of its own and `SIGTRAP`
//! (single-stepping), handed on when not memwatch's. While a trace records:
//! the fatal signals (`SIGSEGV`, `SIGBUS`, `SIGABRT`, `SIGFPE`, `SIGILL`, and
//! `SIGTERM` left at its default), whose handler takes one last look at the
//! watched regions and then hands the signal on to the action that was
//! there before ([`signals::crash`]). Line mode itself (userfaultfd
//! `WP_ASYNC` with `PAGEMAP_SCAN`) needs no signal handler.
//!
//! The module also carries the `memwatch` command line (`_cli_main`, which
//! calls [`memwatch_cli::run()`]): maturin builds one extension module per
//! wheel, so the console script `memwatch` that pip installs calls into it,
//! and one `pip install` gives both `import memwatch` and the command.
//!
//! The exception hierarchy is created here once, rooted at
//! `memwatch.MemwatchError`; [`errors::trace_error`] maps every
//! `memwatch_format::Error` to its Python class.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

pub mod api;
pub mod change;
pub mod engine;
pub mod errors;
mod fastline;
pub mod guard;
pub mod kernel;
pub mod monitor;
pub mod objects;
mod pyframes;
pub mod reader;
pub mod signals;
pub mod sink;
pub mod store;
pub mod vars;

use errors::trace_error;

/// Runs the `memwatch` command line with `argv` (program name first) and
/// returns its exit status. The GIL is released while it runs.
#[pyfunction]
fn _cli_main(py: Python<'_>, argv: Vec<String>) -> u8 {
    py.detach(|| memwatch_cli::run(argv))
}

/// Reads a trace's header and framing: a dict of the recorded process's
/// metadata, the number of chunks, and how the file ends.
#[pyfunction]
fn trace_info<'py>(py: Python<'py>, path: std::path::PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let reader = py
        .detach(|| memwatch_format::TraceReader::open(&path))
        .map_err(trace_error)?;
    trace_info_dict(py, &reader)
}

/// The dict `trace_info` and `Trace.meta` return.
pub(crate) fn trace_info_dict<'py>(
    py: Python<'py>,
    reader: &memwatch_format::TraceReader,
) -> PyResult<Bound<'py, PyDict>> {
    let h = reader.header();
    let d = PyDict::new(py);
    d.set_item("path", reader.path().to_string_lossy())?;
    d.set_item("version", h.version)?;
    d.set_item("pid", h.meta.pid)?;
    d.set_item("argv", PyList::new(py, &h.meta.argv)?)?;
    d.set_item("python_version", &h.meta.python_version)?;
    d.set_item("platform", &h.meta.platform)?;
    d.set_item("page_size", h.meta.page_size)?;
    d.set_item("start_time_ns", h.meta.start_time_ns)?;
    d.set_item("writer", &h.meta.writer)?;
    let props = PyDict::new(py);
    for (k, v) in &h.meta.properties {
        props.set_item(k, v)?;
    }
    d.set_item("properties", props)?;
    d.set_item("chunks", reader.chunks().len())?;
    d.set_item("file_bytes", reader.file_len())?;
    let (tail, ignored) = match reader.tail() {
        memwatch_format::Tail::Closed => ("closed", 0),
        memwatch_format::Tail::Unclosed => ("unclosed", 0),
        memwatch_format::Tail::Truncated { bytes_ignored } => ("truncated", bytes_ignored),
    };
    d.set_item("tail", tail)?;
    d.set_item("bytes_ignored", ignored)?;
    Ok(d)
}

#[pymodule]
fn _memwatch(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FORMAT_VERSION", memwatch_format::FORMAT_VERSION)?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(_cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(trace_info, m)?)?;
    m.add_class::<change::Change>()?;
    m.add_class::<api::WatchHandle>()?;
    m.add_class::<objects::ObjectWatchHandle>()?;
    m.add_class::<reader::Trace>()?;
    m.add_class::<reader::Process>()?;
    for f in [
        wrap_pyfunction!(reader::open_trace, m)?,
        wrap_pyfunction!(api::_watch, m)?,
        wrap_pyfunction!(api::_unwatch, m)?,
        wrap_pyfunction!(api::_regions, m)?,
        wrap_pyfunction!(api::check, m)?,
        wrap_pyfunction!(api::_check_op, m)?,
        wrap_pyfunction!(api::on_change, m)?,
        wrap_pyfunction!(api::remove_callback, m)?,
        wrap_pyfunction!(api::history, m)?,
        wrap_pyfunction!(api::clear_history, m)?,
        wrap_pyfunction!(api::_configure, m)?,
        wrap_pyfunction!(api::_rescope, m)?,
        wrap_pyfunction!(api::backend, m)?,
        wrap_pyfunction!(change::location, m)?,
        wrap_pyfunction!(change::_decode, m)?,
        wrap_pyfunction!(api::_store_stats, m)?,
        wrap_pyfunction!(api::_backend_problem, m)?,
        wrap_pyfunction!(api::_start, m)?,
        wrap_pyfunction!(api::_stop, m)?,
        wrap_pyfunction!(api::_recording, m)?,
        wrap_pyfunction!(api::_shutdown, m)?,
        wrap_pyfunction!(api::_after_fork_child, m)?,
        wrap_pyfunction!(pyframes::_frame_walker_in_use, m)?,
        wrap_pyfunction!(monitor::_set_hooks, m)?,
        wrap_pyfunction!(objects::_set_object_hooks, m)?,
        wrap_pyfunction!(objects::_watch_object, m)?,
        wrap_pyfunction!(vars::_vars_changed, m)?,
        wrap_pyfunction!(vars::_vars_forgot_frames, m)?,
        wrap_pyfunction!(objects::_unwatch_object, m)?,
        wrap_pyfunction!(objects::_object_watches, m)?,
        wrap_pyfunction!(objects::_objects_after_fork_child, m)?,
        wrap_pyfunction!(monitor::_mon_py_start, m)?,
        wrap_pyfunction!(monitor::_mon_line, m)?,
        wrap_pyfunction!(monitor::_mon_py_return, m)?,
        wrap_pyfunction!(monitor::_install_tracer, m)?,
        wrap_pyfunction!(monitor::_thread_trace_hook, m)?,
        wrap_pyfunction!(guard::_set_guard_hooks, m)?,
        wrap_pyfunction!(guard::_set_guarded, m)?,
        wrap_pyfunction!(guard::_forget_threads, m)?,
        wrap_pyfunction!(guard::_unraisable, m)?,
    ] {
        m.add_function(f)?;
    }
    Ok(())
}
