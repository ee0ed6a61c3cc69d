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

The format follows the output's extension (.parquet, .csv, .jsonl) unless
--format says otherwise. On a terminal, a long export shows its progress.

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
    /// Table format (default: from the output's extension, else parquet).
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

pub fn run(args: &Args, out: &mut dyn Write) -> Result<u8> {
    let reader = TraceReader::open(&args.trace)?;
    let format =
        args.format.unwrap_or_else(
            || match args.output.extension().and_then(|e| e.to_str()).unwrap_or("") {
                "csv" => Format::Csv,
                "jsonl" | "json" => Format::Jsonl,
                _ => Format::Parquet,
            },
        );
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
