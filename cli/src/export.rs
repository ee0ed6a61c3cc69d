//! `memwatch export`: the changes as a Parquet, CSV or JSON-lines table,
//! or as a timeline for Perfetto ([`crate::perfetto`]).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use memwatch_analyzer::{export_partitioned, export_run, ExportFormat, ExportSource, Filter, Granularity};
use memwatch_format::TraceReader;

use crate::text::parse_range;

const AFTER_HELP: &str = "\
One row per change (or per changed element with --elements). The columns
are documented in docs/export.md: seq, time_ns, wall_time_ns, tag,
variable, kind, file, line, function, thread, thread_name, address, offset,
bytes_changed, ranges, index, old, new, old_value, new_value, key,
old_repr, new_repr, op, pid, rank.

The format follows the output's extension (.parquet, .csv, .jsonl or .json);
any other extension is refused unless --format says which. On a terminal, a long export shows its progress.

--format perfetto writes a timeline instead: Chrome trace-event JSON that
ui.perfetto.dev and chrome://tracing open, a track per thread with an
event per change (named `<tag> <file>:<line>`), a counter per tag, the
regions watched and unwatched and how the recording ended (docs/export.md).

A run of several processes (memwatch record of a program that forks, uses
multiprocessing or subprocess, or torchrun) is exported as one from its
first trace: every process's rows merged by wall_time_ns, with their pid
and rank; --pid keeps some. --partition-by pid writes a hive-partitioned
Parquet dataset instead, a directory with a file per process
(DIR/pid=PID/part-0.parquet), which DuckDB reads with
read_parquet('DIR/**/*.parquet', hive_partitioning=true) and pyarrow
with pyarrow.dataset.dataset('DIR', partitioning='hive').

Examples:
  memwatch export run.mwt -o changes.parquet
  memwatch export run.mwt -o by_pid/ --partition-by pid
  memwatch export run.mwt -o worker.parquet --pid 18532
  memwatch export run.mwt -o w.parquet --tag layer1_weight --elements
  memwatch export run.mwt --format perfetto -o run.json
  python -c 'import pandas; print(pandas.read_parquet(\"changes.parquet\"))'";

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Parquet,
    Csv,
    Jsonl,
    /// Chrome trace-event JSON, for ui.perfetto.dev and chrome://tracing.
    Perfetto,
}

/// Export the changes of a trace as a table.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The trace file (.mwt).
    pub trace: PathBuf,
    /// The table to write.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Table format (default: from the output's extension).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// One row per changed element (regions with a dtype) instead of per change.
    #[arg(long)]
    pub elements: bool,
    /// Only this tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Only seqs in A..B (each process of a run counts its own seqs).
    #[arg(long, value_name = "A..B", value_parser = parse_range)]
    pub seq: Option<(u64, u64)>,
    /// Only changes made by this process (a pid of the run; repeatable,
    /// or comma-separated).
    #[arg(long, value_name = "PID", value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Write a hive-partitioned Parquet dataset: -o names a directory, with
    /// a file per process (DIR/pid=PID/part-0.parquet).
    #[arg(long, value_enum, value_name = "COLUMN")]
    pub partition_by: Option<Partition>,
}

/// The columns a dataset can be partitioned by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Partition {
    /// A directory per process: `pid=PID/`.
    Pid,
}

/// The format an output's extension names; an unknown or missing one is
/// refused, naming the formats (a table must not silently come out as
/// another format than its name says).
fn format_of(output: &std::path::Path) -> Result<Format> {
    let ext = output.extension().and_then(|e| e.to_str()).unwrap_or("");
    Ok(match ext.to_ascii_lowercase().as_str() {
        "parquet" | "pq" => Format::Parquet,
        "csv" => Format::Csv,
        "jsonl" | "json" | "ndjson" => Format::Jsonl,
        "" => anyhow::bail!(
            "{}: no extension to tell the format from; name it .parquet, .csv or .jsonl, \
             or pass --format parquet|csv|jsonl",
            output.display()
        ),
        _ => anyhow::bail!(
            "{}: unknown table format \".{ext}\"; the formats are parquet (.parquet), csv (.csv) \
             and jsonl (.jsonl, .json), or pass --format (--format perfetto writes a timeline for \
             ui.perfetto.dev)",
            output.display()
        ),
    })
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<u8> {
    if args.partition_by.is_some() {
        return run_partitioned(args, out);
    }
    let format = match args.format {
        Some(f) => f,
        None => format_of(&args.output)?,
    };
    if format == Format::Perfetto && args.elements {
        anyhow::bail!(
            "--elements has no meaning for --format perfetto (one event per change, its first \
             changed element in its args); leave it out"
        );
    }
    let procs = crate::run::open(&args.trace, &args.pid)?;
    let format = match format {
        Format::Parquet => ExportFormat::Parquet,
        Format::Csv => ExportFormat::Csv,
        Format::Jsonl => ExportFormat::Jsonl,
        Format::Perfetto => return run_perfetto(args, &procs, out),
    };
    let (granularity, filter) = rows_wanted(args);
    let tty = std::io::stderr().is_terminal();
    let mut progress = progress_bar(tty);
    let sources = sources(&procs);
    let rows = export_run(
        &sources,
        &args.output,
        format,
        granularity,
        &filter,
        &mut progress,
    )?;
    if tty {
        eprint!("\r\x1b[K");
    }
    let from = if procs.len() > 1 {
        format!(" (from {} processes)", procs.len())
    } else {
        String::new()
    };
    writeln!(out, "wrote {rows} rows to {}{from}", args.output.display())?;
    out.flush()?;
    crate::run::tail_notes(&procs);
    Ok(0)
}

/// The rows `args` asks for: per change or per element, and which.
fn rows_wanted(args: &Args) -> (Granularity, Filter) {
    let granularity = if args.elements {
        Granularity::Element
    } else {
        Granularity::Change
    };
    let filter = Filter {
        tag: args.tag.clone(),
        seq: args.seq,
        ..Filter::default()
    };
    (granularity, filter)
}

fn sources(procs: &[crate::run::Proc]) -> Vec<ExportSource<'_>> {
    procs
        .iter()
        .map(|p| ExportSource {
            reader: &p.reader,
            pid: p.pid,
            rank: p.rank,
        })
        .collect()
}

/// `--partition-by pid`: a Parquet file per process in a directory.
fn run_partitioned(args: &Args, out: &mut dyn Write) -> Result<u8> {
    match args.format {
        None | Some(Format::Parquet) => {}
        Some(f) => anyhow::bail!(
            "--partition-by writes a Parquet dataset; leave out --format {} (or export one {} file without --partition-by)",
            format!("{f:?}").to_lowercase(),
            format!("{f:?}").to_lowercase()
        ),
    }
    if let Some(ext) = args.output.extension().and_then(|e| e.to_str()) {
        if ["parquet", "pq", "csv", "jsonl", "json"].contains(&ext) {
            anyhow::bail!(
                "{}: --partition-by writes a directory (one file per process in it); name a directory, like -o {}/",
                args.output.display(),
                args.output.with_extension("").display()
            );
        }
    }
    let procs = crate::run::open(&args.trace, &args.pid)?;
    let (granularity, filter) = rows_wanted(args);
    let tty = std::io::stderr().is_terminal();
    let mut progress = progress_bar(tty);
    let parts = export_partitioned(
        &sources(&procs),
        &args.output,
        granularity,
        &filter,
        &mut progress,
    )?;
    if tty {
        eprint!("\r\x1b[K");
    }
    let rows: u64 = parts.iter().map(|(_, n)| n).sum();
    writeln!(
        out,
        "wrote {rows} rows to {} ({} process{}: {})",
        args.output.display(),
        parts.len(),
        if parts.len() == 1 { "" } else { "es" },
        parts
            .iter()
            .map(|(pid, n)| format!("pid={pid} {n} rows"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    out.flush()?;
    crate::run::tail_notes(&procs);
    Ok(0)
}

/// On a terminal, a long export's progress on stderr.
fn progress_bar(tty: bool) -> impl FnMut(usize, usize) {
    move |done: usize, total: usize| {
        if tty && total > 8 {
            eprint!(
                "\rmemwatch: exporting: chunk {done}/{total} ({}%)",
                done * 100 / total.max(1)
            );
        }
    }
}

/// `--format perfetto`: written under a temporary name next to the output
/// and renamed at the end (as the tables are), so a failed export leaves
/// no partial file; a device or pipe (`-o /dev/stdout`) is written
/// directly.
fn run_perfetto(args: &Args, procs: &[crate::run::Proc], out: &mut dyn Write) -> Result<u8> {
    let path = &args.output;
    let direct = std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir());
    let tmp = if direct {
        path.clone()
    } else {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".partial-{}", std::process::id()));
        path.with_file_name(name)
    };
    let file = std::fs::File::create(&tmp)
        .with_context(|| format!("cannot write {}; pass -o with a writable path", path.display()))?;
    let (_, filter) = rows_wanted(args);
    let tty = std::io::stderr().is_terminal();
    let mut progress = progress_bar(tty);
    let base = crate::run::base_ns(procs);
    let timeline: Vec<(&TraceReader, u32, u64)> = procs
        .iter()
        .map(|p| (&p.reader, p.pid, p.shift_ns(base)))
        .collect();
    let written =
        crate::perfetto::write_run(&timeline, &filter, std::io::BufWriter::new(file), &mut progress)
            .with_context(|| format!("writing {}", path.display()))
            .and_then(|w| {
                if !direct {
                    std::fs::rename(&tmp, path)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                Ok(w)
            });
    if tty {
        eprint!("\r\x1b[K");
    }
    let written = match written {
        Ok(w) => w,
        Err(e) => {
            if !direct {
                let _ = std::fs::remove_file(&tmp);
            }
            return Err(e);
        }
    };
    writeln!(
        out,
        "wrote {} events ({} change{}) to {}; open it in https://ui.perfetto.dev",
        written.events,
        written.changes,
        if written.changes == 1 { "" } else { "s" },
        path.display()
    )?;
    out.flush()?;
    crate::run::tail_notes(procs);
    Ok(0)
}
