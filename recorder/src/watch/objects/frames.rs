//! The stacks of queued events: what the dict watcher callback and the
//! collection callback capture ([`capture_frames`]), and how the flush turns
//! that into frames ([`resolve_frames`], [`resolve_stack`]), remembering the
//! last stack each thread resolved ([`StackMemo`]) so that a loop storing to
//! a watched object resolves its stack once, not at every store.
//!
//! Locking: none of the objects' locks. [`code_at`] takes
//! `runtime::codes::CODES` for one lookup. The memo and the walk are thread-locals, borrowed
//! with `try_borrow`: a call that finds them busy goes without.
//!
//! Signal context: nothing here runs in a signal handler.
//! [`capture_frames`] runs inside the dict watcher callback (`hooks.rs`),
//! that is inside a dict mutation: it runs no Python code and releases no
//! reference. [`resolve_frames`] runs at the flush, a safe point, and may run
//! Python code (looking code objects up, releasing the memo it replaces).

use std::sync::Arc;

use pyo3::ffi;
use pyo3::prelude::*;

use crate::model::change::FrameRef;

/// A code object and a line in it.
type CodeLine = (Py<PyAny>, u32);

/// The stack of a queued event.
pub(super) enum Frames {
    /// Resolved when queued, from this thread's [`StackMemo`]: the frames
    /// from the innermost in-scope one out, and that frame's code and line.
    Resolved(Arc<[FrameRef]>, Option<CodeLine>),
    /// `(code object, instruction offset)`, innermost first: resolved at
    /// the flush, where looking a code object up may run Python code.
    Raw(Vec<(Py<PyAny>, i32)>),
}

/// The stack last resolved for a queued event of this thread, by its raw
/// frames. A loop that stores to a watched object queues the same stack
/// at every store: the callback compares the raw frames and shares the
/// resolved stack instead of holding a reference per frame, and the flush
/// resolves nothing.
///
/// Its code objects are held, so that their addresses cannot be reused
/// while it is here. It is only replaced at a flush, never in the dict
/// watcher callback: releasing a code object there could run Python code.
struct StackMemo {
    /// [`crate::runtime::codes::scope_generation`] when resolved: which frames are in
    /// scope decides where the stack starts.
    scope: u64,
    raw: Vec<(usize, i32)>,
    _codes: Vec<Py<PyAny>>,
    stack: Arc<[FrameRef]>,
    at: Option<(usize, u32)>,
}

thread_local! {
    static MEMO: std::cell::RefCell<Option<StackMemo>> = const { std::cell::RefCell::new(None) };
    /// The walk of the current event's stack (kept for its capacity).
    static WALKED: std::cell::RefCell<Vec<(usize, i32)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The calling thread's stack for a queued event. Runs no Python code and
/// releases no reference (it is called inside the dict watcher callback).
pub(super) fn capture_frames(py: Python<'_>) -> Frames {
    WALKED.with(|w| {
        let Ok(mut walked) = w.try_borrow_mut() else {
            return Frames::Raw(Vec::new());
        };
        walked.clear();
        crate::runtime::frames::walk(py, &mut |code, lasti| {
            walked.push((code, lasti));
            true
        });
        let known = MEMO.with(|m| {
            let m = m.try_borrow().ok()?;
            let m = m.as_ref()?;
            (m.scope == crate::runtime::codes::scope_generation() && m.raw == *walked).then(|| {
                // SAFETY: GIL held; the memo holds the code object.
                let at = m.at.map(|(c, l)| {
                    (
                        unsafe { Bound::from_borrowed_ptr(py, c as *mut ffi::PyObject) }.unbind(),
                        l,
                    )
                });
                Frames::Resolved(m.stack.clone(), at)
            })
        });
        known.unwrap_or_else(|| {
            Frames::Raw(
                walked
                    .iter()
                    .map(|&(code, lasti)| {
                        // SAFETY: the code object of a frame that is still
                        // running (GIL held, no Python code ran since the walk).
                        (
                            unsafe { Bound::from_borrowed_ptr(py, code as *mut ffi::PyObject) }.unbind(),
                            lasti,
                        )
                    })
                    .collect(),
            )
        })
    })
}

/// The resolved stack of a queued event and its attributed code and line;
/// a raw stack queued by this thread becomes its [`StackMemo`].
pub(super) fn resolve_frames(
    py: Python<'_>,
    frames: &Frames,
    mine: bool,
) -> (Arc<[FrameRef]>, Option<CodeLine>) {
    let raw = match frames {
        Frames::Resolved(stack, at) => {
            return (stack.clone(), at.as_ref().map(|(c, l)| (c.clone_ref(py), *l)))
        }
        Frames::Raw(raw) => raw,
    };
    let lined: Vec<(Py<PyAny>, u32)> = raw
        .iter()
        .map(|(code, lasti)| {
            (
                code.clone_ref(py),
                crate::runtime::attrib::line_at(code.bind(py), *lasti),
            )
        })
        .collect();
    let scope = crate::runtime::codes::scope_generation();
    let (stack, at) = resolve_stack(py, &lined);
    if mine {
        let memo = StackMemo {
            scope,
            raw: raw.iter().map(|(c, o)| (c.as_ptr() as usize, *o)).collect(),
            _codes: lined.into_iter().map(|(c, _)| c).collect(),
            stack: stack.clone(),
            at: at.as_ref().map(|(c, l)| (c.as_ptr() as usize, *l)),
        };
        // The memo replaced is released after the cell is let go: that may
        // run Python code (a code object's last reference).
        let old = MEMO.with(|m| m.try_borrow_mut().ok().map(|mut m| m.replace(memo)));
        drop(old);
    }
    (stack, at)
}

/// Resolves a raw stack: the frames from the innermost in-scope one out
/// (all of them when none is in scope), and that frame's code and line.
fn resolve_stack(py: Python<'_>, frames: &[(Py<PyAny>, u32)]) -> (Arc<[FrameRef]>, Option<CodeLine>) {
    let bound: Vec<(&Bound<'_, PyAny>, u32)> = frames.iter().map(|(c, l)| (c.bind(py), *l)).collect();
    let refs = crate::runtime::attrib::frame_refs(py, &bound);
    let first = refs.iter().position(|(_, _, in_scope)| *in_scope);
    let i = first.unwrap_or(0);
    let at = first.map(|i| (frames[i].0.clone_ref(py), frames[i].1));
    (
        refs.into_iter()
            .skip(i)
            .map(|(_, f, _)| f)
            .collect::<Vec<_>>()
            .into(),
        at,
    )
}

/// The code object at address `code` (known to `runtime::codes`) and `line`.
pub(super) fn code_at(py: Python<'_>, (code, line): (usize, u32)) -> Option<(Py<PyAny>, u32)> {
    let g = crate::runtime::codes::CODES
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    g.as_ref()?.get(&code).map(|i| (i.code.clone_ref(py), line))
}
