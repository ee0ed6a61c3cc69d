//! Starting a buffer watch: `memwatch.watch`, through [`_watch`], in named
//! phases: the name's current watch, the span of the object or address,
//! what keeps it alive, the registration (ending one is `super::end`).
//!
//! Locking: the buffers' state lock (`super::state`) and, inside it, the
//! trace's, in short sections that run no Python code. Nothing here runs
//! in signal context.

use std::sync::Arc;

use memwatch_format::UnwatchReason;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::mem::engine::{view_mask, Layout, Region, Tracking};
use crate::mem::kernel::is_mapped_writable;
use crate::mem::signals::crash;
use crate::model::errors::MemwatchError;
use crate::runtime::attrib::{attributed_stack, innermost_in_scope, thread_name};
use crate::runtime::events;
use crate::runtime::thread::{guarded, set_last, LAST};
use crate::runtime::watched::{self, Kind};
use crate::trace::sink::{self, EventContext};
use crate::watch::buffers::end::{check_and_end, unwatch_region};
use crate::watch::buffers::export::{dtype_itemsize, export, span_of, Span};
use crate::watch::buffers::state::{with_state, Held, Owner, Pinned, Watch};

/// A watched region, as `watch` returns it.
#[pyclass(module = "memwatch", frozen, name = "WatchHandle")]
pub struct WatchHandle {
    #[pyo3(get)]
    pub region: u32,
    #[pyo3(get)]
    pub tag: String,
    #[pyo3(get)]
    pub variable: Option<String>,
    /// Address of the first watched byte.
    #[pyo3(get)]
    pub address: u64,
    #[pyo3(get)]
    pub size: u64,
    #[pyo3(get)]
    pub dtype: Option<String>,
    /// How changes are found: `"uffd-wp-async"` or `"compare"`.
    #[pyo3(get)]
    pub tracking: &'static str,
    /// Why page tracking was not used, when it was wanted.
    #[pyo3(get)]
    pub tracking_note: Option<String>,
}

#[pymethods]
impl WatchHandle {
    fn __repr__(&self) -> String {
        format!(
            "<memwatch.WatchHandle tag={:?} address={:#x} size={} tracking={}>",
            self.tag, self.address, self.size, self.tracking
        )
    }
}

/// Starts watching. Called by `memwatch.watch` after it resolved the
/// arguments; see its docstring. With `obj`, `dtype` (when given) replaces
/// the dtype of the buffer's format, for elements of the same size that
/// the format cannot name (a torch `bfloat16` tensor exported as int16).
#[pyfunction]
#[pyo3(signature = (obj, address, size, tag, variable, dtype, shape, keepalive, bytes_like, mode="line", owner=None, memory_owner=None))]
#[allow(clippy::too_many_arguments)]
pub fn _watch(
    py: Python<'_>,
    obj: Option<&Bound<'_, PyAny>>,
    address: Option<u64>,
    size: Option<i64>,
    tag: String,
    variable: Option<String>,
    dtype: Option<String>,
    shape: Option<Vec<u64>>,
    keepalive: Vec<Py<PyAny>>,
    bytes_like: bool,
    mode: &str,
    owner: Option<&Bound<'_, PyAny>>,
    memory_owner: Option<&Bound<'_, PyAny>>,
) -> PyResult<WatchHandle> {
    let store = parse_mode(mode)?;
    if tag.is_empty() {
        return Err(PyValueError::new_err("name must not be empty"));
    }
    refuse_object_name(&tag)?;
    // Report what changed before this watch began (other regions), so the
    // new region's baseline is this moment; a watch whose object is gone
    // ends there, freeing its name.
    check_and_end(py, LAST.with(|l| l.get()));
    let new_oid = owner.or(obj).map(|o| o.as_ptr() as usize);
    if let Some(handle) = watched_under_name(&tag, new_oid, address, size, store, mode)? {
        return Ok(handle);
    }
    let (span, pinned) = match (obj, address) {
        (Some(obj), _) => {
            let (span, pinned) = object_span(py, obj, bytes_like, dtype)?;
            (span, Some(pinned))
        }
        (None, Some(address)) => (address_span(address, size, dtype, shape)?, None),
        (None, None) => {
            return Err(PyTypeError::new_err(
                "watch() needs an object with a buffer, or buffer=address and size=nbytes",
            ))
        }
    };
    // The caller's object (a tensor, not the numpy view exported for it):
    // what `unwatch(obj)` finds the region by.
    let obj_id = owner.or(obj).map(|o| o.as_ptr() as usize);
    let mut keep = keepalive;
    if let Some(o) = obj {
        keep.push(o.clone().unbind());
    }
    if let Some(m) = memory_owner {
        keep.push(m.clone().unbind());
    }
    let owner = owner.or(obj).map(|o| Owner {
        obj: held_of(py, o, &keep, pinned.as_ref()),
        memory: memory_owner.map(|m| held_of(py, m, &keep, pinned.as_ref())),
    });
    let watch = Watch {
        id: 0,
        tag: tag.as_str().into(),
        variable: variable.as_deref().map(Into::into),
        layout: Arc::new(span.layout.clone()),
        pinned,
        keepalive: keep,
        obj_id,
        owner,
    };
    let handle = register(py, span, watch, store)?;
    if let Err(e) = events::start(py).and_then(|()| events::restart_disabled(py)) {
        let _ = unwatch_region(py, handle.region, UnwatchReason::Explicit);
        return Err(e);
    }
    set_last(innermost_in_scope(py, false));
    Ok(handle)
}

/// A name an object watch has is refused for a buffer (whether a name is
/// taken is `runtime::watched::named`; a buffer's own name is
/// [`watched_under_name`]'s).
fn refuse_object_name(tag: &str) -> PyResult<()> {
    if watched::named(tag) == Some(Kind::Objects) {
        return Err(PyValueError::new_err(format!(
            "'{tag}' is already watched (an object); pass another name= or unwatch it first"
        )));
    }
    Ok(())
}

/// What `memwatch.watch` asks before it prepares anything for the name
/// `tag` (a torch tensor's resize hook): the refusal `_watch` would give.
#[pyfunction]
pub fn _check_buffer_name(tag: &str) -> PyResult<()> {
    refuse_object_name(tag)
}

/// `mode=`: store mode (`"store"`) or not (`"line"`).
fn parse_mode(mode: &str) -> PyResult<bool> {
    match mode {
        "line" => Ok(false),
        "store" => Ok(true),
        _ => Err(PyValueError::new_err(format!(
            "mode must be 'line' or 'store', not {mode:?}"
        ))),
    }
}

/// A name is watched once at a time. Watching the same object under its
/// name again (a task that runs twice in one worker process) is that
/// watch, returned here; another object under a name in use is refused,
/// saying how to fix it. `None`: the name is free.
fn watched_under_name(
    tag: &str,
    new_oid: Option<usize>,
    address: Option<u64>,
    size: Option<i64>,
    store: bool,
    mode: &str,
) -> PyResult<Option<WatchHandle>> {
    let taken = with_state(|st| {
        let w = st.watches.iter().find(|w| &*w.tag == tag)?;
        let r = st.engine.regions.iter().find(|r| r.id == w.id)?;
        let same = match (new_oid, address) {
            (Some(oid), _) => w.obj_id == Some(oid),
            (None, Some(a)) => r.start == a && size.is_some_and(|n| n >= 0 && n as u64 == r.len),
            (None, None) => false,
        };
        let store = r.tracking == Tracking::Store;
        let handle = WatchHandle {
            region: r.id,
            tag: tag.to_string(),
            variable: w.variable.as_deref().map(str::to_string),
            address: r.start,
            size: r.len,
            dtype: r.layout.dtype.clone(),
            tracking: r.tracking.name(),
            tracking_note: r.tracking_note.clone(),
        };
        Some((same, store, handle))
    });
    let Some((same, was_store, handle)) = taken else {
        return Ok(None);
    };
    if same && was_store == store {
        return Ok(Some(handle));
    }
    let what = match &handle.dtype {
        Some(d) => format!("{} bytes of {d} at {:#x}", handle.size, handle.address),
        None => format!("{} bytes at {:#x}", handle.size, handle.address),
    };
    Err(PyValueError::new_err(if same {
        format!(
            "'{tag}' is already watched in {} mode; unwatch it before watching it in {mode} mode",
            if was_store { "store" } else { "line" }
        )
    } else {
        format!(
            "a region named '{tag}' is already watched: another buffer ({what}) that is still \
             referenced; a name is watched once at a time: unwatch('{tag}') when done with \
             the first (or watch it in a `with memwatch.watching(...)` block), or give each \
             its own name= (a task that runs more than once in a worker: name=f\"{tag}-{{i}}\")"
        )
    }))
}

/// The memory `obj` exports, pinned. `dtype` names what the exported
/// elements really are when the buffer's format cannot (a torch bfloat16
/// tensor exports int16).
fn object_span(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    bytes_like: bool,
    dtype: Option<String>,
) -> PyResult<(Span, Pinned)> {
    let pinned = export(py, obj)?;
    let span = span_of(&pinned.0, bytes_like).and_then(|mut s| {
        if let Some(d) = dtype {
            if dtype_itemsize(&d) != Some(s.layout.itemsize) {
                return Err(PyValueError::new_err(format!(
                    "dtype {d:?} does not match the buffer's {}-byte elements",
                    s.layout.itemsize
                )));
            }
            s.layout.dtype = Some(d);
        }
        Ok(s)
    });
    match span {
        Ok(s) => Ok((s, pinned)),
        Err(e) => {
            let mut p = pinned;
            // SAFETY: releasing the export we just made, GIL held.
            unsafe { ffi::PyBuffer_Release(&mut *p.0) };
            Err(e)
        }
    }
}

/// `watch(buffer=address, size=n, dtype=, shape=)`: checked to be writable
/// memory of this process, whole elements, and a shape that covers it.
fn address_span(
    address: u64,
    size: Option<i64>,
    dtype: Option<String>,
    shape: Option<Vec<u64>>,
) -> PyResult<Span> {
    let size = size.ok_or_else(|| PyValueError::new_err("watch(buffer=...) needs size=nbytes"))?;
    if size <= 0 {
        return Err(PyValueError::new_err(format!(
            "size must be a positive number of bytes, got {size}"
        )));
    }
    let size = size as u64;
    if address == 0 {
        return Err(PyValueError::new_err("buffer=0 is a null address"));
    }
    match is_mapped_writable(address, size) {
        Ok(true) => {}
        Ok(false) => {
            return Err(MemwatchError::new_err(format!(
                "[{address:#x}, {:#x}) is not writable memory mapped in this process; \
                 pass the address and size of a live buffer",
                address + size
            )))
        }
        Err(e) => {
            return Err(MemwatchError::new_err(format!(
                "cannot read /proc/self/maps: {e}"
            )))
        }
    }
    let (dtype, itemsize) = match dtype {
        None => (None, 1),
        Some(d) => {
            let n = dtype_itemsize(&d).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "dtype {d:?} is not a numeric type memwatch decodes: an array-protocol \
                     string like '<f4' or '|u1', or one of memwatch's names like '<bfloat16'"
                ))
            })?;
            (Some(d), n)
        }
    };
    if size % u64::from(itemsize) != 0 {
        return Err(PyValueError::new_err(format!(
            "size {size} is not a whole number of {itemsize}-byte elements"
        )));
    }
    let shape = shape.unwrap_or_else(|| vec![size / u64::from(itemsize)]);
    let covered = shape
        .iter()
        .try_fold(u64::from(itemsize), |acc, n| acc.checked_mul(*n));
    if covered != Some(size) {
        return Err(PyValueError::new_err(format!(
            "shape {shape:?} of {itemsize}-byte elements does not cover size {size}"
        )));
    }
    let layout = Layout {
        dtype,
        itemsize,
        shape,
        strides: vec![],
        origin: 0,
    };
    Ok(Span {
        start: address,
        len: size,
        layout,
    })
}

/// Registers the region of `span` with the engine (store mode with
/// `store`) under a new id, records it to the trace, and keeps `watch`.
/// On failure the export `watch` pinned is released.
fn register(py: Python<'_>, span: Span, watch: Watch, store: bool) -> PyResult<WatchHandle> {
    let mask = view_mask(&span.layout, span.len);
    let stack = attributed_stack(py, innermost_in_scope(py, false));
    let tname = thread_name(py);
    let (tag, variable) = (watch.tag.clone(), watch.variable.clone());
    let mut pending = Some(watch);
    let handle = with_state(|st| {
        let id = st.next_region;
        let region = Region {
            id,
            tag: tag.clone(),
            variable: variable.clone(),
            start: span.start,
            len: span.len,
            layout: span.layout,
            mask,
            shadow: Arc::new(Vec::new()),
            spare: None,
            tracking: Tracking::Compare,
            tracking_note: None,
        };
        let region = if store {
            st.engine
                .add_store(region)
                .map_err(|why| MemwatchError::new_err(format!("cannot watch '{tag}' in store mode: {why}")))?
        } else {
            st.engine.add(region)
        };
        st.next_region += 1;
        {
            let mut sk = sink::lock();
            let seq = crash::next_seq();
            if let Some(s) = sk.as_mut() {
                let ev = EventContext::here(&tname, &stack);
                s.region_watched(seq, region, &ev);
            }
        }
        let handle = WatchHandle {
            region: id,
            tag: tag.to_string(),
            variable: variable.as_deref().map(str::to_string),
            address: region.start,
            size: region.len,
            dtype: region.layout.dtype.clone(),
            tracking: region.tracking.name(),
            tracking_note: region.tracking_note.clone(),
        };
        if let Some(w) = pending.take() {
            st.watches.push(Watch { id, ..w });
        }
        Ok(handle)
    });
    if let Some(Watch {
        pinned: Some(mut p), ..
    }) = pending
    {
        // SAFETY: releasing the export made for this watch, GIL held.
        unsafe { ffi::PyBuffer_Release(&mut *p.0) };
    }
    handle
}

/// `owner` and the references to it that a watch holding `keep` and the
/// export `pinned` has: direct ones, and a kept array's `.base` (a view of
/// it). Counting fewer than there are only keeps a dead watch alive (a
/// memoryview's exporter, referred to through its managed buffer, is one);
/// every one counted is really held, so a live object is never taken for
/// a dead one.
fn held_of(py: Python<'_>, owner: &Bound<'_, PyAny>, keep: &[Py<PyAny>], pinned: Option<&Pinned>) -> Held {
    let me = owner.as_ptr();
    let mut held = keep.iter().filter(|k| k.as_ptr() == me).count() as isize;
    let mut holders: Vec<*mut ffi::PyObject> = keep.iter().map(|k| k.as_ptr()).filter(|&p| p != me).collect();
    if let Some(p) = pinned {
        if p.0.obj == me {
            held += 1;
        } else if !p.0.obj.is_null() {
            holders.push(p.0.obj);
        }
    }
    holders.sort_unstable();
    holders.dedup();
    for h in holders {
        // SAFETY: `keep` or the export holds each of these; GIL held.
        let h = unsafe { Bound::<PyAny>::from_borrowed_ptr(py, h) };
        if guarded(|| h.getattr("base")).is_ok_and(|b| b.is(owner)) {
            held += 1;
        }
    }
    Held {
        ptr: me as usize,
        held,
    }
}
