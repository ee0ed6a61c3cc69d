//! `memwatch query`: the changes of a trace, filtered, as a table, JSON
//! lines or CSV.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Result;
use memwatch_analyzer::{csv_cell, for_each_change, json_str, ChangeRef, Filter, WhatRef};

use crate::text::{element, hex, parse_range, parse_time_range};

const AFTER_HELP: &str = "\
Columns: seq, time (ms since the trace started), tag, variable, the line the
change is attributed to (file:line), function, thread, what changed (bytes,
or elements for a known dtype, or the kind of an object change), the op that
made it (only when some change has one: those recorded through
watch(t, via=\"dispatch\"), e.g. aten::add_.Tensor) and a sample of old -> new
(the first changed element or bytes). JSON lines and CSV always carry op
(null or empty when a change has none).

Examples:
  memwatch query run.mwt --tag layer1_weight
  memwatch query run.mwt --file train.py --line 52 --format jsonl
  memwatch query run.mwt --seq 100..200 --thread MainThread --limit 20
  memwatch query run.mwt --time 1.5s..2s --tag step
  memwatch query run.mwt --format csv > changes.csv
  memwatch query run.mwt --pid 4242 --tag worker

A run of several processes (memwatch record of a program that forks,
uses multiprocessing or subprocess) is read as one from its first trace:
the changes of every process, merged by time, with a pid column (pid and
rank in JSON lines, pid in CSV); --pid keeps some. Times are then from the
start of the run's first trace.";

/// Output formats of `memwatch query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Jsonl,
    Csv,
}

/// List the changes of a trace, filtered.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The trace file (.mwt).
    pub trace: PathBuf,
    /// Only this tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Only changes attributed to this file (a path or its end: train.py).
    #[arg(long)]
    pub file: Option<String>,
    /// Only changes attributed to this line.
    #[arg(long)]
    pub line: Option<u32>,
    /// Only changes attributed to this function (qualified or plain name).
    #[arg(long)]
    pub function: Option<String>,
    /// Only changes made by this thread (OS thread id or name).
    #[arg(long)]
    pub thread: Option<String>,
    /// Only seqs in A..B (inclusive; either end may be left out).
    #[arg(long, value_name = "A..B", value_parser = parse_range)]
    pub seq: Option<(u64, u64)>,
    /// Only changes made between times A and B after the trace started
    /// (inclusive): 1.5s..2s, 150ms.., ..20us; a plain number is nanoseconds.
    #[arg(long, value_name = "A..B", value_parser = parse_time_range)]
    pub time: Option<(u64, u64)>,
    /// Only changes made by this process (a pid of the run; repeatable,
    /// or comma-separated). Without it, every process of the run.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Stop after this many changes.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

impl Args {
    /// The filter for a trace that started `shift` ns after the run's first
    /// (times are given from the run's start).
    fn filter(&self, shift: u64) -> Filter {
        Filter {
            tag: self.tag.clone(),
            file: self.file.clone(),
            line: self.line,
            function: self.function.clone(),
            thread: self.thread.clone(),
            seq: self.seq,
            time: self
                .time
                .map(|(a, b)| (a.saturating_sub(shift), b.saturating_sub(shift))),
        }
    }
}

/// What changed, in a few words: `3 elements`, `5 bytes`, `setattr`.
pub fn changed_text(row: &ChangeRef<'_>) -> String {
    match &row.what {
        WhatRef::Bytes { ranges, .. } => {
            let bytes = ranges.bytes_changed();
            match row.region.and_then(|r| r.dtype.as_ref().map(|_| r.itemsize)) {
                Some(size) if size > 1 => {
                    let els = ranges
                        .iter()
                        .flat_map(|r| r.old.chunks(size as usize).zip(r.new.chunks(size as usize)))
                        .filter(|(a, b)| a != b)
                        .count();
                    format!("{els} element{}", if els == 1 { "" } else { "s" })
                }
                _ => format!("{bytes} byte{}", if bytes == 1 { "" } else { "s" }),
            }
        }
        WhatRef::Object { kind, key, .. } => match key {
            Some(k) => format!("{} {k}", kind.name()),
            None => kind.name().to_string(),
        },
    }
}

/// The first changed element or bytes, `old -> new`.
pub fn sample_text(row: &ChangeRef<'_>) -> String {
    match &row.what {
        WhatRef::Bytes { ranges, .. } => {
            let Some(first) = ranges.first() else {
                return String::new();
            };
            let (old, new) = (first.old, first.new);
            let region = row.region;
            if let Some((dtype, size)) =
                region.and_then(|r| r.dtype.as_deref().map(|d| (d, r.itemsize as usize)))
            {
                let pair = old
                    .chunks(size)
                    .zip(new.chunks(size))
                    .find(|(a, b)| a != b)
                    .and_then(|(a, b)| Some((element(dtype, a)?, element(dtype, b)?)));
                if let Some((a, b)) = pair {
                    return format!("{a} -> {b}");
                }
            }
            format!("{} -> {}", hex(old, 8), hex(new, 8))
        }
        WhatRef::Object { old, new, .. } => {
            format!("{} -> {}", old.unwrap_or("-"), new.unwrap_or("-"))
        }
    }
}

fn at_text(row: &ChangeRef<'_>) -> String {
    row.frame
        .map(|f| memwatch_format::location(&f.file, f.line))
        .unwrap_or_else(|| "?".into())
}

fn json_opt(s: Option<&str>) -> String {
    s.map(json_str).unwrap_or_else(|| "null".into())
}

/// One change as a JSON object (no trailing newline).
pub fn json_row(row: &ChangeRef<'_>) -> String {
    let f = row.frame;
    let mut s = format!(
        "{{\"seq\":{},\"time_ns\":{},\"tag\":{},\"variable\":{},\"file\":{},\"line\":{},\"function\":{},\"thread\":{},\"thread_name\":{}",
        row.seq,
        row.time_ns,
        json_str(row.tag),
        json_opt(row.variable),
        json_opt(f.map(|f| &*f.file)),
        f.map(|f| f.line.to_string()).unwrap_or_else(|| "null".into()),
        json_opt(f.map(|f| &*f.function)),
        row.thread,
        json_opt(row.thread_name),
    );
    match &row.what {
        WhatRef::Bytes { region, ranges } => {
            let rs: Vec<String> = ranges
                .iter()
                .map(|r| {
                    format!(
                        "{{\"offset\":{},\"old\":\"{}\",\"new\":\"{}\"}}",
                        r.offset,
                        hex(r.old, 0),
                        hex(r.new, 0)
                    )
                })
                .collect();
            s.push_str(&format!(
                ",\"kind\":\"bytes\",\"region\":{region},\"bytes_changed\":{},\"ranges\":[{}]",
                row.bytes_changed(),
                rs.join(",")
            ));
        }
        WhatRef::Object { kind, key, old, new } => s.push_str(&format!(
            ",\"kind\":\"{}\",\"key\":{},\"old\":{},\"new\":{}",
            kind.name(),
            json_opt(*key),
            json_opt(*old),
            json_opt(*new)
        )),
    }
    let stack: Vec<String> = row
        .stack()
        .map(|f| format!("[{},{},{}]", json_str(&f.file), f.line, json_str(&f.function)))
        .collect();
    s.push_str(&format!(",\"op\":{}", json_opt(row.op)));
    s.push_str(&format!(",\"stack\":[{}]}}", stack.join(",")));
    s
}

/// Lists the changes `args` asks for, of every process of the run, merged
/// by time.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<u8> {
    let procs = crate::run::open(&args.trace, &args.pid)?;
    let several = procs.len() > 1 || !args.pid.is_empty();
    let limit = args.limit.unwrap_or(usize::MAX);
    if args.format == Format::Csv {
        writeln!(out, "{CSV_HEAD}")?;
    }
    let mut found = find_changes(args, &procs, limit)?;
    check_tag_known(args, procs.len(), &found.unknown)?;
    found.merge(procs.len() > 1, limit);
    found.write(out, args.format, several)?;
    out.flush()?;
    crate::run::tail_notes(&procs);
    Ok(0)
}

/// The first line of `--format csv`.
const CSV_HEAD: &str =
    "seq,time_ns,tag,variable,file,line,function,thread,thread_name,kind,changed,sample,op,pid";

/// The changes found in the processes of a run, each with the time it
/// happened (from the run's start) and its process's order, to merge by.
#[derive(Default)]
struct Found {
    /// Table rows (`--format table`).
    rows: Vec<(u64, usize, [String; COLUMNS])>,
    /// JSON or CSV lines (`--format jsonl`, `csv`).
    lines: Vec<(u64, usize, String)>,
    /// Of a run of several processes, each one's error for a `--tag` it
    /// does not have.
    unknown: Vec<memwatch_analyzer::Error>,
}

/// Scans every process of the run for the changes `args` asks for (the
/// first `limit` of each), formatted as `args.format` wants them.
fn find_changes(args: &Args, procs: &[crate::run::Proc], limit: usize) -> Result<Found> {
    let base = crate::run::base_ns(procs);
    let mut found = Found::default();
    // A run's processes watch different things (torchrun's launcher, a
    // Pool's parent, watch nothing): --tag skips a process without the tag
    // while another has it.
    for (order, p) in procs.iter().enumerate() {
        let shift = p.shift_ns(base);
        let pid_text = p.label();
        let mut n = 0usize;
        let scanned = for_each_change(&p.reader, &args.filter(shift), |row| {
            // The first `limit` of each process include the first `limit` of all.
            if n >= limit {
                return ControlFlow::Break(());
            }
            n += 1;
            let at = row.time_ns + shift;
            match args.format {
                Format::Table => found.rows.push((at, order, table_row(row, at, &pid_text))),
                Format::Jsonl => found.lines.push((at, order, jsonl_line(row, p))),
                Format::Csv => found.lines.push((at, order, csv_line(row, p.pid))),
            }
            ControlFlow::Continue(())
        });
        match scanned {
            Ok(_) => {}
            Err(e @ memwatch_analyzer::Error::UnknownTag { .. }) if procs.len() > 1 => found.unknown.push(e),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(found)
}

/// A change as a row of the table, `at` ns after the run started, in the
/// process `pid_text`.
fn table_row(row: &ChangeRef<'_>, at: u64, pid_text: &str) -> [String; COLUMNS] {
    [
        pid_text.to_string(),
        row.seq.to_string(),
        format!("{:.3}", at as f64 / 1e6),
        row.tag.to_string(),
        row.variable.unwrap_or("-").to_string(),
        at_text(row),
        row.frame.map(|f| f.function.to_string()).unwrap_or_default(),
        row.thread_name
            .map(String::from)
            .unwrap_or_else(|| row.thread.to_string()),
        changed_text(row),
        row.op.unwrap_or("").to_string(),
        sample_text(row),
    ]
}

/// A change as a JSON line: [`json_row`] with its process's pid (and rank).
fn jsonl_line(row: &ChangeRef<'_>, p: &crate::run::Proc) -> String {
    let mut j = json_row(row);
    j.pop();
    j.push_str(&format!(",\"pid\":{}", p.pid));
    if let Some(r) = p.rank {
        j.push_str(&format!(",\"rank\":{r}"));
    }
    j.push('}');
    j
}

/// A change as a CSV line, the columns of [`CSV_HEAD`].
fn csv_line(row: &ChangeRef<'_>, pid: u32) -> String {
    let f = row.frame;
    let kind = row.kind_name();
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        row.seq,
        row.time_ns,
        csv_cell(row.tag),
        csv_cell(row.variable.unwrap_or("")),
        csv_cell(f.map(|f| &*f.file).unwrap_or("")),
        f.map(|f| f.line.to_string()).unwrap_or_default(),
        csv_cell(f.map(|f| &*f.function).unwrap_or("")),
        row.thread,
        csv_cell(row.thread_name.unwrap_or("")),
        kind,
        csv_cell(&changed_text(row)),
        csv_cell(&sample_text(row)),
        csv_cell(row.op.unwrap_or("")),
        pid,
    )
}

/// Refuses a `--tag` that no process of a run of several has (in a run of
/// one, the scan itself refuses it), naming the tags they have.
fn check_tag_known(args: &Args, procs: usize, unknown: &[memwatch_analyzer::Error]) -> Result<()> {
    if procs > 1 && unknown.len() == procs {
        let mut known: Vec<String> = unknown
            .iter()
            .flat_map(|e| match e {
                memwatch_analyzer::Error::UnknownTag { known, .. } => known.clone(),
                _ => Vec::new(),
            })
            .collect();
        known.sort();
        known.dedup();
        anyhow::bail!(
            "no process of this run has a tag {:?}; their tags are: {}",
            args.tag.as_deref().unwrap_or(""),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    Ok(())
}

impl Found {
    /// Merges the processes' changes by time (when there are `several`)
    /// and keeps the first `limit`.
    fn merge(&mut self, several: bool, limit: usize) {
        // One process's rows are in seq order already: a stable sort by time
        // keeps them so, and puts the others between them.
        if several {
            self.rows.sort_by_key(|(at, _, _)| *at);
            self.lines.sort_by_key(|(at, _, _)| *at);
        }
        self.rows.truncate(limit);
        self.lines.truncate(limit);
    }

    /// Writes the lines, or for `--format table` the table (with a pid
    /// column when `with_pid`) and `(no changes match)` under an empty one.
    fn write(self, out: &mut dyn Write, format: Format, with_pid: bool) -> Result<()> {
        for (_, _, l) in &self.lines {
            writeln!(out, "{l}")?;
        }
        if format == Format::Table {
            let table: Vec<[String; COLUMNS]> = self.rows.into_iter().map(|(_, _, r)| r).collect();
            write_table(out, &table, with_pid)?;
            if table.is_empty() {
                writeln!(out, "(no changes match)")?;
            }
        }
        Ok(())
    }
}

/// Columns of the table; the op column ([`OP_COLUMN`]) is left out when no
/// row has an op.
const COLUMNS: usize = 11;
const OP_COLUMN: usize = 9;
const PID_COLUMN: usize = 0;

/// The table; the pid column only when the run has several processes.
fn write_table(out: &mut dyn Write, rows: &[[String; COLUMNS]], with_pid: bool) -> std::io::Result<()> {
    const HEAD: [&str; COLUMNS] = [
        "pid",
        "seq",
        "time_ms",
        "tag",
        "variable",
        "at",
        "function",
        "thread",
        "changed",
        "op",
        "old -> new",
    ];
    let with_op = rows.iter().any(|r| !r[OP_COLUMN].is_empty());
    let shown = |i: &usize| (with_op || *i != OP_COLUMN) && (with_pid || *i != PID_COLUMN);
    let mut width: Vec<usize> = HEAD.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count().min(60));
        }
    }
    let width: Vec<usize> = (0..COLUMNS).filter(shown).map(|i| width[i]).collect();
    let line = |cells: &[&str]| -> String {
        let parts: Vec<String> = cells
            .iter()
            .zip(&width)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == cells.len() - 1 {
                    c.to_string()
                } else {
                    format!("{c:<w$}", w = *w)
                }
            })
            .collect();
        parts.join("  ").trim_end().to_string()
    };
    let head: Vec<&str> = (0..COLUMNS).filter(shown).map(|i| HEAD[i]).collect();
    writeln!(out, "{}", line(&head))?;
    for r in rows {
        let cells: Vec<&str> = (0..COLUMNS)
            .filter(shown)
            .map(|i| {
                if i == OP_COLUMN && r[i].is_empty() {
                    "-"
                } else {
                    r[i].as_str()
                }
            })
            .collect();
        writeln!(out, "{}", line(&cells))?;
    }
    Ok(())
}
