use std::collections::HashMap;
use std::sync::Arc;

use memwatch_format::{Id, Record};

/// A resolved frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInfo {
    pub file: Arc<str>,
    pub function: Arc<str>,
    pub line: u32,
}

/// What a trace said about a region when it was watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    pub region: u32,
    pub tag: Arc<str>,
    pub variable: Option<Arc<str>>,
    pub address: u64,
    pub len: u64,
    pub dtype: Option<Arc<str>>,
    pub itemsize: u32,
    pub shape: Vec<u64>,
    pub strides: Vec<i64>,
    /// Offset of element `[0, ...]` from the region start.
    pub origin: u64,
    /// The seq of its `RegionWatched` record.
    pub watched_seq: u64,
    /// The seq of its `RegionUnwatched` record, once seen.
    pub unwatched_seq: Option<u64>,
}

/// Interned strings, frames, stacks and regions of a trace, learned while
/// streaming it: feed every record to [`learn`](Self::learn) in file order,
/// and ids used by later records resolve (a writer always defines an id
/// before it uses it).
#[derive(Debug, Default, Clone)]
pub struct Symbols {
    strings: HashMap<Id, Arc<str>>,
    frames: HashMap<Id, FrameInfo>,
    stacks: HashMap<Id, Vec<Id>>,
    regions: HashMap<u32, RegionInfo>,
    object_tags: std::collections::BTreeSet<String>,
}

impl Symbols {
    /// Takes note of any definition in `rec`; ignores other records.
    pub fn learn(&mut self, rec: &Record<'_>) {
        match rec {
            Record::String(s) => {
                self.strings.insert(s.id, Arc::from(s.value));
            }
            Record::Frame(f) => {
                let info = FrameInfo {
                    file: self.string_or_unknown(f.file),
                    function: self.string_or_unknown(f.function),
                    line: f.line,
                };
                self.frames.insert(f.id, info);
            }
            Record::Stack(s) => {
                self.stacks.insert(s.id, s.frames.clone());
            }
            Record::RegionWatched(r) => {
                let info = RegionInfo {
                    region: r.region,
                    tag: Arc::from(r.tag),
                    variable: r.variable.map(Arc::from),
                    address: r.address,
                    len: r.len,
                    dtype: r.layout.dtype.map(Arc::from),
                    itemsize: r.layout.itemsize,
                    shape: r.layout.shape.clone(),
                    strides: r.layout.strides.clone(),
                    origin: r.layout.origin,
                    watched_seq: r.seq,
                    unwatched_seq: None,
                };
                self.regions.insert(r.region, info);
            }
            Record::ObjectChange(o) => {
                if let Some(t) = self.strings.get(&o.tag) {
                    if !self.object_tags.contains(&**t) {
                        self.object_tags.insert(t.to_string());
                    }
                }
            }
            Record::RegionUnwatched(u) => {
                if let Some(r) = self.regions.get_mut(&u.region) {
                    r.unwatched_seq = Some(u.seq);
                }
            }
            _ => {}
        }
    }

    fn string_or_unknown(&self, id: Id) -> Arc<str> {
        self.strings.get(&id).cloned().unwrap_or_else(|| Arc::from("?"))
    }

    /// The string with this id (`None` for id 0 or an undefined id).
    pub fn string(&self, id: Id) -> Option<&str> {
        self.strings.get(&id).map(|s| &**s)
    }

    pub fn frame(&self, id: Id) -> Option<&FrameInfo> {
        self.frames.get(&id)
    }

    /// The frames of stack `id`, innermost first (unknown frames skipped).
    pub fn stack(&self, id: Id) -> impl Iterator<Item = &FrameInfo> {
        self.stacks
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|f| self.frames.get(f))
    }

    /// The frame ids of stack `id`, innermost first.
    pub fn stack_ids(&self, id: Id) -> Option<&[Id]> {
        self.stacks.get(&id).map(|v| v.as_slice())
    }

    pub fn region(&self, region: u32) -> Option<&RegionInfo> {
        self.regions.get(&region)
    }

    /// Every tag seen so far (regions and objects), sorted, without repeats.
    pub fn tags(&self) -> Vec<String> {
        let mut t: Vec<String> = self.regions.values().map(|r| r.tag.to_string()).collect();
        t.extend(self.object_tags.iter().cloned());
        t.sort();
        t.dedup();
        t
    }

    /// Every region seen so far, in region id order.
    pub fn regions(&self) -> Vec<&RegionInfo> {
        let mut v: Vec<_> = self.regions.values().collect();
        v.sort_by_key(|r| r.region);
        v
    }
}
