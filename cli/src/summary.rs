//! `memwatch summary`: per tag and per line, and anything suspicious.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Result;
use memwatch_analyzer::{for_each_change, Filter, WhatRef};
use memwatch_format::TraceReader;

const AFTER_HELP: &str = "\
For each tag: changes, bytes changed, first and last seq, and the lines that
changed it most. Then anything suspicious: NaN or Inf appearing in a float
region, writes from threads other than the main one.

Example:
  memwatch summary run.mwt";

/// Summarize a trace per tag and per line.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The trace file (.mwt).
    pub trace: PathBuf,
    /// How many lines to show per tag.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
}

#[derive(Default)]
struct TagStats {
    changes: u64,
    bytes: u64,
    first: u64,
    last: u64,
    lines: BTreeMap<String, (u64, u64)>,
}

fn non_finite(dtype: &str, b: &[u8]) -> bool {
    memwatch_format::dtype::Dtype::parse(dtype)
        .and_then(|d| d.decode(b))
        .is_some_and(|v| v.is_nonfinite())
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<u8> {
    let reader = TraceReader::open(&args.trace)?;
    let mut tags: BTreeMap<String, TagStats> = BTreeMap::new();
    let mut warnings: Vec<String> = Vec::new();
    let mut main_thread: Option<u64> = None;
    let mut other_threads: BTreeMap<(String, String), u64> = BTreeMap::new();
    let syms = for_each_change(&reader, &Filter::default(), |row| {
        let t = tags.entry(row.tag.to_string()).or_default();
        if t.changes == 0 {
            t.first = row.seq;
        }
        t.changes += 1;
        t.last = row.seq;
        t.bytes += row.bytes_changed();
        let at = row
            .frame
            .map(|f| format!("{} ({})", memwatch_format::location(&f.file, f.line), f.function))
            .unwrap_or_else(|| "?".into());
        let e = t.lines.entry(at.clone()).or_default();
        e.0 += 1;
        e.1 += row.bytes_changed();
        if row.thread_name == Some("MainThread") {
            main_thread.get_or_insert(row.thread);
        } else {
            let name = row
                .thread_name
                .map(String::from)
                .unwrap_or_else(|| row.thread.to_string());
            *other_threads.entry((row.tag.to_string(), name)).or_default() += 1;
        }
        if let (WhatRef::Bytes { ranges, .. }, Some(region)) = (&row.what, row.region) {
            if let Some(d) = region.dtype.as_deref() {
                let size = region.itemsize as usize;
                let introduced = ranges.iter().any(|r| {
                    r.old
                        .chunks(size)
                        .zip(r.new.chunks(size))
                        .any(|(a, b)| !non_finite(d, a) && non_finite(d, b))
                });
                if introduced {
                    warnings.push(format!(
                        "NaN or Inf written into {} at seq {} by {at}",
                        row.tag, row.seq
                    ));
                }
            }
        }
        ControlFlow::Continue(())
    })?;
    if tags.is_empty() {
        writeln!(out, "no changes recorded")?;
    }
    for (tag, t) in &tags {
        writeln!(
            out,
            "{tag}: {} change{}, {} byte{} changed, seq {}..{}",
            t.changes,
            if t.changes == 1 { "" } else { "s" },
            t.bytes,
            if t.bytes == 1 { "" } else { "s" },
            t.first,
            t.last
        )?;
        let mut lines: Vec<_> = t.lines.iter().collect();
        lines.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
        for (at, (n, bytes)) in lines.into_iter().take(args.top) {
            let (c, b) = (
                if *n == 1 { " " } else { "s" },
                if *bytes == 1 { " " } else { "s" },
            );
            writeln!(out, "  {n:>8} change{c}  {bytes:>12} byte{b}  {at}")?;
        }
    }
    for ((tag, thread), n) in &other_threads {
        warnings.push(format!(
            "{tag} was written by thread {thread} ({n} change{})",
            if *n == 1 { "" } else { "s" }
        ));
    }
    if !warnings.is_empty() {
        writeln!(out, "suspicious:")?;
        for w in warnings.iter().take(50) {
            writeln!(out, "  {w}")?;
        }
        if warnings.len() > 50 {
            writeln!(out, "  ... and {} more", warnings.len() - 50)?;
        }
    }
    let (waited, waits) = syms.waited;
    if waits > 0 {
        writeln!(
            out,
            "the program waited {} for the trace's writer ({waits} time{}): it changed memory faster \
             than the writer compressed it (`memwatch record --compression` with a lower level is faster)",
            memwatch_analyzer::duration_text(waited),
            if waits == 1 { "" } else { "s" },
        )?;
    }
    if let Some(msg) = reader.tail_message() {
        out.flush()?;
        eprintln!("memwatch: note: {}: {msg}", reader.path().display());
    }
    Ok(0)
}
