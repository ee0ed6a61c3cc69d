//! The check: [`Engine::check`] finds every change since the previous one,
//! in phases: the stores caught in store mode (each its own change, with
//! its [`Writer`]; a store that does not follow from the shadow counts in
//! [`STALE_EVENTS`] and its page is diffed instead), the pages let through
//! for kernel writes, the compared regions, then the page-tracked ones (no
//! page scan while the process's fault count has not moved; otherwise the
//! pages the kernel says were written, diffed span by span or, for a
//! rewrite of most of a region of at least [`BULK_MIN`] bytes, through a
//! whole snapshot). [`Engine::fast_checkable`] tells the line fast path
//! whether it can decide a check itself, from the compared regions and the
//! fault count.
//!
//! Locking: none of its own; the engine is used under the buffers' state
//! lock (see `mod.rs`). Collecting the caught stores locks the
//! store tracker's event queue for a moment (`StoreTracker::take`).
//! Nothing here runs in signal context: the signal handlers write the
//! events into lock-free per-thread rings, and `StoreTracker::take` hands
//! them over.

use std::io;

use super::diff::{bulk_diff, diff_into, merge_adjacent, push_diff, store_diff};
use super::region::{RawChange, Tracking, Writer};
use super::register::Engine;
use crate::mem::kernel::page_size;
use crate::mem::signals::Event;

/// Regions at least this large whose dirty pages cover half of them are
/// diffed through a whole snapshot (see [`Engine::check`]).
pub const BULK_MIN: u64 = 1 << 20;

/// Events that did not follow from the values reported before them (the
/// bytes a store changed did not hold, before it, what the shadow says) and
/// were replaced by a diff of the page.
pub static STALE_EVENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Engine {
    /// Whether a check could be decided by comparing the `Compare` regions
    /// with their shadows and the process's fault count with the one the
    /// last page scan read: `Some(None)` with no page-tracked region,
    /// `Some(Some(count))` with some, `None` when not (store mode, or no
    /// scan since pages were registered).
    pub fn fast_checkable(&self) -> Option<Option<u64>> {
        if self.store.is_some() {
            return None;
        }
        if self.spans.is_empty() {
            return Some(None);
        }
        self.faults_seen.map(Some)
    }

    /// Finds every change since the previous check, appends one
    /// [`RawChange`] per changed region to `out`, and updates the shadows.
    pub fn check(&mut self, out: &mut Vec<RawChange>) -> io::Result<()> {
        self.check_stores(out);
        for r in self
            .regions
            .iter_mut()
            .filter(|r| r.tracking == Tracking::Compare)
        {
            if r.current() != r.shadow.as_slice() {
                push_diff(r, 0, r.len as usize, out);
            }
        }
        if self.spans.is_empty() {
            return Ok(());
        }
        // A page can only become written through a write fault (the scan
        // left it write-protected), and every fault counts in the process's
        // fault count before the write it lets through happens. So if the
        // count has not moved since it was read before the last scan, no
        // page was written since: skip the scan, which walks every page
        // table entry of the spans (25 us for 100 MB of 4 KiB pages; the
        // count costs one getrusage, ~0.6 us).
        let faults = crate::mem::kernel::process_faults();
        if faults.is_some() && faults == self.faults_seen {
            return Ok(());
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.clear();
        if let Some(t) = self.tracker.as_mut() {
            for &(a, b) in &self.spans {
                if let Err(e) = t.scan_written(a, b, |s, e| dirty.push((s, e))) {
                    self.faults_seen = None;
                    return Err(e);
                }
            }
        }
        self.faults_seen = faults;
        if !dirty.is_empty() {
            for r in self.regions.iter_mut().filter(|r| r.tracking == Tracking::Pages) {
                let (rs, re) = (r.start, r.start + r.len);
                let spans: Vec<(usize, usize)> = dirty
                    .iter()
                    .map(|&(s, e)| (s.max(rs), e.min(re)))
                    .filter(|(s, e)| s < e)
                    .map(|(s, e)| ((s - rs) as usize, (e - rs) as usize))
                    .collect();
                if spans.is_empty() {
                    continue;
                }
                let dirty_bytes: usize = spans.iter().map(|(s, e)| e - s).sum();
                let mut ranges = Vec::new();
                if r.len >= BULK_MIN && r.mask.is_none() && dirty_bytes as u64 * 2 >= r.len {
                    bulk_diff(r, &spans, &mut ranges);
                } else {
                    for (s, e) in spans {
                        diff_into(r, s, e, &mut ranges);
                    }
                    merge_adjacent(&mut ranges);
                }
                if !ranges.is_empty() {
                    out.push(RawChange {
                        region: r.id,
                        ranges,
                        writer: None,
                    });
                }
            }
        }
        self.dirty = dirty;
        Ok(())
    }

    /// Reports each store caught since the last check as its own change,
    /// in the order they happened, then the net change of the pages that
    /// were let through (kernel writes, a full ring), and protects those
    /// pages again.
    fn check_stores(&mut self, out: &mut Vec<RawChange>) {
        let Some(tracker) = self.store.as_ref() else {
            return;
        };
        let mut events: Vec<Event> = Vec::new();
        let mut open: Vec<u64> = Vec::new();
        let all = tracker.take(&mut events, &mut open);
        if all {
            open = self.store_pages.keys().copied().collect();
        }
        let mut stale: Vec<u64> = Vec::new();
        for ev in &events {
            let (ea, ee) = (ev.addr, ev.addr + u64::from(ev.len));
            let writer = Some(Writer {
                tid: ev.tid,
                time_ns: ev.time_ns,
            });
            for r in self.regions.iter_mut().filter(|r| r.tracking == Tracking::Store) {
                if ee <= r.start || r.start + r.len <= ea {
                    continue;
                }
                match store_diff(r, ev) {
                    Some(ranges) if !ranges.is_empty() => out.push(RawChange {
                        region: r.id,
                        ranges,
                        writer,
                    }),
                    Some(_) => {}
                    // The event does not follow from what was reported:
                    // report what memory holds instead.
                    None => stale.push(ev.addr & !(page_size() - 1)),
                }
            }
        }
        if !stale.is_empty() {
            STALE_EVENTS.fetch_add(stale.len() as u64, std::sync::atomic::Ordering::Relaxed);
            open.extend(stale);
            open.sort_unstable();
            open.dedup();
        }
        if open.is_empty() {
            return;
        }
        let ps = page_size();
        for r in self.regions.iter_mut().filter(|r| r.tracking == Tracking::Store) {
            let (rs, re) = (r.start, r.start + r.len);
            let mut ranges = Vec::new();
            for &p in open.iter().filter(|&&p| p < re && rs < p + ps) {
                let (s, e) = (p.max(rs) - rs, (p + ps).min(re) - rs);
                diff_into(r, s as usize, e as usize, &mut ranges);
            }
            merge_adjacent(&mut ranges);
            if !ranges.is_empty() {
                out.push(RawChange {
                    region: r.id,
                    ranges,
                    writer: None,
                });
            }
        }
        for p in open {
            if self.store_pages.contains_key(&p) {
                tracker.protect(p);
            }
        }
    }
}
