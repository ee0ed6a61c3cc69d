//! What memory a watched object exports: the buffer protocol (`Pinned`,
//! held for as long as the watch lasts, so the memory cannot move or be
//! freed), its bounds, and the dtype and shape of its elements.
//!
//! No state, no lock. Called with the GIL held; nothing here runs in
//! signal context.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::mem::engine::Layout;
use crate::watch::buffers::state::Pinned;

pub(crate) fn array_protocol_dtype(format: &str, itemsize: usize) -> Option<String> {
    let (order, code) = match format.chars().next() {
        Some(c @ ('<' | '>' | '=' | '@' | '!')) => (c, &format[1..]),
        _ => ('@', format),
    };
    let big = order == '>' || order == '!';
    let e = if big { '>' } else { '<' };
    let (kind, size) = match code {
        "f" => ('f', 4),
        "d" => ('f', 8),
        "e" => ('f', 2),
        "b" => ('i', 1),
        "B" => ('u', 1),
        "h" => ('i', 2),
        "H" => ('u', 2),
        "i" => ('i', 4),
        "I" => ('u', 4),
        "l" | "q" => ('i', 8),
        "L" | "Q" => ('u', 8),
        "n" => ('i', std::mem::size_of::<isize>()),
        "N" => ('u', std::mem::size_of::<usize>()),
        "?" => ('b', 1),
        "Zf" => ('c', 8),
        "Zd" => ('c', 16),
        _ => return None,
    };
    if size != itemsize {
        return None;
    }
    let e = if size == 1 { '|' } else { e };
    Some(format!("{e}{kind}{size}"))
}

/// The item size of a dtype string memwatch decodes (`<f4`, `|u1`,
/// `<bfloat16`: [`memwatch_format::dtype`]).
pub(crate) fn dtype_itemsize(dtype: &str) -> Option<u32> {
    memwatch_format::dtype::Dtype::parse(dtype).map(|d| d.itemsize)
}

pub(crate) struct Span {
    pub start: u64,
    pub len: u64,
    pub layout: Layout,
}

/// Exports `obj`'s buffer writable, or explains why it cannot.
pub(crate) fn export(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Pinned> {
    let mut view: Box<ffi::Py_buffer> = Box::new(unsafe { std::mem::zeroed() });
    // SAFETY: GIL held; `view` is a valid, zeroed Py_buffer.
    let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, ffi::PyBUF_RECORDS) };
    if rc == 0 {
        return Ok(Pinned(view));
    }
    let err = PyErr::fetch(py);
    let tname = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    // Is it a read-only buffer, or no buffer at all?
    let mut ro: ffi::Py_buffer = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut ro, ffi::PyBUF_RECORDS_RO) } == 0 {
        // SAFETY: `ro` was filled by a successful export.
        unsafe { ffi::PyBuffer_Release(&mut ro) };
        return Err(PyValueError::new_err(format!(
            "cannot watch a read-only {tname} buffer: memwatch only watches memory that can change \
             (use a bytearray, a writable numpy array, or the like)"
        )));
    }
    let _ = PyErr::take(py);
    if err.is_instance_of::<pyo3::exceptions::PyTypeError>(py) {
        return Err(PyTypeError::new_err(format!(
            "cannot watch an object of type {tname}: it does not export a buffer; \
             pass a bytearray, array.array, memoryview, mmap, numpy array or torch CPU tensor, \
             use watch(buffer=address, size=n) for raw memory, or watch_object() for Python objects"
        )));
    }
    Err(err)
}

pub(crate) fn span_of(view: &ffi::Py_buffer, bytes_like: bool) -> PyResult<Span> {
    if !view.suboffsets.is_null() {
        return Err(PyValueError::new_err(
            "cannot watch a buffer with suboffsets (an indirect, PIL-style array)",
        ));
    }
    let itemsize = view.itemsize.max(1) as u64;
    let nd = view.ndim.max(0) as usize;
    // SAFETY: shape and strides have `ndim` entries when requested with
    // PyBUF_STRIDES (strides may be NULL for C-contiguous memory).
    let shape: Vec<u64> = if nd == 0 || view.shape.is_null() {
        vec![(view.len as u64) / itemsize]
    } else {
        (0..nd).map(|i| unsafe { *view.shape.add(i) } as u64).collect()
    };
    let strides: Vec<i64> = if nd == 0 || view.strides.is_null() {
        vec![]
    } else {
        (0..nd).map(|i| unsafe { *view.strides.add(i) } as i64).collect()
    };
    let count: u64 = shape.iter().product();
    if count == 0 || view.len == 0 {
        return Err(PyValueError::new_err("cannot watch an empty buffer (size 0)"));
    }
    let buf = view.buf as u64;
    let (mut lo, mut hi) = (0i64, 0i64);
    for (d, s) in strides.iter().enumerate() {
        let reach = (shape[d] as i64 - 1) * s;
        if reach < 0 {
            lo += reach;
        } else {
            hi += reach;
        }
    }
    // NULL strides (ctypes arrays) mean C-contiguous: the span is `len`.
    let (start, len) = if strides.is_empty() {
        (buf, view.len as u64)
    } else {
        ((buf as i64 + lo) as u64, (hi - lo) as u64 + itemsize)
    };
    // C-contiguous strides carry no information.
    let mut c = itemsize as i64;
    let mut contiguous = !strides.is_empty();
    for d in (0..strides.len()).rev() {
        if shape[d] > 1 && strides[d] != c {
            contiguous = false;
        }
        c *= shape[d] as i64;
    }
    let format = if view.format.is_null() {
        "B".to_string()
    } else {
        // SAFETY: a non-NULL format is a NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(view.format) }
            .to_string_lossy()
            .into_owned()
    };
    let dtype = if bytes_like && (format == "B" || format == "b" || format == "c") {
        None
    } else {
        array_protocol_dtype(&format, itemsize as usize)
    };
    let (shape, itemsize) = if dtype.is_none() && bytes_like {
        (vec![len], 1)
    } else {
        (shape, itemsize)
    };
    Ok(Span {
        start,
        len,
        layout: Layout {
            dtype,
            itemsize: itemsize as u32,
            shape,
            strides: if contiguous || strides.is_empty() {
                vec![]
            } else {
                strides
            },
            origin: (buf - start),
        },
    })
}
