//! The line callback's fast path: a line of in-scope code that changed
//! nothing costs a compare of each small watched region (and, with
//! page-tracked regions, a read of the process's fault count) and no more.
//!
//! A check at a line boundary ([`crate::api::at_boundary`]) takes the
//! recorder's lock, runs the engine, flushes object and variable watches and
//! moves the thread's last line on. When no store-mode region or variable
//! is watched, no object change waits in the queue and compared objects
//! still hold what they held (checked in place), the `Compare`-tracked
//! regions' bytes are what the last check left and the process took no page
//! fault since the page-tracked ones were last scanned, and every watched
//! object is still referred to by something besides memwatch, all of that
//! reduces to "remember this line".
//! [`line_unchanged`] decides that without the lock, from a copy of the
//! regions' shadows taken by [`refresh`].
//!
//! Why the copy can be trusted: every acquisition of the recorder's state
//! lock calls [`invalidate`] (it may change a region or a shadow), and
//! [`refresh`] runs under that lock right after a check, recording the
//! generation it copied. A copy whose generation is not the current one is
//! never used, so a region removed (or a shadow changed) since cannot be
//! read through it. The copy itself is only read and written with the GIL
//! held, which orders every use of it.
//!
//! CPython 3.12+: [`line_callback`] is the `sys.monitoring` `LINE` callback,
//! a plain `METH_FASTCALL` C function (no argument parsing, no pyo3
//! trampoline) that hands anything it cannot decide to the full callback,
//! `monitor::_mon_line`. With watched memory unchanged it also does the
//! rest of a boundary's cheap cases itself: it flushes queued object
//! changes, and lets a line of code that binds a watched variable move on
//! when the frame still binds what was seen last
//! (`vars::line_unchanged`). CPython 3.11's C trace function calls
//! [`line_unchanged`] directly.
//!
//! Nothing here runs in signal context.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use pyo3::ffi;
use pyo3::prelude::*;

use crate::api::Owner;
use crate::engine::{Engine, Tracking};
use crate::monitor::{GUARD, LAST};

/// Generation of the recorder state: bumped by every acquisition of its
/// lock. Starts above 0, the generation of "no valid copy".
static GEN: AtomicU64 = AtomicU64::new(1);

/// Marks the copy stale. Called whenever the recorder's state lock is taken.
pub(crate) fn invalidate() {
    GEN.fetch_add(1, Ordering::Relaxed);
}

/// The current generation, for a [`refresh`] under the same lock.
pub(crate) fn generation() -> u64 {
    GEN.load(Ordering::Relaxed)
}

/// One `Compare` region: where it is and the shadow the engine holds.
struct Copy {
    start: *const u8,
    bytes: Box<[u8]>,
}

struct Fast {
    /// The generation the copy was taken at; 0: none.
    generation: u64,
    regions: Vec<Copy>,
    /// With page-tracked regions: the process's fault count the engine's
    /// last scan read (an equal count now means no page was written).
    faults: Option<u64>,
    /// Watched objects and the references memwatch holds to each: one
    /// that only memwatch still refers to sends the line to a full check,
    /// which ends its watch.
    owners: Vec<Owner>,
}

/// State only touched with the GIL held.
struct GilCell(UnsafeCell<Fast>);

// SAFETY: every access goes through `GilCell::get`, which takes a `Python`
// token: the GIL serialises them. The raw pointers in `Copy` are only
// dereferenced while their generation is current (see the module docs).
unsafe impl Sync for GilCell {}

impl GilCell {
    /// # Safety
    /// No other reference from `get` may be alive (neither caller keeps
    /// one across code that could call back in).
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, _py: Python<'_>) -> &mut Fast {
        // SAFETY: as the caller promises; the GIL excludes other threads.
        unsafe { &mut *self.0.get() }
    }
}

static FAST: GilCell = GilCell(UnsafeCell::new(Fast {
    generation: 0,
    regions: Vec::new(),
    faults: None,
    owners: Vec::new(),
}));

/// Copies the engine's shadows for the fast path, right after a check,
/// under the state lock (`None`: no engine yet, nothing watched). Leaves no
/// usable copy when the engine tracks anything the fast path cannot check
/// (stores, pages not scanned yet).
pub(crate) fn refresh(
    py: Python<'_>,
    engine: Option<&Engine>,
    owners: impl Iterator<Item = Owner>,
    generation: u64,
) {
    // SAFETY: GIL held; no other reference is alive (see `line_unchanged`).
    let fast = unsafe { FAST.get(py) };
    fast.generation = 0;
    fast.owners.clear();
    fast.owners.extend(owners);
    let Some(engine) = engine else {
        fast.regions.clear();
        fast.faults = None;
        fast.generation = generation;
        return;
    };
    let Some(faults) = engine.fast_checkable() else {
        return;
    };
    fast.faults = faults;
    let compared = engine.regions.iter().filter(|r| r.tracking == Tracking::Compare);
    fast.regions.truncate(compared.clone().count());
    for (i, r) in compared.enumerate() {
        let start = r.start as usize as *const u8;
        match fast.regions.get_mut(i) {
            Some(c) if c.bytes.len() == r.shadow.len() => {
                c.start = start;
                c.bytes.copy_from_slice(&r.shadow);
            }
            _ => {
                let c = Copy {
                    start,
                    bytes: r.shadow.as_slice().into(),
                };
                if i < fast.regions.len() {
                    fast.regions[i] = c;
                } else {
                    fast.regions.push(c);
                }
            }
        }
    }
    fast.generation = generation;
}

/// True when a line boundary has nothing to do but remember the line: no
/// store-mode region or variable is watched, no object change waits to be
/// reported, each `Compare` region's bytes equal the shadow the last check
/// left, and the process took no page fault since the last scan of the
/// page-tracked ones. Runs no Python code and takes no
/// lock. The GIL must be held.
#[inline]
pub(crate) fn line_unchanged(py: Python<'_>) -> bool {
    !crate::vars::any() && crate::objects::quiet(py) && buffers_unchanged(py)
}

/// True when watched memory needs no check at this boundary: no store-mode
/// region is watched, each `Compare` region's bytes equal the shadow the
/// last check left, and the process took no page fault since the last scan
/// of the page-tracked ones. Says nothing of objects and variables. Runs
/// no Python code and takes no lock. The GIL must be held.
#[inline]
fn buffers_unchanged(py: Python<'_>) -> bool {
    if crate::store::active() {
        return false;
    }
    // SAFETY: GIL held; the reference does not outlive this function, which
    // calls nothing that could reach `refresh`.
    let fast = unsafe { FAST.get(py) };
    if fast.generation != GEN.load(Ordering::Relaxed) {
        return false;
    }
    let compared_equal = fast.regions.iter().all(|c| {
        // SAFETY: the region is still watched (its generation is current,
        // so no state change, unwatching included, happened since the copy)
        // and so pinned; concurrent writers only make this read one of the
        // values they stored, as in `Region::current`.
        let now = unsafe { std::slice::from_raw_parts(c.start, c.bytes.len()) };
        now == &c.bytes[..]
    });
    // Page-tracked regions: the engine's own test (see `Engine::check`).
    compared_equal
        && fast.owners.iter().all(|o| !o.unreferenced())
        && fast
            .faults
            .is_none_or(|f| crate::kernel::process_faults() == Some(f))
}

/// True when no buffer is watched, as the current copy says (call right
/// after [`buffers_unchanged`] said yes, so that the copy is current).
fn no_buffers(py: Python<'_>) -> bool {
    // SAFETY: GIL held; the reference does not outlive this function.
    let fast = unsafe { FAST.get(py) };
    fast.generation == GEN.load(Ordering::Relaxed) && fast.regions.is_empty() && fast.faults.is_none()
}

/// The full `LINE` callback (`monitor::_mon_line`), called for whatever the
/// fast path cannot decide.
static SLOW: OnceLock<Py<PyAny>> = OnceLock::new();

/// `LINE` callback for `sys.monitoring` (`args`: code object, line number).
///
/// # Safety
/// Called by the interpreter, with the GIL held and `nargs` arguments.
unsafe extern "C" fn line_fast(
    _slf: *mut ffi::PyObject,
    args: *mut *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter calls us with the GIL held.
    let py = unsafe { Python::assume_attached() };
    if nargs == 2
        && !GUARD.with(|g| g.get())
        && crate::monitor::is_active()
        && !crate::guard::any_waiting()
        && buffers_unchanged(py)
    {
        // SAFETY: two arguments, as checked; the second is the line (an int).
        let (code, line) = unsafe { (*args, ffi::PyLong_AsLong(*args.add(1))) };
        if line >= 0 {
            // Watched memory is as the last check left it: only objects may
            // have something to report (a queued change, a compared node
            // that differs), and reporting it is all the full boundary would
            // do before moving the line on (`api::at_boundary`).
            if !crate::objects::quiet(py) {
                // In pyo3's attach scope, so that what the flush lets go
                // of is freed now, not at pyo3's next entry point.
                Python::attach(|py| crate::objects::flush(py, LAST.with(|l| l.get())));
            }
            // A change the flush reported may have armed a guard (a frozen
            // dict): its raise is due here, at this boundary, which the
            // full callback gives (the flush found nothing more to do).
            let armed = crate::guard::any_waiting();
            // Watched variables: the line moves on here only if the frame
            // still binds what was seen at its last check. With nothing but
            // variables watched, a line of code that binds none of them
            // must not become the thread's last line: a rebinding belongs
            // to the frame that made it, and this code's return will not be
            // seen (its events are switched off). The full callback
            // switches this line's event off without moving the line.
            let vars = crate::vars::any();
            if !armed && (!vars || crate::vars::line_unchanged(py, code as usize)) {
                let passive = vars
                    && !crate::objects::any()
                    && no_buffers(py)
                    && crate::vars::binds_watched(code as usize) == Some(false);
                if !passive {
                    crate::monitor::set_last((code as usize, line as u32));
                    // SAFETY: returning a new reference to None.
                    return unsafe { ffi::Py_NewRef(ffi::Py_None()) };
                }
            }
        }
        // SAFETY: GIL held; clears the conversion error, if any.
        unsafe { ffi::PyErr_Clear() };
    }
    let Some(slow) = SLOW.get() else {
        // SAFETY: as above.
        return unsafe { ffi::Py_NewRef(ffi::Py_None()) };
    };
    // SAFETY: forwarding our own arguments to a callable, GIL held.
    unsafe { ffi::PyObject_Vectorcall(slow.as_ptr(), args, nargs as usize, std::ptr::null_mut()) }
}

static DEF: OnceLock<SyncDef> = OnceLock::new();

struct SyncDef(ffi::PyMethodDef);

// SAFETY: the definition is immutable after creation; the interpreter only
// reads it.
unsafe impl Sync for SyncDef {}
// SAFETY: as above.
unsafe impl Send for SyncDef {}

/// The `LINE` callback to register: the fast path in front of `slow`.
pub(crate) fn line_callback<'py>(py: Python<'py>, slow: Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let _ = SLOW.set(slow.unbind());
    let def = DEF.get_or_init(|| {
        SyncDef(ffi::PyMethodDef {
            ml_name: c"_mon_line_fast".as_ptr(),
            ml_meth: ffi::PyMethodDefPointer {
                PyCFunctionFast: line_fast,
            },
            ml_flags: ffi::METH_FASTCALL,
            ml_doc: c"memwatch's sys.monitoring LINE callback (fast path).".as_ptr(),
        })
    });
    // SAFETY: `def` lives for the rest of the process; GIL held.
    unsafe {
        let f = ffi::PyCFunction_NewEx(
            std::ptr::from_ref(&def.0).cast_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        Bound::from_owned_ptr_or_err(py, f)
    }
}
