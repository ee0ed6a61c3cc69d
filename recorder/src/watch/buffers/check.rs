//! The check of watched buffers: run the engine, turn its raw changes into
//! `memwatch.Change`s attributed to the thread's last in-scope line, number
//! and record them (under the trace's lock, taken inside the state lock,
//! which holds the shadows the trace needs), and hand them to delivery. Also the op a check is made for
//! (`watch(t, via="dispatch")`: `Change.op`).
//!
//! Locking: the buffers' state lock (`super::state`), then the trace's,
//! each change in one short section; both are let go before any change is
//! delivered (callbacks run Python code). A `Busy` token is held from the
//! check until its changes are in the journal, so the fatal-signal handler
//! waits rather than read shadows that say more than the trace. Nothing
//! here runs in signal context.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::deliver::output;
use crate::mem::engine::RawChange;
use crate::mem::kernel::gettid;
use crate::mem::signals::crash::{self, Busy};
use crate::model::change::Change;
use crate::model::errors::MemwatchError;
use crate::runtime::attrib::{attributed_frames, attributed_stack, other_thread_context, thread_name};
use crate::trace::sink::{self, unix_ns, EventContext};
use crate::watch::buffers::fast;
use crate::watch::buffers::state::{state, with_state, Owner};

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

/// Runs `f` with the checks it makes marking the changes of `regions` as
/// made by torch op `op` (`skip`: memwatch's own innermost frames, left out
/// of a stack no in-scope line led to); returns what `f` returned and the
/// regions, as the check left them.
pub(crate) fn with_op<R>(regions: Vec<u32>, op: &str, skip: usize, f: impl FnOnce() -> R) -> (R, Vec<u32>) {
    let check = OpCheck {
        regions,
        op: op.into(),
        skip,
    };
    let outer = OP.with(|o| o.borrow_mut().replace(check));
    let r = f();
    let check = OP.with(|o| std::mem::replace(&mut *o.borrow_mut(), outer));
    (r, check.map(|c| c.regions).unwrap_or_default())
}

/// Reports what changed in watched memory since the last check; returns
/// the regions whose objects only memwatch refers to (see [`Owner`]).
pub(crate) fn check_regions(py: Python<'_>, last: (usize, u32)) -> Vec<u32> {
    // From the check until its changes are in the journal, the shadows say
    // more than the trace: the fatal-signal handler must wait.
    let busy = Busy::new();
    let (raw, collected) = {
        let mut g = state();
        let Some(st) = g.as_mut() else {
            fast::refresh(
                py,
                None,
                std::iter::empty(),
                crate::runtime::watched::generation(),
            );
            return Vec::new();
        };
        if st.watches.is_empty() {
            fast::refresh(
                py,
                Some(&st.engine),
                std::iter::empty(),
                crate::runtime::watched::generation(),
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
        fast::refresh(
            py,
            Some(&st.engine),
            owners,
            crate::runtime::watched::generation(),
        );
        (raw, collected)
    };
    if !raw.is_empty() {
        emit(py, raw, last, busy);
    }
    collected
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
            let region = st.engine.regions.iter().find(|r| r.id == rc.region)?;
            let mut sk = sink::lock();
            // Numbered under the trace's lock: the trace holds changes in
            // the order of their numbers.
            let seq = crash::next_seq();
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
                pid: crate::model::change::live_pid(),
                rank: crate::model::change::live_rank(),
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
            Some((change, tracing))
        });
        // Where it goes is read now, before any change of this check is
        // delivered (a callback may change it).
        made_all.extend(made.map(|(change, tracing)| (change, tracing, output::route(py))));
    }
    drop(busy);
    for (change, tracing, route) in made_all {
        output::deliver(py, change, route, tracing);
    }
}
