//! The calling thread's Python stack, read from the interpreter's own frame
//! records instead of through frame objects.
//!
//! `PyEval_GetFrame`/`PyFrame_GetBack` create a frame object for every
//! frame they return that has none yet, and each step costs reference
//! counting and a call into the interpreter. The recorder walks the stack at
//! every change (its `stack`) and at every return of in-scope code (the
//! caller's line), so it reads the frame records directly: a code object
//! pointer and an instruction pointer per frame, linked to the previous
//! frame. Their layout is private to each CPython minor version, so:
//!
//! - the offsets below were read from the headers of CPython 3.11, 3.12
//!   and 3.13 (`Include/internal/pycore_frame.h`, `cpython/pystate.h`,
//!   `cpython/code.h`) with `offsetof`;
//! - before the first use, [`walk`] checks them against the public API on
//!   the stack of the moment, reading through `process_vm_readv` so that a
//!   wrong offset fails the check instead of crashing; any difference (or
//!   another Python version) turns the walker off for the rest of the
//!   process, and [`walk`] goes through the public API instead. So does
//!   `MEMWATCH_FRAME_WALKER=0` in the environment.
//!
//! Only the calling thread's own frames are read, with the GIL held, so
//! they cannot change under the walk. State: whether the offsets passed
//! their check (an atomic); no lock. Nothing here runs in signal context.

use std::sync::atomic::{AtomicU8, Ordering};

use pyo3::ffi;
use pyo3::prelude::*;

/// Where things are, for one CPython minor version (byte offsets).
struct Layout {
    /// `PyThreadState` → the current frame (3.13), or → `cframe` (3.11, 3.12).
    tstate_frame: usize,
    /// `_PyCFrame` → `current_frame` (3.11, 3.12).
    cframe_frame: Option<usize>,
    /// `_PyInterpreterFrame` → code object (`f_code`, `f_executable`).
    code: usize,
    /// `_PyInterpreterFrame` → `previous`.
    previous: usize,
    /// `_PyInterpreterFrame` → `prev_instr` (3.11, 3.12) / `instr_ptr` (3.13).
    instr: usize,
    /// `_PyInterpreterFrame` → `owner` (a `char`).
    owner: usize,
    /// `owner` of a frame that is a shim for a C call (`FRAME_OWNED_BY_CSTACK`), skipped.
    cstack: Option<u8>,
    /// `PyCodeObject` → `co_code_adaptive` (the first instruction).
    co_code: usize,
}

const PY311: Layout = Layout {
    tstate_frame: 56,
    cframe_frame: Some(8),
    code: 32,
    previous: 48,
    instr: 56,
    owner: 69,
    cstack: None,
    co_code: 184,
};
const PY312: Layout = Layout {
    tstate_frame: 56,
    cframe_frame: Some(0),
    code: 0,
    previous: 8,
    instr: 56,
    owner: 70,
    cstack: Some(3),
    co_code: 192,
};
const PY313: Layout = Layout {
    tstate_frame: 72,
    cframe_frame: None,
    code: 0,
    previous: 8,
    instr: 56,
    owner: 70,
    cstack: Some(3),
    co_code: 200,
};

const UNCHECKED: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNCHECKED);
/// Which of the layouts: 11, 12 or 13.
static MINOR: AtomicU8 = AtomicU8::new(0);

/// Most frames walked (a deeper stack is cut, as the public-API walk is).
pub const MAX_DEPTH: usize = 256;

fn layout() -> Option<&'static Layout> {
    match MINOR.load(Ordering::Relaxed) {
        11 => Some(&PY311),
        12 => Some(&PY312),
        13 => Some(&PY313),
        _ => None,
    }
}

/// Reads one word: plainly, or (`checked`) through `process_vm_readv`,
/// which fails with `EFAULT` on an unmapped address instead of faulting.
///
/// # Safety
/// Unless `checked`, `addr` must be a readable, aligned word.
unsafe fn read(addr: usize, checked: bool) -> Option<usize> {
    if !checked {
        // SAFETY: as the caller promises.
        return Some(unsafe { std::ptr::read(addr as *const usize) });
    }
    let mut out: usize = 0;
    let local = libc::iovec {
        iov_base: (&raw mut out).cast(),
        iov_len: std::mem::size_of::<usize>(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: std::mem::size_of::<usize>(),
    };
    // SAFETY: reads our own memory into `out`; the kernel checks `addr`.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    (n == std::mem::size_of::<usize>() as isize).then_some(out)
}

/// Walks with layout `l` from thread state `tstate`, calling `f(code
/// object address, instruction offset in bytes)` per frame, innermost
/// first, until it returns `false` or [`MAX_DEPTH`] frames were seen.
///
/// # Safety
/// GIL held, `tstate` the calling thread's; unless `checked`, `l` must be
/// this interpreter's layout.
unsafe fn walk_with(
    l: &Layout,
    tstate: usize,
    checked: bool,
    f: &mut dyn FnMut(usize, i32) -> bool,
) -> Option<()> {
    let code_type = std::ptr::addr_of!(ffi::PyCode_Type) as usize;
    // SAFETY (every read below): as the caller promises, or checked.
    let mut frame = unsafe { read(tstate + l.tstate_frame, checked)? };
    if let Some(off) = l.cframe_frame {
        if frame == 0 {
            return Some(());
        }
        frame = unsafe { read(frame + off, checked)? };
    }
    let mut seen = 0;
    while frame != 0 && seen < MAX_DEPTH {
        let word = unsafe { read(frame + (l.owner & !7), checked)? };
        let owner = (word >> ((l.owner & 7) * 8)) as u8;
        if l.cstack != Some(owner) {
            let code = unsafe { read(frame + l.code, checked)? };
            // Only code objects (`ob_type`, the second word of an object).
            if code != 0 && unsafe { read(code + 8, checked)? } == code_type {
                let instr = unsafe { read(frame + l.instr, checked)? };
                let offset = instr as isize - (code + l.co_code) as isize;
                seen += 1;
                if !f(code, offset.clamp(0, i32::MAX as isize) as i32) {
                    return Some(());
                }
            }
        }
        frame = unsafe { read(frame + l.previous, checked)? };
    }
    Some(())
}

/// The same walk through the public API (`PyEval_GetFrame`,
/// `PyFrame_GetBack`): the check's reference, and the fallback.
fn walk_public(py: Python<'_>, f: &mut dyn FnMut(usize, i32) -> bool) {
    // SAFETY: GIL held; borrowed frame turned into an owned reference.
    let mut frame = unsafe {
        let f = ffi::PyEval_GetFrame();
        if f.is_null() {
            return;
        }
        Bound::<PyAny>::from_borrowed_ptr(py, f.cast())
    };
    for _ in 0..MAX_DEPTH {
        let fp = frame.as_ptr() as *mut ffi::PyFrameObject;
        // SAFETY: `fp` is a live frame; new references or NULL. The code
        // object stays alive after `code` is dropped: the frame holds it.
        let (code, lasti) = unsafe {
            let code = Bound::<PyAny>::from_owned_ptr(py, ffi::PyFrame_GetCode(fp).cast());
            (code.as_ptr() as usize, ffi::PyFrame_GetLasti(fp))
        };
        if !f(code, lasti.max(0)) {
            return;
        }
        // SAFETY: `fp` is a live frame; a new reference or NULL.
        let back = unsafe { ffi::PyFrame_GetBack(fp) };
        if back.is_null() {
            return;
        }
        // SAFETY: `back` is a new reference.
        frame = unsafe { Bound::from_owned_ptr(py, back.cast()) };
    }
}

/// Decides once whether the layout is right for this interpreter.
fn check(py: Python<'_>) -> bool {
    let info = py.version_info();
    let minor = if info.major == 3 && (11..=13).contains(&info.minor) {
        info.minor
    } else {
        0
    };
    MINOR.store(minor, Ordering::Relaxed);
    // An escape hatch for an interpreter build the check passes wrongly.
    let wanted = std::env::var_os("MEMWATCH_FRAME_WALKER").is_none_or(|v| v != "0");
    let ok = wanted
        && layout().is_some_and(|l| {
            let mut ours = Vec::new();
            let mut theirs = Vec::new();
            // SAFETY: GIL held; every read is checked.
            let walked = unsafe {
                walk_with(l, ffi::PyThreadState_Get() as usize, true, &mut |c, o| {
                    ours.push((c, o));
                    true
                })
            };
            walk_public(py, &mut |c, o| {
                theirs.push((c, o));
                true
            });
            walked.is_some() && !theirs.is_empty() && ours == theirs
        });
    STATE.store(if ok { ON } else { OFF }, Ordering::Relaxed);
    ok
}

/// Calls `f(code object address, instruction offset in bytes, as
/// `PyFrame_GetLasti` gives it)` for each frame of the calling thread's
/// stack, innermost first, until `f` returns `false` or [`MAX_DEPTH`]
/// frames were seen: from the frame records where they were checked,
/// through the public API otherwise.
///
/// The code objects are alive while their frames are: `f` must not run
/// Python code, and must take its own reference to keep one.
pub fn walk(py: Python<'_>, f: &mut dyn FnMut(usize, i32) -> bool) {
    // Decided first: the check is what sets the version `layout` reads.
    let checked = records_checked(py);
    match layout().filter(|_| checked) {
        // SAFETY: GIL held; the layout was checked on this interpreter.
        Some(l) => unsafe {
            walk_with(l, ffi::PyThreadState_Get() as usize, false, f);
        },
        None => walk_public(py, f),
    }
}

/// Whether the frame records are read on this interpreter (deciding now
/// if not decided yet).
fn records_checked(py: Python<'_>) -> bool {
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => check(py),
    }
}

/// Whether stacks are read from the frame records on this interpreter:
/// `None` until the first walk decided it. For tests and diagnostics; it
/// decides nothing itself, so that it shows what the recorder's own walks
/// did.
#[pyfunction]
pub fn _frame_walker_in_use() -> Option<bool> {
    match STATE.load(Ordering::Relaxed) {
        ON => Some(true),
        OFF => Some(false),
        _ => None,
    }
}
