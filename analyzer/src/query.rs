//! Streaming the changes of a trace through a filter.

use std::ops::ControlFlow;
use std::sync::Arc;

use memwatch_format::{ObjectChangeKind, Record, TraceReader};

use crate::error::{Error, Result};
use crate::symbols::{FrameInfo, RegionInfo, Symbols};

/// Which changes a query wants. Every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tag: Option<String>,
    /// A file name, matched against the end of the recorded path
    /// (`train.py` matches `/home/me/train.py`).
    pub file: Option<String>,
    pub line: Option<u32>,
    pub function: Option<String>,
    /// A thread id or name.
    pub thread: Option<String>,
    /// Inclusive seq range.
    pub seq: Option<(u64, u64)>,
    /// Inclusive range of nanoseconds since the trace started.
    pub time: Option<(u64, u64)>,
}

/// What changed: bytes of a region, or a Python object or variable.
#[derive(Debug, Clone, PartialEq)]
pub enum What {
    Bytes {
        region: u32,
        /// `(offset, old, new)`.
        ranges: Vec<(u64, Vec<u8>, Vec<u8>)>,
    },
    Object {
        kind: ObjectChangeKind,
        key: Option<String>,
        old: Option<String>,
        new: Option<String>,
    },
}

/// One change, with its interned ids resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRow {
    pub seq: u64,
    pub time_ns: u64,
    pub tag: Arc<str>,
    pub variable: Option<Arc<str>>,
    pub thread: u64,
    pub thread_name: Option<Arc<str>>,
    /// The line the change is attributed to.
    pub frame: Option<FrameInfo>,
    /// Innermost first.
    pub stack: Vec<FrameInfo>,
    pub what: What,
    /// The region, for byte changes.
    pub region: Option<RegionInfo>,
}

impl ChangeRow {
    /// Bytes changed (0 for object changes).
    pub fn bytes_changed(&self) -> u64 {
        match &self.what {
            What::Bytes { ranges, .. } => ranges.iter().map(|r| r.1.len() as u64).sum(),
            What::Object { .. } => 0,
        }
    }
}

impl Filter {
    fn wants_seq(&self, seq: u64, time_ns: u64) -> bool {
        self.seq.is_none_or(|(a, b)| (a..=b).contains(&seq))
            && self.time.is_none_or(|(a, b)| (a..=b).contains(&time_ns))
    }

    fn wants(&self, row: &ChangeRow) -> bool {
        if self.tag.as_deref().is_some_and(|t| t != &*row.tag) {
            return false;
        }
        if let Some(file) = &self.file {
            let ok = row
                .frame
                .as_ref()
                .is_some_and(|f| f.file.ends_with(file.as_str()) || &*f.file == file);
            if !ok {
                return false;
            }
        }
        if let Some(line) = self.line {
            if row.frame.as_ref().is_none_or(|f| f.line != line) {
                return false;
            }
        }
        if let Some(func) = &self.function {
            let ok = row.frame.as_ref().is_some_and(|f| {
                &*f.function == func || f.function.rsplit('.').next() == Some(func.as_str())
            });
            if !ok {
                return false;
            }
        }
        if let Some(t) = &self.thread {
            let by_id = t.parse::<u64>().ok() == Some(row.thread);
            let by_name = row.thread_name.as_deref() == Some(t.as_str());
            if !by_id && !by_name {
                return false;
            }
        }
        true
    }
}

/// Streams every change matching `filter` to `f`, in seq order; `f`
/// returns `ControlFlow::Break(())` to stop early. Fails with
/// [`Error::UnknownTag`] when the filter names a tag the trace never had.
pub fn for_each_change(
    reader: &TraceReader,
    filter: &Filter,
    f: impl FnMut(&ChangeRow) -> ControlFlow<()>,
) -> Result<Symbols> {
    for_each_change_progress(reader, filter, &mut |_, _| {}, f)
}

/// [`for_each_change`], calling `progress(chunks_done, chunks_total)`
/// before each chunk.
pub fn for_each_change_progress(
    reader: &TraceReader,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
    mut f: impl FnMut(&ChangeRow) -> ControlFlow<()>,
) -> Result<Symbols> {
    let mut syms = Symbols::default();
    let mut seen_tag = filter.tag.is_none();
    let mut complete = true;
    let total = reader.chunks().len();
    for (done, info) in reader.chunks().iter().enumerate() {
        progress(done, total);
        let h = &info.header;
        // Chunks after the seq range hold nothing wanted.
        if let Some((_, b)) = filter.seq {
            if h.first_seq != memwatch_format::NO_SEQ && h.first_seq > b {
                complete = false;
                break;
            }
        }
        let chunk = reader.decode_chunk(info)?;
        for rec in chunk.records() {
            let rec = rec?;
            syms.learn(&rec);
            let row = match &rec {
                Record::RegionWatched(r) => {
                    if filter.tag.as_deref() == Some(r.tag) {
                        seen_tag = true;
                    }
                    continue;
                }
                Record::Change(c) => {
                    if !filter.wants_seq(c.seq, c.ctx.time_ns) {
                        continue;
                    }
                    let Some(region) = syms.region(c.region) else {
                        continue;
                    };
                    if filter.tag.as_deref().is_some_and(|t| t != &*region.tag) {
                        continue;
                    }
                    ChangeRow {
                        seq: c.seq,
                        time_ns: c.ctx.time_ns,
                        tag: region.tag.clone(),
                        variable: region.variable.clone(),
                        thread: c.ctx.thread,
                        thread_name: syms.string(c.ctx.thread_name).map(Arc::from),
                        frame: syms.frame(c.ctx.frame).cloned(),
                        stack: syms.stack(c.ctx.stack).cloned().collect(),
                        what: What::Bytes {
                            region: c.region,
                            ranges: c
                                .ranges
                                .iter()
                                .map(|r| (r.offset, r.old.to_vec(), r.new.to_vec()))
                                .collect(),
                        },
                        region: Some(region.clone()),
                    }
                }
                Record::ObjectChange(o) => {
                    if !filter.wants_seq(o.seq, o.ctx.time_ns) {
                        continue;
                    }
                    let tag: Arc<str> = syms.string(o.tag).unwrap_or("?").into();
                    if filter.tag.as_deref() == Some(&*tag) {
                        seen_tag = true;
                    }
                    ChangeRow {
                        seq: o.seq,
                        time_ns: o.ctx.time_ns,
                        tag,
                        variable: None,
                        thread: o.ctx.thread,
                        thread_name: syms.string(o.ctx.thread_name).map(Arc::from),
                        frame: syms.frame(o.ctx.frame).cloned(),
                        stack: syms.stack(o.ctx.stack).cloned().collect(),
                        what: What::Object {
                            kind: o.kind,
                            key: o.key.map(String::from),
                            old: o.old.map(String::from),
                            new: o.new.map(String::from),
                        },
                        region: None,
                    }
                }
                _ => continue,
            };
            if filter.wants(&row) && f(&row).is_break() {
                return Ok(syms);
            }
        }
    }
    if !seen_tag && complete {
        return Err(Error::UnknownTag {
            tag: filter.tag.clone().unwrap_or_default(),
            known: syms.tags(),
        });
    }
    Ok(syms)
}
