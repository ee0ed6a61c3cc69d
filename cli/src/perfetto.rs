//! `memwatch export --format perfetto`: a trace as Chrome trace-event
//! JSON, the format that ui.perfetto.dev and chrome://tracing open.
//!
//! The output is one object, `{"traceEvents": [...], "displayTimeUnit":
//! "ns", "metadata": {...}}`, written as the trace is scanned (one event
//! per line, through the caller's buffered writer), so a trace of
//! millions of changes never sits in memory as JSON. What it holds:
//!
//! - a track per thread: a `thread_name` metadata event (`"ph": "M"`) for
//!   each thread the first time it appears (and again if it is renamed),
//!   under its process (`pid` from the trace's header): a run of several
//!   processes ([`write_run`]) has a process per trace, its times counted
//!   from the run's start;
//! - a thread-scoped instant (`"ph": "i", "s": "t"`) per change, named
//!   `<tag> <file>:<line>` (the file without its directory), whose args
//!   say what changed: seq, tag, variable, kind, bytes and elements
//!   changed, the first changed element's index and old and new values
//!   (when the region's dtype is known) or the first range's offset and
//!   bytes, an object change's key and reprs, file, line and function;
//! - a counter per tag (`"ph": "C"`, named after the tag): the changes
//!   and the bytes changed so far (Perfetto shows them as the tracks
//!   `<tag> changes` and `<tag> bytes`);
//! - instants for a region watched and unwatched, for events the recorder
//!   lost, and for the recording's start and end (closed, crashed,
//!   stopped early, or not closed).
//!
//! Timestamps (`ts`) are microseconds since the trace started, with three
//! decimals: the recorded nanoseconds, exactly. The JSON is written by
//! hand (strings through [`write_json_str`]); the CLI owns this format,
//! like the text of `query`, because it shares that text's element
//! formatting ([`crate::text::element`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::ops::ControlFlow;

use memwatch_analyzer::{for_each_event, ChangeRef, Event, Filter, Symbols, WhatRef};
use memwatch_format::{Context, Ending, Record, TraceReader};

use crate::text::{elements_changed, first_element, hex};

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Written {
    /// Trace events in all (metadata, instants, counters).
    pub events: u64,
    /// Of them, changes (one instant each).
    pub changes: u64,
}

/// Writes `s` as a JSON string literal: `"` and `\` escaped, control
/// characters as `\n`, `\r`, `\t` or `\u00XX`; everything else (UTF-8
/// included) as it is.
///
/// ```
/// let mut out = Vec::new();
/// memwatch_cli::perfetto::write_json_str(&mut out, "a \"b\"\\\n\u{1}é").unwrap();
/// assert_eq!(String::from_utf8(out).unwrap(), r#""a \"b\"\\\n\u0001é""#);
/// ```
pub fn write_json_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(b"\"")?;
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        w.write_all(&bytes[start..i])?;
        if esc.is_empty() {
            write!(w, "\\u{b:04x}")?;
        } else {
            w.write_all(esc)?;
        }
        start = i + 1;
    }
    w.write_all(&bytes[start..])?;
    w.write_all(b"\"")
}

/// Nanoseconds as the format's microseconds, exactly: `12.345`.
fn write_ts(w: &mut impl Write, ns: u64) -> io::Result<()> {
    write!(w, "{}.{:03}", ns / 1000, ns % 1000)
}

/// `file:line` with the file's directory left out (`cell [3], line 2`
/// for a notebook cell), after `tag ` in `name`.
fn push_name(name: &mut String, tag: &str, file: Option<(&str, u32)>) {
    name.clear();
    name.push_str(tag);
    match file {
        Some((file, line)) if file.starts_with("cell [") && file.ends_with(']') => {
            let _ = write!(name, " {file}, line {line}");
        }
        Some((file, line)) => {
            let base = file.rsplit('/').next().unwrap_or(file);
            let _ = write!(name, " {base}:{line}");
        }
        None => name.push_str(" ?"),
    }
}

/// The args of one event, written as they come.
struct ArgsOut<'w, W: Write> {
    w: &'w mut W,
    n: usize,
}

impl<W: Write> ArgsOut<'_, W> {
    fn key(&mut self, k: &str) -> io::Result<&mut W> {
        if self.n > 0 {
            self.w.write_all(b",")?;
        }
        self.n += 1;
        write!(self.w, "\"{k}\":")?;
        Ok(self.w)
    }

    fn str(&mut self, k: &str, v: &str) -> io::Result<()> {
        let w = self.key(k)?;
        write_json_str(w, v)
    }

    fn opt_str(&mut self, k: &str, v: Option<&str>) -> io::Result<()> {
        match v {
            Some(v) => self.str(k, v),
            None => Ok(()),
        }
    }

    fn num(&mut self, k: &str, v: u64) -> io::Result<()> {
        let w = self.key(k)?;
        write!(w, "{v}")
    }

    /// `file`, `line` and `function` of a frame, when known.
    fn frame(&mut self, f: Option<&memwatch_analyzer::FrameInfo>) -> io::Result<()> {
        if let Some(f) = f {
            self.str("file", &f.file)?;
            self.num("line", u64::from(f.line))?;
            self.str("function", &f.function)?;
        }
        Ok(())
    }
}

/// The writer's state: the output, and what has been said so far.
struct Out<W: Write> {
    w: W,
    pid: u32,
    /// Added to every time: how much later than the run this process's
    /// trace started.
    shift: u64,
    events: u64,
    changes: u64,
    /// By thread id: the name its track was given (`None`: none yet).
    threads: HashMap<u64, Option<Box<str>>>,
    /// By tag: changes and bytes changed so far.
    counters: HashMap<Box<str>, (u64, u64)>,
    /// The latest time seen, for events that have none of their own.
    last_ns: u64,
    name: String,
}

impl<W: Write> Out<W> {
    /// Starts an event: the separator, then the fields every event has,
    /// up to the opening of its args.
    fn head(
        &mut self,
        ph: &str,
        scope: Option<&str>,
        cat: &str,
        name: &str,
        ts: u64,
        tid: Option<u64>,
    ) -> io::Result<()> {
        self.w.write_all(if self.events == 0 { b"\n" } else { b",\n" })?;
        self.events += 1;
        write!(self.w, "{{\"ph\":\"{ph}\",")?;
        if let Some(s) = scope {
            write!(self.w, "\"s\":\"{s}\",")?;
        }
        write!(self.w, "\"cat\":\"{cat}\",\"name\":")?;
        write_json_str(&mut self.w, name)?;
        self.w.write_all(b",\"ts\":")?;
        write_ts(&mut self.w, ts + self.shift)?;
        write!(self.w, ",\"pid\":{}", self.pid)?;
        if let Some(t) = tid {
            write!(self.w, ",\"tid\":{t}")?;
        }
        self.w.write_all(b",\"args\":{")
    }

    fn args(&mut self) -> ArgsOut<'_, W> {
        ArgsOut { w: &mut self.w, n: 0 }
    }

    fn end(&mut self) -> io::Result<()> {
        self.w.write_all(b"}}")
    }

    /// A metadata event (`process_name`, `thread_name`, ...).
    fn meta(&mut self, what: &str, tid: Option<u64>, key: &str, value: MetaValue<'_>) -> io::Result<()> {
        self.w.write_all(if self.events == 0 { b"\n" } else { b",\n" })?;
        self.events += 1;
        write!(self.w, "{{\"ph\":\"M\",\"name\":\"{what}\",\"pid\":{}", self.pid)?;
        if let Some(t) = tid {
            write!(self.w, ",\"tid\":{t}")?;
        }
        write!(self.w, ",\"args\":{{\"{key}\":")?;
        match value {
            MetaValue::Str(s) => write_json_str(&mut self.w, s)?,
            MetaValue::Num(n) => write!(self.w, "{n}")?,
        }
        self.w.write_all(b"}}")
    }

    /// Names the track of thread `tid` the first time it appears, and
    /// again when it appears under another name.
    fn thread(&mut self, tid: u64, name: Option<&str>) -> io::Result<()> {
        match self.threads.get(&tid) {
            Some(known) if name.is_none() || known.as_deref() == name => return Ok(()),
            Some(_) => {}
            None => {
                let order = self.threads.len() as u64;
                self.meta(
                    "thread_sort_index",
                    Some(tid),
                    "sort_index",
                    MetaValue::Num(order),
                )?;
            }
        }
        if let Some(n) = name {
            self.meta("thread_name", Some(tid), "name", MetaValue::Str(n))?;
        }
        self.threads.insert(tid, name.map(Box::from));
        Ok(())
    }

    fn change(&mut self, row: &ChangeRef<'_>) -> io::Result<()> {
        self.last_ns = self.last_ns.max(row.time_ns);
        self.thread(row.thread, row.thread_name)?;
        let mut name = std::mem::take(&mut self.name);
        push_name(&mut name, row.tag, row.frame.map(|f| (&*f.file, f.line)));
        self.head("i", Some("t"), "change", &name, row.time_ns, Some(row.thread))?;
        self.name = name;
        let bytes = row.bytes_changed();
        let mut a = self.args();
        a.num("seq", row.seq)?;
        a.str("tag", row.tag)?;
        a.opt_str("variable", row.variable)?;
        a.str("kind", row.kind_name())?;
        match &row.what {
            WhatRef::Bytes { ranges, .. } => {
                a.num("bytes_changed", bytes)?;
                if let Some(n) = elements_changed(row) {
                    a.num("elements_changed", n)?;
                }
                if let Some(first) = ranges.first() {
                    a.num("offset", first.offset)?;
                }
                match first_element(row) {
                    Some((index, old, new)) => {
                        a.str("index", &index)?;
                        a.str("old", &old)?;
                        a.str("new", &new)?;
                    }
                    None => {
                        if let Some(first) = ranges.first() {
                            a.str("old", &hex(first.old, 16))?;
                            a.str("new", &hex(first.new, 16))?;
                        }
                    }
                }
            }
            WhatRef::Object { key, old, new, .. } => {
                a.opt_str("key", *key)?;
                a.opt_str("old", *old)?;
                a.opt_str("new", *new)?;
            }
        }
        a.opt_str("op", row.op)?;
        a.frame(row.frame)?;
        a.opt_str("thread_name", row.thread_name)?;
        self.end()?;
        self.changes += 1;
        // The tag's counter.
        let (n, b) = match self.counters.get_mut(row.tag) {
            Some(c) => {
                c.0 += 1;
                c.1 += bytes;
                *c
            }
            None => {
                self.counters.insert(Box::from(row.tag), (1, bytes));
                (1, bytes)
            }
        };
        self.head("C", None, "counter", row.tag, row.time_ns, None)?;
        write!(self.w, "\"changes\":{n},\"bytes\":{b}")?;
        self.end()
    }

    /// A region watched or unwatched, on the thread that did it.
    fn region_event(
        &mut self,
        what: &str,
        ctx: &Context,
        syms: &Symbols,
        region: u32,
        seq: u64,
        reason: Option<&str>,
    ) -> io::Result<()> {
        let Some(r) = syms.region(region) else {
            return Ok(());
        };
        self.last_ns = self.last_ns.max(ctx.time_ns);
        self.thread(ctx.thread, syms.string(ctx.thread_name))?;
        let name = format!("{what} {}", r.tag);
        self.head("i", Some("t"), "region", &name, ctx.time_ns, Some(ctx.thread))?;
        let mut a = self.args();
        a.num("seq", seq)?;
        a.str("tag", &r.tag)?;
        a.opt_str("variable", r.variable.as_deref())?;
        a.str("address", &format!("{:#x}", r.address))?;
        a.num("bytes", r.len)?;
        a.opt_str("dtype", r.dtype.as_deref())?;
        if !r.shape.is_empty() {
            let dims: Vec<String> = r.shape.iter().map(u64::to_string).collect();
            a.str("shape", &format!("[{}]", dims.join(", ")))?;
        }
        a.opt_str("reason", reason)?;
        a.frame(syms.frame(ctx.frame))?;
        self.end()
    }

    /// A process-scoped instant with a few string args.
    fn process_instant(
        &mut self,
        name: &str,
        ts: u64,
        args: &[(&str, &str)],
        nums: &[(&str, u64)],
    ) -> io::Result<()> {
        self.head("i", Some("p"), "recording", name, ts, None)?;
        let mut a = self.args();
        for (k, v) in nums {
            a.num(k, *v)?;
        }
        for (k, v) in args {
            a.str(k, v)?;
        }
        self.end()
    }
}

enum MetaValue<'a> {
    Str(&'a str),
    Num(u64),
}

/// Writes the changes of `reader` that `filter` takes (its tag and seq
/// range also choose the regions whose watch and unwatch are shown) to
/// `w` as Chrome trace-event JSON; `progress(done, total)` is called per
/// chunk. `w` should be buffered.
pub fn write(
    reader: &TraceReader,
    filter: &Filter,
    w: impl Write,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<Written> {
    let meta = &reader.header().meta;
    write_run(&[(reader, meta.pid, 0)], filter, w, progress)
}

/// [`write()`] for the processes of a run: each `(reader, pid, shift_ns)`
/// is a process of its own in the timeline, its times moved by `shift_ns`
/// (how much later than the run its trace started). The metadata is the
/// first trace's, with the list of processes.
pub fn write_run(
    procs: &[(&TraceReader, u32, u64)],
    filter: &Filter,
    w: impl Write,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<Written> {
    let mut out = Out {
        w,
        pid: 1,
        shift: 0,
        events: 0,
        changes: 0,
        threads: HashMap::new(),
        counters: HashMap::new(),
        last_ns: 0,
        name: String::new(),
    };
    out.w.write_all(b"{\"traceEvents\":[")?;
    let total: usize = procs.iter().map(|(r, _, _)| r.chunks().len()).sum();
    let mut before = 0usize;
    let mut missing = 0usize;
    for &(reader, pid, shift) in procs {
        // pid 0 is the kernel's to Perfetto; a trace without one gets 1.
        out.pid = if pid == 0 { 1 } else { pid };
        out.shift = shift;
        out.threads.clear();
        out.counters.clear();
        out.last_ns = 0;
        let mut each = |done: usize, _: usize| progress(before + done, total);
        match write_process(&mut out, reader, filter, &mut each) {
            // A tag only some processes of the run watched.
            Err(e)
                if procs.len() > 1
                    && matches!(
                        e.downcast_ref::<memwatch_analyzer::Error>(),
                        Some(memwatch_analyzer::Error::UnknownTag { .. })
                    ) =>
            {
                missing += 1;
                if missing == procs.len() {
                    return Err(e);
                }
            }
            r => r?,
        }
        before += reader.chunks().len();
    }
    let reader = procs[0].0;
    let meta = &reader.header().meta;
    let message = reader.tail_message().unwrap_or_else(|| "closed cleanly".into());
    let ending = reader.ending();
    let Out {
        mut w,
        events,
        changes,
        ..
    } = out;
    w.write_all(b"\n],\n\"displayTimeUnit\":\"ns\",\n\"metadata\":{\"trace\":")?;
    write_json_str(&mut w, &reader.path().display().to_string())?;
    w.write_all(b",\"argv\":[")?;
    for (i, a) in meta.argv.iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        write_json_str(&mut w, a)?;
    }
    write!(w, "],\"pid\":{},\"python_version\":", meta.pid)?;
    write_json_str(&mut w, &meta.python_version)?;
    w.write_all(b",\"platform\":")?;
    write_json_str(&mut w, &meta.platform)?;
    write!(
        w,
        ",\"start_time_ns\":{},\"format_version\":{},\"writer\":",
        meta.start_time_ns,
        reader.header().version
    )?;
    write_json_str(&mut w, &meta.writer)?;
    w.write_all(b",\"ending\":")?;
    write_json_str(&mut w, ending.name())?;
    w.write_all(b",\"ending_message\":")?;
    write_json_str(&mut w, &message)?;
    write!(w, ",\"changes\":{changes},\"events\":{events}")?;
    if procs.len() > 1 {
        let pids: Vec<String> = procs.iter().map(|(_, p, _)| p.to_string()).collect();
        write!(w, ",\"processes\":[{}]", pids.join(","))?;
    }
    if let Some(t) = &filter.tag {
        w.write_all(b",\"tag\":")?;
        write_json_str(&mut w, t)?;
    }
    if let Some((a, b)) = filter.seq {
        write!(w, ",\"seq\":[{a},{b}]")?;
    }
    w.write_all(b"}}\n")?;
    w.flush()?;
    Ok(Written { events, changes })
}

/// One process's events: its name, its changes and regions, and how its
/// recording ended.
fn write_process<W: Write>(
    out: &mut Out<W>,
    reader: &TraceReader,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<()> {
    write_process_start(out, reader)?;
    write_events(out, reader, filter, progress)?;
    write_ending(out, reader)?;
    Ok(())
}

/// Names the process after its command line (`pid N` without one) and
/// marks the recording's start.
fn write_process_start<W: Write>(out: &mut Out<W>, reader: &TraceReader) -> io::Result<()> {
    let meta = &reader.header().meta;
    let program = if meta.argv.is_empty() {
        format!("pid {}", meta.pid)
    } else {
        meta.argv.join(" ")
    };
    out.meta("process_name", None, "name", MetaValue::Str(&program))?;
    out.process_instant("recording started", 0, &[("argv", &program)], &[])
}

/// Scans the trace, writing each event [`write_event`] shows; a write that
/// fails stops the scan, and its error is the one returned.
fn write_events<W: Write>(
    out: &mut Out<W>,
    reader: &TraceReader,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<()> {
    let stop = reader.stopped().map(|(seq, _, reason)| (seq, reason.to_string()));
    let mut failed: Option<io::Error> = None;
    let scanned = for_each_event(reader, filter, progress, |e| {
        match write_event(out, e, filter, stop.as_ref()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        }
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    scanned?;
    Ok(())
}

/// One event of the scan: a change; a region watched or unwatched, when
/// `filter`'s seq range and tag take it; events lost, unless that loss is
/// the one that stopped the recording (`stop`: its seq and reason), which
/// the ending tells. Other records show nothing.
fn write_event<W: Write>(
    out: &mut Out<W>,
    e: Event<'_>,
    filter: &Filter,
    stop: Option<&(u64, String)>,
) -> io::Result<()> {
    let in_range = |seq: u64| filter.seq.is_none_or(|(a, b)| (a..=b).contains(&seq));
    let wanted_tag = |tag: &str| filter.tag.as_deref().is_none_or(|t| t == tag);
    match e {
        Event::Change(row) => out.change(row),
        Event::Record(Record::RegionWatched(r), syms) if in_range(r.seq) && wanted_tag(r.tag) => {
            out.region_event("watch", &r.ctx, syms, r.region, r.seq, None)
        }
        Event::Record(Record::RegionUnwatched(u), syms)
            if in_range(u.seq) && syms.region(u.region).is_some_and(|r| wanted_tag(&r.tag)) =>
        {
            out.region_event("unwatch", &u.ctx, syms, u.region, u.seq, Some(u.reason.name()))
        }
        Event::Record(Record::Lost(l), _)
            if l.events > 0 && stop.is_none_or(|(s, r)| (*s, r.as_str()) != (l.after_seq, l.reason)) =>
        {
            let name = format!("lost {} events", l.events);
            let ts = out.last_ns;
            out.process_instant(
                &name,
                ts,
                &[("reason", l.reason)],
                &[("after_seq", l.after_seq), ("events", l.events)],
            )
        }
        _ => Ok(()),
    }
}

/// How the recording ended: closed, crashed (on the thread that died),
/// stopped early, or not closed; never before the last event written.
fn write_ending<W: Write>(out: &mut Out<W>, reader: &TraceReader) -> io::Result<()> {
    let message = reader.tail_message().unwrap_or_else(|| "closed cleanly".into());
    let ending = reader.ending();
    let last = out.last_ns;
    match ending {
        Ending::Closed { end_time_ns } => out.process_instant(
            "recording closed",
            end_time_ns.max(last),
            &[("ending", "closed")],
            &[],
        )?,
        Ending::Crashed {
            signal,
            thread,
            time_ns,
            description,
        } => {
            let name = format!("crashed: {}", memwatch_format::crash::signal_name(signal));
            out.thread(thread, None)?;
            out.head(
                "i",
                Some("t"),
                "recording",
                &name,
                time_ns.max(last),
                Some(thread),
            )?;
            let mut a = out.args();
            a.str("ending", "crashed")?;
            a.num("signal", u64::try_from(signal).unwrap_or(0))?;
            a.str("message", description)?;
            out.end()?;
        }
        Ending::Stopped {
            after_seq,
            lost,
            reason,
        } => {
            let why = reason.split_once(": ").map_or(reason, |(_, why)| why);
            out.process_instant(
                &format!("recording stopped: {why}"),
                last,
                &[("ending", "stopped"), ("message", &message)],
                &[("after_seq", after_seq), ("lost", lost)],
            )?
        }
        other => out.process_instant(
            "recording not closed",
            last,
            &[("ending", other.name()), ("message", &message)],
            &[],
        )?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> String {
        let mut v = Vec::new();
        write_json_str(&mut v, s).unwrap();
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn strings_are_escaped_as_json_wants() {
        assert_eq!(json("plain"), "\"plain\"");
        assert_eq!(json("q\"b\\s"), r#""q\"b\\s""#);
        assert_eq!(json("\n\r\t\u{0}\u{1f}"), r#""\n\r\t\u0000\u001f""#);
        assert_eq!(json("ü → 𝄞"), "\"ü → 𝄞\"");
        assert_eq!(json(""), "\"\"");
    }

    #[test]
    fn timestamps_keep_nanoseconds() {
        let ts = |ns| {
            let mut v = Vec::new();
            write_ts(&mut v, ns).unwrap();
            String::from_utf8(v).unwrap()
        };
        assert_eq!(ts(0), "0.000");
        assert_eq!(ts(1), "0.001");
        assert_eq!(ts(12_345), "12.345");
        assert_eq!(ts(u64::MAX), "18446744073709551.615");
    }

    #[test]
    fn names_are_the_tag_and_the_short_location() {
        let mut n = String::new();
        push_name(&mut n, "w", Some(("/home/me/train.py", 12)));
        assert_eq!(n, "w train.py:12");
        push_name(&mut n, "w", Some(("cell [3]", 2)));
        assert_eq!(n, "w cell [3], line 2");
        push_name(&mut n, "w", None);
        assert_eq!(n, "w ?");
    }
}
