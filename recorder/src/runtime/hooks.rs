//! The Python functions the hot paths call, handed over once by the
//! Python package at import (`memwatch._session` calls [`_set_hooks`]).
//!
//! A `OnceLock`, set once and then only read. Nothing here runs in signal
//! context.

use std::sync::OnceLock;

use pyo3::prelude::*;

/// Python functions the hot paths call, handed over once by the Python
/// package at import (`_set_hooks`). Callbacks must never import: the
/// frame they run in may have no `__builtins__` (code made by `exec`).
pub struct Hooks {
    pub in_scope: Py<PyAny>,
    pub current_thread: Py<PyAny>,
    pub sys: Py<PyAny>,
    /// `display_name(path)`: the name a code object's file is recorded
    /// under (`cell [3]` for an IPython cell, else the path itself).
    pub display_name: Py<PyAny>,
}

pub static HOOKS: OnceLock<Hooks> = OnceLock::new();

/// Receives the hooks from `memwatch._session`.
#[pyfunction]
pub fn _set_hooks(in_scope: Py<PyAny>, current_thread: Py<PyAny>, sys: Py<PyAny>, display_name: Py<PyAny>) {
    let _ = HOOKS.set(Hooks {
        in_scope,
        current_thread,
        sys,
        display_name,
    });
}

/// The hooks, or an error if the Python package did not set them.
pub fn hooks() -> PyResult<&'static Hooks> {
    HOOKS
        .get()
        .ok_or_else(|| crate::model::errors::MemwatchError::new_err("memwatch._session was not imported"))
}
