//! Streaming the changes of a trace through a filter.
//!
//! The scan is the hot path of `query`, `summary`, `blame` and `export`, so
//! it builds nothing per record: each change is handed to the caller as a
//! [`ChangeRef`] borrowing the decompressed chunk and the [`Symbols`]
//! learned so far, filters are checked on interned ids (with the answer for
//! each frame remembered), and chunks are checked and decompressed by
//! worker threads ahead of the caller ([`crate::scan`]).

use std::ops::ControlFlow;
use std::sync::Arc;

use memwatch_format::{
    ChangeView, Expander, Id, ObjectChange, ObjectChangeKind, RangesView, Record, RecordView, TraceReader,
    NO_SEQ,
};

use crate::error::{Error, Result};
use crate::scan::for_each_chunk;
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
    /// The op that made the change (`aten::add_.Tensor`), for changes
    /// recorded through `watch(t, via="dispatch")`.
    pub op: Option<Arc<str>>,
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

/// One change as a scan sees it, borrowed from the chunk being read and
/// the symbols learned so far; [`to_row`](Self::to_row) makes an owned
/// [`ChangeRow`].
#[derive(Debug, Clone, Copy)]
pub struct ChangeRef<'a> {
    pub seq: u64,
    pub time_ns: u64,
    pub thread: u64,
    pub tag: &'a str,
    pub variable: Option<&'a str>,
    pub thread_name: Option<&'a str>,
    /// The line the change is attributed to.
    pub frame: Option<&'a FrameInfo>,
    /// The region, for byte changes.
    pub region: Option<&'a RegionInfo>,
    pub what: WhatRef<'a>,
    /// The op that made the change (`aten::add_.Tensor`), for changes
    /// recorded through `watch(t, via="dispatch")`.
    pub op: Option<&'a str>,
    stack: Id,
    syms: &'a Symbols,
}

/// What changed, borrowed: see [`What`].
#[derive(Debug, Clone, Copy)]
pub enum WhatRef<'a> {
    Bytes {
        region: u32,
        ranges: RangesView<'a>,
    },
    Object {
        kind: ObjectChangeKind,
        key: Option<&'a str>,
        old: Option<&'a str>,
        new: Option<&'a str>,
    },
}

impl<'a> ChangeRef<'a> {
    /// The full Python stack, innermost first.
    pub fn stack(&self) -> impl Iterator<Item = &'a FrameInfo> {
        self.syms.stack(self.stack)
    }

    /// Bytes changed (0 for object changes).
    pub fn bytes_changed(&self) -> u64 {
        match &self.what {
            WhatRef::Bytes { ranges, .. } => ranges.bytes_changed(),
            WhatRef::Object { .. } => 0,
        }
    }

    /// The name of the kind of change: `bytes`, or an object change's kind.
    pub fn kind_name(&self) -> &'static str {
        match &self.what {
            WhatRef::Bytes { .. } => "bytes",
            WhatRef::Object { kind, .. } => kind.name(),
        }
    }

    /// The same change, owned.
    pub fn to_row(&self) -> ChangeRow {
        ChangeRow {
            seq: self.seq,
            time_ns: self.time_ns,
            tag: Arc::from(self.tag),
            variable: self.variable.map(Arc::from),
            thread: self.thread,
            thread_name: self.thread_name.map(Arc::from),
            frame: self.frame.cloned(),
            stack: self.stack().cloned().collect(),
            what: match self.what {
                WhatRef::Bytes { region, ranges } => What::Bytes {
                    region,
                    ranges: ranges
                        .iter()
                        .map(|r| (r.offset, r.old.to_vec(), r.new.to_vec()))
                        .collect(),
                },
                WhatRef::Object { kind, key, old, new } => What::Object {
                    kind,
                    key: key.map(String::from),
                    old: old.map(String::from),
                    new: new.map(String::from),
                },
            },
            region: self.region.cloned(),
            op: self.op.map(Arc::from),
        }
    }
}

/// A [`Filter`] made ready for a scan: numbers parsed once, and whether
/// each frame matches the file/line/function filters remembered by frame
/// id.
struct Matcher<'f> {
    filter: &'f Filter,
    thread_id: Option<u64>,
    by_frame: bool,
    /// By frame id: 0 not yet known, 1 no, 2 yes.
    frame_ok: Vec<u8>,
}

impl<'f> Matcher<'f> {
    fn new(filter: &'f Filter) -> Self {
        Matcher {
            filter,
            thread_id: filter.thread.as_deref().and_then(|t| t.parse().ok()),
            by_frame: filter.file.is_some() || filter.line.is_some() || filter.function.is_some(),
            frame_ok: Vec::new(),
        }
    }

    #[inline]
    fn seq_time(&self, seq: u64, time_ns: u64) -> bool {
        self.filter.seq.is_none_or(|(a, b)| (a..=b).contains(&seq))
            && self.filter.time.is_none_or(|(a, b)| (a..=b).contains(&time_ns))
    }

    fn frame_matches(&self, f: Option<&FrameInfo>) -> bool {
        let Some(f) = f else {
            return false;
        };
        let file_ok = self
            .filter
            .file
            .as_deref()
            .is_none_or(|file| f.file.ends_with(file));
        let line_ok = self.filter.line.is_none_or(|l| f.line == l);
        let func_ok = self
            .filter
            .function
            .as_deref()
            .is_none_or(|func| &*f.function == func || f.function.rsplit('.').next() == Some(func));
        file_ok && line_ok && func_ok
    }

    /// Everything but the seq, time and tag, checked on ids.
    #[inline]
    fn rest(&mut self, syms: &Symbols, ctx: &memwatch_format::Context) -> bool {
        if self.by_frame {
            let i = ctx.frame as usize;
            let known = self.frame_ok.get(i).copied().unwrap_or(0);
            let ok = if known != 0 {
                known == 2
            } else {
                let ok = self.frame_matches(syms.frame(ctx.frame));
                // Frame ids are small and dense; remember only those.
                if i < 1 << 20 {
                    if self.frame_ok.len() <= i {
                        self.frame_ok.resize(i + 1, 0);
                    }
                    self.frame_ok[i] = if ok { 2 } else { 1 };
                }
                ok
            };
            if !ok {
                return false;
            }
        }
        if let Some(t) = &self.filter.thread {
            let by_id = self.thread_id == Some(ctx.thread);
            if !by_id && syms.string(ctx.thread_name) != Some(t.as_str()) {
                return false;
            }
        }
        true
    }
}

fn change_ref<'a>(syms: &'a Symbols, c: &ChangeView<'a>, region: &'a RegionInfo) -> ChangeRef<'a> {
    ChangeRef {
        seq: c.seq,
        time_ns: c.ctx.time_ns,
        thread: c.ctx.thread,
        tag: &region.tag,
        variable: region.variable.as_deref(),
        thread_name: syms.string(c.ctx.thread_name),
        frame: syms.frame(c.ctx.frame),
        region: Some(region),
        what: WhatRef::Bytes {
            region: c.region,
            ranges: c.ranges,
        },
        op: syms.op(c.seq),
        stack: c.ctx.stack,
        syms,
    }
}

fn object_ref<'a>(syms: &'a Symbols, o: &ObjectChange<'a>, tag: &'a str) -> ChangeRef<'a> {
    ChangeRef {
        seq: o.seq,
        time_ns: o.ctx.time_ns,
        thread: o.ctx.thread,
        tag,
        variable: syms.object_variable(o.tag),
        thread_name: syms.string(o.ctx.thread_name),
        frame: syms.frame(o.ctx.frame),
        region: None,
        what: WhatRef::Object {
            kind: o.kind,
            key: o.key,
            old: o.old,
            new: o.new,
        },
        op: syms.op(o.seq),
        stack: o.ctx.stack,
        syms,
    }
}

/// Streams every change matching `filter` to `f`, in seq order; `f`
/// returns `ControlFlow::Break(())` to stop early. Fails with
/// [`Error::UnknownTag`] when the filter names a tag the trace never had.
pub fn for_each_change(
    reader: &TraceReader,
    filter: &Filter,
    f: impl FnMut(&ChangeRef<'_>) -> ControlFlow<()>,
) -> Result<Symbols> {
    for_each_change_progress(reader, filter, &mut |_, _| {}, f)
}

/// What [`for_each_event`] hands over: a change that matches the filter,
/// or any other record of the chunks it reads.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A change matching the filter, as [`for_each_change`] gives it.
    Change(&'a ChangeRef<'a>),
    /// Any record that is not a change (a region watched or unwatched, a
    /// checkpoint, a loss, a crash, a definition), after the symbols have
    /// learned it, whatever the filter: the caller picks what it wants.
    /// Chunks after a filter's seq range are not read, so their records
    /// do not come.
    Record(&'a Record<'a>, &'a Symbols),
}

/// [`for_each_change_progress`], also handing `f` every other record read
/// ([`Event::Record`]), in file order: for views of a trace that show
/// more than its changes (`memwatch summary`, the Perfetto export).
pub fn for_each_event(
    reader: &TraceReader,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
    f: impl FnMut(Event<'_>) -> ControlFlow<()>,
) -> Result<Symbols> {
    scan_events(reader, filter, progress, crate::scan::default_workers(), f)
}

/// [`for_each_change`], calling `progress(chunks_done, chunks_total)`
/// before each chunk.
pub fn for_each_change_progress(
    reader: &TraceReader,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
    f: impl FnMut(&ChangeRef<'_>) -> ControlFlow<()>,
) -> Result<Symbols> {
    scan_changes(reader, filter, progress, crate::scan::default_workers(), f)
}

/// [`for_each_change_progress`] with `workers` decompressing threads (0:
/// none, all on the caller's thread).
pub(crate) fn scan_changes(
    reader: &TraceReader,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
    workers: usize,
    mut f: impl FnMut(&ChangeRef<'_>) -> ControlFlow<()>,
) -> Result<Symbols> {
    scan_events(reader, filter, progress, workers, |e| match e {
        Event::Change(c) => f(c),
        Event::Record(..) => ControlFlow::Continue(()),
    })
}

/// [`scan_changes`], with the other records too (see [`Event`]).
fn scan_events(
    reader: &TraceReader,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
    workers: usize,
    mut f: impl FnMut(Event<'_>) -> ControlFlow<()>,
) -> Result<Symbols> {
    let mut syms = Symbols::default();
    let mut seen_tag = filter.tag.is_none();
    let mut matcher = Matcher::new(filter);
    let all = reader.chunks();
    let total = all.len();
    // Chunks after the seq range hold nothing wanted. (Those before it are
    // still read: they define the strings, frames and regions used later.)
    let end = match filter.seq {
        Some((_, b)) => all
            .iter()
            .position(|c| c.header.first_seq != NO_SEQ && c.header.first_seq > b)
            .unwrap_or(total),
        None => total,
    };
    let complete = end == total;
    // Version 3 stores a change without its old bytes: an expander keeps
    // each region's bytes from its initial contents on, and gives the
    // changes back whole. Before version 3, chunks of region contents hold
    // nothing a scan needs: they are not even decompressed.
    let mut expander = (reader.header().version >= 3).then(Expander::default);
    let wanted: Vec<_> = all[..end]
        .iter()
        .filter(|c| expander.is_some() || !c.header.contents_only)
        .copied()
        .collect();
    let total = wanted.len();
    // Region ids whose tag matches the filter: 0 not yet known, 1 no, 2 yes.
    let mut region_ok: Vec<u8> = Vec::new();
    let mut done = 0;
    for_each_chunk(reader, &wanted, workers, |info, chunk| {
        progress(done, total);
        done += 1;
        let expanded = match expander.as_mut() {
            Some(ex) => ex.expand(chunk)?,
            None => None,
        };
        if info.header.contents_only {
            return Ok(ControlFlow::Continue(()));
        }
        let chunk = expanded.as_ref().unwrap_or(chunk);
        let h = &info.header;
        // A chunk wholly before the seq range only defines things.
        let before = filter
            .seq
            .is_some_and(|(a, _)| h.last_seq != NO_SEQ && h.last_seq < a);
        for view in chunk.views() {
            match view? {
                RecordView::Change(c) => {
                    if before || !matcher.seq_time(c.seq, c.ctx.time_ns) {
                        continue;
                    }
                    let Some(region) = syms.region(c.region) else {
                        continue;
                    };
                    if let Some(tag) = filter.tag.as_deref() {
                        let i = c.region as usize;
                        let known = region_ok.get(i).copied().unwrap_or(0);
                        let ok = if known != 0 {
                            known == 2
                        } else {
                            let ok = &*region.tag == tag;
                            if i < 1 << 20 {
                                if region_ok.len() <= i {
                                    region_ok.resize(i + 1, 0);
                                }
                                region_ok[i] = if ok { 2 } else { 1 };
                            }
                            ok
                        };
                        if !ok {
                            continue;
                        }
                    }
                    if !matcher.rest(&syms, &c.ctx) {
                        continue;
                    }
                    if f(Event::Change(&change_ref(&syms, &c, region))).is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                }
                RecordView::Other(rec) => {
                    syms.learn(&rec);
                    if !matches!(rec, Record::ObjectChange(_)) && f(Event::Record(&rec, &syms)).is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                    let o = match &rec {
                        Record::RegionWatched(r) => {
                            if filter.tag.as_deref() == Some(r.tag) {
                                seen_tag = true;
                            }
                            continue;
                        }
                        Record::ObjectChange(o) => o,
                        _ => continue,
                    };
                    let tag = syms.string(o.tag).unwrap_or("?");
                    if filter.tag.as_deref() == Some(tag) {
                        seen_tag = true;
                    } else if filter.tag.is_some() {
                        continue;
                    }
                    if before || !matcher.seq_time(o.seq, o.ctx.time_ns) || !matcher.rest(&syms, &o.ctx) {
                        continue;
                    }
                    if f(Event::Change(&object_ref(&syms, o, tag))).is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                }
            }
        }
        Ok(ControlFlow::Continue(()))
    })?;
    if !seen_tag && complete {
        return Err(Error::UnknownTag {
            tag: filter.tag.clone().unwrap_or_default(),
            known: syms.tags(),
        });
    }
    Ok(syms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use memwatch_format::{
        ByteRange, Change, Context, Layout, Meta, ObjectChange, RegionWatched, TraceWriter, WriterOptions,
    };

    /// 3000 changes over many small chunks, with frames and a thread name
    /// defined along the way and an object change every 100 seqs.
    fn many_chunks() -> TraceReader {
        let opts = WriterOptions {
            chunk_bytes: 2000,
            ..WriterOptions::default()
        };
        let mut w = TraceWriter::new(Vec::new(), "many.mwt", &Meta::default(), opts).unwrap();
        w.append(&Record::RegionWatched(RegionWatched {
            seq: 1,
            ctx: Context::default(),
            region: 1,
            tag: "w",
            variable: None,
            address: 0x1000,
            len: 4096,
            layout: Layout::default(),
        }))
        .unwrap();
        w.append_contents(1, 1, &[0; 4096]).unwrap();
        let tag = w.intern_str("obj").unwrap();
        for seq in 2..3002u64 {
            let frame = w
                .intern_frame("train.py", "step", 10 + (seq / 500) as u32)
                .unwrap();
            let thread_name = w
                .intern_str(if seq % 7 == 0 { "worker" } else { "MainThread" })
                .unwrap();
            let ctx = Context {
                time_ns: seq * 10,
                thread: 1 + u64::from(seq % 7 == 0),
                thread_name,
                frame,
                stack: 0,
            };
            if seq % 100 == 0 {
                w.append(&Record::ObjectChange(ObjectChange {
                    seq,
                    ctx,
                    tag,
                    kind: ObjectChangeKind::Append,
                    key: None,
                    old: None,
                    new: Some("1"),
                }))
                .unwrap();
                continue;
            }
            let b = (seq as u8).to_le_bytes();
            w.append(&Record::Change(Change {
                seq,
                ctx,
                region: 1,
                ranges: vec![ByteRange {
                    offset: seq % 4096,
                    old: &[0],
                    new: &b,
                }],
            }))
            .unwrap();
        }
        let (bytes, _) = w.finish(0).unwrap();
        TraceReader::from_bytes(bytes, "many.mwt").unwrap()
    }

    fn rows(r: &TraceReader, filter: &Filter, workers: usize, limit: usize) -> Vec<ChangeRow> {
        let mut out = Vec::new();
        scan_changes(r, filter, &mut |_, _| {}, workers, |row| {
            out.push(row.to_row());
            if out.len() == limit {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        out
    }

    #[test]
    fn parallel_scans_give_the_serial_rows_in_order() {
        let r = many_chunks();
        assert!(r.chunks().len() > 20, "{} chunks", r.chunks().len());
        let all = Filter::default();
        let serial = rows(&r, &all, 0, usize::MAX);
        assert_eq!(serial.len(), 3000);
        assert!(serial.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        assert_eq!(serial[500].frame.as_ref().unwrap().line, 11);
        for workers in [1, 2, 3, 8] {
            assert_eq!(rows(&r, &all, workers, usize::MAX), serial, "{workers} workers");
        }
        // Stopping early stops the workers and keeps the rows before.
        assert_eq!(rows(&r, &all, 3, 1234), serial[..1234]);
        let worker = Filter {
            thread: Some("worker".into()),
            line: Some(12),
            ..Filter::default()
        };
        let want: Vec<u64> = (1000..1500).filter(|s| s % 7 == 0).collect();
        let got: Vec<u64> = rows(&r, &worker, 2, usize::MAX).iter().map(|c| c.seq).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_seq_range_reads_only_the_chunks_it_needs() {
        let r = many_chunks();
        let filter = Filter {
            seq: Some((1500, 1520)),
            tag: Some("obj".into()),
            ..Filter::default()
        };
        let mut chunks_read = 0;
        let mut got = Vec::new();
        scan_changes(&r, &filter, &mut |done, _| chunks_read = done + 1, 2, |row| {
            got.push((row.seq, row.kind_name()));
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(got, vec![(1500, "append")]);
        let needed = r
            .chunks()
            .iter()
            .take_while(|c| c.header.first_seq == NO_SEQ || c.header.first_seq <= 1520)
            .count();
        assert_eq!(chunks_read, needed);
        assert!(needed < r.chunks().len() / 2 + 2);
        // Definitions from the chunks before the range still resolve.
        let filter = Filter {
            seq: Some((2990, 3001)),
            ..Filter::default()
        };
        let last = rows(&r, &filter, 2, usize::MAX);
        assert_eq!(last.len(), 12);
        assert_eq!(&*last[10].tag, "obj");
        assert_eq!(&*last[0].tag, "w");
        assert_eq!(last[0].thread_name.as_deref(), Some("MainThread"));
    }
}
