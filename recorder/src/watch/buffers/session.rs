//! The buffers' part of the session: a trace that starts while buffers
//! are watched gets each of them with its current contents, and a fork
//! child watches again, with its own kernel registrations, every region
//! its parent watched.
//!
//! Locking: the buffers' state lock, and inside it the trace's. Nothing
//! here runs in signal context.

use std::sync::Arc;

use pyo3::ffi;

use crate::mem::engine::{Engine, Region, Tracking};
use crate::mem::signals::crash;
use crate::model::change::FrameRef;
use crate::runtime::watched::{self, Kind};
use crate::trace::sink::{self, EventContext, TraceSink};
use crate::watch::buffers::state::{state, State, STATE};

/// Makes `new` the active trace and writes every watched region to it
/// (its contents as they are now), in one section of the state lock, so
/// that no check falls between.
pub(crate) fn start_recording(new: TraceSink, thread_name: &str, stack: &[FrameRef]) {
    let g = state();
    let mut sk = sink::lock();
    *sk = Some(new);
    let s = sk.as_mut().expect("just set");
    if let Some(st) = g.as_ref() {
        for w in &st.watches {
            if let Some(r) = st.engine.regions.iter().find(|r| r.id == w.id) {
                let ev = EventContext::here(thread_name, stack);
                s.region_watched(crash::next_seq(), r, &ev);
            }
        }
    }
}

/// In a fork child (see `py::session::_after_fork_child`): every region
/// watched before the fork is watched again, tracked with this process's
/// own kernel registrations. Returns whether a watch is kept; what could not be kept is added
/// to `problems`.
pub(crate) fn after_fork_child(problems: &mut Vec<String>) -> bool {
    // The fast path's copy points at the parent's regions.
    watched::invalidate();
    let old = {
        let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
        g.take()
    };
    let Some(st) = old else {
        // Nothing kept (or the lock was a parent thread's, and replaced).
        watched::set(Kind::Buffers, false);
        return false;
    };
    let State {
        engine,
        watches,
        next_region,
    } = st;
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
    let kept = !kept_watches.is_empty();
    let mut g = state();
    *g = Some(State {
        engine: fresh,
        watches: kept_watches,
        next_region,
    });
    kept
}
