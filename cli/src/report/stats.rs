//! The parts an [`Aggregate`](super::aggregate::Aggregate) is made of, each
//! bounded: timeline [`Buckets`], [`LineStats`], the element [`Heat`]map of
//! a region, the [`Trajectory`] of an element's values, the [`Suspicious`]
//! events, and what is known of a tag ([`TagAgg`]) and of a process
//! ([`ProcAgg`]); and the arithmetic of element indices ([`flat_index`],
//! [`unflatten`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use memwatch_analyzer::RegionInfo;

use super::limits::{BUCKETS, EXACT_COUNTS, HEAT_1D, HEAT_2D, MAX_POINTS};

/// Counts and bytes in fixed-width buckets from an origin, the width
/// doubling (pairs of buckets merged) whenever a value falls beyond the
/// last bucket, so any range fits in [`BUCKETS`] buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    pub origin: u64,
    pub width: u64,
    pub changes: Vec<u64>,
    pub bytes: Vec<u64>,
}

impl Buckets {
    /// Empty buckets of `width` (at least 1) from `origin`.
    pub fn new(origin: u64, width: u64) -> Self {
        Buckets {
            origin,
            width: width.max(1),
            changes: vec![0; BUCKETS],
            bytes: vec![0; BUCKETS],
        }
    }

    /// Counts a change of `bytes` bytes at `x` (a value before the origin
    /// counts in the first bucket).
    pub fn add(&mut self, x: u64, bytes: u64) {
        let rel = x.saturating_sub(self.origin);
        while rel / self.width >= BUCKETS as u64 {
            self.coarsen();
        }
        let i = (rel / self.width) as usize;
        self.changes[i] += 1;
        self.bytes[i] += bytes;
    }

    fn coarsen(&mut self) {
        for v in [&mut self.changes, &mut self.bytes] {
            for i in 0..BUCKETS / 2 {
                v[i] = v[2 * i] + v[2 * i + 1];
            }
            v[BUCKETS / 2..].fill(0);
        }
        self.width = self.width.saturating_mul(2);
    }

    /// Coarsens until the width is at least `width` (to share an axis
    /// with buckets that grew wider).
    pub fn coarsen_to(&mut self, width: u64) {
        while self.width < width {
            self.coarsen();
        }
    }

    /// The number of buckets up to the last non-empty one.
    pub(super) fn used(&self) -> usize {
        self.changes.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1)
    }
}

/// A line, identified by its interned strings (shared by every change on
/// it) and its number, as in `summary`.
pub(super) type LineKey = (usize, u32, usize);

pub(super) fn line_key(f: &memwatch_analyzer::FrameInfo) -> LineKey {
    (
        Arc::as_ptr(&f.file) as *const u8 as usize,
        f.line,
        Arc::as_ptr(&f.function) as *const u8 as usize,
    )
}

/// What one line did to one tag.
#[derive(Debug, Clone, PartialEq)]
pub struct LineStats {
    pub tag: usize,
    /// `None`: changes without a line.
    pub frame: Option<memwatch_analyzer::FrameInfo>,
    pub changes: u64,
    pub bytes: u64,
    pub elements: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Thread names (or ids), the first few.
    pub threads: Vec<String>,
}

/// The element heatmap of a tag: its elements as `rows` × `cols` (a 1-D
/// region is one row; more dimensions are rows of the last one), binned
/// into cells of `cell_rows` × `cell_cols` elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Heat {
    pub shape: Vec<u64>,
    pub rows: u64,
    pub cols: u64,
    pub cell_rows: u64,
    pub cell_cols: u64,
    pub grid_rows: u64,
    pub grid_cols: u64,
    /// Element changes per cell.
    pub counts: Vec<u64>,
    /// Sum of |new - old| per cell, over the finite changes.
    pub delta_sum: Vec<f64>,
    /// Changes counted in `delta_sum`, per cell.
    pub delta_n: Vec<u64>,
    /// Element changes per element, for small regions.
    pub exact: Option<Vec<u32>>,
    /// Per cell, the last element changed in it (flat index).
    pub cell_last: Vec<u64>,
    /// Element changes that could not be placed (another shape under the
    /// same tag, or bytes not on an element's boundary).
    pub unplaced: u64,
}

impl Heat {
    /// The heatmap of a region of `shape` (empty: flat, of `elements`).
    pub fn new(shape: &[u64], elements: u64) -> Self {
        let shape: Vec<u64> = if shape.is_empty() {
            vec![elements]
        } else {
            shape.to_vec()
        };
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let rows = if shape.len() <= 1 {
            1
        } else {
            shape[..shape.len() - 1]
                .iter()
                .fold(1u64, |a, n| a.saturating_mul((*n).max(1)))
        };
        let (cell_rows, cell_cols) = if rows == 1 {
            (1, cols.div_ceil(HEAT_1D))
        } else {
            (rows.div_ceil(HEAT_2D), cols.div_ceil(HEAT_2D))
        };
        let (grid_rows, grid_cols) = (rows.div_ceil(cell_rows), cols.div_ceil(cell_cols));
        let cells = (grid_rows * grid_cols) as usize;
        let total = rows.saturating_mul(cols);
        Heat {
            shape,
            rows,
            cols,
            cell_rows,
            cell_cols,
            grid_rows,
            grid_cols,
            counts: vec![0; cells],
            delta_sum: vec![0.0; cells],
            delta_n: vec![0; cells],
            exact: (total <= EXACT_COUNTS).then(|| vec![0; total as usize]),
            cell_last: vec![0; cells],
            unplaced: 0,
        }
    }

    /// Counts a change of element `flat` (C order) by `delta` (`None`:
    /// not finite, or not a number).
    pub fn add(&mut self, flat: u64, delta: Option<f64>) {
        let (r, c) = (flat / self.cols, flat % self.cols);
        if r >= self.rows {
            self.unplaced += 1;
            return;
        }
        let cell = ((r / self.cell_rows) * self.grid_cols + c / self.cell_cols) as usize;
        self.counts[cell] += 1;
        self.cell_last[cell] = flat;
        if let Some(d) = delta {
            self.delta_sum[cell] += d;
            self.delta_n[cell] += 1;
        }
        if let Some(e) = self.exact.as_mut() {
            e[flat as usize] = e[flat as usize].saturating_add(1);
        }
    }

    /// The busiest element: exactly for a small region, else the last one
    /// changed in the busiest cell. `None` when nothing was placed.
    pub fn busiest(&self) -> Option<u64> {
        if let Some(e) = &self.exact {
            let (i, n) = e
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))?;
            return (*n > 0).then_some(i as u64);
        }
        let (i, n) = self
            .counts
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))?;
        (*n > 0).then(|| self.cell_last[i])
    }

    pub(super) fn is_binned(&self) -> bool {
        self.cell_rows > 1 || self.cell_cols > 1
    }
}

/// The flat (C-order) index of the element whose bytes start at offset
/// `at` of `region`, if one does.
pub fn flat_index(region: &RegionInfo, at: u64) -> Option<u64> {
    let itemsize = u64::from(region.itemsize.max(1));
    let shape = memwatch_analyzer::shape_of(region);
    let total = shape.iter().fold(1u64, |a, n| a.saturating_mul(*n));
    if region.strides.is_empty() {
        let rel = at.checked_sub(region.origin)?;
        let flat = (rel % itemsize == 0).then_some(rel / itemsize)?;
        return (flat < total).then_some(flat);
    }
    // Strided: divide by the strides, largest first (a transpose, a step,
    // negative strides from the origin), and check the division is exact.
    let mut rel = i128::from(at) - i128::from(region.origin);
    let mut order: Vec<usize> = (0..shape.len().min(region.strides.len())).collect();
    order.sort_by_key(|&d| std::cmp::Reverse(region.strides[d].unsigned_abs()));
    let mut idx = vec![0u64; shape.len()];
    for d in order {
        let s = i128::from(region.strides[d]);
        if s == 0 || shape[d] == 0 {
            continue;
        }
        let q = (rel / s).clamp(0, i128::from(shape[d] - 1));
        idx[d] = q as u64;
        rel -= q * s;
    }
    if rel != 0 {
        return None;
    }
    Some(idx.iter().zip(&shape).fold(0u64, |a, (i, n)| a * n + i))
}

/// A point of a trajectory: seq, nanoseconds since the start, the value,
/// and the line (an index into [`Aggregate::wheres`](super::aggregate::Aggregate::wheres)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub seq: u64,
    pub time_ns: u64,
    pub value: f64,
    pub line: u32,
}

/// The values of one element over the run, decimated to at most
/// [`MAX_POINTS`]: every `every`-th change is kept (and the last one).
#[derive(Debug, Clone, PartialEq)]
pub struct Trajectory {
    pub tag: usize,
    pub flat: u64,
    pub index: Vec<u64>,
    /// Asked with `--element` (else picked as the busiest).
    pub asked: bool,
    /// Its value before its first change.
    pub initial: Option<f64>,
    pub points: Vec<Point>,
    pub changes: u64,
    pub every: u64,
    last: Option<Point>,
}

impl Trajectory {
    pub(super) fn new(tag: usize, flat: u64, index: Vec<u64>, asked: bool) -> Self {
        Trajectory {
            tag,
            flat,
            index,
            asked,
            initial: None,
            points: Vec::new(),
            changes: 0,
            every: 1,
            last: None,
        }
    }

    /// Adds a change of the element to `p.value` from `old`.
    pub fn push(&mut self, old: f64, p: Point) {
        if self.changes == 0 {
            self.initial = Some(old);
        }
        if self.changes % self.every == 0 {
            if self.points.len() >= MAX_POINTS {
                let mut k = 0;
                self.points.retain(|_| {
                    k += 1;
                    k % 2 == 1
                });
                self.every *= 2;
            }
            if self.changes % self.every == 0 {
                self.points.push(p);
            }
        }
        self.last = Some(p);
        self.changes += 1;
    }

    /// The points to draw: the kept ones and the last change.
    pub fn finished_points(&self) -> Vec<Point> {
        let mut v = self.points.clone();
        if let Some(last) = self.last {
            if v.last().is_none_or(|p| p.seq != last.seq) {
                v.push(last);
            }
        }
        v
    }
}

/// How bad a suspicious event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub(super) fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// Something in the run worth a look.
#[derive(Debug, Clone, PartialEq)]
pub struct Suspicious {
    pub severity: Severity,
    /// `nonfinite`, `new_thread`, `new_line`, `lost`, `crash`, `ending`.
    pub kind: &'static str,
    pub tag: Option<usize>,
    pub seq: Option<u64>,
    pub time_ns: Option<u64>,
    /// An index into [`Aggregate::wheres`](super::aggregate::Aggregate::wheres).
    pub line: Option<u32>,
    pub detail: String,
    /// The process it happened in (an index into [`Aggregate::procs`](super::aggregate::Aggregate::procs)).
    pub proc: usize,
}

/// What the report knows of one tag.
#[derive(Debug, Clone)]
pub struct TagAgg {
    pub name: Arc<str>,
    /// The process whose tag it is (an index into [`Aggregate::procs`](super::aggregate::Aggregate::procs)).
    pub proc: usize,
    pub variable: Option<Arc<str>>,
    pub dtype: Option<Arc<str>>,
    pub shape: Vec<u64>,
    pub changes: u64,
    pub bytes: u64,
    /// Elements changed (byte changes; for plain bytes, bytes).
    pub elements: u64,
    pub object_changes: u64,
    pub first: (u64, u64),
    pub last: (u64, u64),
    /// By thread id: its last name and its changes.
    pub threads: HashMap<u64, (Option<Arc<str>>, u64)>,
    /// Elements that became NaN or Inf.
    pub nonfinite: u64,
    pub time: Buckets,
    pub seq: Buckets,
    pub heat: Option<Heat>,
    pub(super) new_lines: u64,
    pub(super) lines: HashSet<Option<LineKey>>,
}

impl TagAgg {
    /// A tag of process `proc` with nothing counted yet: its timelines
    /// over time (from 0) and over seq (from `seq_origin`) in buckets of
    /// `time_width` ns and `seq_width` seqs.
    pub(super) fn new(name: Arc<str>, proc: usize, time_width: u64, seq_origin: u64, seq_width: u64) -> Self {
        TagAgg {
            name,
            proc,
            variable: None,
            dtype: None,
            shape: Vec::new(),
            changes: 0,
            bytes: 0,
            elements: 0,
            object_changes: 0,
            first: (0, 0),
            last: (0, 0),
            threads: HashMap::new(),
            nonfinite: 0,
            time: Buckets::new(0, time_width),
            seq: Buckets::new(seq_origin, seq_width),
            heat: None,
            new_lines: 0,
            lines: HashSet::new(),
        }
    }
}

/// What one process of a run did, for the report's list of processes.
#[derive(Debug, Clone, Default)]
pub struct ProcAgg {
    pub pid: u32,
    pub rank: Option<u32>,
    pub changes: u64,
    pub bytes: u64,
    pub regions: u64,
    /// Its last event, ns from its own start.
    pub last_ns: u64,
}

/// The index of flat element `flat` of `shape` (C order).
pub fn unflatten(mut flat: u64, shape: &[u64]) -> Vec<u64> {
    let mut idx = vec![0; shape.len().max(1)];
    for d in (0..shape.len()).rev() {
        let n = shape[d].max(1);
        idx[d] = flat % n;
        flat /= n;
    }
    if shape.is_empty() {
        idx[0] = flat;
    }
    idx
}

/// `[3, 1]`: an index as the page and the messages write it.
pub(super) fn index_text(idx: &[u64]) -> String {
    let parts: Vec<String> = idx.iter().map(u64::to_string).collect();
    format!("[{}]", parts.join(", "))
}
