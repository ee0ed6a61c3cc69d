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

/// A map from ids to values that is a plain vector for the small, dense ids
/// a writer hands out (from 1 up), so that resolving an id on the hot path
/// of a scan is an index, not a hash. Ids far beyond the ones seen (only a
/// damaged or hand-made trace has them) go to a hash map instead, so they
/// cannot make the vector huge.
#[derive(Debug, Clone)]
struct IdMap<T> {
    dense: Vec<Option<T>>,
    sparse: HashMap<u32, T>,
}

impl<T> Default for IdMap<T> {
    fn default() -> Self {
        IdMap {
            dense: Vec::new(),
            sparse: HashMap::new(),
        }
    }
}

impl<T> IdMap<T> {
    fn insert(&mut self, id: u32, value: T) {
        let i = id as usize;
        if !self.sparse.is_empty() {
            self.sparse.remove(&id);
        }
        if i < self.dense.len() {
            self.dense[i] = Some(value);
        } else if i <= 2 * self.dense.len() + 4096 {
            self.dense.resize_with(i + 1, || None);
            self.dense[i] = Some(value);
        } else {
            self.sparse.insert(id, value);
        }
    }

    #[inline]
    fn get(&self, id: u32) -> Option<&T> {
        match self.dense.get(id as usize) {
            Some(Some(v)) => Some(v),
            // The dense part may have grown past an id stored sparsely.
            _ => self.sparse.get(&id),
        }
    }

    fn get_mut(&mut self, id: u32) -> Option<&mut T> {
        match self.dense.get_mut(id as usize) {
            Some(Some(v)) => Some(v),
            _ => self.sparse.get_mut(&id),
        }
    }

    fn values(&self) -> impl Iterator<Item = &T> {
        self.dense.iter().flatten().chain(self.sparse.values())
    }
}

#[cfg(test)]
mod tests {
    use super::IdMap;

    #[test]
    fn id_maps_hold_dense_and_far_ids() {
        let mut m = IdMap::default();
        m.insert(3, "a");
        m.insert(4_000_000_000, "far");
        m.insert(9000, "beyond");
        assert_eq!(m.dense.len(), 4);
        assert_eq!(
            (m.get(3), m.get(4_000_000_000), m.get(9000)),
            (Some(&"a"), Some(&"far"), Some(&"beyond"))
        );
        // The dense part grows past an id first stored sparsely.
        for id in 0..10_000 {
            if id != 9000 {
                m.insert(id, "x");
            }
        }
        assert_eq!(m.get(9000), Some(&"beyond"));
        m.insert(9000, "again");
        assert_eq!(m.get(9000), Some(&"again"));
        *m.get_mut(9000).unwrap() = "changed";
        assert_eq!(m.get(9000), Some(&"changed"));
        assert_eq!(m.get(10_001), None);
        assert_eq!(m.values().count(), 10_001);
    }
}

/// Interned strings, frames, stacks and regions of a trace, learned while
/// streaming it: feed every record to [`learn`](Self::learn) in file order,
/// and ids used by later records resolve (a writer always defines an id
/// before it uses it).
#[derive(Debug, Default, Clone)]
pub struct Symbols {
    strings: IdMap<Arc<str>>,
    frames: IdMap<FrameInfo>,
    stacks: IdMap<Vec<Id>>,
    regions: IdMap<RegionInfo>,
    object_tags: std::collections::BTreeSet<String>,
    /// By tag string id: the variable its object changes come through
    /// (`ObjectVariable` records, format version 2 on).
    object_variables: IdMap<Option<Arc<str>>>,
    /// Nanoseconds and number of times the recorded program waited for the
    /// trace's writer (`Waited` records, format version 3 on).
    pub waited: (u64, u64),
    /// The last `op` note (format version 4 on): the seq of the change it
    /// is about and the string id of the op. A note comes right before its
    /// change, so the last one is the only one a scan needs.
    last_op: Option<(u64, Id)>,
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
            Record::Waited(w) => {
                self.waited.0 = self.waited.0.saturating_add(w.waited_ns);
                self.waited.1 = self.waited.1.saturating_add(w.waits);
            }
            Record::ObjectChange(o) => {
                if let Some(t) = self.strings.get(o.tag) {
                    if !self.object_tags.contains(&**t) {
                        self.object_tags.insert(t.to_string());
                    }
                }
            }
            Record::RegionUnwatched(u) => {
                if let Some(r) = self.regions.get_mut(u.region) {
                    r.unwatched_seq = Some(u.seq);
                }
            }
            Record::ObjectVariable(v) => {
                self.object_variables.insert(v.tag, v.variable.map(Arc::from));
            }
            Record::Note(n) if self.string(n.key) == Some(memwatch_format::NOTE_OP) => {
                self.last_op = Some((n.seq, n.value));
            }
            _ => {}
        }
    }

    fn string_or_unknown(&self, id: Id) -> Arc<str> {
        self.strings.get(id).cloned().unwrap_or_else(|| Arc::from("?"))
    }

    /// The string with this id (`None` for id 0 or an undefined id).
    #[inline]
    pub fn string(&self, id: Id) -> Option<&str> {
        self.strings.get(id).map(|s| &**s)
    }

    /// The frame with this id (`None` for id 0 or an undefined id).
    #[inline]
    pub fn frame(&self, id: Id) -> Option<&FrameInfo> {
        self.frames.get(id)
    }

    /// The frames of stack `id`, innermost first (unknown frames skipped).
    pub fn stack(&self, id: Id) -> impl Iterator<Item = &FrameInfo> {
        self.stacks
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|f| self.frames.get(*f))
    }

    /// The frame ids of stack `id`, innermost first.
    pub fn stack_ids(&self, id: Id) -> Option<&[Id]> {
        self.stacks.get(id).map(|v| v.as_slice())
    }

    /// The variable the object changes of the tag with string id `tag`
    /// come through, as last defined (`None` before format version 2).
    #[inline]
    pub fn object_variable(&self, tag: Id) -> Option<&str> {
        self.object_variables.get(tag).and_then(|v| v.as_deref())
    }

    /// The op that made change `seq` (its `op` note, format version 4 on),
    /// if it had one. Valid while a scan is at that change: only the last
    /// note is kept.
    #[inline]
    pub fn op(&self, seq: u64) -> Option<&str> {
        match self.last_op {
            Some((s, id)) if s == seq => self.string(id),
            _ => None,
        }
    }

    /// What the trace said about region `region` when it was watched.
    #[inline]
    pub fn region(&self, region: u32) -> Option<&RegionInfo> {
        self.regions.get(region)
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
