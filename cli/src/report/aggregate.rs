//! [`Aggregate`]: everything the report shows, gathered from a trace;
//! its changes are counted by [`Aggregate::change`], in `change.rs`. It
//! owns the tags of each process of a run ([`Aggregate::begin`]), the
//! lines that events and points refer to, the suspicious events, the
//! records that are not changes ([`Aggregate::record`]), the shared
//! timeline axis ([`Aggregate::finish`]), and the picks of the busiest
//! tags, lines and elements.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use memwatch_analyzer::RegionInfo;
use memwatch_format::dtype::Dtype;
use memwatch_format::Record;

use super::limits::{AUTO_ELEMENTS, BUCKETS, MAX_SUSPICIOUS};
use super::stats::{
    line_key, unflatten, Heat, LineKey, LineStats, ProcAgg, Severity, Suspicious, TagAgg, Trajectory,
};

/// Everything the report shows, gathered from a trace in one scan (and a
/// second one for trajectories, [`Aggregate::follow`]).
#[derive(Debug, Clone)]
pub struct Aggregate {
    pub tags: Vec<TagAgg>,
    /// By process, by tag name: its index in `tags`.
    pub(super) by_name: Vec<HashMap<Arc<str>, usize>>,
    /// By process, by region id: its tag's index.
    pub(super) by_region: Vec<Vec<Option<usize>>>,
    /// The processes scanned, in order ([`Aggregate::begin`]); one, of
    /// pid 0, until a process is begun.
    pub procs: Vec<ProcAgg>,
    /// Tags are labelled with their process (`w (pid 4243)`).
    pub several: bool,
    begun: bool,
    /// The process being scanned, and how much later than the run it
    /// started (added to its times).
    pub(super) cur: usize,
    pub(super) shift: u64,
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
    pub(super) fn resume(&mut self, i: usize, shift: u64) {
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

    pub(super) fn tag_index(&mut self, name: &str, region: Option<&RegionInfo>) -> usize {
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
                self.tags.push(TagAgg::new(
                    name,
                    cur,
                    self.time_width,
                    self.seq_origin,
                    self.seq_width,
                ));
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

    pub(super) fn where_id(&mut self, f: Option<&memwatch_analyzer::FrameInfo>) -> u32 {
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

    pub(super) fn suspect(&mut self, mut s: Suspicious) {
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
    pub(super) fn saw(&mut self, time_ns: u64) {
        let p = &mut self.procs[self.cur];
        p.last_ns = p.last_ns.max(time_ns);
        self.last_ns = self.last_ns.max(time_ns + self.shift);
    }

    /// Follows `elements` in a later scan: (tag index, flat index, index
    /// as given or unflattened, asked).
    pub fn follow(&mut self, elements: Vec<(usize, u64, Vec<u64>, bool)>) {
        self.trajectories = elements
            .into_iter()
            .map(|(t, f, i, asked)| Trajectory::new(t, f, i, asked))
            .collect();
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
