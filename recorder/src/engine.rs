//! Watched regions and the check that finds what changed in them.
//!
//! A region keeps a shadow copy of its bytes. [`Engine::check`] finds the
//! bytes that differ from the shadow, reports them as [`RawChange`]s and
//! updates the shadow. Two ways to find them:
//!
//! - **pages** (regions larger than [`COMPARE_MAX`]): the region's pages are
//!   registered with the [`WriteTracker`] (userfaultfd `WP_ASYNC`); a check
//!   asks the kernel which pages were written and diffs only those. Pages
//!   are shared between regions by reference count, and every scan's dirty
//!   pages are offered to every region overlapping them, so two regions in
//!   one page stay independent.
//! - **compare** (small regions, or memory the kernel cannot write-protect,
//!   such as a file-backed `mmap`): the check compares the whole region with
//!   its shadow. For a few KiB this is cheaper than a system call.
//!
//! Either way a change is the net difference since the previous check,
//! from any writer: Python, native code, another thread, or the kernel.
//!
//! - **store** (`mode="store"`): the region's pages are registered with the
//!   [`StoreTracker`], which catches each store instruction; a check turns
//!   each caught store into its own change, carrying the writing thread and
//!   the time of the store, then diffs the pages that were let through
//!   (kernel writes) as a net change.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use crate::kernel::{page_size, WriteTracker};
use crate::signals::Event;
use crate::store::StoreTracker;

/// Regions at least this large whose dirty pages cover half of them are
/// diffed through a whole snapshot (see [`Engine::check`]).
pub const BULK_MIN: u64 = 1 << 20;

/// Bytes of a change: owned, or a slice of a shadow snapshot shared with
/// the region (large rewrites report slices of the old and new snapshots
/// instead of copying them again).
#[derive(Clone)]
pub enum Bytes {
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>, usize, usize),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Shared(a, s, e) => &a[*s..*e],
        }
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Bytes) -> bool {
        **self == **other
    }
}

impl Eq for Bytes {}

/// One changed run: `(offset, old, new)`.
pub type ChangedRange = (u64, Bytes, Bytes);

/// Regions up to this many bytes are checked by comparing them whole.
pub const COMPARE_MAX: u64 = 16 * 1024;

/// How a region lays out its elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// The dtype string (`<f4`, `<bfloat16`: [`memwatch_format::dtype`]), or `None` for plain bytes.
    pub dtype: Option<String>,
    pub itemsize: u32,
    pub shape: Vec<u64>,
    /// Byte strides; empty means C-contiguous.
    pub strides: Vec<i64>,
    /// Offset of element `[0, ...]` from the region start.
    pub origin: u64,
}

impl Layout {
    /// The layout of changes that have none (objects, variables), shared.
    pub fn none() -> Arc<Layout> {
        static NONE: std::sync::OnceLock<Arc<Layout>> = std::sync::OnceLock::new();
        NONE.get_or_init(|| Arc::new(Layout::default())).clone()
    }

    /// The index of the element that holds byte `offset` of the region, if
    /// any (numpy order, one entry per dimension).
    pub fn index_of(&self, offset: u64) -> Option<Vec<u64>> {
        let itemsize = u64::from(self.itemsize.max(1));
        let rel = offset as i128 - self.origin as i128;
        if self.shape.is_empty() {
            return (rel >= 0).then(|| vec![rel as u64 / itemsize]);
        }
        if self.strides.is_empty() {
            if rel < 0 {
                return None;
            }
            let mut flat = rel as u64 / itemsize;
            let mut idx = vec![0; self.shape.len()];
            for (d, n) in self.shape.iter().enumerate().rev() {
                let n = (*n).max(1);
                idx[d] = flat % n;
                flat /= n;
            }
            return (flat == 0).then_some(idx);
        }
        // Strided: peel dimensions from the largest |stride| down.
        let mut order: Vec<usize> = (0..self.shape.len()).collect();
        order.sort_by_key(|&d| std::cmp::Reverse(self.strides[d].unsigned_abs()));
        let mut idx = vec![0u64; self.shape.len()];
        let mut rest = rel;
        for d in order {
            let s = self.strides[d] as i128;
            if s == 0 {
                continue;
            }
            let i = rest.div_euclid(s);
            let i = i.clamp(0, self.shape[d] as i128 - 1);
            idx[d] = i as u64;
            rest -= i * s;
        }
        (0..itemsize as i128).contains(&rest).then_some(idx)
    }
}

/// How a region's changes are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// Whole-region comparison at each check.
    Compare,
    /// Kernel write tracking of the region's pages.
    Pages,
    /// One change per store instruction (`mode="store"`).
    Store,
}

impl Tracking {
    pub fn name(self) -> &'static str {
        match self {
            Tracking::Compare => "compare",
            Tracking::Pages => "uffd-wp-async",
            Tracking::Store => "uffd-wp-step",
        }
    }
}

/// One watched region.
#[derive(Debug)]
pub struct Region {
    pub id: u32,
    pub tag: Arc<str>,
    pub variable: Option<Arc<str>>,
    /// Address of the first byte of the span.
    pub start: u64,
    pub len: u64,
    pub layout: Layout,
    /// Bit per byte of the span: set where the byte belongs to an element
    /// of the view; `None` when every byte does.
    pub mask: Option<Vec<u64>>,
    /// The region's contents as of the last check.
    pub shadow: Arc<Vec<u8>>,
    /// The snapshot before the last bulk diff, reused for the next one once
    /// no change refers to it any more.
    pub spare: Option<Arc<Vec<u8>>>,
    pub tracking: Tracking,
    /// Why page tracking was not used, when it was wanted.
    pub tracking_note: Option<String>,
}

impl Region {
    fn current(&self) -> &[u8] {
        // SAFETY: the span is pinned by the buffer export the API layer
        // holds for as long as the region exists (or, for raw memory, the
        // user promised it stays mapped); concurrent writers may change
        // bytes while we read them, which only makes this read one of the
        // values they stored.
        unsafe { std::slice::from_raw_parts(self.start as *const u8, self.len as usize) }
    }
}

fn in_mask(mask: &Option<Vec<u64>>, off: usize) -> bool {
    match mask {
        None => true,
        Some(m) => m[off / 64] >> (off % 64) & 1 == 1,
    }
}

/// Changed runs of one region found by one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawChange {
    pub region: u32,
    /// `(offset, old, new)`, increasing offsets, not overlapping.
    pub ranges: Vec<ChangedRange>,
    /// For one caught store: who stored it, and when.
    pub writer: Option<Writer>,
}

/// The thread and time of one caught store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Writer {
    pub tid: u64,
    /// Unix time of the store, nanoseconds.
    pub time_ns: u64,
}

/// All watched regions of the process.
#[derive(Debug, Default)]
pub struct Engine {
    pub regions: Vec<Region>,
    tracker: Option<WriteTracker>,
    tracker_error: Option<String>,
    /// Registered pages (page address → number of regions using it).
    pages: BTreeMap<u64, u32>,
    /// Maximal runs of registered pages, `[start, end)`.
    spans: Vec<(u64, u64)>,
    dirty: Vec<(u64, u64)>,
    /// The process's page-fault count read before the last scan of
    /// `spans`; `None`: scan at the next check whatever the count.
    faults_seen: Option<u64>,
    store: Option<StoreTracker>,
    /// Pages registered for store mode (page address → regions using it).
    store_pages: BTreeMap<u64, u32>,
}

/// Builds the byte mask of a strided view over a span of `len` bytes.
pub fn view_mask(layout: &Layout, len: u64) -> Option<Vec<u64>> {
    if layout.strides.is_empty() {
        return None;
    }
    let itemsize = layout.itemsize.max(1) as u64;
    let count: u64 = layout.shape.iter().product();
    if count * itemsize == len {
        return None;
    }
    let mut mask = vec![0u64; (len as usize).div_ceil(64)];
    let nd = layout.shape.len();
    let mut idx = vec![0u64; nd];
    for _ in 0..count {
        let off = layout.origin as i64
            + idx
                .iter()
                .zip(&layout.strides)
                .map(|(i, s)| *i as i64 * s)
                .sum::<i64>();
        for b in off as u64..off as u64 + itemsize {
            if b < len {
                mask[b as usize / 64] |= 1 << (b % 64);
            }
        }
        for d in (0..nd).rev() {
            idx[d] += 1;
            if idx[d] < layout.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Some(mask)
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
        crate::store::REGIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::signals::add_span(region.start, region.start + region.len);
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
        crate::store::REGIONS.store(0, std::sync::atomic::Ordering::Relaxed);
        crate::signals::clear_spans();
    }

    /// Stops tracking region `id` and returns it.
    pub fn remove(&mut self, id: u32) -> Option<Region> {
        let i = self.regions.iter().position(|r| r.id == id)?;
        let region = self.regions.remove(i);
        match region.tracking {
            Tracking::Pages => self.unregister_pages(region.start, region.len),
            Tracking::Store => {
                crate::store::REGIONS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                crate::signals::remove_span(region.start, region.start + region.len);
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
        let faults = crate::kernel::process_faults();
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
}

impl Engine {
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

/// Events that did not follow from the values reported before them (the
/// bytes a store changed did not hold, before it, what the shadow says) and
/// were replaced by a diff of the page.
pub static STALE_EVENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The changed elements of region `r` in one caught store: the bytes the
/// store changed, on top of the shadow; `None`, changing nothing, when the
/// store's old bytes are not what the shadow holds (another thread's store
/// no event holds came in between, or the event is stale): the caller then
/// diffs the page, so that every reported change starts from the value
/// reported last. Updates the shadow.
fn store_diff(r: &mut Region, ev: &Event) -> Option<Vec<ChangedRange>> {
    let grid = ElementGrid::of(r);
    let (ea, ee) = (ev.addr, ev.addr + u64::from(ev.len));
    let a = (ea.max(r.start) - r.start) as usize;
    let b = (ee.min(r.start + r.len) - r.start) as usize;
    let (from, to) = (grid.down(a), grid.up(b));
    let old = r.shadow[from..to].to_vec();
    let mut new = old.clone();
    for k in a..b {
        let w = (r.start + k as u64 - ea) as usize;
        if ev.old[w] != ev.new[w] {
            if old[k - from] != ev.old[w] && in_mask(&r.mask, k) {
                return None;
            }
            new[k - from] = ev.new[w];
        }
    }
    let mut ranges: Vec<ChangedRange> = Vec::new();
    let shadow = Arc::make_mut(&mut r.shadow);
    for (x, y) in element_runs(&new, &old, grid.itemsize) {
        let mut k = x;
        while k < y {
            while k < y && !in_mask(&r.mask, from + k) {
                k += 1;
            }
            let s = k;
            while k < y && in_mask(&r.mask, from + k) {
                k += 1;
            }
            if s < k {
                shadow[from + s..from + k].copy_from_slice(&new[s..k]);
                ranges.push((
                    (from + s) as u64,
                    Bytes::Owned(old[s..k].to_vec()),
                    Bytes::Owned(new[s..k].to_vec()),
                ));
            }
        }
    }
    Some(ranges)
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

fn push_diff(r: &mut Region, from: usize, to: usize, out: &mut Vec<RawChange>) {
    let mut ranges = Vec::new();
    diff_into(r, from, to, &mut ranges);
    if !ranges.is_empty() {
        out.push(RawChange {
            region: r.id,
            ranges,
            writer: None,
        });
    }
}

/// Where a region's element boundaries fall.
struct ElementGrid {
    itemsize: usize,
    phase: usize,
    len: usize,
}

impl ElementGrid {
    fn of(r: &Region) -> ElementGrid {
        let itemsize = r.layout.itemsize.max(1) as usize;
        ElementGrid {
            itemsize,
            phase: r.layout.origin as usize % itemsize,
            len: r.len as usize,
        }
    }

    /// The element boundary at or before byte `x`.
    fn down(&self, x: usize) -> usize {
        if x >= self.phase {
            x - (x - self.phase) % self.itemsize
        } else {
            0
        }
    }

    /// The element boundary at or after byte `x` (at most the region's end).
    fn up(&self, x: usize) -> usize {
        if x > self.phase {
            ((x - self.phase).div_ceil(self.itemsize) * self.itemsize + self.phase).min(self.len)
        } else {
            x.min(self.len)
        }
    }
}

/// Appends the changed runs of bytes `[from, to)` of `r` (whole elements,
/// limited to the view's bytes) and updates the shadow.
///
/// Finds differing 32-byte blocks first (a memcmp each), then splits each
/// run of them into exact runs of differing elements, so unchanged memory
/// costs one comparison per block and changed memory one per element.
fn diff_into(r: &mut Region, from: usize, to: usize, ranges: &mut Vec<ChangedRange>) {
    let grid = ElementGrid::of(r);
    let (itemsize, len) = (grid.itemsize, grid.len);
    let (down, up) = (|x: usize| grid.down(x), |x: usize| grid.up(x));
    let (from, to) = (down(from), up(to));
    // SAFETY: as in `Region::current`; a separate borrow so the shadow can
    // be updated while reading.
    let cur: &[u8] = unsafe { std::slice::from_raw_parts(r.start as *const u8, len) };
    let blk = itemsize * 32usize.div_ceil(itemsize);
    let mut i = from;
    while i < to {
        let e = (i + blk).min(to);
        if cur[i..e] == r.shadow[i..e] {
            i = e;
            continue;
        }
        // Extend over following differing blocks.
        let mut j = e;
        while j < to {
            let e2 = (j + blk).min(to);
            if cur[j..e2] == r.shadow[j..e2] {
                break;
            }
            j = e2;
        }
        for (a, b) in element_runs(&cur[i..j], &r.shadow[i..j], itemsize) {
            push_run(r, cur, i + a, i + b, ranges);
        }
        i = j;
    }
}

/// Whether every `N`-byte element of the 32-byte blocks `x` and `y`
/// differs, a 64-bit word at a time: an element is equal where its lane of
/// `x ^ y` is zero, and the classic "has a zero lane" test finds one
/// (`(v - ones) & !v & highs` is non-zero exactly when some lane of `v` is
/// zero).
#[inline(always)]
fn all_differ<const N: usize>(x: &[u8], y: &[u8]) -> bool {
    let word = |s: &[u8], i: usize| u64::from_le_bytes(s[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let lanes = |ones: u64, highs: u64| {
        (0..4).all(|i| {
            let v = word(x, i) ^ word(y, i);
            v.wrapping_sub(ones) & !v & highs == 0
        })
    };
    match N {
        1 => lanes(0x0101_0101_0101_0101, 0x8080_8080_8080_8080),
        2 => lanes(0x0001_0001_0001_0001, 0x8000_8000_8000_8000),
        4 => lanes(0x0000_0001_0000_0001, 0x8000_0000_8000_0000),
        8 => (0..4).all(|i| word(x, i) != word(y, i)),
        16 => (0..2).all(|i| word(x, 2 * i) != word(y, 2 * i) || word(x, 2 * i + 1) != word(y, 2 * i + 1)),
        _ => false,
    }
}

/// Maximal runs `[a, b)` of elements that differ between `x` and `y`.
fn element_runs(x: &[u8], y: &[u8], itemsize: usize) -> Vec<(usize, usize)> {
    fn runs<const N: usize>(x: &[u8], y: &[u8]) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let n = x.len() / N;
        // Fixed-size array compares compile to plain loads, not memcmp calls.
        let el = |s: &[u8], k: usize| -> [u8; N] { s[k * N..k * N + N].try_into().expect("N bytes") };
        // Elements per 32-byte block, for skipping whole blocks (N divides
        // 32); compared as arrays, which compiles to vector compares rather
        // than a memcmp call per block.
        let per = 32 / N;
        let block = |s: &[u8], k: usize| -> [u8; 32] { s[k * N..k * N + 32].try_into().expect("32 bytes") };
        let mut k = 0;
        while k < n {
            // Equal blocks, then equal elements.
            while k + per <= n && block(x, k) == block(y, k) {
                k += per;
            }
            if k < n && el(x, k) == el(y, k) {
                k += 1;
                continue;
            }
            if k >= n {
                break;
            }
            let start = k;
            // Blocks whose every element differs (a whole array rewritten),
            // then element by element to the run's end.
            while k + per <= n && all_differ::<N>(&x[k * N..(k + per) * N], &y[k * N..(k + per) * N]) {
                k += per;
            }
            while k < n && el(x, k) != el(y, k) {
                k += 1;
            }
            out.push((start * N, k * N));
        }
        // A partial element at the end (a span that is not a whole number
        // of elements) counts as one.
        let tail = n * N;
        if tail < x.len() && x[tail..] != y[tail..] {
            match out.last_mut() {
                Some((_, b)) if *b == tail => *b = x.len(),
                _ => out.push((tail, x.len())),
            }
        }
        out
    }
    match itemsize {
        1 => runs::<1>(x, y),
        2 => runs::<2>(x, y),
        4 => runs::<4>(x, y),
        8 => runs::<8>(x, y),
        16 => runs::<16>(x, y),
        n => {
            let mut out: Vec<(usize, usize)> = Vec::new();
            // Equal stretches are skipped whole elements at a time, about
            // 64 bytes per compare.
            let step = n * 64usize.div_ceil(n);
            let mut a = 0;
            while a < x.len() {
                if a + step <= x.len() && x[a..a + step] == y[a..a + step] {
                    a += step;
                    continue;
                }
                let b = (a + n).min(x.len());
                if x[a..b] != y[a..b] {
                    match out.last_mut() {
                        Some((_, e)) if *e == a => *e = b,
                        _ => out.push((a, b)),
                    }
                }
                a = b;
            }
            out
        }
    }
}

/// Records bytes `[a, b)` as changed (split by the view mask), updating
/// the shadow with exactly the bytes reported.
fn push_run(r: &mut Region, cur: &[u8], a: usize, b: usize, ranges: &mut Vec<ChangedRange>) {
    let mask = &r.mask;
    let shadow = Arc::make_mut(&mut r.shadow);
    let mut emit = |shadow: &mut Vec<u8>, s: usize, e: usize| {
        let new = cur[s..e].to_vec();
        if new[..] != shadow[s..e] {
            let old = shadow[s..e].to_vec();
            shadow[s..e].copy_from_slice(&new);
            match ranges.last_mut() {
                Some((o, Bytes::Owned(po), Bytes::Owned(pn))) if *o as usize + po.len() == s => {
                    po.extend_from_slice(&old);
                    pn.extend_from_slice(&new);
                }
                _ => ranges.push((s as u64, Bytes::Owned(old), Bytes::Owned(new))),
            }
        }
    };
    if mask.is_none() {
        emit(shadow, a, b);
        return;
    }
    let mut k = a;
    while k < b {
        while k < b && !in_mask(mask, k) {
            // Bytes between a view's elements are not its own: keep the
            // shadow in step so they are not looked at again.
            shadow[k] = cur[k];
            k += 1;
        }
        let s = k;
        while k < b && in_mask(mask, k) {
            k += 1;
        }
        if s < k {
            emit(shadow, s, k);
        }
    }
}

/// Diffs a region most of which was written: builds the next snapshot (the
/// live bytes of the dirty spans, the old shadow elsewhere) in a reused
/// buffer, and reports slices of the old and new snapshots, so a large
/// rewrite costs one copy of the written memory and one comparison.
fn bulk_diff(r: &mut Region, spans: &[(usize, usize)], ranges: &mut Vec<ChangedRange>) {
    let grid = ElementGrid::of(r);
    let (itemsize, len) = (grid.itemsize, grid.len);
    let (down, up) = (|x: usize| grid.down(x), |x: usize| grid.up(x));
    // SAFETY: as in `Region::current`.
    let cur: &[u8] = unsafe { std::slice::from_raw_parts(r.start as *const u8, len) };
    let mut next = match r.spare.take().map(Arc::try_unwrap) {
        Some(Ok(mut v)) => {
            v.clear();
            v
        }
        _ => Vec::with_capacity(len),
    };
    let old = r.shadow.clone();
    let mut aligned: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for &(s, e) in spans {
        let (s, e) = (down(s), up(e));
        match aligned.last_mut() {
            Some((_, pe)) if *pe >= s => *pe = (*pe).max(e),
            _ => aligned.push((s, e)),
        }
    }
    let mut pos = 0;
    for &(s, e) in &aligned {
        next.extend_from_slice(&old[pos..s]);
        next.extend_from_slice(&cur[s..e]);
        pos = e;
    }
    next.extend_from_slice(&old[pos..len]);
    let next = Arc::new(next);
    // `element_runs` skips equal stretches a block at a time itself.
    for &(from, to) in &aligned {
        for (a, b) in element_runs(&next[from..to], &old[from..to], itemsize) {
            let (a, b) = (from + a, from + b);
            ranges.push((
                a as u64,
                Bytes::Shared(old.clone(), a, b),
                Bytes::Shared(next.clone(), a, b),
            ));
        }
    }
    r.shadow = next;
    r.spare = Some(old);
}

fn merge_adjacent(ranges: &mut Vec<ChangedRange>) {
    ranges.sort_by_key(|r| r.0);
    let mut out: Vec<ChangedRange> = Vec::with_capacity(ranges.len());
    for (off, old, new) in ranges.drain(..) {
        match out.last_mut() {
            Some((o, Bytes::Owned(po), Bytes::Owned(pn))) if *o + po.len() as u64 == off => {
                po.extend_from_slice(&old);
                pn.extend_from_slice(&new);
            }
            _ => out.push((off, old, new)),
        }
    }
    *ranges = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(buf: &mut [u8], itemsize: u32) -> Region {
        Region {
            id: 1,
            tag: "t".into(),
            variable: None,
            start: buf.as_ptr() as u64,
            len: buf.len() as u64,
            layout: Layout {
                dtype: None,
                itemsize,
                shape: vec![],
                strides: vec![],
                origin: 0,
            },
            mask: None,
            shadow: Arc::new(vec![]),
            spare: None,
            tracking: Tracking::Compare,
            tracking_note: None,
        }
    }

    fn event(addr: u64, old: &[u8], new: &[u8]) -> Event {
        let mut e = Event {
            order: 1,
            time_ns: 0,
            tid: 1,
            addr,
            len: crate::signals::WINDOW as u32,
            old: [0; crate::signals::WINDOW],
            new: [0; crate::signals::WINDOW],
        };
        e.old.copy_from_slice(old);
        e.new.copy_from_slice(new);
        e
    }

    #[test]
    fn a_store_window_straddling_the_region_reports_exactly_its_bytes() {
        // The window starts 0x30 bytes before the region and ends past it.
        let mut buf = vec![0u8; 64];
        let mut r = region(&mut buf, 1);
        r.shadow = Arc::new(vec![0; 64]);
        let base = r.start;
        let (old, mut new) = (vec![0u8; 128], vec![0u8; 128]);
        new[0x30..0x33].copy_from_slice(&[0xab; 3]);
        new[0x10] = 9; // outside the region: ignored
        let got = store_diff(&mut r, &event(base - 0x30, &old, &new)).expect("consistent");
        assert_eq!(plain(&got), vec![(0, vec![0; 3], vec![0xab; 3])]);
        assert_eq!(&r.shadow[..4], &[0xab, 0xab, 0xab, 0]);
        // An element straddling the window's end takes its other bytes
        // from the shadow.
        let mut big = vec![0u8; 256];
        let mut r4 = region(&mut big, 4);
        let mut shadow = vec![0u8; 256];
        shadow[130] = 7;
        r4.shadow = Arc::new(shadow);
        let (old, mut new) = (vec![0u8; 128], vec![0u8; 128]);
        new[127] = 1; // region byte 129, in element 128..132
        let ev = event(r4.start + 2, &old, &new);
        let got = store_diff(&mut r4, &ev).expect("consistent");
        assert_eq!(plain(&got), vec![(128, vec![0, 0, 7, 0], vec![0, 1, 7, 0])]);
    }

    #[test]
    fn a_store_whose_old_bytes_are_not_the_shadow_changes_nothing() {
        // The store says 5 -> 6, but 4 was reported last: the page is
        // diffed instead, so that the chain of values stays whole.
        let mut buf = vec![0u8; 64];
        let mut r = region(&mut buf, 1);
        let mut shadow = vec![0u8; 64];
        shadow[0] = 4;
        r.shadow = Arc::new(shadow);
        let (mut old, mut new) = (vec![0u8; 128], vec![0u8; 128]);
        (old[0], new[0]) = (5, 6);
        let ev = event(r.start, &old, &new);
        assert!(store_diff(&mut r, &ev).is_none());
        assert_eq!(r.shadow[0], 4);
    }

    fn plain(r: &[ChangedRange]) -> Vec<(u64, Vec<u8>, Vec<u8>)> {
        r.iter().map(|(o, a, b)| (*o, a.to_vec(), b.to_vec())).collect()
    }

    #[test]
    fn byte_changes_are_exact() {
        let mut buf = vec![0u8; 100];
        let mut e = Engine::default();
        e.add(region(&mut buf, 1));
        buf[3] = 1;
        buf[4] = 2;
        buf[50] = 9;
        let mut out = Vec::new();
        e.check(&mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            plain(&out[0].ranges),
            vec![(3, vec![0, 0], vec![1, 2]), (50, vec![0], vec![9])]
        );
        out.clear();
        e.check(&mut out).unwrap();
        assert!(out.is_empty(), "a second check sees nothing new");
    }

    #[test]
    fn changes_align_to_elements() {
        let mut buf = vec![0u8; 16];
        let mut e = Engine::default();
        e.add(region(&mut buf, 4));
        buf[5] = 0xff; // inside element 1
        let mut out = Vec::new();
        e.check(&mut out).unwrap();
        assert_eq!(plain(&out[0].ranges), vec![(4, vec![0; 4], vec![0, 0xff, 0, 0])]);
    }

    #[test]
    fn runs_are_exact_elements_even_inside_a_changed_block() {
        let mut buf = vec![0u8; 4096];
        let mut e = Engine::default();
        e.add(region(&mut buf, 4));
        // Every element changes but element 2 and the last one.
        for (i, x) in buf.chunks_exact_mut(4).enumerate() {
            if i != 2 && i != 1023 {
                x.copy_from_slice(&(i as u32 + 1).to_le_bytes());
            }
        }
        let mut out = Vec::new();
        e.check(&mut out).unwrap();
        let spans: Vec<(u64, usize)> = out[0].ranges.iter().map(|r| (r.0, r.1.len())).collect();
        assert_eq!(spans, vec![(0, 8), (12, 4092 - 12)]);
        assert_eq!(&out[0].ranges[1].2[..4], &4u32.to_le_bytes());
    }

    #[test]
    fn large_rewrites_go_through_snapshots_and_small_writes_after_them_still_count() {
        let mut buf = vec![1u8; 4 << 20];
        let mut e = Engine::default();
        let tracking = e.add(region(&mut buf, 4)).tracking;
        if e.backend().is_err() {
            return; // no userfaultfd write-protect here: covered by the compare path
        }
        assert_eq!(tracking, Tracking::Pages);
        for (i, x) in buf.iter_mut().enumerate() {
            if i % 4096 != 0 {
                *x = 2;
            }
        }
        let mut out = Vec::new();
        e.check(&mut out).unwrap();
        let r = &out[0].ranges;
        assert!(
            matches!(r[0].1, Bytes::Shared(..)),
            "a bulk diff shares the snapshots"
        );
        assert_eq!(
            (r[0].0, r[0].1[0], r[0].2[0]),
            (0, 1, 1),
            "element 0 keeps byte 0 but changes"
        );
        assert_eq!(&r[0].2[1..4], &[2, 2, 2]);
        let changed: usize = r.iter().map(|x| x.1.len()).sum();
        assert_eq!(changed, 4 << 20);
        // While the change is alive, a small write copies the shared shadow.
        buf[8] = 9;
        let mut out2 = Vec::new();
        e.check(&mut out2).unwrap();
        assert_eq!(
            plain(&out2[0].ranges),
            vec![(8, vec![2, 2, 2, 2], vec![9, 2, 2, 2])]
        );
        assert_eq!(
            out[0].ranges[0].2[8], 2,
            "the earlier change still shows its own new bytes"
        );
        drop(out);
        for x in buf.iter_mut() {
            *x = 3;
        }
        let mut out3 = Vec::new();
        e.check(&mut out3).unwrap();
        let changed: usize = out3[0].ranges.iter().map(|x| x.1.len()).sum();
        assert_eq!(changed, 4 << 20);
        assert!(out3[0]
            .ranges
            .iter()
            .all(|(_, a, b)| a.iter().all(|&v| v != 3) && b.iter().all(|&v| v == 3)));
        e.remove(1);
    }

    #[test]
    fn strided_regions_ignore_their_gaps() {
        let mut buf = vec![0u8; 40];
        let mut r = region(&mut buf, 4);
        r.layout.shape = vec![5];
        r.layout.strides = vec![8];
        r.mask = view_mask(&r.layout, 36);
        r.len = 36;
        let mut e = Engine::default();
        e.add(r);
        buf[4] = 1; // gap
        buf[9] = 2; // element 1
        let mut out = Vec::new();
        e.check(&mut out).unwrap();
        assert_eq!(plain(&out[0].ranges), vec![(8, vec![0; 4], vec![0, 2, 0, 0])]);
        out.clear();
        e.check(&mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn index_of_handles_c_order_and_strides() {
        let l = Layout {
            dtype: Some("<f4".into()),
            itemsize: 4,
            shape: vec![2, 3],
            strides: vec![],
            origin: 0,
        };
        assert_eq!(l.index_of(4 * 4), Some(vec![1, 1]));
        // A view a[::2] of 10 float32: shape [5], stride 8.
        let v = Layout {
            strides: vec![8],
            shape: vec![5],
            ..l.clone()
        };
        assert_eq!(v.index_of(16), Some(vec![2]));
        assert_eq!(v.index_of(20), None, "byte 20 belongs to no element of the view");
        // Reversed: a[::-1] of 4 float32: origin 12, stride -4.
        let r = Layout {
            strides: vec![-4],
            shape: vec![4],
            origin: 12,
            ..l
        };
        assert_eq!(r.index_of(0), Some(vec![3]));
        assert_eq!(r.index_of(12), Some(vec![0]));
    }

    #[test]
    fn masks_leave_out_gaps_of_a_strided_view() {
        let l = Layout {
            dtype: Some("<i2".into()),
            itemsize: 2,
            shape: vec![3],
            strides: vec![4],
            origin: 0,
        };
        let mask = view_mask(&l, 10).unwrap();
        let bits: Vec<bool> = (0..10).map(|b| mask[0] >> b & 1 == 1).collect();
        assert_eq!(
            bits,
            [true, true, false, false, true, true, false, false, true, true]
        );
    }

    /// The tests' oracle: maximal runs of `n`-byte elements that differ,
    /// found one element at a time (deliberately not `element_runs`).
    fn plain_runs(x: &[u8], y: &[u8], n: usize) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut a = 0;
        while a < x.len() {
            let b = (a + n).min(x.len());
            if x[a..b] != y[a..b] {
                match out.last_mut() {
                    Some((_, e)) if *e == a => *e = b,
                    _ => out.push((a, b)),
                }
            }
            a = b;
        }
        out
    }

    /// `bulk_diff` reports the region's maximal runs of changed elements,
    /// for any itemsize, with the old and new bytes of each, and leaves the
    /// current contents as the shadow.
    #[test]
    fn bulk_diff_reports_maximal_runs_of_changed_elements() {
        const BULK_BLOCK: usize = 256 << 10;
        for itemsize in [1usize, 4, 12] {
            let len = (3 * BULK_BLOCK + 1000) / itemsize * itemsize;
            let old: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut buf = old.clone();
            let block = (BULK_BLOCK / itemsize).max(1) * itemsize;
            // Runs of a few elements at and around 256 KiB boundaries, and
            // scattered single elements.
            let mut touch = |a: usize, b: usize| {
                for x in &mut buf[a * itemsize..b * itemsize] {
                    *x = x.wrapping_add(1);
                }
            };
            let e = |bytes: usize| bytes / itemsize;
            touch(e(block) - 5, e(block) + 7);
            touch(e(2 * block) - 3, e(2 * block));
            touch(e(3 * block), e(3 * block) + 2);
            for k in (0..e(len)).step_by(9973) {
                touch(k, k + 1);
            }
            let expected = plain_runs(&buf, &old, itemsize);
            let mut r = region(&mut buf, itemsize as u32);
            r.shadow = Arc::new(old.clone());
            let mut ranges = Vec::new();
            bulk_diff(&mut r, &[(0, len)], &mut ranges);
            let got: Vec<(usize, usize)> = ranges
                .iter()
                .map(|(off, o, n)| {
                    assert_eq!(o.len(), n.len());
                    (*off as usize, *off as usize + n.len())
                })
                .collect();
            assert_eq!(got, expected, "itemsize {itemsize}");
            for (off, o, n) in &ranges {
                let a = *off as usize;
                assert_eq!(&o[..], &old[a..a + o.len()]);
                assert_eq!(&n[..], &buf[a..a + n.len()]);
            }
            assert_eq!(r.shadow.as_slice(), buf.as_slice());
        }
    }

    /// The block-skipping `element_runs` against element-by-element
    /// comparing, on arrays with every density of change (none, sparse,
    /// long runs, all) and lengths that end mid-block and mid-element.
    #[test]
    fn element_runs_match_a_plain_element_by_element_compare() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for itemsize in [1usize, 2, 3, 4, 8, 16] {
            for len in [0usize, 1, 7, 31, 32, 33, 64, 200, 1000, 4099] {
                for density in [0u64, 1, 20, 60, 95, 100] {
                    let x: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
                    let mut y = x.clone();
                    let mut k = 0;
                    while k < len {
                        // Runs of changed elements of random length.
                        let run = 1 + (rand() % 40) as usize;
                        let change = rand() % 100 < density;
                        for i in k..(k + run * itemsize).min(len) {
                            if change {
                                // Sometimes only one byte of an element.
                                if rand() % 3 != 0 || i % itemsize == 0 {
                                    y[i] = x[i].wrapping_add(1 + (rand() % 255) as u8);
                                }
                            }
                        }
                        k += run * itemsize;
                    }
                    assert_eq!(
                        element_runs(&x, &y, itemsize),
                        plain_runs(&x, &y, itemsize),
                        "itemsize {itemsize} len {len} density {density}"
                    );
                }
            }
        }
    }
}
