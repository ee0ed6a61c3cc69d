//! `memwatch state`: a region's exact contents at any point.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use memwatch_analyzer::{c_order, element_bytes, shape_of, state, RegionInfo};
use memwatch_format::TraceReader;

use crate::text::{element, parse_point, Point};

const AFTER_HELP: &str = "\
The contents are rebuilt from the region's nearest snapshot (its initial
contents or a checkpoint) and the changes after it, so any point is quick
to reach however long the trace is.

Formats: hex (offset and bytes, 16 a line), raw (the bytes as they were in
memory), npy (a numpy .npy file with the recorded dtype and shape; load it
with numpy.load), values (one element per line: index and value).

A tag watched, unwatched and watched again is several regions: the one
watched at the point is shown (an error says when none was).

Examples:
  memwatch state run.mwt --tag layer1_weight --at 120 --format values
  memwatch state run.mwt --tag layer1_weight --at 2.5s --format values
  memwatch state run.mwt --tag layer1_weight --format npy -o w.npy";

/// Output formats of `memwatch state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Hex,
    Raw,
    Npy,
    Values,
}

/// Print a region's exact contents after a given seq.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The trace file (.mwt).
    pub trace: PathBuf,
    /// The region's tag.
    #[arg(long)]
    pub tag: String,
    /// The point: a seq (a plain integer: the state after that event) or a
    /// time since the trace started with a unit (2.5s, 150ms, 20us, 100ns:
    /// the state after the last event at or before it). Default: the end.
    #[arg(long, value_name = "SEQ|TIME", value_parser = parse_point)]
    pub at: Option<Point>,
    #[arg(long, value_enum, default_value_t = Format::Hex)]
    pub format: Format,
    /// Write to this file instead of stdout.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
}

/// Every element's index and bytes, in C order.
fn elements<'a>(region: &RegionInfo, data: &'a [u8]) -> Vec<(Vec<u64>, &'a [u8])> {
    let shape = shape_of(region);
    c_order(&shape)
        .filter_map(|idx| {
            let (a, b) = element_bytes(region, &idx).ok()?;
            ((b as usize) <= data.len()).then(|| (idx, &data[a as usize..b as usize]))
        })
        .collect()
}

/// A `.npy` (version 1.0) file of the region's elements in C order.
pub fn npy(region: &RegionInfo, data: &[u8]) -> Vec<u8> {
    let (descr, shape): (String, Vec<u64>) = match &region.dtype {
        Some(d) => (d.to_string(), shape_of(region)),
        None => ("|u1".into(), vec![region.len]),
    };
    let shape_txt = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    if region.dtype.is_some() {
        for (_, b) in elements(region, data) {
            out.extend_from_slice(b);
        }
    } else {
        out.extend_from_slice(data);
    }
    out
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<u8> {
    let reader = TraceReader::open(&args.trace)?;
    let at = args.at.map(|p| p.seq(&reader)).transpose()?;
    let st = state(&reader, &args.tag, at)?;
    let mut buf: Vec<u8> = Vec::new();
    match args.format {
        Format::Raw => buf = st.data.clone(),
        Format::Npy => buf = npy(&st.region, &st.data),
        Format::Hex => {
            writeln!(
                buf,
                "# {} after seq {}: {} bytes at {:#x} (rebuilt from the snapshot at seq {} and {} changes)",
                st.region.tag, st.at_seq, st.region.len, st.region.address, st.from_snapshot, st.replayed
            )?;
            for (i, line) in st.data.chunks(16).enumerate() {
                let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
                writeln!(buf, "{:08x}  {}", i * 16, hex.join(" "))?;
            }
        }
        Format::Values => {
            let Some(dtype) = st.region.dtype.as_deref() else {
                anyhow::bail!(
                    "{:?} has no dtype (plain bytes): use --format hex or raw",
                    st.region.tag
                );
            };
            for (idx, b) in elements(&st.region, &st.data) {
                let i: Vec<String> = idx.iter().map(u64::to_string).collect();
                writeln!(
                    buf,
                    "[{}] {}",
                    i.join(", "),
                    element(dtype, b).unwrap_or_else(|| format!("0x{}", crate::text::hex(b, 0)))
                )?;
            }
        }
    }
    match &args.output {
        Some(p) => std::fs::write(p, &buf).with_context(|| format!("cannot write {}", p.display()))?,
        None => out.write_all(&buf)?,
    }
    Ok(0)
}
