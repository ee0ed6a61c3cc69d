//! `memwatch summary`: the run (program, duration, how it ended, the
//! trace), then per tag (changes, bytes and elements, first and last
//! change, busiest lines, threads), then anything suspicious.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use memwatch_analyzer::{duration_text, for_each_event, json_str, Event, Filter, FrameInfo, WhatRef};
use memwatch_format::{Ending, Record, TraceReader, NO_SEQ};

use crate::text::{elements_changed, utc};

const AFTER_HELP: &str = "\
First the run: the program and its process, when it started and for how
long it ran, how the recording ended (closed normally, the program died of
a signal, recording stopped by a full disk or a file size limit, or the
trace was never closed), and the trace's size per change and checkpoints.

Then for each tag: changes, bytes changed, elements changed (for a known
dtype), the first and last change (seq and time since the start), the
lines that changed it most and the threads that did. Then anything
suspicious: NaN or Inf appearing in a float region, writes from threads
other than the main one.

--format json prints the same as one JSON object, for scripts (its keys
are in docs/index.md).

A run of several processes (fork, multiprocessing, subprocess, torchrun:
run.PID.mwt or run.rankR.PID.mwt beside run.mwt) is summarized whole from
its first trace: one line per process (pid, rank, parent, trace, when it
started and for how long it ran, its changes, how its trace ended) and the
run's totals, then each tag per process (`w (pid 4243)`: a fork's child
keeps its parent's watches under the same tags), times counted from the
run's start. --pid keeps some processes. In JSON, a `processes` array and
a `pid` (and `rank`) on each tag.

Examples:
  memwatch summary run.mwt
  memwatch summary run.mwt --top 10
  memwatch summary run.mwt --format json | jq '.tags[].changes'
  memwatch summary run.mwt --pid 4243          # one process of a run
  memwatch summary run.mwt --format json | jq '.processes[] | [.pid, .changes]'";

/// Output formats of `memwatch summary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Summarize a trace: the run, each tag, anything suspicious.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The trace file (.mwt).
    pub trace: PathBuf,
    /// How many of the busiest lines to show per tag.
    #[arg(long, default_value_t = 3)]
    pub top: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Only these processes of the run (pids; repeatable, or
    /// comma-separated). Without it, every process of the run.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
}

/// A line, identified by its interned strings (shared by every change on
/// it, so comparing pointers is comparing the strings) and its number.
type LineKey = (usize, u32, usize);

#[derive(Default)]
struct TagStats {
    changes: u64,
    bytes: u64,
    /// Elements changed, summed over the changes whose region has a dtype.
    elements: Option<u64>,
    first: (u64, u64),
    last: (u64, u64),
    lines: HashMap<LineKey, (FrameInfo, u64, u64)>,
    /// Changes without a line.
    unknown_line: (u64, u64),
    /// By thread id: its last name and its changes.
    threads: HashMap<u64, (Option<Arc<str>>, u64)>,
    /// By kind of object change (`setattr`, ...).
    kinds: BTreeMap<&'static str, u64>,
}

impl TagStats {
    /// The `top` busiest lines: (where, changes, bytes), most changes first.
    fn busiest(&self, top: usize) -> Vec<(Option<&FrameInfo>, u64, u64)> {
        let mut v: Vec<_> = self.lines.values().map(|(f, n, b)| (Some(f), *n, *b)).collect();
        if self.unknown_line.0 > 0 {
            v.push((None, self.unknown_line.0, self.unknown_line.1));
        }
        let at = |f: &Option<&FrameInfo>| f.map(|f| (f.file.clone(), f.line));
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| at(&a.0).cmp(&at(&b.0))));
        v.truncate(top);
        v
    }

    /// Threads, most changes first: (id, name, changes).
    fn threads(&self) -> Vec<(u64, Option<&str>, u64)> {
        let mut v: Vec<_> = self
            .threads
            .iter()
            .map(|(t, (n, c))| (*t, n.as_deref(), *c))
            .collect();
        v.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        v
    }
}

/// Everything the summary says, gathered in one scan.
#[derive(Default)]
struct Run {
    tags: HashMap<Box<str>, TagStats>,
    changes: u64,
    bytes: u64,
    checkpoints: u64,
    regions: u64,
    last_ns: u64,
    warnings: Vec<String>,
    /// Warnings past [`MAX_WARNINGS`], counted.
    more_warnings: u64,
    other_threads: BTreeMap<(String, String), u64>,
    waited: (u64, u64),
}

/// Warnings listed; more are only counted.
const MAX_WARNINGS: usize = 50;

fn non_finite(dtype: memwatch_format::dtype::Dtype, b: &[u8]) -> bool {
    dtype.decode(b).is_some_and(|v| v.is_nonfinite())
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn at_text(f: Option<&FrameInfo>) -> String {
    f.map(|f| format!("{} ({})", memwatch_format::location(&f.file, f.line), f.function))
        .unwrap_or_else(|| "?".into())
}

fn gather(reader: &TraceReader) -> Result<Run> {
    let mut run = Run::default();
    let syms = for_each_event(reader, &Filter::default(), &mut |_, _| {}, |e| {
        let row = match e {
            Event::Change(row) => row,
            Event::Record(rec, _) => {
                match rec {
                    Record::Checkpoint(_) => run.checkpoints += 1,
                    Record::RegionWatched(r) => {
                        run.regions += 1;
                        run.last_ns = run.last_ns.max(r.ctx.time_ns);
                    }
                    Record::RegionUnwatched(u) => run.last_ns = run.last_ns.max(u.ctx.time_ns),
                    _ => {}
                }
                return ControlFlow::Continue(());
            }
        };
        let bytes = row.bytes_changed();
        run.changes += 1;
        run.bytes += bytes;
        run.last_ns = run.last_ns.max(row.time_ns);
        if !run.tags.contains_key(row.tag) {
            run.tags.insert(Box::from(row.tag), TagStats::default());
        }
        let Some(t) = run.tags.get_mut(row.tag) else {
            return ControlFlow::Continue(());
        };
        if t.changes == 0 {
            t.first = (row.seq, row.time_ns);
        }
        t.changes += 1;
        t.last = (row.seq, row.time_ns);
        t.bytes += bytes;
        if let Some(n) = elements_changed(row) {
            *t.elements.get_or_insert(0) += n;
        }
        if let WhatRef::Object { kind, .. } = row.what {
            *t.kinds.entry(kind.name()).or_default() += 1;
        }
        match row.frame {
            Some(f) => {
                let key = (
                    Arc::as_ptr(&f.file) as *const u8 as usize,
                    f.line,
                    Arc::as_ptr(&f.function) as *const u8 as usize,
                );
                let e = t.lines.entry(key).or_insert_with(|| (f.clone(), 0, 0));
                e.1 += 1;
                e.2 += bytes;
            }
            None => {
                t.unknown_line.0 += 1;
                t.unknown_line.1 += bytes;
            }
        }
        let th = t.threads.entry(row.thread).or_insert((None, 0));
        th.1 += 1;
        if th.0.as_deref() != row.thread_name {
            th.0 = row.thread_name.map(Arc::from);
        }
        if row.thread_name != Some("MainThread") {
            let name = row
                .thread_name
                .map(String::from)
                .unwrap_or_else(|| row.thread.to_string());
            *run.other_threads.entry((row.tag.to_string(), name)).or_default() += 1;
        }
        if let (WhatRef::Bytes { ranges, .. }, Some(region)) = (&row.what, row.region) {
            if let Some(d) = region
                .dtype
                .as_deref()
                .and_then(memwatch_format::dtype::Dtype::parse)
            {
                let size = region.itemsize.max(1) as usize;
                let introduced = ranges.iter().any(|r| {
                    r.old
                        .chunks(size)
                        .zip(r.new.chunks(size))
                        .any(|(a, b)| !non_finite(d, a) && non_finite(d, b))
                });
                if introduced && run.warnings.len() >= MAX_WARNINGS {
                    run.more_warnings += 1;
                } else if introduced {
                    run.warnings.push(format!(
                        "NaN or Inf written into {} at seq {} by {}",
                        row.tag,
                        row.seq,
                        at_text(row.frame)
                    ));
                }
            }
        }
        ControlFlow::Continue(())
    })?;
    run.waited = syms.waited;
    Ok(run)
}

/// How long the run lasted: to the trace's close, the crash, or the last
/// event seen.
pub(crate) fn duration_ns(ending: &Ending<'_>, last_ns: u64) -> u64 {
    match ending {
        Ending::Closed { end_time_ns } => (*end_time_ns).max(last_ns),
        Ending::Crashed { time_ns, .. } => (*time_ns).max(last_ns),
        _ => last_ns,
    }
}

/// The ending in words.
pub(crate) fn ending_text(reader: &TraceReader, ending: &Ending<'_>) -> String {
    match ending {
        Ending::Closed { .. } => "closed normally".into(),
        Ending::Crashed { description, .. } => description.to_string(),
        Ending::Stopped {
            after_seq,
            lost,
            reason,
        } => {
            let after = if *after_seq == NO_SEQ {
                "before the first event".to_string()
            } else {
                format!("after seq {after_seq}")
            };
            let lost = match lost {
                0 => String::new(),
                n => format!(
                    "; {} not recorded",
                    plural(*n, "later event was", "later events were")
                ),
            };
            format!("{reason}, {after}{lost}")
        }
        Ending::Truncated { bytes_ignored } => format!(
            "cut off: the last {} are part of a chunk that was never finished (the process ended \
             while writing it)",
            plural(*bytes_ignored, "byte", "bytes")
        ),
        _ => match reader.recovered() {
            Some(_) => "not closed: the process was killed or ended without closing the trace (SIGKILL, \
                        os._exit); its last records were recovered from the journal"
                .into(),
            None => "not closed: the process was killed or ended without closing the trace (SIGKILL, \
                     os._exit), or is still recording"
                .into(),
        },
    }
}

pub(crate) fn trace_size(reader: &TraceReader) -> u64 {
    std::fs::metadata(reader.path()).map_or(reader.file_len(), |m| m.len())
}

/// [`gather`], and the writes from other threads as warnings.
fn gather_all(reader: &TraceReader) -> Result<Run> {
    let mut run = gather(reader)?;
    for ((tag, thread), n) in &run.other_threads {
        if run.warnings.len() >= MAX_WARNINGS {
            run.more_warnings += 1;
            continue;
        }
        run.warnings.push(format!(
            "{tag} was written by thread {thread} ({})",
            plural(*n, "change", "changes")
        ));
    }
    Ok(run)
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<u8> {
    let procs = crate::run::open(&args.trace, &args.pid)?;
    let runs = procs
        .iter()
        .map(|p| gather_all(&p.reader))
        .collect::<Result<Vec<_>>>()?;
    if let ([p], [run], true) = (procs.as_slice(), runs.as_slice(), args.pid.is_empty()) {
        match args.format {
            Format::Text => write_text(args, &p.reader, run, out)?,
            Format::Json => write_json(args, &p.reader, run, out)?,
        }
    } else {
        let summary = RunSummary::new(&procs, &runs);
        match args.format {
            Format::Text => summary.write_text(args, out)?,
            Format::Json => summary.write_json(args, out)?,
        }
    }
    out.flush()?;
    crate::run::tail_notes(&procs);
    Ok(0)
}

fn sorted_tags(run: &Run) -> Vec<(&str, &TagStats)> {
    let mut v: Vec<_> = run.tags.iter().map(|(k, t)| (&**k, t)).collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

fn write_text(args: &Args, reader: &TraceReader, run: &Run, out: &mut dyn Write) -> Result<()> {
    let meta = &reader.header().meta;
    let ending = reader.ending();
    if !meta.argv.is_empty() {
        writeln!(out, "program: {}", meta.argv.join(" "))?;
    }
    let mut process = format!("process: pid {}", meta.pid);
    if !meta.python_version.is_empty() {
        process.push_str(&format!(", python {}", meta.python_version));
    }
    for part in [&meta.platform, &meta.writer] {
        if !part.is_empty() {
            process.push_str(", ");
            process.push_str(part);
        }
    }
    if !meta.properties.is_empty() {
        let props: Vec<String> = meta.properties.iter().map(|(k, v)| format!("{k} {v}")).collect();
        process.push_str(&format!(" ({})", props.join(", ")));
    }
    writeln!(out, "{process}")?;
    writeln!(
        out,
        "ran: from {} for {}",
        utc(meta.start_time_ns),
        duration_text(duration_ns(&ending, run.last_ns))
    )?;
    writeln!(out, "ended: {}", ending_text(reader, &ending))?;
    let size = trace_size(reader);
    let per = if run.changes > 0 {
        format!(" ({:.1} bytes per change)", size as f64 / run.changes as f64)
    } else {
        String::new()
    };
    writeln!(
        out,
        "trace: {}, {}{per}, {}, {}, {}",
        reader.path().display(),
        plural(size, "byte", "bytes"),
        plural(run.changes, "change", "changes"),
        plural(run.regions, "region watched", "regions watched"),
        plural(run.checkpoints, "checkpoint", "checkpoints"),
    )?;
    if run.tags.is_empty() {
        writeln!(out, "no changes recorded")?;
    }
    for (tag, t) in sorted_tags(run) {
        write_tag_text(args, tag, t, 0, out)?;
    }
    if !run.warnings.is_empty() {
        writeln!(out, "suspicious:")?;
        for w in &run.warnings {
            writeln!(out, "  {w}")?;
        }
        if run.more_warnings > 0 {
            writeln!(out, "  ... and {} more", run.more_warnings)?;
        }
    }
    let (waited, waits) = run.waited;
    if waits > 0 {
        writeln!(
            out,
            "the program waited {} for the trace's writer ({}): it changed memory faster \
             than the writer compressed it (`memwatch record --compression` with a lower level is faster)",
            duration_text(waited),
            plural(waits, "time", "times"),
        )?;
    }
    Ok(())
}

/// One tag's lines of the text summary, headed `name`, `shift` added to
/// its times.
fn write_tag_text(args: &Args, name: &str, t: &TagStats, shift: u64, out: &mut dyn Write) -> Result<()> {
    let mut head = format!("{name}: {}", plural(t.changes, "change", "changes"));
    if t.kinds.is_empty() || t.bytes > 0 {
        head.push_str(&format!(", {} changed", plural(t.bytes, "byte", "bytes")));
    }
    if let Some(n) = t.elements {
        head.push_str(&format!(", {} changed", plural(n, "element", "elements")));
    }
    if !t.kinds.is_empty() {
        let kinds: Vec<String> = t.kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        head.push_str(&format!(" ({})", kinds.join(", ")));
    }
    writeln!(out, "{head}")?;
    writeln!(
        out,
        "  first: seq {} at {}; last: seq {} at {}",
        t.first.0,
        duration_text(t.first.1 + shift),
        t.last.0,
        duration_text(t.last.1 + shift)
    )?;
    let objects_only = !t.kinds.is_empty() && t.bytes == 0;
    for (f, n, bytes) in t.busiest(args.top) {
        let (c, b) = (if n == 1 { " " } else { "s" }, if bytes == 1 { " " } else { "s" });
        if objects_only {
            writeln!(out, "  {n:>8} change{c}  {}", at_text(f))?;
        } else {
            writeln!(out, "  {n:>8} change{c}  {bytes:>12} byte{b}  {}", at_text(f))?;
        }
    }
    let threads: Vec<String> = t
        .threads()
        .iter()
        .map(|(id, name, n)| match name {
            Some(name) => format!("{name} ({n})"),
            None => format!("thread {id} ({n})"),
        })
        .collect();
    writeln!(out, "  threads: {}", threads.join(", "))?;
    Ok(())
}

fn json_frame(f: Option<&FrameInfo>) -> String {
    match f {
        Some(f) => format!(
            "\"file\":{},\"line\":{},\"function\":{}",
            json_str(&f.file),
            f.line,
            json_str(&f.function)
        ),
        None => "\"file\":null,\"line\":null,\"function\":null".into(),
    }
}

/// How `reader`'s trace ended, as the JSON object `summary` prints.
fn ending_json(reader: &TraceReader) -> String {
    let ending = reader.ending();
    let extra = match ending {
        Ending::Crashed {
            signal,
            thread,
            time_ns,
            ..
        } => format!(
            ",\"signal\":{signal},\"signal_name\":{},\"thread\":{thread},\"time_ns\":{time_ns}",
            json_str(&memwatch_format::crash::signal_name(signal))
        ),
        Ending::Stopped { after_seq, lost, .. } => {
            let after = if after_seq == NO_SEQ {
                "null".to_string()
            } else {
                after_seq.to_string()
            };
            format!(",\"after_seq\":{after},\"lost\":{lost}")
        }
        Ending::Closed { end_time_ns } => format!(",\"time_ns\":{end_time_ns}"),
        Ending::Truncated { bytes_ignored } => format!(",\"bytes_ignored\":{bytes_ignored}"),
        _ => String::new(),
    };
    format!(
        "{{\"how\":{},\"message\":{}{extra}}}",
        json_str(ending.name()),
        json_str(&ending_text(reader, &ending))
    )
}

/// One tag's JSON object; `process` is put first inside it (`"pid":4243,`
/// for a run), `shift` added to its times.
fn tag_json(args: &Args, tag: &str, t: &TagStats, process: &str, shift: u64) -> String {
    let lines: Vec<String> = t
        .busiest(args.top)
        .into_iter()
        .map(|(f, n, b)| format!("{{{},\"changes\":{n},\"bytes_changed\":{b}}}", json_frame(f)))
        .collect();
    let threads: Vec<String> = t
        .threads()
        .into_iter()
        .map(|(id, name, n)| {
            format!(
                "{{\"thread\":{id},\"thread_name\":{},\"changes\":{n}}}",
                name.map_or("null".into(), json_str)
            )
        })
        .collect();
    let kinds: Vec<String> = t
        .kinds
        .iter()
        .map(|(k, n)| format!("{}:{n}", json_str(k)))
        .collect();
    format!(
        "{{{process}\"tag\":{},\"changes\":{},\"bytes_changed\":{},\"elements_changed\":{},\
         \"first_seq\":{},\"first_time_ns\":{},\"last_seq\":{},\"last_time_ns\":{},\
         \"kinds\":{{{}}},\"lines\":[{}],\"threads\":[{}]}}",
        json_str(tag),
        t.changes,
        t.bytes,
        t.elements.map_or("null".into(), |n| n.to_string()),
        t.first.0,
        t.first.1 + shift,
        t.last.0,
        t.last.1 + shift,
        kinds.join(","),
        lines.join(","),
        threads.join(","),
    )
}

fn write_json(args: &Args, reader: &TraceReader, run: &Run, out: &mut dyn Write) -> Result<()> {
    let meta = &reader.header().meta;
    let ending = reader.ending();
    let argv: Vec<String> = meta.argv.iter().map(|a| json_str(a)).collect();
    let props: Vec<String> = meta
        .properties
        .iter()
        .map(|(k, v)| format!("{}:{}", json_str(k), json_str(v)))
        .collect();
    let size = trace_size(reader);
    let per = if run.changes > 0 {
        format!("{:.3}", size as f64 / run.changes as f64)
    } else {
        "null".into()
    };
    write!(
        out,
        "{{\"trace\":{},\"argv\":[{}],\"pid\":{},\"python_version\":{},\"platform\":{},\"writer\":{},\
         \"properties\":{{{}}},\"start_time_ns\":{},\"duration_ns\":{},\"trace_bytes\":{size},\
         \"changes\":{},\"bytes_changed\":{},\"bytes_per_change\":{per},\"regions_watched\":{},\
         \"checkpoints\":{},\"waited_ns\":{},\"waits\":{},",
        json_str(&reader.path().display().to_string()),
        argv.join(","),
        meta.pid,
        json_str(&meta.python_version),
        json_str(&meta.platform),
        json_str(&meta.writer),
        props.join(","),
        meta.start_time_ns,
        duration_ns(&ending, run.last_ns),
        run.changes,
        run.bytes,
        run.regions,
        run.checkpoints,
        run.waited.0,
        run.waited.1,
    )?;
    write!(out, "\"ending\":{},\"tags\":[", ending_json(reader))?;
    for (i, (tag, t)) in sorted_tags(run).into_iter().enumerate() {
        write!(
            out,
            "{}{}",
            if i == 0 { "" } else { "," },
            tag_json(args, tag, t, "", 0)
        )?;
    }
    let warnings: Vec<String> = run.warnings.iter().map(|w| json_str(w)).collect();
    writeln!(
        out,
        "],\"suspicious\":[{}],\"more_suspicious\":{}}}",
        warnings.join(","),
        run.more_warnings
    )?;
    Ok(())
}

/// The summary of a run of several processes (or of the processes that
/// `--pid` kept): one line per process, the run's totals, then each tag
/// per process, times from the run's start.
struct RunSummary<'a> {
    procs: &'a [crate::run::Proc],
    runs: &'a [Run],
    base: u64,
}

/// `pid 4243 (rank 1, parent 4242)`.
fn process_text(p: &crate::run::Proc) -> String {
    let mut about = Vec::new();
    if let Some(r) = p.rank {
        about.push(format!("rank {r}"));
    }
    if let Some(parent) = p.parent {
        about.push(format!("parent {parent}"));
    }
    if about.is_empty() {
        format!("pid {}", p.pid)
    } else {
        format!("pid {} ({})", p.pid, about.join(", "))
    }
}

/// `(pid 4243)` or `(pid 4243, rank 1)`, after a tag.
fn tag_process(p: &crate::run::Proc) -> String {
    match p.rank {
        Some(r) => format!("(pid {}, rank {r})", p.pid),
        None => format!("(pid {})", p.pid),
    }
}

fn file_name(reader: &TraceReader) -> String {
    reader.path().file_name().map_or_else(
        || reader.path().display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

impl<'a> RunSummary<'a> {
    fn new(procs: &'a [crate::run::Proc], runs: &'a [Run]) -> Self {
        RunSummary {
            procs,
            runs,
            base: crate::run::base_ns(procs),
        }
    }

    /// Process `i`'s (start, duration) in ns, its start from the run's.
    fn span(&self, i: usize) -> (u64, u64) {
        let p = &self.procs[i];
        (
            p.shift_ns(self.base),
            duration_ns(&p.reader.ending(), self.runs[i].last_ns),
        )
    }

    /// From the run's start to the end of its last process.
    fn duration(&self) -> u64 {
        (0..self.procs.len())
            .map(|i| {
                let (s, d) = self.span(i);
                s + d
            })
            .max()
            .unwrap_or(0)
    }

    fn total(&self, f: impl Fn(&Run) -> u64) -> u64 {
        self.runs.iter().map(f).sum()
    }

    fn trace_bytes(&self) -> u64 {
        self.procs.iter().map(|p| trace_size(&p.reader)).sum()
    }

    /// Every (tag, process) with changes: by tag, then in the run's order
    /// of processes.
    fn tags(&self) -> Vec<(&'a str, usize, &'a TagStats)> {
        let mut v: Vec<_> = self
            .runs
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.tags.iter().map(move |(k, t)| (&**k, i, t)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0).then(a.1.cmp(&b.1)));
        v
    }

    /// The tags changed in several processes: (tag, processes, changes,
    /// bytes), for the run's totals.
    fn shared_tags(&self) -> Vec<(&'a str, Vec<usize>, u64, u64)> {
        let mut out: Vec<(&str, Vec<usize>, u64, u64)> = Vec::new();
        for (tag, i, t) in self.tags() {
            match out.last_mut() {
                Some(last) if last.0 == tag => {
                    last.1.push(i);
                    last.2 += t.changes;
                    last.3 += t.bytes;
                }
                _ => out.push((tag, vec![i], t.changes, t.bytes)),
            }
        }
        out.retain(|s| s.1.len() > 1);
        out
    }

    fn write_text(&self, args: &Args, out: &mut dyn Write) -> Result<()> {
        let root = &self.procs[0].reader.header().meta;
        if !root.argv.is_empty() {
            writeln!(out, "program: {}", root.argv.join(" "))?;
        }
        writeln!(
            out,
            "run: {}, from {} for {} (times below are from the run's start; seqs are each process's own)",
            plural(self.procs.len() as u64, "process", "processes"),
            utc(self.base),
            duration_text(self.duration())
        )?;
        for (i, (p, run)) in self.procs.iter().zip(self.runs).enumerate() {
            let meta = &p.reader.header().meta;
            let (start, dur) = self.span(i);
            let mut line = format!("  {}: {}", process_text(p), file_name(&p.reader));
            if !meta.argv.is_empty() && meta.argv != root.argv {
                line.push_str(&format!(", program: {}", meta.argv.join(" ")));
            }
            line.push_str(&format!(
                ", from {} for {}, {}, {}; ended: {}",
                duration_text(start),
                duration_text(dur),
                plural(run.changes, "change", "changes"),
                plural(run.regions, "region watched", "regions watched"),
                ending_text(&p.reader, &p.reader.ending())
            ));
            writeln!(out, "{line}")?;
        }
        let changes = self.total(|r| r.changes);
        let size = self.trace_bytes();
        let per = if changes > 0 {
            format!(" ({:.1} bytes per change)", size as f64 / changes as f64)
        } else {
            String::new()
        };
        writeln!(
            out,
            "total: {}, {} changed, {}, {}; {}, {}{per}",
            plural(changes, "change", "changes"),
            plural(self.total(|r| r.bytes), "byte", "bytes"),
            plural(self.total(|r| r.regions), "region watched", "regions watched"),
            plural(self.total(|r| r.checkpoints), "checkpoint", "checkpoints"),
            plural(self.procs.len() as u64, "trace", "traces"),
            plural(size, "byte", "bytes"),
        )?;
        for (tag, procs, n, bytes) in self.shared_tags() {
            let pids: Vec<String> = procs.iter().map(|&i| self.procs[i].pid.to_string()).collect();
            writeln!(
                out,
                "  {tag}: {}, {} changed, in {} (pids {})",
                plural(n, "change", "changes"),
                plural(bytes, "byte", "bytes"),
                plural(procs.len() as u64, "process", "processes"),
                pids.join(", ")
            )?;
        }
        let tags = self.tags();
        if tags.is_empty() {
            writeln!(out, "no changes recorded")?;
        }
        for (tag, i, t) in tags {
            let shift = self.procs[i].shift_ns(self.base);
            write_tag_text(
                args,
                &format!("{tag} {}", tag_process(&self.procs[i])),
                t,
                shift,
                out,
            )?;
        }
        let warned = self.runs.iter().any(|r| !r.warnings.is_empty());
        if warned {
            writeln!(out, "suspicious:")?;
            for (p, r) in self.procs.iter().zip(self.runs) {
                for w in &r.warnings {
                    writeln!(out, "  pid {}: {w}", p.pid)?;
                }
                if r.more_warnings > 0 {
                    writeln!(out, "  pid {}: ... and {} more", p.pid, r.more_warnings)?;
                }
            }
        }
        for (p, r) in self.procs.iter().zip(self.runs) {
            let (waited, waits) = r.waited;
            if waits > 0 {
                writeln!(
                    out,
                    "process {} waited {} for its trace's writer ({}): it changed memory faster \
                     than the writer compressed it (`memwatch record --compression` with a lower level is faster)",
                    p.pid,
                    duration_text(waited),
                    plural(waits, "time", "times"),
                )?;
            }
        }
        Ok(())
    }

    fn write_json(&self, args: &Args, out: &mut dyn Write) -> Result<()> {
        let first = &self.procs[0];
        let meta = &first.reader.header().meta;
        let argv = |m: &memwatch_format::Meta| {
            let v: Vec<String> = m.argv.iter().map(|a| json_str(a)).collect();
            v.join(",")
        };
        let props: Vec<String> = meta
            .properties
            .iter()
            .map(|(k, v)| format!("{}:{}", json_str(k), json_str(v)))
            .collect();
        let changes = self.total(|r| r.changes);
        let size = self.trace_bytes();
        let per = if changes > 0 {
            format!("{:.3}", size as f64 / changes as f64)
        } else {
            "null".into()
        };
        let opt = |v: Option<u32>| v.map_or("null".into(), |n| n.to_string());
        write!(
            out,
            "{{\"trace\":{},\"argv\":[{}],\"pid\":{},\"python_version\":{},\"platform\":{},\"writer\":{},\
             \"properties\":{{{}}},\"start_time_ns\":{},\"duration_ns\":{},\"trace_bytes\":{size},\
             \"changes\":{changes},\"bytes_changed\":{},\"bytes_per_change\":{per},\"regions_watched\":{},\
             \"checkpoints\":{},\"waited_ns\":{},\"waits\":{},\"ending\":{},\"processes\":[",
            json_str(&first.reader.path().display().to_string()),
            argv(meta),
            first.pid,
            json_str(&meta.python_version),
            json_str(&meta.platform),
            json_str(&meta.writer),
            props.join(","),
            self.base,
            self.duration(),
            self.total(|r| r.bytes),
            self.total(|r| r.regions),
            self.total(|r| r.checkpoints),
            self.total(|r| r.waited.0),
            self.total(|r| r.waited.1),
            ending_json(&first.reader),
        )?;
        for (i, (p, r)) in self.procs.iter().zip(self.runs).enumerate() {
            let m = &p.reader.header().meta;
            let (start, dur) = self.span(i);
            write!(
                out,
                "{}{{\"pid\":{},\"rank\":{},\"parent\":{},\"trace\":{},\"argv\":[{}],\"start_time_ns\":{},\
                 \"start_ns\":{start},\"duration_ns\":{dur},\"trace_bytes\":{},\"changes\":{},\
                 \"bytes_changed\":{},\"regions_watched\":{},\"checkpoints\":{},\"waited_ns\":{},\
                 \"waits\":{},\"ending\":{}}}",
                if i == 0 { "" } else { "," },
                p.pid,
                opt(p.rank),
                opt(p.parent),
                json_str(&p.reader.path().display().to_string()),
                argv(m),
                p.start_ns,
                trace_size(&p.reader),
                r.changes,
                r.bytes,
                r.regions,
                r.checkpoints,
                r.waited.0,
                r.waited.1,
                ending_json(&p.reader),
            )?;
        }
        write!(out, "],\"tags\":[")?;
        for (k, (tag, i, t)) in self.tags().into_iter().enumerate() {
            let p = &self.procs[i];
            let process = format!("\"pid\":{},\"rank\":{},", p.pid, opt(p.rank));
            let shift = p.shift_ns(self.base);
            write!(
                out,
                "{}{}",
                if k == 0 { "" } else { "," },
                tag_json(args, tag, t, &process, shift)
            )?;
        }
        let mut warnings = Vec::new();
        for (p, r) in self.procs.iter().zip(self.runs) {
            warnings.extend(
                r.warnings
                    .iter()
                    .map(|w| json_str(&format!("pid {}: {w}", p.pid))),
            );
        }
        writeln!(
            out,
            "],\"suspicious\":[{}],\"more_suspicious\":{}}}",
            warnings.join(","),
            self.total(|r| r.more_warnings)
        )?;
        Ok(())
    }
}
