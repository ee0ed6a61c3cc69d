//! The watched buffers' state: the engine with its regions and shadows,
//! and per watch what keeps its memory pinned and reachable. The one lock
//! of buffer watching lives here.
//!
//! Locking: `STATE` is never held while Python code runs (callbacks,
//! reports, imports); the trace's lock (`trace::sink::lock`) is only taken
//! while holding it or alone, never the other way round. Every
//! acquisition (through `state()`) holds a `Busy` token, so the
//! fatal-signal handler does not read shadows being changed, marks the
//! line fast path's copy stale (`runtime::watched::invalidate`), and on
//! release publishes the regions to that handler and says whether any
//! buffer is watched (`runtime::watched`). Nothing here runs in signal
//! context.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::ffi;
use pyo3::prelude::*;

use crate::mem::engine::{Engine, Layout};
use crate::mem::signals::crash::{self, Busy};
use crate::runtime::watched::{self, Kind};

/// A buffer export held for as long as a region is watched: it pins the
/// exporting object's memory (a `bytearray` cannot resize, an array cannot
/// be freed).
pub(crate) struct Pinned(pub Box<ffi::Py_buffer>);

// SAFETY: the Py_buffer is only created and released with the GIL held; in
// between it is inert data.
unsafe impl Send for Pinned {}

pub(crate) struct Watch {
    pub id: u32,
    pub tag: Arc<str>,
    pub variable: Option<Arc<str>>,
    pub layout: Arc<Layout>,
    pub pinned: Option<Pinned>,
    /// The watched object and whatever else must stay alive (a tensor).
    pub keepalive: Vec<Py<PyAny>>,
    /// `id()` of the object passed to `watch`, for `unwatch(obj)`.
    pub obj_id: Option<usize>,
    /// The objects that keep the watched memory reachable: when memwatch
    /// holds all their references, nothing else can reach the memory and
    /// the watch ends (`UnwatchReason::Collected`) at the next boundary.
    pub owner: Option<Owner>,
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

pub(crate) struct State {
    pub engine: Engine,
    pub watches: Vec<Watch>,
    pub next_region: u32,
}

pub(crate) static STATE: Mutex<Option<State>> = Mutex::new(None);

/// The buffers' state, locked. Whoever holds it may change regions or
/// shadows, so it is held with a [`Busy`] token (the fatal-signal handler
/// compares them only while no token is held), and releasing it shows the
/// handler the regions as they are now.
pub(crate) struct StateGuard {
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
        watched::set(
            Kind::Buffers,
            self.guard.as_ref().is_some_and(|st| !st.watches.is_empty()),
        );
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

pub(crate) fn state() -> StateGuard {
    let busy = Busy::new();
    let g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    // Whoever holds the lock may change regions or shadows: the line fast
    // path's copy of them is stale from here on.
    watched::invalidate();
    StateGuard {
        guard: std::mem::ManuallyDrop::new(g),
        _busy: busy,
    }
}

pub(crate) fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    let mut g = state();
    f(init_state(&mut g))
}

pub(crate) fn init_state(g: &mut Option<State>) -> &mut State {
    g.get_or_insert_with(|| State {
        engine: Engine::default(),
        watches: Vec::new(),
        next_region: 1,
    })
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

/// True when a watched region has the tag `tag`.
pub(crate) fn has_tag(tag: &str) -> bool {
    state()
        .as_ref()
        .is_some_and(|st| st.watches.iter().any(|w| &*w.tag == tag))
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
