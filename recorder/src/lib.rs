//! The in-process side of memwatch, and its Python module `memwatch._memwatch`.
//!
//! This crate owns what runs inside the watched program: the Python-facing
//! API and (in later steps) the engine that catches writes to watched
//! memory and appends them to a trace through `memwatch-format`. It does not
//! own the file layout (`memwatch-format`) or offline analysis
//! (`memwatch-analyzer`).
//!
//! The module also carries the `memwatch` command line (`_cli_main`, which
//! calls [`memwatch_cli::run`]): maturin builds one extension module per
//! wheel, so the console script `memwatch` that pip installs calls into it,
//! and one `pip install` gives both `import memwatch` and the command.
//!
//! The exception hierarchy is created here once, rooted at
//! `memwatch.MemwatchError`; [`errors::trace_error`] maps every
//! `memwatch_format::Error` to its Python class.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

pub mod errors;

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
    Ok(())
}
