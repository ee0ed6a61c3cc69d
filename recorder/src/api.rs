//! The Python-facing recorder: watching, checking at line boundaries,
//! turning raw changes into `memwatch.Change`s, and handing them to
//! callbacks, history, the live report and the trace. `_check_op` is the
//! check that `watch(t, via="dispatch")` runs right after a torch op wrote a
//! watched tensor: the changes it finds carry the op (`Change.op`).
//!
//! Locking: `STATE` guards the regions and everything around them and is
//! never held while Python code runs (callbacks, reports, imports); the
//! trace's [`SINK`] is only taken while holding `STATE` or alone, never
//! the other way round.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use memwatch_format::{Meta, UnwatchReason};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::change::{Change, FrameRef};
use crate::engine::{view_mask, Engine, Layout, RawChange, Region, Tracking};
use crate::errors::{MemwatchError, NotWatchedError};
use crate::kernel::{gettid, is_mapped_writable, page_size};
use crate::monitor::{self, guarded, Boundary, LAST};
use crate::signals::crash::{self, Busy};
use crate::sink::{spawn_flusher, unix_ns, EventContext, TraceSink, SINK};

/// A buffer export held for as long as a region is watched: it pins the
/// exporting object's memory (a `bytearray` cannot resize, an array cannot
/// be freed).
struct Pinned(Box<ffi::Py_buffer>);

// SAFETY: the Py_buffer is only created and released with the GIL held; in
// between it is inert data.
unsafe impl Send for Pinned {}

struct Watch {
    id: u32,
    tag: Arc<str>,
    variable: Option<Arc<str>>,
    layout: Arc<Layout>,
    pinned: Option<Pinned>,
    /// The watched object and whatever else must stay alive (a tensor).
    keepalive: Vec<Py<PyAny>>,
    /// `id()` of the object passed to `watch`, for `unwatch(obj)`.
    obj_id: Option<usize>,
    /// The objects that keep the watched memory reachable: when memwatch
    /// holds all their references, nothing else can reach the memory and
    /// the watch ends (`UnwatchReason::Collected`) at the next boundary.
    owner: Option<Owner>,
}

/// What keeps a watched buffer reachable: the object the user watched and,
/// for a view, the object that owns the memory (a numpy view's base, a
/// memoryview's exporter, a tensor view's base).
#[derive(Clone, Copy)]
pub(crate) struct Owner {
    pub obj: Held,
    pub memory: Option<Held>,
}

/// An object (kept alive by the watch's `keepalive`) and how many of its
/// references the watch holds (`keepalive`, the buffer export and the
/// `.base` of a kept array that views it).
#[derive(Clone, Copy)]
pub(crate) struct Held {
    pub ptr: usize,
    pub held: isize,
}

impl Held {
    #[inline]
    fn unreferenced(self) -> bool {
        // SAFETY: the watch's keepalive holds the object, so the pointer is
        // live; GIL held.
        unsafe { ffi::Py_REFCNT(self.ptr as *mut ffi::PyObject) <= self.held }
    }
}

impl Owner {
    /// True when only memwatch refers to the watched object and to the
    /// owner of its memory. Reads a counter or two; no Python code. The GIL
    /// must be held and the watch still alive.
    #[inline]
    pub fn unreferenced(self) -> bool {
        self.obj.unreferenced() && self.memory.is_none_or(Held::unreferenced)
    }
}

struct State {
    engine: Engine,
    watches: Vec<Watch>,
    next_region: u32,
    live: Live,
    callbacks: Vec<Py<PyAny>>,
    history: VecDeque<Py<Change>>,
    max_history: usize,
    /// Bytes of old and new values held by `history`.
    history_bytes: usize,
    max_history_bytes: usize,
}

/// Whether changes are printed as `[MEMWATCH]` reports (when no callback
/// takes them), and how.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Live {
    /// Printed unless a trace is recording (the trace has them).
    Default,
    /// Printed, also while recording (`configure(live=True)`,
    /// `MEMWATCH_LIVE=1`, `memwatch record --live`).
    On,
    /// Printed as one line each ([`Change::short_report`]), also while
    /// recording (`configure(live="short")`, `MEMWATCH_LIVE=short`,
    /// `memwatch record --live=short`).
    Short,
    /// Never printed.
    Off,
}

impl Live {
    fn from_env() -> Live {
        match std::env::var("MEMWATCH_LIVE") {
            Err(_) => Live::Default,
            Ok(v) if v == "0" => Live::Off,
            Ok(v) if v == "short" => Live::Short,
            Ok(_) => Live::On,
        }
    }

    /// The text printed for `change`, if any.
    fn report(self, tracing: bool, change: &Change) -> Option<String> {
        match self {
            Live::Default if !tracing => Some(change.report()),
            Live::On => Some(change.report()),
            Live::Short => Some(change.short_report()),
            Live::Default | Live::Off => None,
        }
    }
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// The recorder's state, locked. Whoever holds it may change regions or
/// shadows, so it is held with a [`Busy`] token (the fatal-signal handler
/// compares them only while no token is held), and releasing it shows the
/// handler the regions as they are now.
struct StateGuard {
    guard: std::mem::ManuallyDrop<MutexGuard<'static, Option<State>>>,
    _busy: Busy,
}

impl std::ops::Deref for StateGuard {
    type Target = Option<State>;
    fn deref(&self) -> &Option<State> {
        &self.guard
    }
}

impl std::ops::DerefMut for StateGuard {
    fn deref_mut(&mut self) -> &mut Option<State> {
        &mut self.guard
    }
}

impl Drop for StateGuard {
    fn drop(&mut self) {
        if crash::armed() {
            let regions = self.guard.iter().flat_map(|st| st.engine.regions.iter());
            crash::publish(
                regions
                    .filter(|r| r.shadow.len() as u64 == r.len)
                    .map(|r| crash::Published {
                        id: r.id,
                        start: r.start,
                        len: r.len,
                        shadow: r.shadow.as_ptr(),
                        itemsize: r.layout.itemsize,
                        origin: r.layout.origin,
                        mask: r.mask.as_ref().map_or(std::ptr::null(), |m| m.as_ptr()),
                    }),
            );
        }
        // SAFETY: dropped once, here; the token goes after the lock.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.guard) };
    }
}

fn state() -> StateGuard {
    let busy = Busy::new();
    let g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    // Whoever holds the lock may change regions or shadows: the line fast
    // path's copy of them is stale from here on.
    crate::fastline::invalidate();
    StateGuard {
        guard: std::mem::ManuallyDrop::new(g),
        _busy: busy,
    }
}

fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    let mut g = state();
    f(init_state(&mut g))
}

/// [`with_state`] for what only numbers, records and delivers changes
/// (`seq`, the trace, callbacks, history, `live`): `f` must not touch the
/// engine, the watches or their shadows, so the line fast path's copy of
/// them stays good. Object changes are delivered this way, at every write.
fn with_delivery_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    f(init_state(&mut g))
}

fn init_state(g: &mut Option<State>) -> &mut State {
    g.get_or_insert_with(|| State {
        engine: Engine::default(),
        watches: Vec::new(),
        next_region: 1,
        live: Live::from_env(),
        callbacks: Vec::new(),
        history: VecDeque::new(),
        max_history: 100_000,
        history_bytes: 0,
        max_history_bytes: 64 << 20,
    })
}

fn sink() -> MutexGuard<'static, Option<TraceSink>> {
    SINK.lock().unwrap_or_else(|p| p.into_inner())
}

// --- frames and attribution ---------------------------------------------------

/// The calling thread's Python stack, innermost first, as (code object,
/// line). Runs no Python code, so it is safe inside interpreter callbacks.
pub(crate) fn raw_frames(py: Python<'_>) -> Vec<(Bound<'_, PyAny>, u32)> {
    let mut walked: Vec<(usize, i32)> = Vec::new();
    crate::pyframes::walk(py, &mut |code, lasti| {
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
type LineCache = monitor::AddrMap<(usize, i32), (Py<PyAny>, i32)>;

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
    let known = monitor::describe(&keys);
    frames
        .iter()
        .zip(known)
        .map(|((code, line), known)| {
            let (file, function, in_scope) = match known {
                Some(x) => x,
                None => monitor::code_info(py, code).unwrap_or_else(|_| ("?".into(), "?".into(), false)),
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

fn attributed_frames(py: Python<'_>, last: (usize, u32)) -> Vec<FrameRef> {
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
            let (file, function) = monitor::known_code(code).unwrap_or_else(|| ("?".into(), "?".into()));
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
    innermost(py, skip_current, monitor::code_in_scope)
}

/// The innermost in-scope frame under the current one whose code may bind
/// a watched variable (known to, or not yet known not to), and its line.
fn innermost_binding_caller(py: Python<'_>) -> (usize, u32) {
    innermost(py, true, |code| {
        monitor::code_in_scope(code) && crate::vars::binds_watched(code) != Some(false)
    })
}

/// The innermost frame (below the current one, with `skip_current`) whose
/// code `wanted` accepts, and its line; `(0, 0)` when there is none.
fn innermost(py: Python<'_>, skip_current: bool, wanted: impl Fn(usize) -> bool) -> (usize, u32) {
    let mut found = None;
    let mut skip = skip_current;
    crate::pyframes::walk(py, &mut |code, lasti| {
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

// --- checking -----------------------------------------------------------------

/// True while a buffer is watched.
pub(crate) fn any_regions() -> bool {
    state().as_ref().is_some_and(|st| !st.watches.is_empty())
}

/// Called at every line boundary of in-scope code (and at returns; `code` is
/// the code of the frame the new line is in, or of the one returning): finds
/// what changed since the last check and reports it, attributed to the line
/// this thread ran before.
pub fn at_boundary(py: Python<'_>, code: usize, line: u32, kind: Boundary) {
    let last = LAST.with(|l| l.get());
    crate::objects::flush(py, last);
    check_and_emit(py, last);
    crate::vars::at_boundary(py, code, kind == Boundary::Return, last);
    match kind {
        Boundary::Line => monitor::set_last((code, line)),
        Boundary::Return => {
            let caller = if crate::vars::only_variables_watched() {
                // Only variables watched: the caller whose line a rebinding
                // can belong to (code that binds none has its events off).
                innermost_binding_caller(py)
            } else {
                innermost_in_scope(py, true)
            };
            monitor::set_last(caller);
        }
    }
    if crate::store::active() {
        note_thread_line(py, LAST.with(|l| l.get()));
    }
}

/// Reports what changed in watched memory since the last check, then ends
/// the watches of objects nothing but memwatch refers to any more.
fn check_and_emit(py: Python<'_>, last: (usize, u32)) {
    let collected = check_regions(py, last);
    for id in collected {
        // Already gone if a callback unwatched it meanwhile: nothing to do.
        let _ = unwatch_region(py, id, UnwatchReason::Collected);
    }
}

/// Reports what changed in watched memory since the last check; returns
/// the regions whose objects only memwatch refers to (see [`Owner`]).
fn check_regions(py: Python<'_>, last: (usize, u32)) -> Vec<u32> {
    // From the check until its changes are in the journal, the shadows say
    // more than the trace: the fatal-signal handler must wait.
    let busy = Busy::new();
    let (raw, collected) = {
        let mut g = state();
        let Some(st) = g.as_mut() else {
            crate::fastline::refresh(py, None, std::iter::empty(), crate::fastline::generation());
            return Vec::new();
        };
        if st.watches.is_empty() {
            crate::fastline::refresh(
                py,
                Some(&st.engine),
                std::iter::empty(),
                crate::fastline::generation(),
            );
            return Vec::new();
        }
        let mut raw = Vec::new();
        if let Err(e) = st.engine.check(&mut raw) {
            drop(g);
            PyErr::new::<MemwatchError, _>(format!("memwatch: checking watched memory failed: {e}"))
                .write_unraisable(py, None);
            return Vec::new();
        }
        let collected: Vec<u32> = st
            .watches
            .iter()
            .filter(|w| w.owner.is_some_and(Owner::unreferenced))
            .map(|w| w.id)
            .collect();
        let owners = st.watches.iter().filter_map(|w| w.owner);
        crate::fastline::refresh(py, Some(&st.engine), owners, crate::fastline::generation());
        (raw, collected)
    };
    if !raw.is_empty() {
        emit(py, raw, last, busy);
    }
    collected
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
            let thread = monitor::hooks()?.current_thread.bind(py).call0()?;
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

fn change_bytes(c: &Change) -> usize {
    let reprs = c.object.as_ref().map_or(0, |o| {
        [&o.key, &o.old, &o.new]
            .iter()
            .map(|v| v.as_ref().map_or(0, |v| v.len()))
            .sum()
    });
    reprs + c.ranges.iter().map(|r| r.1.len() + r.2.len()).sum::<usize>()
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
fn note_thread_line(py: Python<'_>, last: (usize, u32)) {
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
fn other_thread_context(tid: u64, own: &Arc<[FrameRef]>) -> (Arc<[FrameRef]>, Arc<str>) {
    let seen = threads_seen()
        .as_ref()
        .and_then(|m| m.get(&tid))
        .map(|s| (s.last, s.name.clone()));
    match seen {
        Some(((code, line), name)) if code != 0 => {
            let (file, function) = monitor::known_code(code).unwrap_or_else(|| ("?".into(), "?".into()));
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

/// Numbers and records the changes of one check, then delivers them
/// (history, callbacks, live reports). `busy` is given back in between:
/// callbacks run Python code, which the fatal-signal handler must not wait
/// for.
fn emit(py: Python<'_>, raw: Vec<RawChange>, last: (usize, u32), busy: Busy) {
    let stack = match OP.with(|o| o.borrow().as_ref().map(|o| o.skip)) {
        // No in-scope line led here: the whole stack, less memwatch's frames.
        Some(skip) if last.0 == 0 => {
            let mut frames = attributed_frames(py, last);
            frames.drain(..skip.min(frames.len()));
            frames.into()
        }
        _ => attributed_stack(py, last),
    };
    let op = OP.with(|o| o.borrow().as_ref().map(|o| (o.regions.clone(), o.op.clone())));
    let tid = gettid();
    let tname = thread_name(py);
    let now = unix_ns();
    // Per change: does a later one of this check change the same region?
    // (Store mode reports each caught store of a region as its own change,
    // all from one check: the shadow is the state after the last of them.)
    let later: Vec<bool> = (0..raw.len())
        .map(|i| raw[i + 1..].iter().any(|r| r.region == raw[i].region))
        .collect();
    let mut made_all = Vec::with_capacity(raw.len());
    for (rc, later) in raw.into_iter().zip(later) {
        let (stack, tname, tid, now) = match rc.writer {
            Some(w) if w.tid != tid => {
                let (s, n) = other_thread_context(w.tid, &stack);
                (s, n, w.tid, w.time_ns)
            }
            Some(w) => (stack.clone(), tname.clone(), tid, w.time_ns),
            None => (stack.clone(), tname.clone(), tid, now),
        };
        let ev = EventContext {
            thread: tid,
            thread_name: &tname,
            stack: &stack,
        };
        let op = op
            .as_ref()
            .filter(|(regions, _)| regions.contains(&rc.region))
            .map(|(_, op)| op.clone());
        let made = with_state(|st| {
            let w = st.watches.iter().find(|w| w.id == rc.region)?;
            let seq = crash::next_seq();
            let region = st.engine.regions.iter().find(|r| r.id == rc.region)?;
            let mut sk = sink();
            let tracing = sk.is_some();
            if let Some(s) = sk.as_mut() {
                // The shadow is this change's state only after the region's
                // last change of the check.
                let after = (!later).then_some(&region.shadow[..]);
                s.change(seq, region, &rc.ranges, after, &ev, op.as_deref());
            }
            let change = Change {
                seq,
                time_ns: now,
                pid: crate::change::live_pid(),
                rank: crate::change::live_rank(),
                tag: w.tag.clone(),
                variable: w.variable.clone(),
                region_start: region.start,
                ranges: rc.ranges,
                layout: w.layout.clone(),
                stack: stack.clone(),
                thread_id: tid,
                thread_name: tname.clone(),
                object: None,
                op,
            };
            let callbacks: Vec<Py<PyAny>> = st.callbacks.iter().map(|c| c.clone_ref(py)).collect();
            Some((change, callbacks, tracing, st.live, st.max_history))
        });
        made_all.extend(made);
    }
    drop(busy);
    for (change, callbacks, tracing, live, max_history) in made_all {
        deliver(py, change, callbacks, tracing, live, max_history);
    }
}

/// Hands one object change (`change.object` set) to the trace, history,
/// callbacks and the live report, numbering it in the process's sequence.
pub(crate) fn emit_object(py: Python<'_>, mut change: Change) {
    let (callbacks, tracing, live, max_history) = with_delivery_state(|st| {
        change.seq = crash::next_seq();
        let mut sk = sink();
        if let (Some(s), Some(info)) = (sk.as_mut(), change.object.as_ref()) {
            let ev = EventContext {
                thread: change.thread_id,
                thread_name: &change.thread_name,
                stack: &change.stack,
            };
            s.object_change(change.seq, &change.tag, change.variable.as_deref(), info, &ev);
        }
        let callbacks: Vec<Py<PyAny>> = st.callbacks.iter().map(|c| c.clone_ref(py)).collect();
        (callbacks, sk.is_some(), st.live, st.max_history)
    });
    deliver(py, change, callbacks, tracing, live, max_history);
}

/// The common end of every change: history, callbacks, the live report.
fn deliver(
    py: Python<'_>,
    change: Change,
    callbacks: Vec<Py<PyAny>>,
    tracing: bool,
    live: Live,
    max_history: usize,
) {
    // A guarded watch reports through its action (`guard`), not live.
    let has_guard = crate::guard::guarded(&change.tag);
    let report = if !has_guard && callbacks.is_empty() {
        live.report(tracing, &change)
    } else {
        None
    };
    if report.is_none() && callbacks.is_empty() && max_history == 0 && !has_guard {
        // Nobody sees the change as an object: the trace (if any) has it.
        return;
    }
    let obj = match Py::new(py, change) {
        Ok(o) => o,
        Err(e) => {
            e.write_unraisable(py, None);
            return;
        }
    };
    with_delivery_state(|st| {
        let size = change_bytes(obj.get());
        if max_history > 0 && size <= st.max_history_bytes {
            st.history.push_back(obj.clone_ref(py));
            st.history_bytes += size;
            while st.history.len() > max_history || st.history_bytes > st.max_history_bytes {
                match st.history.pop_front() {
                    Some(old) => st.history_bytes -= change_bytes(old.get()),
                    None => break,
                }
            }
        }
    });
    guarded(|| {
        for cb in &callbacks {
            if let Err(e) = cb.call1(py, (obj.clone_ref(py),)) {
                e.write_unraisable(py, Some(cb.bind(py)));
            }
        }
        if let Some(text) = report {
            let written = monitor::hooks()
                .and_then(|h| h.sys.bind(py).getattr("stderr"))
                .and_then(|e| e.call_method1("write", (text,)).map(|_| ()));
            if let Err(e) = written {
                e.write_unraisable(py, None);
            }
        }
        if has_guard {
            crate::guard::on_change(py, obj.as_any());
        }
    });
}

// --- watching -----------------------------------------------------------------

fn array_protocol_dtype(format: &str, itemsize: usize) -> Option<String> {
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
fn dtype_itemsize(dtype: &str) -> Option<u32> {
    memwatch_format::dtype::Dtype::parse(dtype).map(|d| d.itemsize)
}

struct Span {
    start: u64,
    len: u64,
    layout: Layout,
}

/// Exports `obj`'s buffer writable, or explains why it cannot.
fn export(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Pinned> {
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

fn span_of(view: &ffi::Py_buffer, bytes_like: bool) -> PyResult<Span> {
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

/// Counters of store mode since the process started: faults stepped over,
/// faults let through (kernel writes), stores recorded, pages left open for
/// the next check, and `SIGTRAP`s handed on to the program's handler.
#[pyfunction]
pub fn _store_stats() -> std::collections::HashMap<&'static str, u64> {
    use std::sync::atomic::Ordering::Relaxed;
    let (open, pending, overflow) = crate::signals::slot_states();
    [
        ("slots_open", open),
        ("slots_pending", pending),
        ("slots_overflow", overflow),
        ("pages_let_through", crate::store::OPEN_COUNT.load(Relaxed) as u64),
        ("stale_events", crate::engine::STALE_EVENTS.load(Relaxed)),
        ("stepped", crate::store::STEPPED.load(Relaxed)),
        ("let_through", crate::store::LET_THROUGH.load(Relaxed)),
        ("events", crate::signals::EVENTS.load(Relaxed)),
        ("overflows", crate::signals::OVERFLOWS.load(Relaxed)),
        ("foreign_traps", crate::signals::FOREIGN_TRAPS.load(Relaxed)),
    ]
    .into_iter()
    .collect()
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
    let store = match mode {
        "line" => false,
        "store" => true,
        _ => {
            return Err(PyValueError::new_err(format!(
                "mode must be 'line' or 'store', not {mode:?}"
            )))
        }
    };
    if tag.is_empty() {
        return Err(PyValueError::new_err("name must not be empty"));
    }
    // Report what changed before this watch began (other regions), so the
    // new region's baseline is this moment; a watch whose object is gone
    // ends there, freeing its name.
    check_and_emit(py, LAST.with(|l| l.get()));
    // A name is watched once at a time. Watching the same object under its
    // name again (a task that runs twice in one worker process) is that
    // watch; another object under a name in use is refused, saying how to
    // fix it.
    let new_oid = owner.or(obj).map(|o| o.as_ptr() as usize);
    let taken = with_state(|st| {
        let w = st.watches.iter().find(|w| &*w.tag == tag.as_str())?;
        let r = st.engine.regions.iter().find(|r| r.id == w.id)?;
        let same = match (new_oid, address) {
            (Some(oid), _) => w.obj_id == Some(oid),
            (None, Some(a)) => r.start == a && size.is_some_and(|n| n >= 0 && n as u64 == r.len),
            (None, None) => false,
        };
        let store = r.tracking == Tracking::Store;
        let handle = WatchHandle {
            region: r.id,
            tag: tag.clone(),
            variable: w.variable.as_deref().map(str::to_string),
            address: r.start,
            size: r.len,
            dtype: r.layout.dtype.clone(),
            tracking: r.tracking.name(),
            tracking_note: r.tracking_note.clone(),
        };
        Some((same, store, handle))
    });
    if let Some((same, was_store, handle)) = taken {
        if same && was_store == store {
            return Ok(handle);
        }
        let what = match &handle.dtype {
            Some(d) => format!("{} bytes of {d} at {:#x}", handle.size, handle.address),
            None => format!("{} bytes at {:#x}", handle.size, handle.address),
        };
        return Err(PyValueError::new_err(if same {
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
        }));
    }
    let (span, mut pinned) = match (obj, address) {
        (Some(obj), _) => {
            let pinned = export(py, obj)?;
            // `dtype` names what the exported elements really are when the
            // buffer's format cannot (a torch bfloat16 tensor exports int16).
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
                Ok(s) => (s, Some(pinned)),
                Err(e) => {
                    let mut p = pinned;
                    // SAFETY: releasing the export we just made, GIL held.
                    unsafe { ffi::PyBuffer_Release(&mut *p.0) };
                    return Err(e);
                }
            }
        }
        (None, Some(address)) => {
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
            (
                Span {
                    start: address,
                    len: size,
                    layout,
                },
                None,
            )
        }
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
    let tag_arc: Arc<str> = tag.as_str().into();
    let variable_arc: Option<Arc<str>> = variable.as_deref().map(Into::into);
    let mask = view_mask(&span.layout, span.len);
    let layout = Arc::new(span.layout.clone());
    let stack = attributed_stack(py, innermost_in_scope(py, false));
    let tname = thread_name(py);
    let handle = with_state(|st| {
        let id = st.next_region;
        let region = Region {
            id,
            tag: tag_arc.clone(),
            variable: variable_arc.clone(),
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
        let seq = crash::next_seq();
        if let Some(s) = sink().as_mut() {
            let ev = EventContext::here(&tname, &stack);
            s.region_watched(seq, region, &ev);
        }
        let handle = WatchHandle {
            region: id,
            tag: tag.clone(),
            variable: variable.clone(),
            address: region.start,
            size: region.len,
            dtype: region.layout.dtype.clone(),
            tracking: region.tracking.name(),
            tracking_note: region.tracking_note.clone(),
        };
        st.watches.push(Watch {
            id,
            tag: tag_arc,
            variable: variable_arc,
            layout,
            pinned: pinned.take(),
            keepalive: std::mem::take(&mut keep),
            obj_id,
            owner,
        });
        Ok(handle)
    });
    let handle = match handle {
        Ok(h) => h,
        Err(e) => {
            if let Some(mut p) = pinned.take() {
                // SAFETY: releasing the export made above, GIL held.
                unsafe { ffi::PyBuffer_Release(&mut *p.0) };
            }
            return Err(e);
        }
    };
    if let Err(e) = monitor::start(py).and_then(|()| monitor::restart_disabled(py)) {
        let _ = unwatch_region(py, handle.region, UnwatchReason::Explicit);
        return Err(e);
    }
    monitor::set_last(innermost_in_scope(py, false));
    Ok(handle)
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

fn unwatch_region(py: Python<'_>, region: u32, reason: UnwatchReason) -> PyResult<()> {
    let last = LAST.with(|l| l.get());
    let _ = check_regions(py, last);
    let stack = attributed_stack(py, innermost_in_scope(py, false));
    let tname = thread_name(py);
    let (watch, now_empty) = with_state(|st| {
        let i = st.watches.iter().position(|w| w.id == region)?;
        let w = st.watches.remove(i);
        st.engine.remove(region);
        let seq = crash::next_seq();
        if let Some(s) = sink().as_mut() {
            let ev = EventContext::here(&tname, &stack);
            s.region_unwatched(seq, region, reason, &ev);
        }
        Some((w, st.watches.is_empty()))
    })
    .ok_or_else(|| NotWatchedError::new_err(format!("region {region} is not watched")))?;
    if let Some(mut p) = watch.pinned {
        // SAFETY: releasing the export made in `_watch`, GIL held.
        unsafe { ffi::PyBuffer_Release(&mut *p.0) };
    }
    drop(watch.keepalive);
    if now_empty && !crate::objects::any() && !crate::vars::any() {
        monitor::stop(py)?;
    }
    Ok(())
}

/// Stops watching region `region` (after reporting its last changes).
#[pyfunction]
pub fn _unwatch(py: Python<'_>, region: u32) -> PyResult<()> {
    unwatch_region(py, region, UnwatchReason::Explicit)
}

/// `(region, tag, address, size, obj_id)` for every watched region.
#[pyfunction]
pub fn _regions() -> Vec<(u32, String, u64, u64, Option<usize>)> {
    with_state(|st| {
        st.watches
            .iter()
            .map(|w| {
                let r = st.engine.regions.iter().find(|r| r.id == w.id);
                (
                    w.id,
                    w.tag.to_string(),
                    r.map(|r| r.start + r.layout.origin).unwrap_or(0),
                    r.map(|r| r.len).unwrap_or(0),
                    w.obj_id,
                )
            })
            .collect()
    })
}

/// Looks for changes now (attributed to the last in-scope line of this
/// thread) instead of waiting for the next line boundary.
#[pyfunction]
pub fn check(py: Python<'_>) -> PyResult<()> {
    let last = LAST.with(|l| l.get());
    crate::objects::flush(py, last);
    check_and_emit(py, last);
    crate::guard::fire(py)
}

/// What the check `_check_op` runs says about the changes it finds.
struct OpCheck {
    /// The regions the op wrote: their changes carry `op`.
    regions: Vec<u32>,
    op: Arc<str>,
    /// Innermost frames that are memwatch's own (the dispatch mode's), left
    /// out of the stack of a change made where no in-scope line led to it.
    skip: usize,
}

thread_local! {
    /// Set while this thread runs `_check_op`.
    static OP: std::cell::RefCell<Option<OpCheck>> = const { std::cell::RefCell::new(None) };
}

/// Looks for changes now, as `check` does, right after torch op `op` wrote
/// the memory of the watched `regions` (`memwatch._torch_dispatch`): their
/// changes carry the op (`Change.op`, and an `op` note in the trace). On a
/// thread that ran no in-scope line (an autograd worker thread), the
/// change's stack leaves out the caller's `skip` innermost frames. Returns
/// those of `regions` that are not watched any more.
#[pyfunction]
#[pyo3(signature = (regions, op, skip=0))]
pub fn _check_op(py: Python<'_>, regions: Vec<u32>, op: String, skip: usize) -> PyResult<Vec<u32>> {
    let mut last = LAST.with(|l| l.get());
    if last.0 == 0 {
        last = innermost_in_scope(py, false);
    }
    let check = OpCheck {
        regions,
        op: op.into(),
        skip,
    };
    let outer = OP.with(|o| o.borrow_mut().replace(check));
    crate::objects::flush(py, last);
    check_and_emit(py, last);
    let check = OP.with(|o| std::mem::replace(&mut *o.borrow_mut(), outer));
    let regions = check.map(|c| c.regions).unwrap_or_default();
    let gone = with_state(|st| {
        regions
            .into_iter()
            .filter(|r| !st.watches.iter().any(|w| w.id == *r))
            .collect()
    });
    crate::guard::fire(py)?;
    Ok(gone)
}

/// Registers `callback(change)`, called for every change.
#[pyfunction]
pub fn on_change(callback: Bound<'_, PyAny>) -> PyResult<Bound<'_, PyAny>> {
    if !callback.is_callable() {
        return Err(PyTypeError::new_err("on_change() needs a callable"));
    }
    with_state(|st| st.callbacks.push(callback.clone().unbind()));
    Ok(callback)
}

/// Unregisters a callback given to `on_change`.
#[pyfunction]
pub fn remove_callback(py: Python<'_>, callback: &Bound<'_, PyAny>) -> PyResult<()> {
    let found = with_state(|st| {
        let i = st.callbacks.iter().position(|c| c.bind(py).is(callback))?;
        st.callbacks.remove(i);
        Some(())
    });
    found.ok_or_else(|| PyValueError::new_err("that callback is not registered"))
}

/// The changes seen so far (all, or those of tag `name`), oldest first.
#[pyfunction]
#[pyo3(signature = (name=None))]
pub fn history<'py>(py: Python<'py>, name: Option<&str>) -> PyResult<Bound<'py, PyAny>> {
    let items: Vec<Py<Change>> = with_state(|st| {
        st.history
            .iter()
            .filter(|c| name.is_none_or(|n| &*c.get().tag == n))
            .map(|c| c.clone_ref(py))
            .collect()
    });
    crate::change::change_list(py, items)
}

/// Forgets the history.
#[pyfunction]
pub fn clear_history() {
    with_state(|st| {
        st.history.clear();
        st.history_bytes = 0;
    });
}

/// Sets recorder options (`None` leaves one as it is); returns them all.
#[pyfunction]
#[pyo3(signature = (live=None, max_history=None, max_history_bytes=None))]
pub fn _configure<'py>(
    py: Python<'py>,
    live: Option<&Bound<'py, PyAny>>,
    max_history: Option<usize>,
    max_history_bytes: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    // `live`: a bool, or "short" (checked here, before anything changes).
    let live = match live {
        None => None,
        Some(v) if v.is_instance_of::<pyo3::types::PyBool>() => {
            Some(if v.extract::<bool>()? { Live::On } else { Live::Off })
        }
        Some(v) if v.extract::<String>().is_ok_and(|s| s == "short") => Some(Live::Short),
        Some(v) => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "live={} is not an option: pass True (a [MEMWATCH] report per change), \
                 \"short\" (one line per change) or False (none)",
                v.repr()?
            )))
        }
    };
    let (live, max_history, max_history_bytes) = with_state(|st| {
        if let Some(l) = live {
            st.live = l;
        }
        if let Some(m) = max_history {
            st.max_history = m;
        }
        if let Some(m) = max_history_bytes {
            st.max_history_bytes = m;
        }
        while st.history.len() > st.max_history || st.history_bytes > st.max_history_bytes {
            match st.history.pop_front() {
                Some(old) => st.history_bytes -= change_bytes(old.get()),
                None => break,
            }
        }
        (st.live, st.max_history, st.max_history_bytes)
    });
    let d = PyDict::new(py);
    match live {
        Live::Short => d.set_item("live", "short")?,
        other => d.set_item("live", other != Live::Off)?,
    }
    d.set_item("max_history", max_history)?;
    d.set_item("max_history_bytes", max_history_bytes)?;
    Ok(d)
}

/// Re-evaluates scope decisions after include/exclude changed.
#[pyfunction]
pub fn _rescope(py: Python<'_>) -> PyResult<()> {
    monitor::rescope(py)
}

/// The kernel mechanism large regions use, or `"compare"` where it is
/// unavailable.
#[pyfunction]
pub fn backend() -> String {
    with_state(|st| match st.engine.backend() {
        Ok(b) => b.to_string(),
        Err(_) => "compare".to_string(),
    })
}

/// Why the kernel mechanism is unavailable, or `None`.
#[pyfunction]
pub fn _backend_problem() -> Option<String> {
    with_state(|st| st.engine.backend().err())
}

/// Starts recording to `path`; regions already watched are written with
/// their current contents.
///
/// `properties` go to the header beside `backend` and `mode`: a process
/// of a run (`memwatch record`, a fork child) names the run there (`run`,
/// `root`, `parent`, `rank`; see docs/format.md, "Runs of several
/// processes").
#[pyfunction]
#[pyo3(signature = (path, argv, python_version, properties=Vec::new()))]
pub fn _start(
    py: Python<'_>,
    path: std::path::PathBuf,
    argv: Vec<String>,
    python_version: String,
    properties: Vec<(String, String)>,
) -> PyResult<()> {
    if let Some(s) = sink().as_ref() {
        return Err(MemwatchError::new_err(format!(
            "already recording to {}; call memwatch.stop() first",
            s.path().display()
        )));
    }
    let meta = Meta {
        pid: std::process::id(),
        argv,
        python_version,
        platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        page_size: page_size() as u32,
        start_time_ns: unix_ns(),
        writer: format!("memwatch {}", env!("CARGO_PKG_VERSION")),
        properties: vec![
            ("backend".into(), backend()),
            (
                "mode".into(),
                std::env::var("MEMWATCH_MODE").unwrap_or_else(|_| "line".into()),
            ),
        ]
        .into_iter()
        .chain(properties)
        .collect(),
    };
    let new = py
        .detach(|| TraceSink::create(&path, meta))
        .map_err(crate::errors::trace_error)?;
    if let Some(why) = new.journal_error() {
        py.import("warnings")?.getattr("warn")?.call1((
            format!(
                "memwatch: recording without a journal ({why}): if the program dies, \
                 its last changes (up to half a second) are lost"
            ),
            py.get_type::<pyo3::exceptions::PyRuntimeWarning>(),
        ))?;
    }
    let last = LAST.with(|l| l.get());
    check_and_emit(py, last);
    let stack = attributed_stack(py, innermost_in_scope(py, false));
    let tname = thread_name(py);
    with_state(|st| {
        let mut sk = sink();
        *sk = Some(new);
        let s = sk.as_mut().expect("just set");
        for w in &st.watches {
            if let Some(r) = st.engine.regions.iter().find(|r| r.id == w.id) {
                let ev = EventContext::here(&tname, &stack);
                s.region_watched(crash::next_seq(), r, &ev);
            }
        }
    });
    spawn_flusher();
    Ok(())
}

/// Stops recording: reports pending changes, writes the trailer. Returns
/// `(path, changes, file_bytes)`, or `None` when nothing was recording.
#[pyfunction]
pub fn _stop(py: Python<'_>) -> PyResult<Option<(std::path::PathBuf, u64, u64)>> {
    let last = LAST.with(|l| l.get());
    crate::objects::flush(py, last);
    check_and_emit(py, last);
    let taken = {
        let _st = state();
        sink().take()
    };
    let Some(s) = taken else { return Ok(None) };
    let path = s.path().to_path_buf();
    let changes = s.changes;
    match py.detach(|| s.finish()) {
        Ok(bytes) => Ok(Some((path, changes, bytes))),
        Err(msg) => Err(MemwatchError::new_err(format!("{}: {msg}", path.display()))),
    }
}

/// Path of the active trace, or `None`.
#[pyfunction]
pub fn _recording() -> Option<std::path::PathBuf> {
    sink().as_ref().map(|s| s.path().to_path_buf())
}

/// At interpreter exit: last check, close the trace, release every buffer.
#[pyfunction]
pub fn _shutdown(py: Python<'_>) -> PyResult<()> {
    let ids: Vec<u32> = with_state(|st| st.watches.iter().map(|w| w.id).collect());
    let last = LAST.with(|l| l.get());
    crate::objects::shutdown(py, last);
    let _ = check_regions(py, last);
    for id in ids {
        unwatch_region(py, id, UnwatchReason::Shutdown)?;
    }
    // A recording that stopped early said so when it stopped: nothing more
    // is printed at exit.
    let warned = sink().as_ref().is_some_and(|s| s.failed.is_some());
    match _stop(py) {
        Err(_) if warned => Ok(()),
        r => r.map(|_| ()),
    }
}

/// Makes `lock` usable in a fork child. A thread that held it in the
/// parent does not exist here and never lets go: the lock is replaced by a
/// fresh one and what it guarded is forgotten (leaked, never dropped: it
/// may be half-changed). Returns false when that happened.
///
/// Only for the fork child's single thread, before anything else locks it.
fn reset_in_child<T>(lock: &'static Mutex<Option<T>>) -> bool {
    match lock.try_lock() {
        Ok(_) | Err(std::sync::TryLockError::Poisoned(_)) => true,
        Err(std::sync::TryLockError::WouldBlock) => {
            // SAFETY: the child has one thread, this one, and it holds no
            // guard of `lock`; the old lock and its contents are forgotten
            // without being dropped. Every field of a `Mutex` is interior-
            // mutable, so writing it through the static's address is what
            // any lock operation does.
            unsafe {
                std::ptr::write(
                    std::ptr::addr_of!(*lock) as *mut Mutex<Option<T>>,
                    Mutex::new(None),
                )
            };
            false
        }
    }
}

/// In a fork child: the recorder starts clean, keeping its watches. The
/// parent's trace, journal and crash area stay the parent's (nothing of
/// them is written from here), the seq starts again at 1, the history is
/// empty, and every region watched before the fork is watched again here:
/// its contents as they are now, tracked with this process's own kernel
/// registrations (userfaultfd and store-mode registrations do not survive
/// a fork). Callbacks and options stay.
///
/// Returns `(recording, problems)`: whether the parent was recording (the
/// caller then starts this process's own trace) and one line per watch
/// that could not be kept.
#[pyfunction]
pub fn _after_fork_child(py: Python<'_>) -> (bool, Vec<String>) {
    crash::after_fork();
    crate::change::forget_pid();
    let mut problems = Vec::new();
    let sink_ok = reset_in_child(&SINK);
    let state_ok = reset_in_child(&STATE);
    let recording = match sink().take() {
        Some(s) => {
            // The parent owns the file: writing pending records from here
            // would interleave with it. Nor is its crash area ours to write.
            crash::disarm();
            std::mem::forget(s);
            true
        }
        None => {
            crash::disarm();
            !sink_ok
        }
    };
    crash::reset_seq();
    if !state_ok {
        problems.push(
            "the fork came while another thread of the parent was inside memwatch: \
             this process does not keep the parent's watches"
                .to_string(),
        );
    }
    let old = {
        let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
        g.take()
    };
    let mut kept = false;
    if let Some(st) = old {
        let State {
            engine,
            watches,
            next_region,
            live,
            callbacks,
            history,
            max_history,
            max_history_bytes,
            ..
        } = st;
        // The history's changes are the parent's.
        drop(history);
        let mut engine = engine;
        let regions = std::mem::take(&mut engine.regions);
        // The child's userfaultfd registrations are gone with the fork; the
        // engine's descriptors are simply dropped (the store tracker's
        // threads live in the parent only: it is forgotten, not joined).
        engine.forget_after_fork();
        drop(engine);
        let mut fresh = Engine::default();
        let mut gone = Vec::new();
        for r in regions {
            let store = r.tracking == Tracking::Store;
            let region = Region {
                shadow: Arc::new(Vec::new()),
                spare: None,
                tracking: Tracking::Compare,
                tracking_note: None,
                ..r
            };
            if store {
                let (id, tag) = (region.id, region.tag.clone());
                if let Err(why) = fresh.add_store(region) {
                    problems.push(format!("'{tag}' is not watched in this process: {why}"));
                    gone.push(id);
                }
            } else {
                fresh.add(region);
            }
        }
        let mut kept_watches = Vec::new();
        for w in watches {
            if gone.contains(&w.id) {
                if let Some(mut p) = w.pinned {
                    // SAFETY: GIL held in the child's only thread; the
                    // export was copied with the parent's memory.
                    unsafe { ffi::PyBuffer_Release(&mut *p.0) };
                }
            } else {
                kept_watches.push(w);
            }
        }
        kept = !kept_watches.is_empty();
        let mut g = state();
        *g = Some(State {
            engine: fresh,
            watches: kept_watches,
            next_region,
            live,
            callbacks,
            history: VecDeque::new(),
            max_history,
            history_bytes: 0,
            max_history_bytes,
        });
    }
    if !kept && !crate::objects::any() && !crate::vars::any() {
        let _ = monitor::stop(py);
    }
    (recording, problems)
}
