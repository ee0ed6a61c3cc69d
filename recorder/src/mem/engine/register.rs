//! The [`Engine`] and how regions enter and leave it: which [`Tracking`]
//! each gets (whole-region compare up to [`COMPARE_MAX`] bytes, kernel page
//! tracking above, store mode when asked), registering its pages with the
//! [`WriteTracker`] or the [`StoreTracker`] by reference count (so regions
//! that share a page stay independent), removing it, and letting go of the
//! trackers in a `fork()` child.
//!
//! Locking: none of its own; the engine is used under the buffers' state
//! lock (see `mod.rs`). Nothing here runs in signal context. Adding
//! or removing a store-mode region updates the table of store-mode spans
//! that the signal handlers read (`signals::add_span`, lock-free atomics).

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use super::region::{Region, Tracking};
use crate::mem::kernel::{page_size, WriteTracker};
use crate::mem::store::StoreTracker;

/// Regions up to this many bytes are checked by comparing them whole.
pub const COMPARE_MAX: u64 = 16 * 1024;

/// All watched regions of the process.
#[derive(Debug, Default)]
pub struct Engine {
    pub regions: Vec<Region>,
    pub(super) tracker: Option<WriteTracker>,
    tracker_error: Option<String>,
    /// Registered pages (page address → number of regions using it).
    pages: BTreeMap<u64, u32>,
    /// Maximal runs of registered pages, `[start, end)`.
    pub(super) spans: Vec<(u64, u64)>,
    pub(super) dirty: Vec<(u64, u64)>,
    /// The process's page-fault count read before the last scan of
    /// `spans`; `None`: scan at the next check whatever the count.
    pub(super) faults_seen: Option<u64>,
    pub(super) store: Option<StoreTracker>,
    /// Pages registered for store mode (page address → regions using it).
    pub(super) store_pages: BTreeMap<u64, u32>,
}

impl Engine {
    /// Which kernel mechanism page tracking uses, or why it is unavailable.
    pub fn backend(&mut self) -> Result<&'static str, String> {
        self.tracker().map(|_| "uffd-wp-async")
    }

    fn tracker(&mut self) -> Result<&mut WriteTracker, String> {
        if self.tracker.is_none() && self.tracker_error.is_none() {
            match WriteTracker::new() {
                Ok(t) => self.tracker = Some(t),
                Err(e) => {
                    self.tracker_error = Some(format!(
                        "userfaultfd write-protect tracking is unavailable ({e}); it needs Linux 6.7 or newer"
                    ))
                }
            }
        }
        match (&mut self.tracker, &self.tracker_error) {
            (Some(t), _) => Ok(t),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => unreachable!(),
        }
    }

    /// Adds a region (its shadow is its current contents) and starts
    /// tracking it. Returns a reference to it.
    pub fn add(&mut self, mut region: Region) -> &Region {
        region.shadow = Arc::new(region.current().to_vec());
        let (first, end) = Self::page_range(region.start, region.len);
        if region.len > COMPARE_MAX && self.store_pages.range(first..end).next().is_some() {
            region.tracking = Tracking::Compare;
            region.tracking_note = Some("it shares a page with a store-mode region".into());
        } else if region.len > COMPARE_MAX {
            match self.register_pages(region.start, region.len) {
                Ok(()) => region.tracking = Tracking::Pages,
                Err(note) => {
                    region.tracking = Tracking::Compare;
                    region.tracking_note = Some(note);
                }
            }
        } else {
            region.tracking = Tracking::Compare;
        }
        self.regions.push(region);
        self.regions.last().expect("just pushed")
    }

    /// Adds a region caught store by store (`mode="store"`), or says why
    /// it cannot be.
    pub fn add_store(&mut self, mut region: Region) -> Result<&Region, String> {
        let (first, end) = Self::page_range(region.start, region.len);
        if let Some(other) = self
            .regions
            .iter()
            .find(|r| r.tracking == Tracking::Pages && r.start < end && first < r.start + r.len)
        {
            return Err(format!(
                "its pages are shared with '{}', which is watched in line mode with page tracking; \
                 watch both in the same mode",
                other.tag
            ));
        }
        if self.store.is_none() {
            let t = StoreTracker::new().map_err(|e| format!("store mode is unavailable: {e}"))?;
            self.store = Some(t);
        }
        let tracker = self.store.as_ref().expect("just made");
        let ps = page_size();
        let mut p = first;
        while p < end {
            if !self.store_pages.contains_key(&p) {
                if let Err(e) = tracker.register(p, ps) {
                    let done = p;
                    let mut q = first;
                    while q < done {
                        if !self.store_pages.contains_key(&q) {
                            let _ = tracker.unregister(q, ps);
                        }
                        q += ps;
                    }
                    return Err(describe_register_error(&e));
                }
            }
            p += ps;
        }
        let mut p = first;
        while p < end {
            *self.store_pages.entry(p).or_insert(0) += 1;
            p += ps;
        }
        region.shadow = Arc::new(region.current().to_vec());
        region.tracking = Tracking::Store;
        region.tracking_note = tracker.kernel_note.clone();
        crate::mem::store::REGIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::mem::signals::add_span(region.start, region.start + region.len);
        self.regions.push(region);
        Ok(self.regions.last().expect("just pushed"))
    }

    /// In a `fork()` child: lets go of the store tracker without joining
    /// its threads (they exist only in the parent).
    pub fn forget_after_fork(&mut self) {
        self.faults_seen = None;
        if let Some(t) = self.store.take() {
            std::mem::forget(t);
        }
        crate::mem::store::REGIONS.store(0, std::sync::atomic::Ordering::Relaxed);
        crate::mem::signals::clear_spans();
    }

    /// Stops tracking region `id` and returns it.
    pub fn remove(&mut self, id: u32) -> Option<Region> {
        let i = self.regions.iter().position(|r| r.id == id)?;
        let region = self.regions.remove(i);
        match region.tracking {
            Tracking::Pages => self.unregister_pages(region.start, region.len),
            Tracking::Store => {
                crate::mem::store::REGIONS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                crate::mem::signals::remove_span(region.start, region.start + region.len);
                let (first, end) = Self::page_range(region.start, region.len);
                let ps = page_size();
                let mut p = first;
                while p < end {
                    if let Some(n) = self.store_pages.get_mut(&p) {
                        *n -= 1;
                        if *n == 0 {
                            self.store_pages.remove(&p);
                            if let Some(t) = self.store.as_ref() {
                                let _ = t.unregister(p, ps);
                            }
                        }
                    }
                    p += ps;
                }
            }
            Tracking::Compare => {}
        }
        Some(region)
    }

    fn page_range(start: u64, len: u64) -> (u64, u64) {
        let ps = page_size();
        (start / ps * ps, (start + len).div_ceil(ps) * ps)
    }

    fn register_pages(&mut self, start: u64, len: u64) -> Result<(), String> {
        let ps = page_size();
        let (first, end) = Self::page_range(start, len);
        // Register only the pages nobody registered yet, run by run.
        let mut new_runs: Vec<(u64, u64)> = Vec::new();
        let mut p = first;
        while p < end {
            if !self.pages.contains_key(&p) {
                match new_runs.last_mut() {
                    Some((_, e)) if *e == p => *e += ps,
                    _ => new_runs.push((p, p + ps)),
                }
            }
            p += ps;
        }
        let tracker = self.tracker()?;
        let mut done: Vec<(u64, u64)> = Vec::new();
        for &(a, b) in &new_runs {
            if let Err(e) = tracker.register(a, b - a) {
                for &(a, b) in &done {
                    let _ = tracker.unregister(a, b - a);
                }
                return Err(describe_register_error(&e));
            }
            done.push((a, b));
        }
        let mut p = first;
        while p < end {
            *self.pages.entry(p).or_insert(0) += 1;
            p += ps;
        }
        self.rebuild_spans();
        Ok(())
    }

    fn unregister_pages(&mut self, start: u64, len: u64) {
        let ps = page_size();
        let (first, end) = Self::page_range(start, len);
        let mut freed: Vec<(u64, u64)> = Vec::new();
        let mut p = first;
        while p < end {
            if let Some(n) = self.pages.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    self.pages.remove(&p);
                    match freed.last_mut() {
                        Some((_, e)) if *e == p => *e += ps,
                        _ => freed.push((p, p + ps)),
                    }
                }
            }
            p += ps;
        }
        if let Some(t) = self.tracker.as_ref() {
            for (a, b) in freed {
                let _ = t.unregister(a, b - a);
            }
        }
        self.rebuild_spans();
    }

    fn rebuild_spans(&mut self) {
        let ps = page_size();
        self.faults_seen = None;
        self.spans.clear();
        for &p in self.pages.keys() {
            match self.spans.last_mut() {
                Some((_, e)) if *e == p => *e += ps,
                _ => self.spans.push((p, p + ps)),
            }
        }
    }
}

fn describe_register_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EINVAL) => {
            "the kernel cannot write-protect this memory (file-backed or special mapping)".into()
        }
        Some(libc::ENOMEM) => "too many memory mappings to write-protect it (vm.max_map_count)".into(),
        _ => format!("write-protecting it failed: {e}"),
    }
}
