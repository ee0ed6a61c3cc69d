//! The Python exception hierarchy, created once:
//!
//! ```text
//! MemwatchError(Exception)
//! ├── NotWatchedError             unwatch() of something not watched
//! ├── UnsupportedError            memory memwatch cannot watch (a CUDA tensor)
//! ├── MutationError               a frozen object (or a watch with action="raise") changed
//! └── TraceError                  a trace file cannot be read
//!     ├── NotATraceError          bad magic
//!     ├── TraceVersionError       written by a newer memwatch
//!     ├── TraceTruncatedError     ends early (header, or strict reading)
//!     └── TraceCorruptError       damaged header or chunk
//! ```
//!
//! I/O errors map to the standard `OSError` subclasses (a missing file is a
//! `FileNotFoundError`), with the file name in the message.
//!
//! No state, no lock; nothing here runs in signal context.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyIsADirectoryError, PyOSError, PyPermissionError};
use pyo3::prelude::*;

create_exception!(
    memwatch,
    MemwatchError,
    PyException,
    "Base class of every memwatch error."
);
create_exception!(
    memwatch,
    TraceError,
    MemwatchError,
    "A trace file cannot be read."
);
create_exception!(
    memwatch,
    NotATraceError,
    TraceError,
    "The file is not a memwatch trace."
);
create_exception!(
    memwatch,
    TraceVersionError,
    TraceError,
    "The trace was written by a newer memwatch."
);
create_exception!(
    memwatch,
    NotWatchedError,
    MemwatchError,
    "unwatch() was given something that is not watched."
);
create_exception!(
    memwatch,
    UnsupportedError,
    MemwatchError,
    "memwatch cannot watch this kind of memory (yet)."
);
create_exception!(
    memwatch,
    MutationError,
    MemwatchError,
    "A frozen object, or one watched with action=\"raise\", changed; `.change` is the Change."
);
create_exception!(memwatch, TraceTruncatedError, TraceError, "The trace ends early.");
create_exception!(memwatch, TraceCorruptError, TraceError, "The trace is damaged.");

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("MemwatchError", py.get_type::<MemwatchError>())?;
    m.add("TraceError", py.get_type::<TraceError>())?;
    m.add("NotWatchedError", py.get_type::<NotWatchedError>())?;
    m.add("UnsupportedError", py.get_type::<UnsupportedError>())?;
    m.add("MutationError", py.get_type::<MutationError>())?;
    m.add("NotATraceError", py.get_type::<NotATraceError>())?;
    m.add("TraceVersionError", py.get_type::<TraceVersionError>())?;
    m.add("TraceTruncatedError", py.get_type::<TraceTruncatedError>())?;
    m.add("TraceCorruptError", py.get_type::<TraceCorruptError>())?;
    Ok(())
}

/// The Python exception for a trace error; the message is the Rust one.
pub fn trace_error(e: memwatch_format::Error) -> PyErr {
    use memwatch_format::Error as E;
    let msg = e.to_string();
    match &e {
        E::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            std::io::ErrorKind::IsADirectory => PyIsADirectoryError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
        E::NotATrace { .. } => NotATraceError::new_err(msg),
        E::NewerVersion { .. } => TraceVersionError::new_err(msg),
        E::Truncated { .. } => TraceTruncatedError::new_err(msg),
        E::CorruptHeader { .. } | E::CorruptChunk { .. } => TraceCorruptError::new_err(msg),
        _ => MemwatchError::new_err(msg),
    }
}
