//! The one owner of delivery state: where a change goes once it is made.
//! Every change (of a buffer, an object or a variable) ends in
//! [`deliver`]: the history, the `on_change` callbacks, the live
//! `[MEMWATCH]` report, and a guarded tag's guard (`super::guard`).
//! Object and variable changes are numbered and recorded here too
//! ([`emit_object`]); buffer changes are numbered and recorded by
//! `watch::buffers` under its own lock, which holds the shadows the trace
//! needs, and then delivered here.
//!
//! Locking: `OUT` (callbacks, history and the options) is held only to
//! read or update them, never while Python code runs, and never while
//! taking another lock. The trace's lock (`trace::sink::SINK`) is taken
//! alone here. Nothing here runs in signal context.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::deliver::guard;
use crate::mem::engine::Layout;
use crate::mem::signals::crash;
use crate::model::change::{Change, FrameRef, ObjectInfo};
use crate::runtime::hooks::hooks;
use crate::runtime::thread::guarded;
use crate::trace::sink::{self, EventContext};

/// Callbacks, history and the options of delivery.
struct Outputs {
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

static OUT: Mutex<Option<Outputs>> = Mutex::new(None);

fn with_out<R>(f: impl FnOnce(&mut Outputs) -> R) -> R {
    let mut g: MutexGuard<'static, Option<Outputs>> = OUT.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(|| Outputs {
        live: Live::from_env(),
        callbacks: Vec::new(),
        history: VecDeque::new(),
        max_history: 100_000,
        history_bytes: 0,
        max_history_bytes: 64 << 20,
    }))
}

/// What one change is delivered to, read once per change so that no lock
/// is held while callbacks run.
pub struct Route {
    callbacks: Vec<Py<PyAny>>,
    live: Live,
    max_history: usize,
}

/// The callbacks and options a change made now goes to.
pub fn route(py: Python<'_>) -> Route {
    with_out(|o| Route {
        callbacks: o.callbacks.iter().map(|c| c.clone_ref(py)).collect(),
        live: o.live,
        max_history: o.max_history,
    })
}

/// Who made an object change, and where: what [`emit_object`] needs
/// besides the change itself.
pub struct Origin {
    pub stack: Arc<[FrameRef]>,
    pub thread_id: u64,
    pub thread_name: Arc<str>,
}

/// Makes the `Change` of one object change (of `tag`, and of `variable`
/// for a watched variable), numbers it, records it to the trace, then
/// delivers it. Variable changes are object changes too.
pub fn emit_object(
    py: Python<'_>,
    tag: Arc<str>,
    variable: Option<Arc<str>>,
    info: ObjectInfo,
    origin: Origin,
) {
    let mut change = Change {
        seq: 0,
        time_ns: sink::unix_ns(),
        pid: crate::model::change::live_pid(),
        rank: crate::model::change::live_rank(),
        tag,
        variable,
        region_start: 0,
        ranges: Vec::new(),
        layout: Layout::none(),
        stack: origin.stack,
        thread_id: origin.thread_id,
        thread_name: origin.thread_name,
        object: Some(info),
        op: None,
    };
    let tracing = {
        let mut sk = sink::lock();
        // Numbered under the trace's lock: the trace holds changes in the
        // order of their numbers.
        change.seq = crash::next_seq();
        if let (Some(s), Some(info)) = (sk.as_mut(), change.object.as_ref()) {
            let ev = EventContext {
                thread: change.thread_id,
                thread_name: &change.thread_name,
                stack: &change.stack,
            };
            s.object_change(change.seq, &change.tag, change.variable.as_deref(), info, &ev);
        }
        sk.is_some()
    };
    let route = route(py);
    deliver(py, change, route, tracing);
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

/// The common end of every change: history, callbacks, the live report.
pub fn deliver(py: Python<'_>, change: Change, route: Route, tracing: bool) {
    let Route {
        callbacks,
        live,
        max_history,
    } = route;
    // A guarded watch reports through its action (`guard`), not live.
    let has_guard = guard::guarded(&change.tag);
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
    if max_history > 0 {
        let size = change_bytes(obj.get());
        with_out(|o| {
            if size <= o.max_history_bytes {
                o.history.push_back(obj.clone_ref(py));
                o.history_bytes += size;
                o.trim();
            }
        });
    }
    guarded(|| {
        for cb in &callbacks {
            if let Err(e) = cb.call1(py, (obj.clone_ref(py),)) {
                e.write_unraisable(py, Some(cb.bind(py)));
            }
        }
        if let Some(text) = report {
            let written = hooks()
                .and_then(|h| h.sys.bind(py).getattr("stderr"))
                .and_then(|e| e.call_method1("write", (text,)).map(|_| ()));
            if let Err(e) = written {
                e.write_unraisable(py, None);
            }
        }
        if has_guard {
            guard::on_change(py, obj.as_any());
        }
    });
}

impl Outputs {
    /// Drops the oldest changes of the history until it fits its limits.
    fn trim(&mut self) {
        while self.history.len() > self.max_history || self.history_bytes > self.max_history_bytes {
            match self.history.pop_front() {
                Some(old) => self.history_bytes -= change_bytes(old.get()),
                None => break,
            }
        }
    }
}

/// Registers `callback(change)`, called for every change.
#[pyfunction]
pub fn on_change(callback: Bound<'_, PyAny>) -> PyResult<Bound<'_, PyAny>> {
    if !callback.is_callable() {
        return Err(PyTypeError::new_err("on_change() needs a callable"));
    }
    with_out(|o| o.callbacks.push(callback.clone().unbind()));
    Ok(callback)
}

/// Unregisters a callback given to `on_change`.
#[pyfunction]
pub fn remove_callback(py: Python<'_>, callback: &Bound<'_, PyAny>) -> PyResult<()> {
    let found = with_out(|o| {
        let i = o.callbacks.iter().position(|c| c.bind(py).is(callback))?;
        Some(o.callbacks.remove(i))
    });
    // Released outside the lock: releasing it may run Python code.
    found
        .map(drop)
        .ok_or_else(|| PyValueError::new_err("that callback is not registered"))
}

/// The changes seen so far (all, or those of tag `name`), oldest first.
#[pyfunction]
#[pyo3(signature = (name=None))]
pub fn history<'py>(py: Python<'py>, name: Option<&str>) -> PyResult<Bound<'py, PyAny>> {
    let items: Vec<Py<Change>> = with_out(|o| {
        o.history
            .iter()
            .filter(|c| name.is_none_or(|n| &*c.get().tag == n))
            .map(|c| c.clone_ref(py))
            .collect()
    });
    crate::model::change::change_list(py, items)
}

/// Forgets the history.
#[pyfunction]
pub fn clear_history() {
    with_out(|o| {
        o.history.clear();
        o.history_bytes = 0;
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
            return Err(PyValueError::new_err(format!(
                "live={} is not an option: pass True (a [MEMWATCH] report per change), \
                 \"short\" (one line per change) or False (none)",
                v.repr()?
            )))
        }
    };
    let (live, max_history, max_history_bytes) = with_out(|o| {
        if let Some(l) = live {
            o.live = l;
        }
        if let Some(m) = max_history {
            o.max_history = m;
        }
        if let Some(m) = max_history_bytes {
            o.max_history_bytes = m;
        }
        o.trim();
        (o.live, o.max_history, o.max_history_bytes)
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

/// In a fork child: the history is the parent's and is dropped; callbacks
/// and options stay. Returns false when a thread of the parent held the
/// lock at the fork (then callbacks and options start over too).
pub fn after_fork_child() -> bool {
    let ok = crate::runtime::fork::reset_in_child(&OUT);
    with_out(|o| {
        // The history's changes are the parent's.
        o.history.clear();
        o.history_bytes = 0;
    });
    ok
}
