//! `memwatch report`: a run at a glance, as one self-contained HTML page.
//!
//! This module owns the report: the aggregation of a trace into bounded
//! summaries ([`Aggregate`]: a timeline per tag, the lines that wrote, an
//! element heatmap per region, value trajectories of a few elements, and
//! the suspicious events), their JSON, and the page around it. The page is
//! `report/report.html` with `report/report.css` and `report/report.js`
//! put inline and the JSON embedded as a `<script type="application/json">`
//! blob that the script draws (SVG and canvas) when the page opens. It
//! loads nothing from anywhere: its Content-Security-Policy forbids it.
//!
//! Whatever the trace's size, the page stays small (a few hundred KB for
//! a 1 GB trace, under 5 MB by construction): the timeline has at most
//! [`BUCKETS`] buckets per tag, the busiest [`MAX_TIMELINE_TAGS`] tags,
//! [`MAX_LINES`] lines, [`MAX_HEATMAPS`] heatmaps of at most
//! [`HEAT_1D`] or [`HEAT_2D`]² cells, trajectories of at most
//! [`MAX_POINTS`] points and [`MAX_SUSPICIOUS`] suspicious events. What
//! was cut or binned is listed in the page's "Sampling" notes.
//!
//! Two scans at most: the first aggregates; when there are elements to
//! follow (asked with `--element TAG:INDEX`, or else the busiest element
//! of the busiest tags), a second one collects their values.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use memwatch_analyzer::{
    for_each_event, json_str, seq_bounds, ChangeRef, Event, Filter, RegionInfo, WhatRef,
};
use memwatch_format::dtype::{Dtype, FloatFormat};
use memwatch_format::{Ending, Record, TraceReader};

use crate::summary::{duration_ns, ending_text, trace_size};
use crate::text::utc;

const AFTER_HELP: &str = "\
Writes one HTML file that opens in any browser, offline (its scripts and
styles are inline; it loads nothing): the run and how it ended, each tag's
changes over time and seq, the lines that changed what (how often, how many
bytes), a heatmap of the elements of each 1-D and 2-D region (how often
each changed and by how much; more dimensions are shown as rows of the
last one), the values of a few elements over the run, and anything
suspicious (NaN or Inf written, a thread or line writing a tag it had not
written before, a crash, lost events).

The elements followed are the ones given with --element (repeatable),
else the busiest element of each of the busiest tags. A large trace is
summarized: buckets, cells and samples of bounded size, so the page stays
under a few MB; the page says what it sampled.

A run of several processes (fork, multiprocessing, subprocess, torchrun:
run.PID.mwt or run.rankR.PID.mwt beside run.mwt) is reported whole from
its first trace: its processes (pid, rank, parent, trace, how each ended),
timelines on the run's clock, each tag per process (`w (pid 4243)`: a
fork's child keeps its parent's watches under the same tags), and the
process of each line and suspicious event. --pid keeps some processes;
--element TAG:INDEX follows the element in each process with that tag.

Examples:
  memwatch report run.mwt                      # writes run.html
  memwatch report run.mwt -o report.html
  memwatch report run.mwt --element layer1_weight:0,0 --element bias:3
  memwatch report run.mwt --pid 4243           # one process of a run";

/// An element to follow through the run: `TAG:INDEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementSpec {
    pub tag: String,
    /// One number per dimension, or one flat (C-order) index.
    pub index: Vec<u64>,
}

/// Parses `--element TAG:INDEX`: the index is one number per dimension,
/// comma-separated (`w:3,1`, `w:[3, 1]`), or one flat index (`w:7`). The
/// tag is everything before the last `:`.
///
/// ```
/// use memwatch_cli::report::{parse_element, ElementSpec};
/// assert_eq!(parse_element("w:3,1"), Ok(ElementSpec { tag: "w".into(), index: vec![3, 1] }));
/// assert!(parse_element("w").unwrap_err().contains("TAG:INDEX"));
/// ```
pub fn parse_element(s: &str) -> Result<ElementSpec, String> {
    let Some((tag, index)) = s.rsplit_once(':') else {
        return Err(format!(
            "{s:?} names no element: give TAG:INDEX, like layer1_weight:0,0 (one number per \
             dimension) or bias:3"
        ));
    };
    if tag.is_empty() {
        return Err(format!(
            "{s:?} has no tag before the ':' (TAG:INDEX, like bias:3)"
        ));
    }
    let inner = index.trim().trim_start_matches('[').trim_end_matches(']');
    let index: Result<Vec<u64>, _> = inner.split(',').map(|p| p.trim().parse::<u64>()).collect();
    match index {
        Ok(index) if !index.is_empty() => Ok(ElementSpec {
            tag: tag.to_string(),
            index,
        }),
        _ => Err(format!(
            "{s:?}: the index after the ':' must be whole numbers separated by commas, like \
             {tag}:0,0 or {tag}:3"
        )),
    }
}

/// Write a self-contained HTML report of a trace.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The trace file (.mwt).
    pub trace: PathBuf,
    /// The HTML file to write (default: the trace's name with .html; `-`: stdout).
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// An element whose values to plot over the run, TAG:INDEX (repeatable).
    #[arg(long = "element", value_name = "TAG:INDEX", value_parser = parse_element)]
    pub elements: Vec<ElementSpec>,
    /// Only these processes of the run (pids; repeatable, or
    /// comma-separated). Without it, every process of the run.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
}

/// Buckets of a timeline, per tag, over time and over seq.
pub const BUCKETS: usize = 240;
/// Tags with a timeline of their own; the others are counted.
pub const MAX_TIMELINE_TAGS: usize = 40;
/// Lines listed, busiest first.
pub const MAX_LINES: usize = 500;
/// Tags with a heatmap, busiest first.
pub const MAX_HEATMAPS: usize = 16;
/// Cells of the heatmap of a 1-D region.
pub const HEAT_1D: u64 = 512;
/// Cells per side of the heatmap of a 2-D region.
pub const HEAT_2D: u64 = 96;
/// Points kept of an element's trajectory.
pub const MAX_POINTS: usize = 1500;
/// Suspicious events listed; more are counted by kind.
pub const MAX_SUSPICIOUS: usize = 200;
/// Elements followed when none is asked for.
pub const AUTO_ELEMENTS: usize = 4;
/// Elements that may be asked for.
pub const MAX_ELEMENTS: usize = 16;
/// "New line" events listed per tag.
const NEW_LINES_PER_TAG: u64 = 8;
/// Regions up to this many elements keep an exact count per element.
const EXACT_COUNTS: u64 = 1 << 16;

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
    fn used(&self) -> usize {
        self.changes.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1)
    }
}

/// A line, identified by its interned strings (shared by every change on
/// it) and its number, as in `summary`.
type LineKey = (usize, u32, usize);

fn line_key(f: &memwatch_analyzer::FrameInfo) -> LineKey {
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

    fn is_binned(&self) -> bool {
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
/// and the line (an index into [`Aggregate::wheres`]).
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
    fn new(tag: usize, flat: u64, index: Vec<u64>, asked: bool) -> Self {
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
    fn name(self) -> &'static str {
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
    /// An index into [`Aggregate::wheres`].
    pub line: Option<u32>,
    pub detail: String,
    /// The process it happened in (an index into [`Aggregate::procs`]).
    pub proc: usize,
}

/// What the report knows of one tag.
#[derive(Debug, Clone)]
pub struct TagAgg {
    pub name: Arc<str>,
    /// The process whose tag it is (an index into [`Aggregate::procs`]).
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
    new_lines: u64,
    lines: HashSet<Option<LineKey>>,
}

/// Everything the report shows, gathered from a trace in one scan (and a
/// second one for trajectories, [`Aggregate::follow`]).
#[derive(Debug, Clone)]
pub struct Aggregate {
    pub tags: Vec<TagAgg>,
    /// By process, by tag name: its index in `tags`.
    by_name: Vec<HashMap<Arc<str>, usize>>,
    /// By process, by region id: its tag's index.
    by_region: Vec<Vec<Option<usize>>>,
    /// The processes scanned, in order ([`Aggregate::begin`]); one, of
    /// pid 0, until a process is begun.
    pub procs: Vec<ProcAgg>,
    /// Tags are labelled with their process (`w (pid 4243)`).
    pub several: bool,
    begun: bool,
    /// The process being scanned, and how much later than the run it
    /// started (added to its times).
    cur: usize,
    shift: u64,
    pub lines: HashMap<(usize, Option<LineKey>), LineStats>,
    /// `file:line (function)` strings that points and events refer to.
    pub wheres: Vec<String>,
    where_ids: HashMap<Option<LineKey>, u32>,
    pub suspicious: Vec<Suspicious>,
    /// Suspicious events past [`MAX_SUSPICIOUS`] (or a tag's new lines
    /// past its share), by kind.
    pub more_suspicious: BTreeMap<&'static str, u64>,
    pub trajectories: Vec<Trajectory>,
    pub changes: u64,
    pub bytes: u64,
    pub regions: u64,
    pub checkpoints: u64,
    pub lost: u64,
    pub last_ns: u64,
    pub waited: (u64, u64),
    seq_origin: u64,
    seq_width: u64,
    time_width: u64,
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

fn non_finite(v: Option<f64>) -> bool {
    v.is_some_and(|x| !x.is_finite())
}

impl Aggregate {
    /// An empty aggregate for a trace whose seqs run over `seqs` and
    /// that lasted about `duration_ns` (0: unknown; the buckets grow).
    pub fn new(seqs: Option<(u64, u64)>, duration_ns: u64) -> Self {
        let (lo, hi) = seqs.unwrap_or((0, 0));
        Aggregate {
            tags: Vec::new(),
            by_name: vec![HashMap::new()],
            by_region: vec![Vec::new()],
            procs: vec![ProcAgg::default()],
            several: false,
            begun: false,
            cur: 0,
            shift: 0,
            lines: HashMap::new(),
            wheres: Vec::new(),
            where_ids: HashMap::new(),
            suspicious: Vec::new(),
            more_suspicious: BTreeMap::new(),
            trajectories: Vec::new(),
            changes: 0,
            bytes: 0,
            regions: 0,
            checkpoints: 0,
            lost: 0,
            last_ns: 0,
            waited: (0, 0),
            seq_origin: lo,
            seq_width: (hi - lo + 1).div_ceil(BUCKETS as u64).max(1),
            time_width: (duration_ns + 1).div_ceil(BUCKETS as u64).max(1),
        }
    }

    /// Starts the scan of the next process of the run, `pid` (with
    /// `rank`), which started `shift` ns after the run did: its tags are
    /// its own, its times are put on the run's clock.
    pub fn begin(&mut self, pid: u32, rank: Option<u32>, shift: u64) {
        if !self.begun {
            // The placeholder process of [`Aggregate::new`].
            self.begun = true;
            self.procs.clear();
            self.by_region.clear();
            self.by_name.clear();
        }
        self.procs.push(ProcAgg {
            pid,
            rank,
            ..ProcAgg::default()
        });
        self.by_region.push(Vec::new());
        self.by_name.push(HashMap::new());
        self.cur = self.procs.len() - 1;
        self.shift = shift;
    }

    /// Goes back to process `i` (for the second scan).
    fn resume(&mut self, i: usize, shift: u64) {
        self.cur = i;
        self.shift = shift;
    }

    /// A tag's name as the page shows it: with its process when the run
    /// has several (`w (pid 4243)`).
    pub fn tag_label(&self, t: usize) -> String {
        let tag = &self.tags[t];
        if !self.several {
            return tag.name.to_string();
        }
        let p = &self.procs[tag.proc];
        match p.rank {
            Some(r) => format!("{} (pid {}, rank {r})", tag.name, p.pid),
            None => format!("{} (pid {})", tag.name, p.pid),
        }
    }

    fn tag_index(&mut self, name: &str, region: Option<&RegionInfo>) -> usize {
        let cur = self.cur;
        if let Some(r) = region {
            if let Some(Some(i)) = self.by_region[cur].get(r.region as usize) {
                return *i;
            }
        }
        let i = match self.by_name[cur].get(name) {
            Some(i) => *i,
            None => {
                let name: Arc<str> = Arc::from(name);
                self.by_name[cur].insert(name.clone(), self.tags.len());
                self.tags.push(TagAgg {
                    name,
                    proc: cur,
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
                    time: Buckets::new(0, self.time_width),
                    seq: Buckets::new(self.seq_origin, self.seq_width),
                    heat: None,
                    new_lines: 0,
                    lines: HashSet::new(),
                });
                self.tags.len() - 1
            }
        };
        if let Some(r) = region {
            let t = &mut self.tags[i];
            if t.heat.is_none() {
                t.dtype = r.dtype.clone();
                t.shape = memwatch_analyzer::shape_of(r);
                t.heat = Some(Heat::new(&r.shape, r.len / u64::from(r.itemsize.max(1))));
            }
            if t.variable.is_none() {
                t.variable = r.variable.clone();
            }
            let k = r.region as usize;
            let by_region = &mut self.by_region[cur];
            if k < 1 << 20 {
                if by_region.len() <= k {
                    by_region.resize(k + 1, None);
                }
                by_region[k] = Some(i);
            }
        }
        i
    }

    fn where_id(&mut self, f: Option<&memwatch_analyzer::FrameInfo>) -> u32 {
        let key = f.map(line_key);
        if let Some(id) = self.where_ids.get(&key) {
            return *id;
        }
        let text = match f {
            // The file without its folder: the page has little room (the
            // lines table keeps whole paths).
            Some(f) => format!(
                "{} ({})",
                memwatch_format::location(f.file.rsplit('/').next().unwrap_or(&f.file), f.line),
                f.function
            ),
            None => "?".to_string(),
        };
        let id = self.wheres.len() as u32;
        self.wheres.push(text);
        self.where_ids.insert(key, id);
        id
    }

    fn suspect(&mut self, mut s: Suspicious) {
        s.proc = self.cur;
        if self.suspicious.len() >= MAX_SUSPICIOUS {
            *self.more_suspicious.entry(s.kind).or_default() += 1;
        } else {
            self.suspicious.push(s);
        }
    }

    /// Counts a record that is not a change.
    pub fn record(&mut self, rec: &Record<'_>) {
        match rec {
            Record::Checkpoint(_) => self.checkpoints += 1,
            Record::RegionWatched(r) => {
                self.regions += 1;
                self.procs[self.cur].regions += 1;
                self.saw(r.ctx.time_ns);
            }
            Record::RegionUnwatched(u) => self.saw(u.ctx.time_ns),
            Record::Lost(l) if l.events > 0 => {
                self.lost += l.events;
                self.suspect(Suspicious {
                    severity: Severity::Error,
                    kind: "lost",
                    tag: None,
                    seq: Some(l.after_seq),
                    time_ns: None,
                    line: None,
                    detail: format!(
                        "{} {} not recorded after seq {}: {}",
                        l.events,
                        if l.events == 1 { "event was" } else { "events were" },
                        l.after_seq,
                        l.reason
                    ),
                    proc: self.cur,
                });
            }
            _ => {}
        }
    }

    /// An event at `time_ns` of the current process's clock.
    fn saw(&mut self, time_ns: u64) {
        let p = &mut self.procs[self.cur];
        p.last_ns = p.last_ns.max(time_ns);
        self.last_ns = self.last_ns.max(time_ns + self.shift);
    }

    /// Counts one change.
    pub fn change(&mut self, row: &ChangeRef<'_>) {
        let bytes = row.bytes_changed();
        self.changes += 1;
        self.bytes += bytes;
        self.saw(row.time_ns);
        self.procs[self.cur].changes += 1;
        self.procs[self.cur].bytes += bytes;
        // On the run's clock.
        let time_ns = row.time_ns + self.shift;
        let ti = self.tag_index(row.tag, row.region);
        let where_id = self.where_id(row.frame);
        let lk = row.frame.map(line_key);
        let thread_text = || {
            row.thread_name
                .map(String::from)
                .unwrap_or_else(|| format!("thread {}", row.thread))
        };
        // A thread or line new to this tag.
        let t = &mut self.tags[ti];
        let before = t.changes;
        let new_thread = !t.threads.contains_key(&row.thread);
        let new_line = t.lines.insert(lk);
        let mut events = Vec::new();
        if new_thread && (before > 0 || row.thread_name.is_some_and(|n| n != "MainThread")) {
            events.push(Suspicious {
                severity: Severity::Warning,
                kind: "new_thread",
                tag: Some(ti),
                seq: Some(row.seq),
                time_ns: Some(time_ns),
                line: Some(where_id),
                detail: if before > 0 {
                    format!(
                        "first write from thread {} after {before} change{} from other threads",
                        thread_text(),
                        if before == 1 { "" } else { "s" }
                    )
                } else {
                    format!("written by thread {}, not the main thread", thread_text())
                },
                proc: 0,
            });
        }
        if new_line && before > 0 {
            t.new_lines += 1;
            if t.new_lines > NEW_LINES_PER_TAG {
                *self.more_suspicious.entry("new_line").or_default() += 1;
            } else {
                events.push(Suspicious {
                    severity: Severity::Info,
                    kind: "new_line",
                    tag: Some(ti),
                    seq: Some(row.seq),
                    time_ns: Some(time_ns),
                    line: Some(where_id),
                    detail: format!(
                        "first write from this line, after {before} change{} from other lines",
                        if before == 1 { "" } else { "s" }
                    ),
                    proc: 0,
                });
            }
        }
        if t.changes == 0 {
            t.first = (row.seq, time_ns);
        }
        t.changes += 1;
        t.last = (row.seq, time_ns);
        t.bytes += bytes;
        t.time.add(time_ns, bytes);
        t.seq.add(row.seq, bytes);
        let th = t.threads.entry(row.thread).or_insert((None, 0));
        th.1 += 1;
        if th.0.as_deref() != row.thread_name {
            th.0 = row.thread_name.map(Arc::from);
        }
        let mut elements = 0;
        let mut first_nonfinite = None;
        if let (WhatRef::Bytes { ranges, .. }, Some(region)) = (&row.what, row.region) {
            let dtype = region.dtype.as_deref().and_then(Dtype::parse);
            let typed = region.dtype.is_some();
            let size = if typed { region.itemsize.max(1) as usize } else { 1 };
            let same_shape = !typed || memwatch_analyzer::shape_of(region) == t.shape;
            // Plain bytes are counted as bytes, their values 0 to 255.
            let value = |b: &[u8]| match (typed, dtype) {
                (true, Some(d)) => d.decode(b).and_then(|v| v.as_f64()),
                (true, None) => None,
                (false, _) => Some(f64::from(b[0])),
            };
            for r in ranges.iter() {
                for (k, (a, b)) in r.old.chunks_exact(size).zip(r.new.chunks_exact(size)).enumerate() {
                    if a == b {
                        continue;
                    }
                    elements += 1;
                    let (old, new) = (value(a), value(b));
                    let at = r.offset + (k * size) as u64;
                    let flat = if typed { flat_index(region, at) } else { Some(at) };
                    if !non_finite(old) && non_finite(new) {
                        t.nonfinite += 1;
                        if first_nonfinite.is_none() {
                            first_nonfinite = Some((flat, old, new, b.to_vec()));
                        }
                    }
                    let delta = match (old, new) {
                        (Some(o), Some(n)) if (n - o).is_finite() => Some((n - o).abs()),
                        _ => None,
                    };
                    if let Some(heat) = t.heat.as_mut() {
                        match flat {
                            Some(f) if same_shape => heat.add(f, delta),
                            _ => heat.unplaced += 1,
                        }
                    }
                }
            }
            t.elements += elements;
        } else {
            t.object_changes += 1;
        }
        let shape = t.shape.clone();
        let dtype = t.dtype.clone();
        let line = self.lines.entry((ti, lk)).or_insert_with(|| LineStats {
            tag: ti,
            frame: row.frame.cloned(),
            changes: 0,
            bytes: 0,
            elements: 0,
            first_seq: row.seq,
            last_seq: row.seq,
            threads: Vec::new(),
        });
        line.changes += 1;
        line.bytes += bytes;
        line.elements += elements;
        line.last_seq = row.seq;
        if line.threads.len() < 4 {
            let name = thread_text();
            if !line.threads.contains(&name) {
                line.threads.push(name);
            }
        }
        if let Some((flat, old, new, raw)) = first_nonfinite {
            let idx = flat
                .map(|f| index_text(&unflatten(f, &shape)))
                .unwrap_or_default();
            let show = |v: Option<f64>| v.map_or("?".into(), crate::text::fmt_float);
            let new_text = dtype
                .as_deref()
                .and_then(|d| crate::text::element(d, &raw))
                .unwrap_or_else(|| show(new));
            let n = self.tags[ti].nonfinite;
            events.push(Suspicious {
                severity: Severity::Error,
                kind: "nonfinite",
                tag: Some(ti),
                seq: Some(row.seq),
                time_ns: Some(time_ns),
                line: Some(where_id),
                detail: format!(
                    "{} written: element {idx} {} -> {new_text} ({n} element{} of this tag so far)",
                    if new.is_some_and(f64::is_nan) {
                        "NaN"
                    } else {
                        "Inf"
                    },
                    show(old),
                    if n == 1 { "" } else { "s" }
                ),
                proc: 0,
            });
        }
        for e in events {
            self.suspect(e);
        }
    }

    /// Follows `elements` in a later scan: (tag index, flat index, index
    /// as given or unflattened, asked).
    pub fn follow(&mut self, elements: Vec<(usize, u64, Vec<u64>, bool)>) {
        self.trajectories = elements
            .into_iter()
            .map(|(t, f, i, asked)| Trajectory::new(t, f, i, asked))
            .collect();
    }

    /// Counts only the trajectories' elements (the second scan).
    pub fn change_followed(&mut self, row: &ChangeRef<'_>) {
        let Some(region) = row.region else {
            return;
        };
        let Some(ti) = self.by_region[self.cur]
            .get(region.region as usize)
            .copied()
            .flatten()
            .or_else(|| self.by_name[self.cur].get(row.tag).copied())
        else {
            return;
        };
        if !self.trajectories.iter().any(|t| t.tag == ti) {
            return;
        }
        let WhatRef::Bytes { ranges, .. } = &row.what else {
            return;
        };
        if memwatch_analyzer::shape_of(region) != self.tags[ti].shape {
            return;
        }
        let Some(dtype) = region.dtype.as_deref().and_then(Dtype::parse) else {
            return;
        };
        let size = u64::from(region.itemsize.max(1));
        let where_id = self.where_id(row.frame);
        for k in 0..self.trajectories.len() {
            if self.trajectories[k].tag != ti {
                continue;
            }
            let Ok((start, _)) = memwatch_analyzer::element_bytes(region, &self.trajectories[k].index) else {
                continue;
            };
            for r in ranges.iter() {
                let end = r.offset + r.old.len() as u64;
                if start < r.offset || start + size > end {
                    continue;
                }
                let o = (start - r.offset) as usize;
                let (a, b) = (&r.old[o..o + size as usize], &r.new[o..o + size as usize]);
                if a == b {
                    continue;
                }
                let v = |x: &[u8]| dtype.decode(x).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
                self.trajectories[k].push(
                    v(a),
                    Point {
                        seq: row.seq,
                        time_ns: row.time_ns + self.shift,
                        value: v(b),
                        line: where_id,
                    },
                );
            }
        }
    }

    /// Shares one bucket width between the tags' timelines.
    pub fn finish(&mut self) {
        let tw = self.tags.iter().map(|t| t.time.width).max().unwrap_or(1);
        let sw = self.tags.iter().map(|t| t.seq.width).max().unwrap_or(1);
        for t in &mut self.tags {
            t.time.coarsen_to(tw);
            t.seq.coarsen_to(sw);
        }
    }

    /// Tags by changes, most first (then by name).
    pub fn busiest_tags(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.tags.len()).collect();
        v.sort_by(|&a, &b| {
            let (a, b) = (&self.tags[a], &self.tags[b]);
            b.changes.cmp(&a.changes).then_with(|| a.name.cmp(&b.name))
        });
        v
    }

    /// Lines by changes, most first.
    pub fn busiest_lines(&self) -> Vec<&LineStats> {
        let mut v: Vec<&LineStats> = self.lines.values().collect();
        let at = |l: &LineStats| l.frame.as_ref().map(|f| (f.file.clone(), f.line));
        v.sort_by(|a, b| {
            b.changes
                .cmp(&a.changes)
                .then_with(|| at(a).cmp(&at(b)))
                .then(a.tag.cmp(&b.tag))
        });
        v
    }

    /// The elements to follow when none is asked for: the busiest element
    /// of each of the [`AUTO_ELEMENTS`] busiest tags with numbers.
    pub fn auto_elements(&self) -> Vec<(usize, u64, Vec<u64>, bool)> {
        self.busiest_tags()
            .into_iter()
            .filter(|&t| self.tags[t].dtype.as_deref().and_then(Dtype::parse).is_some())
            .filter_map(|t| {
                let flat = self.tags[t].heat.as_ref()?.busiest()?;
                Some((t, flat, unflatten(flat, &self.tags[t].shape), false))
            })
            .take(AUTO_ELEMENTS)
            .collect()
    }
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

fn index_text(idx: &[u64]) -> String {
    let parts: Vec<String> = idx.iter().map(u64::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// A number as JSON: finite ones shortest, the others as strings (`"nan"`,
/// `"inf"`, `"-inf"`), which the page shows as such.
fn num(x: f64, f32_values: bool) -> String {
    if x.is_nan() {
        "\"nan\"".into()
    } else if x.is_infinite() {
        if x > 0.0 { "\"inf\"" } else { "\"-inf\"" }.into()
    } else if f32_values {
        format!("{}", x as f32)
    } else {
        format!("{x}")
    }
}

/// A mean as JSON, to 4 significant digits (the page shows no more).
fn short(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        "0".into()
    } else {
        let s = format!("{x:.3e}");
        // `1.000e0` -> `1e0`: JSON reads either; shorter is smaller.
        match s.split_once('e') {
            Some((m, e)) => {
                let m = m.trim_end_matches('0').trim_end_matches('.');
                format!("{m}e{e}")
            }
            None => s,
        }
    }
}

fn join<T>(v: impl IntoIterator<Item = T>, f: impl Fn(T) -> String) -> String {
    let parts: Vec<String> = v.into_iter().map(f).collect();
    parts.join(",")
}

/// The facts of the run that the report's header shows.
struct RunFacts {
    ending_how: &'static str,
    ending_text: String,
    ending_bad: bool,
    duration_ns: u64,
    trace_bytes: u64,
    chunks: usize,
    /// For a run: its processes' JSON objects (the first
    /// [`MAX_PROCESSES`]) and how many it has.
    processes: Option<(Vec<String>, usize)>,
}

/// The report's data, as JSON (the page's `<script id="data">`).
fn data_json(reader: &TraceReader, agg: &Aggregate, facts: &RunFacts, asked: usize) -> String {
    let meta = &reader.header().meta;
    let mut sampled: Vec<String> = Vec::new();
    let mut j = String::with_capacity(1 << 16);
    let _ = write!(
        j,
        "{{\"version\":{},\"run\":{{\"trace\":{},\"argv\":[{}],\"pid\":{},\"python_version\":{},\
         \"platform\":{},\"writer\":{},\"format_version\":{},\"properties\":[{}],\"start_utc\":{},\
         \"duration_ns\":{},\"trace_bytes\":{},\"chunks\":{},\"changes\":{},\"bytes_changed\":{},\
         \"regions_watched\":{},\"checkpoints\":{},\"lost\":{},\"waited_ns\":{},\"waits\":{},\
         \"ending\":{{\"how\":{},\"message\":{},\"bad\":{}}},\"note\":{}{}}},",
        json_str(env!("CARGO_PKG_VERSION")),
        json_str(&reader.path().display().to_string()),
        join(&meta.argv, |a| json_str(a)),
        meta.pid,
        json_str(&meta.python_version),
        json_str(&meta.platform),
        json_str(&meta.writer),
        reader.header().version,
        join(&meta.properties, |(k, v)| format!(
            "[{},{}]",
            json_str(k),
            json_str(v)
        )),
        json_str(&utc(meta.start_time_ns)),
        facts.duration_ns,
        facts.trace_bytes,
        facts.chunks,
        agg.changes,
        agg.bytes,
        agg.regions,
        agg.checkpoints,
        agg.lost,
        agg.waited.0,
        agg.waited.1,
        json_str(facts.ending_how),
        json_str(&facts.ending_text),
        facts.ending_bad,
        reader.tail_message().map_or("null".into(), |m| json_str(&m)),
        match &facts.processes {
            Some((listed, total)) => format!(
                ",\"processes\":[{}],\"processes_total\":{total}",
                listed.join(",")
            ),
            None => String::new(),
        },
    );
    if let Some((listed, total)) = &facts.processes {
        if listed.len() < *total {
            sampled.push(format!(
                "Processes: the first {} of the run's {total} are listed (all are in the counts).",
                listed.len()
            ));
        }
    }
    // A tag's process, for a run: `"pid":4243,"rank":null,` first in its object.
    let process_of = |proc: usize| {
        if agg.several {
            let p = &agg.procs[proc];
            format!(
                "\"pid\":{},\"rank\":{},",
                p.pid,
                p.rank.map_or("null".into(), |r| r.to_string())
            )
        } else {
            String::new()
        }
    };
    // Tags, in name order (the other sections refer to them by index).
    let _ = write!(
        j,
        "\"tags\":[{}],",
        join(agg.tags.iter().enumerate(), |(i, t)| {
            let mut threads: Vec<(String, u64)> = t
                .threads
                .iter()
                .map(|(id, (n, c))| {
                    (
                        n.as_deref().map_or_else(|| format!("thread {id}"), String::from),
                        *c,
                    )
                })
                .collect();
            threads.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            threads.truncate(8);
            let process = if agg.several {
                format!("{}\"label\":{},", process_of(t.proc), json_str(&agg.tag_label(i)))
            } else {
                String::new()
            };
            format!(
                "{{{process}\"name\":{},\"variable\":{},\"dtype\":{},\"shape\":[{}],\"changes\":{},\"bytes\":{},\
                 \"elements\":{},\"object_changes\":{},\"first_seq\":{},\"first_ns\":{},\"last_seq\":{},\
                 \"last_ns\":{},\"nonfinite\":{},\"threads\":[{}]}}",
                json_str(&t.name),
                t.variable.as_deref().map_or("null".into(), json_str),
                t.dtype.as_deref().map_or("null".into(), json_str),
                join(&t.shape, |n| n.to_string()),
                t.changes,
                t.bytes,
                t.elements,
                t.object_changes,
                t.first.0,
                t.first.1,
                t.last.0,
                t.last.1,
                t.nonfinite,
                join(threads, |(n, c)| format!("[{},{c}]", json_str(&n))),
            )
        })
    );
    // Timeline: the busiest tags, each bucket list cut after its last use.
    let busiest = agg.busiest_tags();
    let shown: Vec<usize> = busiest.iter().copied().take(MAX_TIMELINE_TAGS).collect();
    let used_time = shown.iter().map(|&t| agg.tags[t].time.used()).max().unwrap_or(0);
    let used_seq = shown.iter().map(|&t| agg.tags[t].seq.used()).max().unwrap_or(0);
    let (tw, sw, so) = agg
        .tags
        .first()
        .map_or((1, 1, 0), |t| (t.time.width, t.seq.width, t.seq.origin));
    if busiest.len() > shown.len() {
        sampled.push(format!(
            "Timeline: the {} busiest of {} tags are drawn.",
            shown.len(),
            busiest.len()
        ));
    }
    if agg.changes as usize > BUCKETS {
        sampled.push(format!(
            "Timeline: changes are counted in buckets of {} and of {} seq{}.",
            memwatch_analyzer::duration_text(tw),
            sw,
            if sw == 1 { "" } else { "s" }
        ));
    }
    let _ = write!(
        j,
        "\"timeline\":{{\"time_width\":{tw},\"seq_origin\":{so},\"seq_width\":{sw},\"tags\":[{}],\"hidden\":{}}},",
        join(&shown, |&t| {
            let tg = &agg.tags[t];
            format!(
                "{{\"tag\":{t},\"time_changes\":[{}],\"time_bytes\":[{}],\"seq_changes\":[{}],\"seq_bytes\":[{}]}}",
                join(&tg.time.changes[..used_time], |n| n.to_string()),
                join(&tg.time.bytes[..used_time], |n| n.to_string()),
                join(&tg.seq.changes[..used_seq], |n| n.to_string()),
                join(&tg.seq.bytes[..used_seq], |n| n.to_string()),
            )
        }),
        busiest.len() - shown.len(),
    );
    // Lines.
    let lines = agg.busiest_lines();
    if lines.len() > MAX_LINES {
        sampled.push(format!(
            "Lines: the {MAX_LINES} busiest of {} (tag, line) pairs are listed.",
            lines.len()
        ));
    }
    let _ = write!(
        j,
        "\"lines\":[{}],\"lines_total\":{},",
        join(lines.iter().take(MAX_LINES), |l| {
            let (file, line, function) = match &l.frame {
                Some(f) => (json_str(&f.file), f.line.to_string(), json_str(&f.function)),
                None => ("null".into(), "null".into(), "null".into()),
            };
            format!(
                "{{{}\"tag\":{},\"file\":{file},\"line\":{line},\"function\":{function},\"changes\":{},\
                 \"bytes\":{},\"elements\":{},\"first_seq\":{},\"last_seq\":{},\"threads\":[{}]}}",
                process_of(agg.tags[l.tag].proc),
                l.tag,
                l.changes,
                l.bytes,
                l.elements,
                l.first_seq,
                l.last_seq,
                join(&l.threads, |t| json_str(t)),
            )
        }),
        lines.len(),
    );
    // Heatmaps: the busiest tags (by elements) with a region.
    let mut heat_tags: Vec<usize> = (0..agg.tags.len())
        .filter(|&t| {
            agg.tags[t]
                .heat
                .as_ref()
                .is_some_and(|h| h.counts.iter().any(|&c| c > 0))
        })
        .collect();
    heat_tags.sort_by(|&a, &b| agg.tags[b].elements.cmp(&agg.tags[a].elements).then(a.cmp(&b)));
    if heat_tags.len() > MAX_HEATMAPS {
        sampled.push(format!(
            "Heatmaps: the {MAX_HEATMAPS} tags with the most element changes of {} are drawn.",
            heat_tags.len()
        ));
        heat_tags.truncate(MAX_HEATMAPS);
    }
    for &t in &heat_tags {
        let h = agg.tags[t].heat.as_ref().expect("filtered");
        if h.is_binned() {
            sampled.push(format!(
                "Heatmap of {}: {} × {} elements are binned into cells of {} × {}.",
                agg.tag_label(t),
                h.rows,
                h.cols,
                h.cell_rows,
                h.cell_cols
            ));
        }
    }
    let _ = write!(
        j,
        "\"heatmaps\":[{}],",
        join(&heat_tags, |&t| {
            let h = agg.tags[t].heat.as_ref().expect("filtered");
            format!(
                "{{\"tag\":{t},\"shape\":[{}],\"rows\":{},\"cols\":{},\"cell_rows\":{},\"cell_cols\":{},\
                 \"grid_rows\":{},\"grid_cols\":{},\"counts\":[{}],\"delta\":[{}],\"unplaced\":{}}}",
                join(&h.shape, |n| n.to_string()),
                h.rows,
                h.cols,
                h.cell_rows,
                h.cell_cols,
                h.grid_rows,
                h.grid_cols,
                join(&h.counts, |n| n.to_string()),
                join(h.delta_sum.iter().zip(&h.delta_n), |(s, n)| if *n == 0 {
                    "0".into()
                } else {
                    short(s / *n as f64)
                }),
                h.unplaced,
            )
        })
    );
    // Only the lines that points and events name go into the page.
    let mut wheres: Vec<&str> = Vec::new();
    let mut where_of: HashMap<u32, u32> = HashMap::new();
    let lines_named = agg.suspicious.iter().filter_map(|s| s.line).chain(
        agg.trajectories
            .iter()
            .flat_map(|t| t.finished_points().into_iter().map(|p| p.line)),
    );
    for id in lines_named {
        where_of.entry(id).or_insert_with(|| {
            wheres.push(&agg.wheres[id as usize]);
            wheres.len() as u32 - 1
        });
    }
    // Trajectories.
    for tr in &agg.trajectories {
        if tr.every > 1 {
            sampled.push(format!(
                "Values of {}: every {}th of its {} changes is drawn (and the last).",
                element_label(agg, tr),
                tr.every,
                tr.changes
            ));
        }
    }
    let _ = write!(
        j,
        "\"trajectories\":[{}],\"asked_elements\":{asked},",
        join(&agg.trajectories, |tr| {
            let t = &agg.tags[tr.tag];
            let f32v =
                t.dtype.as_deref().and_then(Dtype::parse).is_some_and(|d| {
                    d.float_format() != Some(FloatFormat::F64) && d.float_format().is_some()
                });
            format!(
                "{{\"tag\":{},\"index\":[{}],\"label\":{},\"asked\":{},\"changes\":{},\"every\":{},\
                 \"initial\":{},\"points\":[{}]}}",
                tr.tag,
                join(&tr.index, |n| n.to_string()),
                json_str(&element_label(agg, tr)),
                tr.asked,
                tr.changes,
                tr.every,
                tr.initial.map_or("null".into(), |v| num(v, f32v)),
                join(tr.finished_points(), |p| format!(
                    "[{},{},{},{}]",
                    p.seq,
                    p.time_ns,
                    num(p.value, f32v),
                    where_of.get(&p.line).copied().unwrap_or(0)
                )),
            )
        })
    );
    let mut suspicious = agg.suspicious.clone();
    suspicious.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.seq.cmp(&b.seq)));
    let more: u64 = agg.more_suspicious.values().sum();
    if more > 0 {
        sampled.push(format!(
            "Suspicious events: {} listed, {more} more counted ({}).",
            suspicious.len(),
            join(&agg.more_suspicious, |(k, n)| format!("{k} {n}")).replace(',', ", ")
        ));
    }
    let opt = |v: Option<u64>| v.map_or("null".into(), |n| n.to_string());
    let _ = write!(
        j,
        "\"suspicious\":[{}],\"more_suspicious\":{{{}}},\"wheres\":[{}],\"sampled\":[{}]}}",
        join(&suspicious, |s| {
            format!(
            "{{{}\"severity\":\"{}\",\"kind\":\"{}\",\"tag\":{},\"seq\":{},\"ns\":{},\"where\":{},\"detail\":{}}}",
            if agg.several { process_of(s.proc) } else { String::new() },
            s.severity.name(),
            s.kind,
            s.tag.map_or("null".into(), |t| t.to_string()),
            opt(s.seq),
            opt(s.time_ns),
            s.line.and_then(|l| where_of.get(&l)).map_or("null".into(), |l| l.to_string()),
            json_str(&s.detail),
        )
        }),
        join(&agg.more_suspicious, |(k, n)| format!("\"{k}\":{n}")),
        join(&wheres, |w| json_str(w)),
        join(&sampled, |s| json_str(s)),
    );
    // Inside a <script>, `</script` or `<!--` would end or confuse it: `<`
    // only occurs in strings, where `\u003c` is the same character.
    j.replace('<', "\\u003c")
}

/// `w[3]`, or `w[3] (pid 4243)` in a run.
fn element_label(agg: &Aggregate, tr: &Trajectory) -> String {
    let t = &agg.tags[tr.tag];
    let label = format!("{}{}", t.name, index_text(&tr.index));
    if agg.several {
        let p = &agg.procs[t.proc];
        format!("{label} (pid {})", p.pid)
    } else {
        label
    }
}

const TEMPLATE: &str = include_str!("report/report.html");
const CSS: &str = include_str!("report/report.css");
const JS: &str = include_str!("report/report.js");

/// The whole page for `data` (the JSON of [`data_json`]).
fn page(title: &str, data: &str) -> String {
    let title = title
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    TEMPLATE
        .replacen("{{TITLE}}", &title, 1)
        .replacen("/*{{CSS}}*/", CSS, 1)
        .replacen("/*{{JS}}*/", JS, 1)
        .replacen("{{DATA}}", data, 1)
}

/// A progress bar for a scan of `what`, drawn only when stderr is a
/// terminal.
fn progress_bar(what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    let style =
        indicatif::ProgressStyle::with_template("memwatch: {msg} [{bar:30}] {pos}/{len} chunks ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// Processes listed in the report of a run; more are counted.
pub const MAX_PROCESSES: usize = 256;

/// One trace of a run to aggregate: its process, and how much later than
/// the run's start it started (ns).
pub struct Source<'a> {
    pub reader: &'a TraceReader,
    pub pid: u32,
    pub rank: Option<u32>,
    pub shift: u64,
}

/// Scans `reader` into an [`Aggregate`]: every change, then (when there
/// are any) the followed elements' values. `elements` are checked
/// against the trace's tags and shapes.
pub fn aggregate(reader: &TraceReader, elements: &[ElementSpec]) -> Result<Aggregate> {
    let source = Source {
        reader,
        pid: reader.header().meta.pid,
        rank: None,
        shift: 0,
    };
    aggregate_run(&[source], false, elements)
}

/// [`aggregate`] of the traces of a run, one after the other, each
/// process's tags its own and its times on the run's clock; `several`
/// labels the tags with their process.
pub fn aggregate_run(sources: &[Source<'_>], several: bool, elements: &[ElementSpec]) -> Result<Aggregate> {
    if elements.len() > MAX_ELEMENTS {
        bail!(
            "{} --element options given; at most {MAX_ELEMENTS} are drawn: leave some out",
            elements.len()
        );
    }
    let known_ns = sources
        .iter()
        .map(|s| match s.reader.ending() {
            Ending::Closed { end_time_ns } => s.shift + end_time_ns,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    let seqs = sources
        .iter()
        .filter_map(|s| seq_bounds(s.reader))
        .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)));
    let mut agg = Aggregate::new(seqs, known_ns);
    agg.several = several;
    for s in sources {
        agg.begin(s.pid, s.rank, s.shift);
        let bar = progress_bar(&if several {
            format!("reading changes of pid {}", s.pid)
        } else {
            "reading changes".to_string()
        });
        let mut progress = |done: usize, total: usize| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        };
        let syms = for_each_event(s.reader, &Filter::default(), &mut progress, |e| {
            match e {
                Event::Change(row) => agg.change(row),
                Event::Record(rec, _) => agg.record(rec),
            }
            ControlFlow::Continue(())
        })?;
        bar.finish_and_clear();
        agg.waited.0 += syms.waited.0;
        agg.waited.1 += syms.waited.1;
    }
    agg.finish();
    let follow = if elements.is_empty() {
        agg.auto_elements()
    } else {
        let mut v = Vec::new();
        for e in elements {
            v.extend(resolve(&agg, e)?);
        }
        if v.len() > MAX_ELEMENTS {
            bail!(
                "the --element options name {} elements in all (a tag in several processes is followed \
                 in each); at most {MAX_ELEMENTS} are drawn: leave some out or keep fewer processes with --pid",
                v.len()
            );
        }
        v
    };
    if follow.is_empty() {
        return Ok(agg);
    }
    agg.follow(follow);
    for (i, s) in sources.iter().enumerate() {
        let mine = agg
            .trajectories
            .iter()
            .map(|t| t.tag)
            .filter(|&t| agg.tags[t].proc == i);
        let Some((lo, hi)) = mine
            .map(|t| (agg.tags[t].first.0, agg.tags[t].last.0))
            .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))
        else {
            continue;
        };
        agg.resume(i, s.shift);
        let filter = Filter {
            seq: Some((lo, hi)),
            ..Filter::default()
        };
        let bar = progress_bar("following elements");
        let mut progress = |done: usize, total: usize| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        };
        for_each_event(s.reader, &filter, &mut progress, |e| {
            if let Event::Change(row) = e {
                agg.change_followed(row);
            }
            ControlFlow::Continue(())
        })?;
        bar.finish_and_clear();
    }
    Ok(agg)
}

/// An element to follow: (tag, flat index, index, asked).
type Followed = (usize, u64, Vec<u64>, bool);

/// An asked element in each process with that tag, or why it is not one.
fn resolve(agg: &Aggregate, e: &ElementSpec) -> Result<Vec<Followed>> {
    let found: Vec<usize> = agg
        .by_name
        .iter()
        .filter_map(|m| m.get(e.tag.as_str()).copied())
        .collect();
    if found.is_empty() {
        let mut known: Vec<&str> = agg.tags.iter().map(|t| &*t.name).collect();
        known.sort_unstable();
        known.dedup();
        bail!(
            "--element {}:{}: the trace has no changes to a tag {:?}; its tags are: {}",
            e.tag,
            join(&e.index, |n| n.to_string()),
            e.tag,
            if known.is_empty() {
                "(none)".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    found.into_iter().map(|t| resolve_in(agg, t, e)).collect()
}

/// [`resolve`] in tag `t`.
fn resolve_in(agg: &Aggregate, t: usize, e: &ElementSpec) -> Result<Followed> {
    let tag = &agg.tags[t];
    if tag.dtype.as_deref().and_then(Dtype::parse).is_none() {
        bail!(
            "--element {}: {:?} has no numeric dtype ({}), so its elements have no values to plot; \
             pick a tag of an array",
            e.tag,
            e.tag,
            if tag.heat.is_none() {
                "it is a Python object"
            } else {
                "it is plain bytes"
            }
        );
    }
    let shape = &tag.shape;
    let total = shape.iter().fold(1u64, |a, n| a.saturating_mul(*n));
    let flat = if e.index.len() == 1 && shape.len() != 1 {
        e.index[0]
    } else if e.index.len() == shape.len() && e.index.iter().zip(shape).all(|(i, n)| i < n) {
        e.index.iter().zip(shape).fold(0u64, |a, (i, n)| a * n + i)
    } else {
        bail!(
            "--element {}:{}: {:?} has shape {}; give one index per dimension, each below its size \
             (like {}:{}), or one flat index below {total}",
            e.tag,
            join(&e.index, |n| n.to_string()),
            e.tag,
            index_text(shape).replace('[', "(").replace(']', ")"),
            e.tag,
            join(shape, |_| "0".to_string()),
        );
    };
    if flat >= total {
        bail!(
            "--element {}:{flat}: {:?} has {total} elements (shape {}); a flat index must be below {total}",
            e.tag,
            e.tag,
            index_text(shape).replace('[', "(").replace(']', ")"),
        );
    }
    Ok((t, flat, unflatten(flat, shape), true))
}

/// Builds the report of `reader` as a whole HTML page.
pub fn render(reader: &TraceReader, elements: &[ElementSpec]) -> Result<String> {
    let agg = aggregate(reader, elements)?;
    let ending = reader.ending();
    let facts = RunFacts {
        ending_how: ending.name(),
        ending_text: ending_text(reader, &ending),
        ending_bad: !matches!(ending, Ending::Closed { .. }),
        duration_ns: duration_ns(&ending, agg.last_ns),
        trace_bytes: trace_size(reader),
        chunks: reader.chunks().len(),
        processes: None,
    };
    Ok(page_of(reader, &agg, &facts, elements.len()))
}

fn page_of(reader: &TraceReader, agg: &Aggregate, facts: &RunFacts, asked: usize) -> String {
    let meta = &reader.header().meta;
    let program = if meta.argv.is_empty() {
        reader.path().display().to_string()
    } else {
        meta.argv.join(" ")
    };
    let data = data_json(reader, agg, facts, asked);
    page(&format!("memwatch report: {program}"), &data)
}

/// Builds the report of the processes `procs` of a run (all of them, or
/// those `--pid` kept) as a whole HTML page; the first one's trace names
/// the run.
pub fn render_run(procs: &[crate::run::Proc], elements: &[ElementSpec]) -> Result<String> {
    let base = crate::run::base_ns(procs);
    let sources: Vec<Source<'_>> = procs
        .iter()
        .map(|p| Source {
            reader: &p.reader,
            pid: p.pid,
            rank: p.rank,
            shift: p.shift_ns(base),
        })
        .collect();
    let agg = aggregate_run(&sources, true, elements)?;
    let first = &procs[0].reader;
    let ending = first.ending();
    let mut listed = Vec::new();
    let mut duration = 0;
    let opt = |v: Option<u32>| v.map_or("null".into(), |n| n.to_string());
    for (i, p) in procs.iter().enumerate() {
        let e = p.reader.ending();
        let shift = p.shift_ns(base);
        let dur = duration_ns(&e, agg.procs[i].last_ns);
        duration = duration.max(shift + dur);
        if listed.len() >= MAX_PROCESSES {
            continue;
        }
        let a = &agg.procs[i];
        let path = p.reader.path();
        let file = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        listed.push(format!(
            "{{\"pid\":{},\"rank\":{},\"parent\":{},\"trace\":{},\"argv\":[{}],\"start_ns\":{shift},\
             \"duration_ns\":{dur},\"trace_bytes\":{},\"changes\":{},\"bytes_changed\":{},\
             \"regions_watched\":{},\"ending\":{{\"how\":{},\"message\":{},\"bad\":{}}}}}",
            p.pid,
            opt(p.rank),
            opt(p.parent),
            json_str(&file),
            join(&p.reader.header().meta.argv, |a| json_str(a)),
            trace_size(&p.reader),
            a.changes,
            a.bytes,
            a.regions,
            json_str(e.name()),
            json_str(&ending_text(&p.reader, &e)),
            !matches!(e, Ending::Closed { .. }),
        ));
    }
    let facts = RunFacts {
        ending_how: ending.name(),
        ending_text: ending_text(first, &ending),
        ending_bad: !matches!(ending, Ending::Closed { .. }),
        duration_ns: duration,
        trace_bytes: procs.iter().map(|p| trace_size(&p.reader)).sum(),
        chunks: procs.iter().map(|p| p.reader.chunks().len()).sum(),
        processes: Some((listed, procs.len())),
    };
    Ok(page_of(first, &agg, &facts, elements.len()))
}

/// The default output: the trace's path with `.html` for its extension.
fn default_output(trace: &Path) -> PathBuf {
    trace.with_extension("html")
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<u8> {
    let procs = crate::run::open(&args.trace, &args.pid)?;
    let html = if procs.len() == 1 && args.pid.is_empty() {
        render(&procs[0].reader, &args.elements)?
    } else {
        render_run(&procs, &args.elements)?
    };
    let path = args.output.clone().unwrap_or_else(|| default_output(&args.trace));
    if path.as_os_str() == "-" {
        out.write_all(html.as_bytes())?;
    } else {
        if path.is_dir() {
            bail!(
                "{} is a folder; pass -o with a file name, like -o {}",
                path.display(),
                path.join("report.html").display()
            );
        }
        std::fs::write(&path, &html)
            .with_context(|| format!("cannot write {}; pass -o with a writable path", path.display()))?;
        writeln!(
            out,
            "wrote {} ({}); open it in a browser",
            path.display(),
            size_text(html.len() as u64)
        )?;
    }
    out.flush()?;
    crate::run::tail_notes(&procs);
    Ok(0)
}

fn size_text(n: u64) -> String {
    match n {
        0..1024 => format!("{n} bytes"),
        1024..1_048_576 => format!("{:.1} KB", n as f64 / 1024.0),
        _ => format!("{:.1} MB", n as f64 / 1_048_576.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_double_their_width_and_keep_every_count() {
        let mut b = Buckets::new(10, 1);
        for x in 10..10 + BUCKETS as u64 {
            b.add(x, 2);
        }
        assert_eq!((b.width, b.changes[0], b.used()), (1, 1, BUCKETS));
        b.add(10 + BUCKETS as u64, 4);
        assert_eq!(b.width, 2);
        assert_eq!(b.changes[..3], [2, 2, 2]);
        assert_eq!(b.changes[BUCKETS / 2], 1);
        assert_eq!(b.bytes[BUCKETS / 2], 4);
        assert_eq!(b.changes.iter().sum::<u64>(), BUCKETS as u64 + 1);
        b.add(10 + 100 * BUCKETS as u64, 1);
        assert!(b.width >= 128, "{}", b.width);
        assert_eq!(b.changes.iter().sum::<u64>(), BUCKETS as u64 + 2);
        let mut c = Buckets::new(0, 1);
        c.add(5, 1);
        c.coarsen_to(b.width);
        assert_eq!((c.width, c.changes[0]), (b.width, 1));
    }

    #[test]
    fn heat_bins_large_regions_and_counts_small_ones_exactly() {
        let mut h = Heat::new(&[4, 3], 12);
        assert_eq!((h.rows, h.cols, h.grid_rows, h.grid_cols), (4, 3, 4, 3));
        h.add(5, Some(0.5));
        h.add(5, Some(1.5));
        h.add(0, None);
        assert_eq!(h.counts[5], 2);
        assert_eq!(h.delta_sum[5] / h.delta_n[5] as f64, 1.0);
        assert_eq!((h.counts[0], h.delta_n[0]), (1, 0));
        assert_eq!(h.busiest(), Some(5));
        assert!(!h.is_binned());
        // A million elements in one row: 512 cells of 1954 elements.
        let mut big = Heat::new(&[1_000_000], 1_000_000);
        assert_eq!((big.grid_rows, big.grid_cols, big.cell_cols), (1, 512, 1954));
        assert!(big.exact.is_none() && big.is_binned());
        big.add(999_999, Some(1.0));
        big.add(1954 * 3 + 7, Some(1.0));
        big.add(1954 * 3 + 8, Some(1.0));
        assert_eq!(big.counts[511], 1);
        assert_eq!(big.counts[3], 2);
        assert_eq!(big.busiest(), Some(1954 * 3 + 8));
        // More dimensions are rows of the last one.
        let h3 = Heat::new(&[2, 500, 7], 7000);
        assert_eq!((h3.rows, h3.cols, h3.cell_rows, h3.cell_cols), (1000, 7, 11, 1));
        assert_eq!((h3.grid_rows, h3.grid_cols), (91, 7));
    }

    fn region(shape: Vec<u64>, strides: Vec<i64>, origin: u64) -> RegionInfo {
        RegionInfo {
            region: 1,
            tag: Arc::from("w"),
            variable: None,
            address: 0,
            len: 4 * shape.iter().product::<u64>(),
            dtype: Some(Arc::from("<f4")),
            itemsize: 4,
            shape,
            strides,
            origin,
            watched_seq: 1,
            unwatched_seq: None,
        }
    }

    #[test]
    fn flat_indices_follow_strides() {
        let c = region(vec![3, 4], vec![], 0);
        assert_eq!(flat_index(&c, 0), Some(0));
        assert_eq!(flat_index(&c, 4 * 6), Some(6));
        assert_eq!(flat_index(&c, 4 * 12), None);
        assert_eq!(flat_index(&c, 2), None);
        // A transpose of a 4x3 array: element [i, j] at 4 * (j * 3 + i).
        let t = region(vec![3, 4], vec![4, 12], 0);
        assert_eq!(flat_index(&t, 4 * (2 * 3 + 1)), Some(4 + 2));
        // Reversed: element [i] at origin - 4 i.
        let r = region(vec![5], vec![-4], 16);
        assert_eq!(flat_index(&r, 16), Some(0));
        assert_eq!(flat_index(&r, 4), Some(3));
        assert_eq!(unflatten(6, &[3, 4]), vec![1, 2]);
        assert_eq!(unflatten(6, &[]), vec![6]);
    }

    #[test]
    fn trajectories_decimate_and_keep_the_last_change() {
        let mut tr = Trajectory::new(0, 0, vec![0], false);
        let n = 3 * MAX_POINTS as u64 + 3;
        for i in 0..n {
            tr.push(
                i as f64 - 1.0,
                Point {
                    seq: i,
                    time_ns: i,
                    value: i as f64,
                    line: 0,
                },
            );
        }
        assert_eq!(tr.initial, Some(-1.0));
        assert_eq!(tr.changes, n);
        assert_eq!(tr.every, 4);
        let pts = tr.finished_points();
        assert!(pts.len() <= MAX_POINTS + 1, "{}", pts.len());
        assert!(pts.iter().take(pts.len() - 1).all(|p| p.seq % 4 == 0));
        assert_eq!(pts.last().unwrap().seq, n - 1);
    }

    #[test]
    fn elements_parse_as_tag_and_index() {
        let e = |tag: &str, index: Vec<u64>| ElementSpec {
            tag: tag.into(),
            index,
        };
        assert_eq!(parse_element("w:0,1"), Ok(e("w", vec![0, 1])));
        assert_eq!(parse_element("w:[0, 1]"), Ok(e("w", vec![0, 1])));
        assert_eq!(
            parse_element("model.fc:weight:7"),
            Ok(e("model.fc:weight", vec![7]))
        );
        assert!(parse_element(":3").unwrap_err().contains("no tag"));
        assert!(parse_element("w:x").unwrap_err().contains("whole numbers"));
        assert!(parse_element("w:").unwrap_err().contains("whole numbers"));
        assert!(parse_element("w").unwrap_err().contains("TAG:INDEX"));
    }

    #[test]
    fn each_process_of_a_run_has_its_own_tags_on_the_runs_clock() {
        let mut agg = Aggregate::new(None, 0);
        agg.several = true;
        agg.begin(10, None, 0);
        let a = agg.tag_index("w", None);
        agg.saw(7);
        agg.begin(11, Some(1), 100);
        let b = agg.tag_index("w", None);
        agg.saw(5);
        // The same tag in two processes: two tags, each labelled with its process.
        assert_ne!(a, b);
        assert_eq!(agg.tag_index("w", None), b);
        assert_eq!((agg.tags[a].proc, agg.tags[b].proc), (0, 1));
        assert_eq!(agg.tag_label(a), "w (pid 10)");
        assert_eq!(agg.tag_label(b), "w (pid 11, rank 1)");
        assert_eq!(agg.procs.iter().map(|p| p.pid).collect::<Vec<_>>(), [10, 11]);
        // Each process's last event on its own clock; the run's on the run's.
        assert_eq!(
            (agg.procs[0].last_ns, agg.procs[1].last_ns, agg.last_ns),
            (7, 5, 105)
        );
        agg.several = false;
        assert_eq!(agg.tag_label(b), "w");
    }

    #[test]
    fn json_numbers_stay_json() {
        assert_eq!(num(f64::NAN, false), "\"nan\"");
        assert_eq!(num(f64::NEG_INFINITY, true), "\"-inf\"");
        assert_eq!(num(f64::from(0.1f32), true), "0.1");
        assert_eq!(num(0.25, false), "0.25");
        assert_eq!(short(0.0), "0");
        assert_eq!(short(1.0), "1e0");
        assert_eq!(short(0.000123456), "1.235e-4");
        let p = page("a <b>", "{\"x\":1}");
        assert!(p.contains("<title>a &lt;b&gt;</title>"));
        assert!(p.contains("{\"x\":1}"));
        assert!(!p.contains("{{DATA}}") && !p.contains("/*{{JS}}*/"));
    }
}
