//! Where a change is attributed: the calling thread's stack as frames,
//! the innermost in-scope line, the thread's `threading` name, and where
//! other threads were last seen (for stores caught in one thread and
//! reported at another's boundary, store mode).
//!
//! State: two thread-locals (a line-table cache and the thread's name) and
//! one mutex (`THREADS_SEEN`), held only to read or update an entry. The
//! frame walks run no Python code, so they are safe inside interpreter
//! callbacks; `thread_name` may run Python code (a `Thread` subclass's
//! property) under memwatch's re-entry guard. Nothing here runs in signal
//! context.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::ffi;
use pyo3::prelude::*;

use crate::mem::kernel::gettid;
use crate::model::change::FrameRef;
use crate::runtime::addr::AddrMap;
use crate::runtime::codes;
use crate::runtime::hooks::hooks;
use crate::runtime::thread::guarded;

// --- frames and attribution ---------------------------------------------------

/// The calling thread's Python stack, innermost first, as (code object,
/// line). Runs no Python code, so it is safe inside interpreter callbacks.
pub(crate) fn raw_frames(py: Python<'_>) -> Vec<(Bound<'_, PyAny>, u32)> {
    let mut walked: Vec<(usize, i32)> = Vec::new();
    crate::runtime::frames::walk(py, &mut |code, lasti| {
        walked.push((code, lasti));
        true
    });
    walked
        .into_iter()
        .map(|(code, lasti)| {
            // SAFETY: the code object of a frame that is still running
            // (GIL held, no Python code ran since the walk).
            let code = unsafe { Bound::<PyAny>::from_borrowed_ptr(py, code as *mut ffi::PyObject) };
            let line = line_at(&code, lasti);
            (code, line)
        })
        .collect()
}

thread_local! {
    /// Lines of `(code, instruction offset)` already looked up: finding a
    /// line walks the code object's line table, and the same few places
    /// (a loop storing to a watched object) come back again and again. The
    /// code object is held so that its address cannot be reused for another
    /// while it is here; the table stops growing at `LINES_MAX` entries.
    static LINES: std::cell::RefCell<LineCache> = std::cell::RefCell::new(LineCache::default());
}

/// `(code address, instruction offset)` to `(code object, line)`.
type LineCache = AddrMap<(usize, i32), (Py<PyAny>, i32)>;

const LINES_MAX: usize = 4096;

/// The line of the instruction at byte offset `lasti` of `code`, through
/// the `LINES` cache. Runs no Python code.
pub(crate) fn line_at(code: &Bound<'_, PyAny>, lasti: i32) -> u32 {
    let key = (code.as_ptr() as usize, lasti);
    if let Some(line) = LINES.with(|l| l.borrow().get(&key).map(|e| e.1)) {
        return line.max(0) as u32;
    }
    // SAFETY: `code` is a code object (GIL held).
    let line = unsafe { ffi::PyCode_Addr2Line(code.as_ptr().cast(), lasti) };
    LINES.with(|l| {
        let mut l = l.borrow_mut();
        // Full: later places are looked up every time. (Emptying it
        // here would release code objects, which may run Python code,
        // and this runs inside the dict watcher callback.)
        if l.len() < LINES_MAX {
            l.insert(key, (code.clone().unbind(), line));
        }
    });
    line.max(0) as u32
}

/// Frames of `raw_frames` as (code address, frame, whether in scope),
/// looking all their code objects up at once; those not seen yet are
/// learnt afterwards (deciding their scope may run Python code).
pub(crate) fn frame_refs(
    py: Python<'_>,
    frames: &[(&Bound<'_, PyAny>, u32)],
) -> Vec<(usize, FrameRef, bool)> {
    let keys: Vec<usize> = frames.iter().map(|(c, _)| c.as_ptr() as usize).collect();
    let known = codes::describe(&keys);
    frames
        .iter()
        .zip(known)
        .map(|((code, line), known)| {
            let (file, function, in_scope) = match known {
                Some(x) => x,
                None => codes::code_info(py, code).unwrap_or_else(|_| ("?".into(), "?".into(), false)),
            };
            let line = *line;
            (
                code.as_ptr() as usize,
                FrameRef { file, line, function },
                in_scope,
            )
        })
        .collect()
}

/// The calling thread's Python stack, innermost first, as (code address,
/// frame). Only called with the GIL held.
fn current_frames(py: Python<'_>) -> Vec<(usize, FrameRef)> {
    let raw = raw_frames(py);
    let frames: Vec<(&Bound<'_, PyAny>, u32)> = raw.iter().map(|(c, l)| (c, *l)).collect();
    frame_refs(py, &frames)
        .into_iter()
        .map(|(key, f, _)| (key, f))
        .collect()
}

/// The stack a change found now is attributed to: the last in-scope line
/// this thread executed (`last`), with the frames around it.
pub(crate) fn attributed_stack(py: Python<'_>, last: (usize, u32)) -> Arc<[FrameRef]> {
    attributed_frames(py, last).into()
}

pub(crate) fn attributed_frames(py: Python<'_>, last: (usize, u32)) -> Vec<FrameRef> {
    let frames = current_frames(py);
    let (code, line) = last;
    if code == 0 {
        return frames.into_iter().map(|(_, f)| f).collect();
    }
    match frames.iter().position(|(k, _)| *k == code) {
        Some(i) => {
            let mut out: Vec<FrameRef> = frames[i..].iter().map(|(_, f)| f.clone()).collect();
            out[0].line = line;
            out
        }
        None => {
            // The line's frame has returned: it goes on top of what is left.
            let (file, function) = codes::known_code(code).unwrap_or_else(|| ("?".into(), "?".into()));
            let mut out = vec![FrameRef { file, line, function }];
            out.extend(frames.into_iter().map(|(_, f)| f));
            out
        }
    }
}

/// The innermost in-scope frame of the current stack, as `LAST` wants it
/// (`skip_current`: not counting the running frame, which is returning).
/// Walks out only as far as that frame, building nothing on the way: it
/// runs at every return of in-scope code.
pub(crate) fn innermost_in_scope(py: Python<'_>, skip_current: bool) -> (usize, u32) {
    innermost(py, skip_current, codes::code_in_scope)
}

/// The innermost frame (below the current one, with `skip_current`) whose
/// code `wanted` accepts, and its line; `(0, 0)` when there is none.
pub(crate) fn innermost(py: Python<'_>, skip_current: bool, wanted: impl Fn(usize) -> bool) -> (usize, u32) {
    let mut found = None;
    let mut skip = skip_current;
    crate::runtime::frames::walk(py, &mut |code, lasti| {
        if std::mem::take(&mut skip) {
            return true;
        }
        if wanted(code) {
            found = Some((code, lasti));
            return false;
        }
        true
    });
    match found {
        Some((code, lasti)) => {
            // SAFETY: the code object of a running frame (GIL held).
            let c = unsafe { Bound::<PyAny>::from_borrowed_ptr(py, code as *mut ffi::PyObject) };
            (code, line_at(&c, lasti))
        }
        None => (0, 0),
    }
}

thread_local! {
    /// This thread's `threading.Thread`, the name object it had when last
    /// read, and that name as text.
    static THREAD_NAME: std::cell::RefCell<Option<NameSeen>> = const { std::cell::RefCell::new(None) };
}

/// A thread object, its name object when read and that name as text.
type NameSeen = (Py<PyAny>, Py<PyAny>, Arc<str>);

/// The calling thread's `threading` name. `current_thread()` is called once
/// per thread; after that the thread object's name is read and compared
/// with the one seen last (`Thread.name` is a property around `_name`), so
/// renaming a thread shows at its next change.
pub(crate) fn thread_name(py: Python<'_>) -> Arc<str> {
    guarded(|| {
        // Copied out first: reading `_name` may run Python code (a
        // subclass's property), which must not find the cell borrowed.
        let seen = THREAD_NAME.with(|c| {
            c.borrow()
                .as_ref()
                .map(|(t, n, s)| (t.clone_ref(py), n.clone_ref(py), s.clone()))
        });
        if let Some((thread, name, text)) = seen {
            // `_name` is a plain attribute of `threading.Thread`: it is read
            // from the instance dict, with no Python code run; a subclass
            // that made it something else takes the full read below.
            // SAFETY: GIL held; a new reference to the dict (or NULL, the
            // error cleared), a borrowed one to the item.
            let same = unsafe {
                let dict = ffi::PyObject_GenericGetDict(thread.as_ptr(), std::ptr::null_mut());
                if dict.is_null() {
                    ffi::PyErr_Clear();
                    false
                } else {
                    let now = ffi::PyDict_GetItemWithError(dict, pyo3::intern!(py, "_name").as_ptr());
                    if now.is_null() {
                        ffi::PyErr_Clear();
                    }
                    let same = now == name.as_ptr();
                    ffi::Py_DECREF(dict);
                    same
                }
            };
            if same {
                return text;
            }
            let now = thread.bind(py).getattr(pyo3::intern!(py, "_name"));
            if now.is_ok_and(|now| now.is(name.bind(py))) {
                return text;
            }
        }
        let read = || -> PyResult<Arc<str>> {
            let thread = hooks()?.current_thread.bind(py).call0()?;
            let name = match thread.getattr(pyo3::intern!(py, "_name")) {
                Ok(n) => n,
                Err(_) => thread.getattr("name")?,
            };
            let text: Arc<str> = name.extract::<String>()?.into();
            THREAD_NAME.with(|c| *c.borrow_mut() = Some((thread.unbind(), name.unbind(), text.clone())));
            Ok(text)
        };
        read().unwrap_or_else(|_| "?".into())
    })
}

/// Where each thread was last seen in in-scope code, for stores caught in
/// one thread and reported at a line boundary of another (store mode).
struct Seen {
    last: (usize, u32),
    name: Arc<str>,
}

static THREADS_SEEN: Mutex<Option<std::collections::HashMap<u64, Seen>>> = Mutex::new(None);

fn threads_seen() -> MutexGuard<'static, Option<std::collections::HashMap<u64, Seen>>> {
    THREADS_SEEN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Notes the line this thread runs (only while store-mode regions exist).
pub(crate) fn note_thread_line(py: Python<'_>, last: (usize, u32)) {
    let tid = gettid();
    let known = threads_seen()
        .as_mut()
        .and_then(|m| m.get_mut(&tid))
        .map(|s| s.last = last)
        .is_some();
    if !known {
        let name = thread_name(py);
        threads_seen()
            .get_or_insert_with(Default::default)
            .insert(tid, Seen { last, name });
    }
}

/// The stack and thread name a store caught in thread `tid` is attributed
/// to: where that thread was last seen in in-scope code, or, for a thread
/// never seen there (a native worker), the reporting thread's line.
pub(crate) fn other_thread_context(tid: u64, own: &Arc<[FrameRef]>) -> (Arc<[FrameRef]>, Arc<str>) {
    let seen = threads_seen()
        .as_ref()
        .and_then(|m| m.get(&tid))
        .map(|s| (s.last, s.name.clone()));
    match seen {
        Some(((code, line), name)) if code != 0 => {
            let (file, function) = codes::known_code(code).unwrap_or_else(|| ("?".into(), "?".into()));
            (Arc::new([FrameRef { file, line, function }]), name)
        }
        other => {
            let name = match other {
                Some((_, name)) => name,
                None => std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                    .map(|s| s.trim_end().into())
                    .unwrap_or_else(|_| format!("thread {tid}").into()),
            };
            (own.clone(), name)
        }
    }
}
