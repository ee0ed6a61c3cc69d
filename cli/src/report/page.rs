//! The page and the command: [`render`] (one trace) and [`render_run`]
//! (the processes of a run) scan, gather the header's facts and put the
//! data into `report.html` with `report.css` and `report.js` inline; and
//! [`run`], `memwatch report` itself, writes the page where it is asked.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use memwatch_format::{Ending, TraceReader};

use super::aggregate::Aggregate;
use super::args::{Args, ElementSpec};
use super::data::{data_json, process_json, RunFacts};
use super::limits::MAX_PROCESSES;
use super::scan::{aggregate, aggregate_run, Source};
use crate::summary::{duration_ns, ending_text, trace_size};

const TEMPLATE: &str = include_str!("report.html");
const CSS: &str = include_str!("report.css");
const JS: &str = include_str!("report.js");

/// The whole page for `data` (the JSON of [`data_json`]).
pub(super) fn page(title: &str, data: &str) -> String {
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

/// The page of `agg`, titled with the run's command line.
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
    for (i, p) in procs.iter().enumerate() {
        let e = p.reader.ending();
        let shift = p.shift_ns(base);
        let dur = duration_ns(&e, agg.procs[i].last_ns);
        duration = duration.max(shift + dur);
        if listed.len() >= MAX_PROCESSES {
            continue;
        }
        listed.push(process_json(p, &agg.procs[i], &e, shift, dur));
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

/// `memwatch report`: writes the page of the trace (or of its run) where
/// `args` say, and says where and how big.
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

/// A size as the message writes it: `512 bytes`, `51.8 KB`, `1.2 MB`.
fn size_text(n: u64) -> String {
    match n {
        0..1024 => format!("{n} bytes"),
        1024..1_048_576 => format!("{:.1} KB", n as f64 / 1024.0),
        _ => format!("{:.1} MB", n as f64 / 1_048_576.0),
    }
}
