//! `memwatch export`: the changes as a Parquet, CSV or JSON-lines table,
//! or as a timeline for Perfetto ([`crate::perfetto`]).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use memwatch_analyzer::{export, ExportFormat, Filter, Granularity};
use memwatch_format::TraceReader;

use crate::text::parse_range;

const AFTER_HELP: &str = "\
One row per change (or per changed element with --elements). The columns
are documented in docs/export.md: seq, time_ns, wall_time_ns, tag,
variable, kind, file, line, function, thread, thread_name, address, offset,
bytes_changed, ranges, index, old, new, old_value, new_value, key,
old_repr, new_repr.

The format follows the output's extension (.parquet, .csv, .jsonl or .json);
any other extension is refused unless --format says which. On a terminal, a long export shows its progress.

--format perfetto writes a timeline instead: Chrome trace-event JSON that
ui.perfetto.dev and chrome://tracing open, a track per thread with an
event per change (named `<tag> <file>:<line>`), a counter per tag, the
regions watched and unwatched and how the recording ended (docs/export.md).

Examples:
  memwatch export run.mwt -o changes.parquet
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
    /// Only seqs in A..B.
    #[arg(long, value_name = "A..B", value_parser = parse_range)]
    pub seq: Option<(u64, u64)>,
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
    let reader = TraceReader::open(&args.trace)?;
    let format = match format {
        Format::Parquet => ExportFormat::Parquet,
        Format::Csv => ExportFormat::Csv,
        Format::Jsonl => ExportFormat::Jsonl,
        Format::Perfetto => return run_perfetto(args, &reader, out),
    };
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
    let tty = std::io::stderr().is_terminal();
    let mut progress = progress_bar(tty);
    let rows = export(&reader, &args.output, format, granularity, &filter, &mut progress)?;
    if tty {
        eprint!("\r\x1b[K");
    }
    writeln!(out, "wrote {rows} rows to {}", args.output.display())?;
    note_tail(&reader, out)?;
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

fn note_tail(reader: &TraceReader, out: &mut dyn Write) -> Result<()> {
    if let Some(msg) = reader.tail_message() {
        out.flush()?;
        eprintln!("memwatch: note: {}: {msg}", reader.path().display());
    }
    Ok(())
}

/// `--format perfetto`: written under a temporary name next to the output
/// and renamed at the end (as the tables are), so a failed export leaves
/// no partial file; a device or pipe (`-o /dev/stdout`) is written
/// directly.
fn run_perfetto(args: &Args, reader: &TraceReader, out: &mut dyn Write) -> Result<u8> {
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
    let filter = Filter {
        tag: args.tag.clone(),
        seq: args.seq,
        ..Filter::default()
    };
    let tty = std::io::stderr().is_terminal();
    let mut progress = progress_bar(tty);
    let written = crate::perfetto::write(reader, &filter, std::io::BufWriter::new(file), &mut progress)
        .with_context(|| format!("writing {}", path.display()))
        .and_then(|w| {
            if !direct {
                std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
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
    note_tail(reader, out)?;
    Ok(0)
}
