//! The in-process side of memwatch, and its Python module `memwatch._memwatch`.
//!
//! This crate owns what runs inside the watched program: finding changes
//! to watched memory, the line boundaries where it looks, watching Python
//! objects and variables, turning what it finds into `memwatch.Change`s for
//! callbacks, history and the live report, and recording them to a trace
//! through `memwatch-format`. It does not own the file layout
//! (`memwatch-format`) or offline analysis (`memwatch-analyzer`).
//!
//! The modules are layers, each calling only those before it (checked by
//! `tests/test_layers.py`; see docs/architecture.md):
//!
//! 1. [`mem`]: the kernel mechanisms, signal handlers, store mode and the
//!    engine that diffs regions against their shadows. No Python.
//! 2. [`model`]: `memwatch.Change` and the exception classes.
//! 3. [`trace`]: recording to a `.mwt` file, and reading one from Python.
//! 4. [`runtime`]: what the layers above share with the GIL held: hooks
//!    into the Python package, code objects and scope, the thread's last
//!    line, attribution, whether line events are on, what is watched.
//! 5. [`deliver`]: history, callbacks, the live report, guards.
//! 6. [`watch`]: the three ways of watching (buffers, objects, variables).
//! 7. [`boundary`]: the one step run at every line and return.
//! 8. [`monitor`]: the interpreter families that deliver line events
//!    (3.12+ `sys.monitoring`, 3.11 settrace), one chosen at import.
//! 9. [`py`]: the session entry points that reach across all of them.
//!
//! Signal context: only [`mem::signals`]. Once a region is watched with
//! `mode="store"` ([`mem::store`]): a real-time signal of its own and
//! `SIGTRAP` (single-stepping), handed on when not memwatch's. While a
//! trace records: the fatal signals (`SIGSEGV`, `SIGBUS`, `SIGABRT`,
//! `SIGFPE`, `SIGILL`, and `SIGTERM` left at its default), whose handler
//! takes one last look at the watched regions and then hands the signal on
//! to the action that was there before ([`mem::signals::crash`]). Line
//! mode itself (userfaultfd `WP_ASYNC` with `PAGEMAP_SCAN`) needs no signal
//! handler.
//!
//! The module also carries the `memwatch` command line (`_cli_main`, which
//! calls [`memwatch_cli::run()`]): maturin builds one extension module per
//! wheel, so the console script `memwatch` that pip installs calls into it,
//! and one `pip install` gives both `import memwatch` and the command.
//!
//! The exception hierarchy is created here once, rooted at
//! `memwatch.MemwatchError`; [`model::errors::trace_error`] maps every
//! `memwatch_format::Error` to its Python class.

use pyo3::prelude::*;

pub mod boundary;
pub mod deliver;
pub mod mem;
pub mod model;
pub mod monitor;
pub mod py;
pub mod runtime;
pub mod trace;
pub mod watch;

/// Runs the `memwatch` command line with `argv` (program name first) and
/// returns its exit status. The GIL is released while it runs.
#[pyfunction]
fn _cli_main(py: Python<'_>, argv: Vec<String>) -> u8 {
    py.detach(|| memwatch_cli::run(argv))
}

#[pymodule]
fn _memwatch(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FORMAT_VERSION", memwatch_format::FORMAT_VERSION)?;
    model::errors::register(m)?;
    monitor::choose(m.py());
    runtime::watched::answer_names(runtime::watched::Kind::Buffers, watch::buffers::state::has_tag);
    runtime::watched::answer_names(runtime::watched::Kind::Objects, watch::objects::has_tag);
    m.add_function(wrap_pyfunction!(_cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(trace::reader::trace_info, m)?)?;
    m.add_class::<model::change::Change>()?;
    m.add_class::<watch::buffers::watch::WatchHandle>()?;
    m.add_class::<watch::objects::ObjectWatchHandle>()?;
    m.add_class::<trace::reader::Trace>()?;
    m.add_class::<trace::reader::Process>()?;
    for f in [
        wrap_pyfunction!(trace::reader::open_trace, m)?,
        wrap_pyfunction!(watch::buffers::watch::_watch, m)?,
        wrap_pyfunction!(watch::buffers::watch::_check_buffer_name, m)?,
        wrap_pyfunction!(watch::buffers::end::_unwatch, m)?,
        wrap_pyfunction!(watch::buffers::state::_regions, m)?,
        wrap_pyfunction!(boundary::check, m)?,
        wrap_pyfunction!(boundary::_check_op, m)?,
        wrap_pyfunction!(deliver::output::on_change, m)?,
        wrap_pyfunction!(deliver::output::remove_callback, m)?,
        wrap_pyfunction!(deliver::output::history, m)?,
        wrap_pyfunction!(deliver::output::clear_history, m)?,
        wrap_pyfunction!(deliver::output::_configure, m)?,
        wrap_pyfunction!(py::session::_rescope, m)?,
        wrap_pyfunction!(watch::buffers::state::backend, m)?,
        wrap_pyfunction!(model::change::location, m)?,
        wrap_pyfunction!(model::change::_decode, m)?,
        wrap_pyfunction!(py::session::_store_stats, m)?,
        wrap_pyfunction!(watch::buffers::state::_backend_problem, m)?,
        wrap_pyfunction!(py::session::_start, m)?,
        wrap_pyfunction!(py::session::_stop, m)?,
        wrap_pyfunction!(py::session::_recording, m)?,
        wrap_pyfunction!(py::session::_shutdown, m)?,
        wrap_pyfunction!(py::session::_after_fork_child, m)?,
        wrap_pyfunction!(runtime::frames::_frame_walker_in_use, m)?,
        wrap_pyfunction!(runtime::hooks::_set_hooks, m)?,
        wrap_pyfunction!(watch::objects::_set_object_hooks, m)?,
        wrap_pyfunction!(watch::objects::_watch_object, m)?,
        wrap_pyfunction!(watch::vars::_vars_changed, m)?,
        wrap_pyfunction!(watch::vars::_vars_forgot_frames, m)?,
        wrap_pyfunction!(watch::objects::_unwatch_object, m)?,
        wrap_pyfunction!(watch::objects::_object_watches, m)?,
        wrap_pyfunction!(watch::objects::_objects_after_fork_child, m)?,
        wrap_pyfunction!(monitor::sys_monitoring::_mon_py_start, m)?,
        wrap_pyfunction!(monitor::sys_monitoring::_mon_py_return, m)?,
        wrap_pyfunction!(monitor::settrace::_install_tracer, m)?,
        wrap_pyfunction!(monitor::settrace::_thread_trace_hook, m)?,
        wrap_pyfunction!(deliver::guard::_set_guard_hooks, m)?,
        wrap_pyfunction!(deliver::guard::_set_guarded, m)?,
        wrap_pyfunction!(deliver::guard::_forget_threads, m)?,
        wrap_pyfunction!(deliver::guard::_unraisable, m)?,
    ] {
        m.add_function(f)?;
    }
    Ok(())
}
