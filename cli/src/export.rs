//! `memwatch export`: the changes as a Parquet, CSV or JSON-lines table.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Result;
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

Examples:
  memwatch export run.mwt -o changes.parquet
  memwatch export run.mwt -o w.parquet --tag layer1_weight --elements
  python -c 'import pandas; print(pandas.read_parquet(\"changes.parquet\"))'";

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Parquet,
    Csv,
    Jsonl,
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
             and jsonl (.jsonl, .json), or pass --format",
            output.display()
        ),
    })
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<u8> {
    let format = match args.format {
        Some(f) => f,
        None => format_of(&args.output)?,
    };
    let reader = TraceReader::open(&args.trace)?;
    let format = match format {
        Format::Parquet => ExportFormat::Parquet,
        Format::Csv => ExportFormat::Csv,
        Format::Jsonl => ExportFormat::Jsonl,
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
    let mut progress = |done: usize, total: usize| {
        if tty && total > 8 {
            eprint!(
                "\rmemwatch: exporting: chunk {done}/{total} ({}%)",
                done * 100 / total.max(1)
            );
        }
    };
    let rows = export(&reader, &args.output, format, granularity, &filter, &mut progress)?;
    if tty {
        eprint!("\r\x1b[K");
    }
    writeln!(out, "wrote {rows} rows to {}", args.output.display())?;
    if let Some(msg) = reader.tail_message() {
        out.flush()?;
        eprintln!("memwatch: note: {}: {msg}", reader.path().display());
    }
    Ok(0)
}
