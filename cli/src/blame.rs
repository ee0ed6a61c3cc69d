//! `memwatch blame`: who last wrote a byte or an element.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use memwatch_analyzer::{element_bytes, shape_of, state, writes_to};

use memwatch_analyzer::{ChangeRow, What};

use crate::text::{element, hex, parse_point, Point};

/// Old -> new of bytes `[start, end)` in this change.
fn blamed_text(row: &ChangeRow, start: u64, end: u64) -> String {
    let What::Bytes { ranges, .. } = &row.what else {
        return String::new();
    };
    let mut old = Vec::new();
    let mut new = Vec::new();
    for b in start..end {
        for (off, o, n) in ranges {
            if (*off..off + o.len() as u64).contains(&b) {
                old.push(o[(b - off) as usize]);
                new.push(n[(b - off) as usize]);
            }
        }
    }
    let dtype = row.region.as_ref().and_then(|r| r.dtype.as_deref());
    match dtype.filter(|_| old.len() as u64 == end - start && end - start > 1) {
        Some(d) => match (element(d, &old), element(d, &new)) {
            (Some(a), Some(b)) => format!("{a} -> {b}"),
            _ => format!("{} -> {}", hex(&old, 0), hex(&new, 0)),
        },
        None => format!("{} -> {}", hex(&old, 0), hex(&new, 0)),
    }
}

const AFTER_HELP: &str = "\
Prints the last change that wrote the byte or element before the point
(default: the end of the trace): its seq, line, function, thread and
old -> new. --all lists every write to it, oldest first.

Examples:
  memwatch blame run.mwt --tag layer1_weight --index 3,1
  memwatch blame run.mwt --tag layer1_weight --index 3,1 --at 1.5s
  memwatch blame run.mwt --tag layer1_weight --flat-index 49
  memwatch blame run.mwt --tag step --offset 0 --all";

/// Show the last change that wrote a byte or element.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The trace file (.mwt).
    pub trace: PathBuf,
    /// The region's tag.
    #[arg(long)]
    pub tag: String,
    /// A byte offset within the region.
    #[arg(
        long,
        conflicts_with_all = ["index", "flat_index"],
        required_unless_present_any = ["index", "flat_index"]
    )]
    pub offset: Option<u64>,
    /// An element index: one number per dimension, comma-separated (3,1).
    #[arg(long, value_delimiter = ',', conflicts_with = "flat_index")]
    pub index: Option<Vec<u64>>,
    /// An element by its flat (C-order) index, whatever the region's shape.
    #[arg(long, value_name = "N")]
    pub flat_index: Option<u64>,
    /// Only changes up to this point: a seq (a plain integer) or a time
    /// since the trace started with a unit (2.5s, 150ms, 20us, 100ns).
    #[arg(long, value_name = "SEQ|TIME", value_parser = parse_point)]
    pub at: Option<Point>,
    /// List every write, not only the last.
    #[arg(long)]
    pub all: bool,
    /// In a run of several processes, the process whose region to blame in
    /// (needed when several of them watched the tag, as a fork's child
    /// keeps its parent's watches). A time in --at counts from the run's
    /// start.
    #[arg(long)]
    pub pid: Option<u32>,
}

/// A shape as Python writes it: (8, 16), (5,).
fn shape_text(shape: &[u64]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
            format!("({})", dims.join(", "))
        }
    }
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<u8> {
    let procs = crate::run::open(&args.trace, &[])?;
    let base = crate::run::base_ns(&procs);
    let proc = crate::run::pick(&procs, args.pid, &args.tag)?;
    let reader = &proc.reader;
    let at = args.at.map(|p| proc.seq_of(p, base)).transpose()?;
    // Resolves the tag (and checks --at) before scanning everything.
    let st = state(reader, &args.tag, at)?;
    // Which process, when the run has several.
    let process = if procs.len() > 1 {
        format!("process {}, ", proc.label())
    } else {
        String::new()
    };
    let region = &st.region;
    let (start, end, what) = match (&args.offset, &args.index, &args.flat_index) {
        (Some(o), _, _) => {
            if *o >= region.len {
                bail!("offset {o} is outside {:?} ({} bytes)", region.tag, region.len);
            }
            (*o, o + 1, format!("byte {o}"))
        }
        (None, Some(idx), _) => {
            let shape = shape_of(region);
            let dims = shape.len();
            if idx.len() != dims {
                let zeros = vec!["0"; dims].join(",");
                bail!(
                    "{:?} has shape {} and needs {dims} {} (--index {zeros}); \
                     for an element by its flat index, use --flat-index N",
                    region.tag,
                    shape_text(&shape),
                    if dims == 1 { "index" } else { "indices" },
                );
            }
            let (a, b) = element_bytes(region, idx)?;
            let i: Vec<String> = idx.iter().map(u64::to_string).collect();
            (a, b, format!("element [{}]", i.join(", ")))
        }
        (None, None, Some(n)) => {
            let (a, b) = element_bytes(region, &[*n])?;
            (a, b, format!("element {n} (flat)"))
        }
        (None, None, None) => bail!("give --offset, --index or --flat-index"),
    };
    let writes = writes_to(reader, &args.tag, start, end, at)?;
    let shown: Vec<_> = if args.all {
        writes.iter().collect()
    } else {
        writes.last().into_iter().collect()
    };
    if shown.is_empty() {
        writeln!(
            out,
            "{} of {} was never written after it was watched (seq {}{})",
            what,
            args.tag,
            region.watched_seq,
            if process.is_empty() {
                String::new()
            } else {
                format!(" in process {}", proc.label())
            }
        )?;
        return Ok(0);
    }
    for row in shown {
        let f = row.frame.as_ref();
        writeln!(
            out,
            "{what} of {}: seq {} at {} in {} ({process}thread {}): {}{}",
            args.tag,
            row.seq,
            f.map(|f| memwatch_format::location(&f.file, f.line))
                .unwrap_or_else(|| "?:0".into()),
            f.map(|f| f.function.to_string()).unwrap_or_else(|| "?".into()),
            row.thread_name
                .as_deref()
                .map(String::from)
                .unwrap_or_else(|| row.thread.to_string()),
            blamed_text(row, start, end),
            row.op
                .as_deref()
                .map(|op| format!(" by {op}"))
                .unwrap_or_default(),
        )?;
    }
    Ok(0)
}
