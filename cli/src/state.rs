//! `memwatch state`: a region's exact contents at any point.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use memwatch_analyzer::{c_order, element_bytes, shape_of, state, RegionInfo};
use memwatch_format::dtype::{Dtype, FloatFormat, Kind, Value};

use crate::text::{element, parse_point, Point};

const AFTER_HELP: &str = "\
The contents are rebuilt from the region's nearest snapshot (its initial
contents or a checkpoint) and the changes after it, so any point is quick
to reach however long the trace is.

Formats: hex (offset and bytes, 16 a line), raw (the bytes as they were in
memory), npy (a numpy .npy file with the recorded dtype and shape; load it
with numpy.load; numpy has no bfloat16, float8 or complex32, so those are
written as float32 or complex64, every value exact), values (one element per line: index and value).

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
    /// In a run of several processes, the process whose region to rebuild
    /// (needed when several of them watched the tag, as a fork's child
    /// keeps its parent's watches). A time in --at counts from the run's
    /// start.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Write to this file instead of stdout.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
}

/// Calls `f` with each element's index and bytes, in C order, without
/// building a list of them (a region can hold hundreds of millions). A
/// contiguous region is walked in memory order with the index counted up
/// in place; a strided one element by element.
fn for_each_element(
    region: &RegionInfo,
    data: &[u8],
    mut f: impl FnMut(&[u64], &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let shape = shape_of(region);
    if !region.strides.is_empty() {
        for idx in c_order(&shape) {
            if let Ok((a, b)) = element_bytes(region, &idx) {
                if (b as usize) <= data.len() {
                    f(&idx, &data[a as usize..b as usize])?;
                }
            }
        }
        return Ok(());
    }
    let itemsize = region.itemsize.max(1) as usize;
    let count: u64 = shape.iter().product();
    let mut idx = vec![0u64; shape.len()];
    let mut at = region.origin as usize;
    for _ in 0..count {
        let Some(b) = data.get(at..at + itemsize) else {
            break;
        };
        f(&idx, b)?;
        at += itemsize;
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(())
}

/// The numpy type a `.npy` file holds for a dtype numpy lacks (`<f4` for
/// bfloat16 and float8, `<c8` for complex32); `None` for one numpy has.
fn npy_widened(dtype: &str) -> Option<&'static str> {
    match Dtype::parse(dtype)?.kind {
        Kind::Float(FloatFormat::F16 | FloatFormat::F32 | FloatFormat::F64) => None,
        Kind::Float(_) => Some("<f4"),
        Kind::Complex(FloatFormat::F16) => Some("<c8"),
        _ => None,
    }
}

/// The `.npy` (version 1.0) header for the region: magic, version, length
/// and the padded dict.
fn npy_header(region: &RegionInfo) -> Vec<u8> {
    let (descr, shape): (String, Vec<u64>) = match &region.dtype {
        Some(d) => (
            npy_widened(d).map_or_else(|| d.to_string(), |w| w.to_string()),
            shape_of(region),
        ),
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
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

/// Writes the region's elements in C order as a `.npy` (version 1.0) file.
pub fn write_npy(region: &RegionInfo, data: &[u8], w: &mut dyn Write) -> std::io::Result<()> {
    w.write_all(&npy_header(region))?;
    if region.dtype.is_none() {
        return w.write_all(data);
    }
    if let Some(d) = region.dtype.as_deref().filter(|d| npy_widened(d).is_some()) {
        let d = Dtype::parse(d).expect("npy_widened parsed it");
        return for_each_element(region, data, |_, b| match d.decode(b) {
            Some(Value::Complex(re, im)) => {
                w.write_all(&(re as f32).to_le_bytes())?;
                w.write_all(&(im as f32).to_le_bytes())
            }
            v => w.write_all(&(v.and_then(|v| v.as_f64()).unwrap_or(f64::NAN) as f32).to_le_bytes()),
        });
    }
    let itemsize = region.itemsize.max(1) as usize;
    let count = shape_of(region).iter().product::<u64>() as usize;
    let start = region.origin as usize;
    // Contiguous and whole: the bytes as they are.
    match data.get(start..start + count * itemsize) {
        Some(bytes) if region.strides.is_empty() => w.write_all(bytes),
        _ => for_each_element(region, data, |_, b| w.write_all(b)),
    }
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<u8> {
    let procs = crate::run::open(&args.trace, &[])?;
    let base = crate::run::base_ns(&procs);
    let proc = crate::run::pick(&procs, args.pid, &args.tag)?;
    let reader = &proc.reader;
    let at = args.at.map(|p| proc.seq_of(p, base)).transpose()?;
    let st = state(reader, &args.tag, at)?;
    let dtype = st.region.dtype.as_deref();
    if args.format == Format::Values && dtype.is_none() {
        anyhow::bail!(
            "{:?} has no dtype (plain bytes): use --format hex or raw",
            st.region.tag
        );
    }
    // Streamed: a 100 MB region is millions of lines, and `| head` stops
    // the writing (a closed stdout is not an error, see `crate::run`).
    let sink: Box<dyn Write + '_> = match &args.output {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?)
        }
        None => Box::new(out),
    };
    let mut w = std::io::BufWriter::with_capacity(1 << 16, sink);
    let written = write_state(&st, args.format, dtype, &mut w).and_then(|()| w.flush());
    match (&args.output, written) {
        (Some(p), Err(e)) => Err(e).with_context(|| format!("cannot write {}", p.display())),
        (None, Err(e)) => Err(e.into()),
        (_, Ok(())) => Ok(0),
    }
}

fn write_state(
    st: &memwatch_analyzer::State,
    format: Format,
    dtype: Option<&str>,
    w: &mut dyn Write,
) -> std::io::Result<()> {
    match format {
        Format::Raw => w.write_all(&st.data),
        Format::Npy => write_npy(&st.region, &st.data, w),
        Format::Hex => {
            writeln!(
                w,
                "# {} after seq {}: {} bytes at {:#x} (rebuilt from the snapshot at seq {} and {} changes)",
                st.region.tag, st.at_seq, st.region.len, st.region.address, st.from_snapshot, st.replayed
            )?;
            for (i, line) in st.data.chunks(16).enumerate() {
                write!(w, "{:08x} ", i * 16)?;
                for b in line {
                    write!(w, " {b:02x}")?;
                }
                writeln!(w)?;
            }
            Ok(())
        }
        Format::Values => {
            let dtype = dtype.unwrap_or("|u1");
            for_each_element(&st.region, &st.data, |idx, b| {
                w.write_all(b"[")?;
                for (k, i) in idx.iter().enumerate() {
                    if k > 0 {
                        w.write_all(b", ")?;
                    }
                    write!(w, "{i}")?;
                }
                match element(dtype, b) {
                    Some(v) => writeln!(w, "] {v}"),
                    None => writeln!(w, "] 0x{}", crate::text::hex(b, 0)),
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(shape: &[u64], strides: &[i64], origin: u64) -> RegionInfo {
        RegionInfo {
            region: 1,
            tag: "t".into(),
            variable: None,
            address: 0,
            len: 64,
            dtype: Some("|u1".into()),
            itemsize: 1,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            origin,
            watched_seq: 1,
            unwatched_seq: None,
        }
    }

    fn walk(r: &RegionInfo, data: &[u8]) -> Vec<(Vec<u64>, u8)> {
        let mut got = Vec::new();
        for_each_element(r, data, |idx, b| {
            got.push((idx.to_vec(), b[0]));
            Ok(())
        })
        .unwrap();
        got
    }

    /// The in-place walk of a contiguous region gives what indexing each
    /// element gives, in the same order.
    #[test]
    fn elements_are_walked_in_c_order_with_their_bytes() {
        let data: Vec<u8> = (0..64).collect();
        for r in [
            region(&[2, 3], &[], 5),
            region(&[4], &[], 0),
            region(&[2, 3], &[1, 8], 0),
            region(&[3, 2], &[-16, 2], 40),
        ] {
            let want: Vec<(Vec<u64>, u8)> = c_order(&shape_of(&r))
                .map(|idx| {
                    let (a, _) = element_bytes(&r, &idx).unwrap();
                    (idx, data[a as usize])
                })
                .collect();
            assert_eq!(walk(&r, &data), want, "{:?} {:?}", r.shape, r.strides);
        }
        // Contents cut short (a damaged trace): the walk stops, no panic.
        assert_eq!(walk(&region(&[2, 3], &[], 60), &data).len(), 4);
        // npy: the header, then the elements in C order.
        let r = region(&[2, 2], &[1, 2], 0);
        let mut npy = Vec::new();
        write_npy(&r, &data, &mut npy).unwrap();
        assert_eq!(&npy[npy.len() - 4..], &[0, 2, 1, 3]);
        assert_eq!(npy.len() % 64, 4);
    }
}
