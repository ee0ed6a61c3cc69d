//! Reprs of the values and keys of object changes: [`bounded_repr`], at
//! most `repr_limit` characters and never failing, with the common scalars
//! written here ([`decimal`]) and everything else through the Python helper
//! `bounded_repr` of `memwatch._objects`.
//!
//! Locking: none.
//!
//! Signal context: nothing here runs in a signal handler, nor in the dict
//! watcher callback: a repr may run Python code (`__repr__`), so it is made
//! at a safe point, at the flush or when a node is built.

use std::os::raw::c_int;

use pyo3::ffi;
use pyo3::prelude::*;

use super::hooks::obj_hooks;
use crate::runtime::thread::guarded;

/// `v` in decimal, as `repr(int)` writes it.
pub(super) fn decimal(v: i64) -> String {
    let mut buf = [0u8; 20];
    let digits = crate::mem::kernel::decimal_digits(v.unsigned_abs(), &mut buf);
    let mut out = String::with_capacity(digits.len() + 1);
    if v < 0 {
        out.push('-');
    }
    // The bytes are ASCII digits.
    out.extend(digits.iter().map(|&d| d as char));
    out
}

/// `repr(value)`, at most `limit` characters; never fails.
pub(super) fn bounded_repr(py: Python<'_>, value: &Bound<'_, PyAny>, limit: usize) -> String {
    // An int that fits in 64 bits, the most common value: written here,
    // without a string object in between.
    // SAFETY: GIL held; an exact type check, then a conversion that cannot
    // fail for an exact int except by overflow (reported, not raised).
    let small = unsafe {
        let p = value.as_ptr();
        let mut overflow: c_int = 0;
        (ffi::PyLong_CheckExact(p) != 0)
            .then(|| ffi::PyLong_AsLongLongAndOverflow(p, &mut overflow))
            .filter(|_| overflow == 0 && ffi::PyErr_Occurred().is_null())
    };
    if let Some(v) = small {
        let text = decimal(v);
        if text.len() <= limit {
            return text;
        }
    }
    // The common scalars: their repr is C code that cannot fail, made here
    // without a call into Python (cut the same way as `_bounded_repr`).
    // SAFETY: GIL held; exact type checks.
    let scalar = unsafe {
        let p = value.as_ptr();
        ffi::PyLong_CheckExact(p) != 0
            || ffi::PyFloat_CheckExact(p) != 0
            || ffi::PyBool_Check(p) != 0
            || p == ffi::Py_None()
            || (ffi::PyUnicode_CheckExact(p) != 0 && ffi::PyUnicode_GetLength(p) < limit as ffi::Py_ssize_t)
    };
    if scalar {
        if let Ok(r) = value.repr() {
            if let Ok(text) = r.to_str() {
                // Bytes bound characters: count them only when it matters.
                if text.len() <= limit || text.chars().count() <= limit {
                    return text.to_owned();
                }
            }
        }
    }
    guarded(|| {
        obj_hooks()
            .and_then(|h| h.repr.bind(py).call1((value, limit))?.extract())
            .unwrap_or_else(|e| format!("<repr failed: {}>", e.get_type(py)))
    })
}
