//! Analyzer throughput on a large generated trace.
//!
//! `cargo bench -p memwatch-analyzer --bench analyzer_throughput [-- N] [--scan-only]`
//!
//! Writes a trace of N (default 10,000,000) small changes (one float32
//! element each, 4 lines, one thread) to a 100 MB float32 region, with
//! checkpoints placed as the recorder places them (whenever a region's
//! changed bytes since the last one reach its size, or after 1,000,000
//! changes), then measures, as
//! medians of 3:
//! - scanning every change through `for_each_change` (records/s),
//! - exporting 2,000,000 of them to Parquet (rows/s),
//! - rebuilding the region's state at the middle seq (seconds).
//!
//! Next to each wall-clock rate it prints the rate per CPU-second of the
//! whole process (user + system time from `/proc/self/stat`) and the load
//! average: on a shared machine the wall-clock rate follows the load, the
//! CPU rate much less. The scan is also compared with a baseline measured
//! in the same run: checking and decompressing, on one thread and with
//! nothing decoded, every chunk a scan reads (all but those flagged
//! contents only, which hold the region's initial contents and
//! checkpoints).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use memwatch_analyzer::{export, for_each_change, state, ExportFormat, Filter, Granularity};
use memwatch_format::*;

const REGION: usize = 100 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// User + system CPU time of this process so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ")".
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line (11 and 12 after the
    // name), in clock ticks.
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let ticks = tick(11) + tick(12);
    Duration::from_secs_f64(ticks as f64 / 100.0)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().next().unwrap_or("?").to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Runs `f` 3 times; the median wall time and the median CPU time.
fn timed(mut f: impl FnMut()) -> (Duration, Duration) {
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (t, c) = (Instant::now(), cpu_time());
        f();
        wall.push(t.elapsed());
        cpu.push(cpu_time().saturating_sub(c));
    }
    (median(wall), median(cpu))
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9) / 1e6
}

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let dir = std::env::temp_dir().join(format!("memwatch-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("big.mwt");

    let t = Instant::now();
    let mut w = TraceWriter::create(&path, &Meta::default(), WriterOptions::default()).unwrap();
    let main = w.intern_str("MainThread").unwrap();
    let frames: Vec<Id> = (0..4)
        .map(|l| w.intern_frame("train.py", "step", 50 + l).unwrap())
        .collect();
    let mut data = vec![0u8; REGION];
    w.append(&Record::RegionWatched(RegionWatched {
        seq: 1,
        ctx: Context::default(),
        region: 1,
        tag: "w",
        variable: Some("w"),
        address: 0x1000_0000,
        len: REGION as u64,
        layout: Layout {
            dtype: Some("<f4"),
            itemsize: 4,
            shape: vec![(REGION / 4) as u64],
            strides: vec![],
            origin: 0,
        },
    }))
    .unwrap();
    w.append_contents(1, 1, &data).unwrap();
    let mut x: u32 = 12345;
    let (mut since_checkpoint, mut changes_since) = (0usize, 0u64);
    for i in 0..n {
        let seq = i + 2;
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let off = ((x >> 4) as usize % (REGION / 4)) * 4;
        let old: [u8; 4] = data[off..off + 4].try_into().unwrap();
        let new = (f32::from_le_bytes(old) + 0.5).to_le_bytes();
        data[off..off + 4].copy_from_slice(&new);
        let k = (i % 4) as usize;
        w.append(&Record::Change(Change {
            seq,
            ctx: Context {
                time_ns: seq * 1_000,
                thread: 7,
                thread_name: main,
                frame: frames[k],
                stack: 0,
            },
            region: 1,
            ranges: vec![ByteRange {
                offset: off as u64,
                old: &old,
                new: &new,
            }],
        }))
        .unwrap();
        since_checkpoint += 4;
        changes_since += 1;
        if since_checkpoint >= REGION || changes_since >= 1_000_000 {
            (since_checkpoint, changes_since) = (0, 0);
            w.append(&Record::Checkpoint(Checkpoint {
                region: 1,
                at_seq: seq,
            }))
            .unwrap();
            w.append_contents(1, seq, &data).unwrap();
        }
    }
    let (_, stats) = w.finish(0).unwrap();
    println!(
        "generated {n} changes: {} bytes ({:.2} bytes/change) in {:.1} s",
        stats.file_bytes,
        stats.file_bytes as f64 / n as f64,
        t.elapsed().as_secs_f64()
    );

    let reader = TraceReader::open(&path).unwrap();
    let (base, base_cpu) = timed(|| {
        let mut buf = Vec::new();
        for info in reader.chunks().iter().filter(|c| !c.header.contents_only) {
            buf = reader.decode_chunk_with(info, buf).unwrap().into_buffer();
        }
    });
    let (scan, scan_cpu) = timed(|| {
        let mut count = 0u64;
        for_each_change(&reader, &Filter::default(), |_| {
            count += 1;
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(count, n);
    });
    println!(
        "scan (for_each_change): {:.2} M records/s (target >= 20), {:.2} M per CPU-second; \
         baseline (decompress only, one thread): {:.2} M records/s; ratio {:.2}; load {}; \
         {} of {} chunks are contents only (skipped)",
        rate(n, scan),
        rate(n, scan_cpu),
        rate(n, base),
        base.as_secs_f64() / scan.as_secs_f64(),
        load(),
        reader.chunks().iter().filter(|c| c.header.contents_only).count(),
        reader.chunks().len()
    );
    let _ = base_cpu;
    if std::env::args().any(|a| a == "--scan-only") {
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    }

    let rows = n.min(2_000_000);
    let filter = Filter {
        seq: Some((2, rows + 1)),
        ..Filter::default()
    };
    for (format, name) in [
        (ExportFormat::Parquet, "Parquet"),
        (ExportFormat::Csv, "CSV"),
        (ExportFormat::Jsonl, "JSON lines"),
    ] {
        let (exp, exp_cpu) = timed(|| {
            let got = export(
                &reader,
                &dir.join("c.out"),
                format,
                Granularity::Change,
                &filter,
                &mut |_, _| {},
            )
            .unwrap();
            assert_eq!(got, rows);
        });
        let size = std::fs::metadata(dir.join("c.out")).map_or(0, |m| m.len());
        println!(
            "export to {name}: {:.2} M rows/s over {rows} rows{}, {:.2} M per CPU-second; {:.1} MB; load {}",
            rate(rows, exp),
            if format == ExportFormat::Parquet {
                " (target >= 5)"
            } else {
                ""
            },
            rate(rows, exp_cpu),
            size as f64 / 1e6,
            load()
        );
    }

    let mid = n / 2 + 1;
    let mut states = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let st = state(&reader, "w", Some(mid)).unwrap();
        states.push(t.elapsed());
        assert_eq!(st.data.len(), REGION);
    }
    println!(
        "state of the 100 MB region at seq {mid}: {:.3} s (target <= 1)",
        median(states).as_secs_f64()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
