//! Trace writer and reader throughput for small change records.
//!
//! `cargo bench -p memwatch-format --bench format_throughput [-- N]`
//!
//! Writes N (default 2,000,000) one-element change records, as a training
//! loop updating scattered float32 elements from a few lines would, to an
//! in-memory trace; then reads them back. The baseline is postcard-encoding
//! the same records into a Vec (no framing, no compression, no checksum),
//! measured in the same run. Each figure is the median of 5 repetitions.

use std::time::{Duration, Instant};

use memwatch_format::*;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn make_change(seq: u64, x: &mut u32, buf: &mut [u8; 8]) -> (u64, u64, u32) {
    *x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
    let v = (seq as f32) * 0.001;
    buf[..4].copy_from_slice(&(v + 0.001).to_le_bytes());
    buf[4..].copy_from_slice(&v.to_le_bytes());
    (((*x >> 8) % 65_536) as u64 * 4, seq * 1_500, (seq % 4) as u32 + 1)
}

fn change<'a>(seq: u64, offset: u64, time_ns: u64, frame: u32, buf: &'a [u8; 8]) -> Record<'a> {
    Record::Change(Change {
        seq,
        ctx: Context {
            time_ns,
            thread: 4242,
            thread_name: 1,
            frame,
            stack: frame,
        },
        region: 1,
        ranges: vec![ByteRange {
            offset,
            old: &buf[..4],
            new: &buf[4..],
        }],
    })
}

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let reps = 5;

    let mut base = Vec::new();
    let mut write = Vec::new();
    let mut read = Vec::new();
    let mut file_bytes = 0;
    for _ in 0..reps {
        // Baseline: encode only.
        let t = Instant::now();
        let mut out: Vec<u8> = Vec::with_capacity(n as usize * 32);
        let (mut x, mut buf) = (12345u32, [0u8; 8]);
        for seq in 1..=n {
            let (off, time, frame) = make_change(seq, &mut x, &mut buf);
            postcard::to_io(&change(seq, off, time, frame, &buf), &mut out).unwrap();
        }
        base.push(t.elapsed());
        std::hint::black_box(&out);

        // The writer: framing, zstd level 3, checksums.
        let t = Instant::now();
        let mut w = TraceWriter::new(
            Vec::new(),
            "bench.mwt",
            &Meta::default(),
            WriterOptions::default(),
        )
        .unwrap();
        let (mut x, mut buf) = (12345u32, [0u8; 8]);
        for seq in 1..=n {
            let (off, time, frame) = make_change(seq, &mut x, &mut buf);
            w.append(&change(seq, off, time, frame, &buf)).unwrap();
        }
        let (bytes, stats) = w.finish(0).unwrap();
        write.push(t.elapsed());
        file_bytes = stats.file_bytes;

        // The reader: checksum, decompress, decode every record.
        let reader = TraceReader::from_bytes(bytes, "bench.mwt").unwrap();
        let t = Instant::now();
        let mut count = 0u64;
        let mut sum = 0u64;
        reader
            .for_each_record(|r| {
                if let Record::Change(c) = r {
                    sum = sum.wrapping_add(c.ranges[0].offset);
                }
                count += 1;
                Ok::<_, Error>(())
            })
            .unwrap();
        read.push(t.elapsed());
        assert_eq!(count, n);
        std::hint::black_box(sum);
    }
    let (b, w, r) = (median(base), median(write), median(read));
    let rate = |d: Duration| n as f64 / d.as_secs_f64() / 1e6;
    println!("{n} small change records, median of {reps}:");
    println!("  baseline encode only : {:>8.2} M records/s", rate(b));
    println!(
        "  writer (zstd 3)      : {:>8.2} M records/s  ({:.2}x baseline time)",
        rate(w),
        w.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "  reader (decode all)  : {:>8.2} M records/s  ({:.2}x baseline time)",
        rate(r),
        r.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "  file size            : {file_bytes} bytes, {:.2} bytes/record",
        file_bytes as f64 / n as f64
    );
}
