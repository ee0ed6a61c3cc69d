//! The writer's chunking bounds, interning and sizes.

use std::time::Duration;

use memwatch_format::*;

use crate::common::*;

#[test]
fn max_age_zero_emits_a_chunk_per_record() {
    let opts = WriterOptions {
        max_age: Duration::ZERO,
        ..WriterOptions::default()
    };
    let recs: Vec<Owned> = (0..5).map(|i| Owned::String(i + 1, format!("s{i}"))).collect();
    let r = TraceReader::from_bytes(write_trace(&Meta::default(), &recs, opts, true), "m").unwrap();
    assert_eq!(r.chunks().len(), 5);
}

#[test]
fn flush_if_older_emits_pending_records() {
    let mut w = TraceWriter::new(Vec::new(), "m", &Meta::default(), WriterOptions::default()).unwrap();
    w.intern_str("pending").unwrap();
    assert_eq!(w.stats().chunks, 0);
    w.flush_if_older(Duration::from_secs(3600)).unwrap();
    assert_eq!(w.stats().chunks, 0);
    std::thread::sleep(Duration::from_millis(5));
    w.flush_if_older(Duration::from_millis(1)).unwrap();
    assert_eq!(w.stats().chunks, 1);
}

#[test]
fn interning_writes_each_definition_once() {
    let mut w = TraceWriter::new(Vec::new(), "m", &Meta::default(), WriterOptions::default()).unwrap();
    let a = w.intern_frame("a.py", "f", 1).unwrap();
    let b = w.intern_frame("a.py", "f", 2).unwrap();
    assert_eq!(w.intern_frame("a.py", "f", 1).unwrap(), a);
    let s1 = w.intern_stack(&[b, a]).unwrap();
    assert_eq!(w.intern_stack(&[b, a]).unwrap(), s1);
    assert_ne!(w.intern_stack(&[a, b]).unwrap(), s1);
    assert_eq!(w.intern_str("a.py").unwrap(), 1);
    // 2 strings, 2 frames, 2 stacks.
    assert_eq!(w.stats().records, 6);
    let (bytes, _) = w.finish(0).unwrap();
    let got = read_all(&TraceReader::from_bytes(bytes, "m").unwrap()).unwrap();
    assert_eq!(got[0], r#"String(StringDef { id: 1, value: "a.py" })"#);
    assert_eq!(got[2], "Frame(FrameDef { id: 1, file: 1, function: 2, line: 1 })");
}

#[test]
fn large_contents_are_split_into_pieces() {
    let data: Vec<u8> = (0..(CONTENTS_PIECE * 2 + 10)).map(|i| (i % 251) as u8).collect();
    let mut w = TraceWriter::new(Vec::new(), "m", &Meta::default(), WriterOptions::default()).unwrap();
    w.append_contents(7, 1, &data).unwrap();
    let (bytes, _) = w.finish(0).unwrap();
    let r = TraceReader::from_bytes(bytes, "m").unwrap();
    let mut rebuilt = vec![0u8; data.len()];
    let mut pieces = 0;
    r.for_each_record(|rec| {
        if let Record::Contents(c) = rec {
            assert!(c.data.len() <= CONTENTS_PIECE);
            rebuilt[c.offset as usize..c.offset as usize + c.data.len()].copy_from_slice(c.data);
            pieces += 1;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(pieces, 3);
    assert_eq!(rebuilt, data);
}

/// 10,000 small change records (one 4-byte element each, as a training loop
/// updating scattered float32 elements from a few lines), compressed.
/// Prints bytes per record; fails if the encoding bloats.
#[test]
fn small_changes_cost_few_bytes_each() {
    let mut w = TraceWriter::new(Vec::new(), "m", &Meta::default(), WriterOptions::default()).unwrap();
    let main = w.intern_str("MainThread").unwrap();
    let frames: Vec<Id> = (0..4)
        .map(|l| w.intern_frame("train.py", "step", 50 + l).unwrap())
        .collect();
    let stacks: Vec<Id> = frames.iter().map(|f| w.intern_stack(&[*f]).unwrap()).collect();
    let before = w.stats().file_bytes;
    let mut x: u32 = 12345;
    let mut value = 1.0f32;
    for seq in 1..=10_000u64 {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let old = value.to_le_bytes();
        value -= 0.001;
        let new = value.to_le_bytes();
        let k = (seq % 4) as usize;
        w.append(&Record::Change(Change {
            seq,
            ctx: Context {
                time_ns: seq * 1_500,
                thread: 4242,
                thread_name: main,
                frame: frames[k],
                stack: stacks[k],
            },
            region: 1,
            ranges: vec![ByteRange {
                offset: ((x >> 8) % 65_536) as u64 * 4,
                old: &old,
                new: &new,
            }],
        }))
        .unwrap();
    }
    let (_, stats) = w.finish(0).unwrap();
    let bytes = stats.file_bytes - before;
    let per = bytes as f64 / 10_000.0;
    println!(
        "10,000 small change records: {bytes} bytes in the file ({per:.2} bytes/record; raw {:.2})",
        stats.raw_bytes as f64 / stats.records as f64
    );
    assert!(per < 20.0, "{per} bytes per record");
}

#[test]
fn large_contents_get_chunks_of_their_own_and_small_ones_stay_in_line() {
    let mut w = TraceWriter::new(Vec::new(), "m", &Meta::default(), WriterOptions::default()).unwrap();
    w.intern_str("before").unwrap();
    w.append_contents(1, 1, &[7u8; 100]).unwrap();
    w.intern_str("between").unwrap();
    let big = vec![3u8; SEPARATE_CONTENTS];
    w.append_contents(2, 2, &big).unwrap();
    w.intern_str("after").unwrap();
    let (bytes, _) = w.finish(0).unwrap();
    let r = TraceReader::from_bytes(bytes, "m").unwrap();
    let kinds: Vec<bool> = r.chunks().iter().map(|c| c.header.contents_only).collect();
    // "before", the small contents and "between"; the big contents; "after".
    assert_eq!(kinds, [false, true, false]);
    let per_chunk: Vec<Vec<String>> = r
        .chunks()
        .iter()
        .map(|c| {
            let chunk = r.decode_chunk(c).unwrap();
            chunk
                .records()
                .map(|rec| match rec.unwrap() {
                    Record::String(s) => s.value.to_string(),
                    Record::Contents(c) => format!("contents {} {}", c.region, c.data.len()),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .collect();
    assert_eq!(per_chunk[0], ["before", "contents 1 100", "between"]);
    assert_eq!(per_chunk[1], [format!("contents 2 {SEPARATE_CONTENTS}")]);
    assert_eq!(per_chunk[2], ["after"]);
}

#[test]
fn a_chunk_flag_this_reader_does_not_know_is_refused_by_name() {
    let mut w = TraceWriter::new(Vec::new(), "m", &Meta::default(), WriterOptions::default()).unwrap();
    w.intern_str("s").unwrap();
    let (mut bytes, _) = w.finish(0).unwrap();
    let first = r_first_chunk_offset(&bytes);
    let mut header: [u8; chunk::CHUNK_HEADER_LEN] =
        bytes[first..first + chunk::CHUNK_HEADER_LEN].try_into().unwrap();
    header[6] = 0x82;
    let crc = crc32fast::hash(&header[0..40]);
    header[40..44].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        ChunkHeader::decode(&header).unwrap_err(),
        "unknown chunk flags 0x82 (this memwatch knows only 0x01: a newer memwatch wrote it?)"
    );
    bytes[first..first + chunk::CHUNK_HEADER_LEN].copy_from_slice(&header);
    let err = TraceReader::from_bytes(bytes, "m")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown chunk flags 0x82"), "{err}");
}

/// Where the first chunk starts: after the file header.
fn r_first_chunk_offset(bytes: &[u8]) -> usize {
    TraceReader::from_bytes(bytes.to_vec(), "m").unwrap().chunks()[0].offset as usize
}

/// Writes the same records, large changes among them, to `out` and to
/// memory, and returns both traces and the file's writer stats.
fn same_trace_twice(path: &std::path::Path, direct_io: bool) -> (Vec<u8>, Vec<u8>, WriterStats) {
    let opts = WriterOptions {
        max_age: Duration::from_secs(3600),
        direct_io,
        ..WriterOptions::default()
    };
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    // Sizes that start and end chunks off the 4 KiB blocks, small chunks
    // (written buffered) between large ones (written directly).
    let sizes = [300_001, 7, 1 << 20, 4096, 2_500_003, 13, 700_000];
    let states: Vec<(Vec<u8>, Vec<u8>)> = sizes.iter().map(|&n| (noise(n), noise(n))).collect();
    let write = |w: &mut dyn FnMut(u64, &ByteRange<'_>)| {
        for (i, (old, new)) in states.iter().enumerate() {
            let r = ByteRange { offset: 0, old, new };
            w(i as u64 + 1, &r);
        }
    };
    let ctx = Context {
        time_ns: 5,
        thread: 1,
        thread_name: NO_ID,
        frame: NO_ID,
        stack: NO_ID,
    };
    let mut file = TraceWriter::create(path, &Meta::default(), opts).unwrap();
    let mut mem = TraceWriter::new(Vec::new(), "m", &Meta::default(), opts).unwrap();
    write(&mut |seq, r| {
        file.append_delta(seq, &ctx, 1, 4, false, std::slice::from_ref(r))
            .unwrap();
        file.flush().unwrap();
        mem.append_delta(seq, &ctx, 1, 4, false, std::slice::from_ref(r))
            .unwrap();
        mem.flush().unwrap();
    });
    let stats = file.stats();
    file.finish(9).unwrap();
    let (mem, _) = mem.finish(9).unwrap();
    (std::fs::read(path).unwrap(), mem, stats)
}

fn scratch(name: &str, base: &std::path::Path) -> std::path::PathBuf {
    let d = base.join(format!("mww-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join("t.mwt")
}

#[test]
fn a_trace_written_past_the_page_cache_holds_the_bytes_of_one_in_memory() {
    let path = scratch("direct", &std::env::temp_dir());
    let (file, mem, stats) = same_trace_twice(&path, true);
    assert_eq!(file.len(), mem.len());
    assert!(file == mem, "the file differs from the trace written to memory");
    if stats.direct_chunks == 0 {
        eprintln!(
            "note: {} refuses direct I/O; the file was written buffered",
            path.parent().unwrap().display()
        );
    } else {
        // The four large chunks.
        assert_eq!(stats.direct_chunks, 4);
    }
    let r = TraceReader::open(&path).unwrap();
    assert_eq!(r.tail(), Tail::Closed);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn without_direct_io_or_where_it_is_refused_the_trace_is_the_same() {
    let path = scratch("buffered", &std::env::temp_dir());
    let (file, mem, stats) = same_trace_twice(&path, false);
    assert_eq!(stats.direct_chunks, 0);
    assert!(file == mem);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    // tmpfs, where a kernel may refuse O_DIRECT.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        let path = scratch("shm", shm);
        let (file, mem, _) = same_trace_twice(&path, true);
        assert!(file == mem);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}

#[test]
fn a_sealer_that_falls_behind_compresses_faster_and_the_trace_reads_the_same() {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let opts = WriterOptions {
        max_age: Duration::from_secs(3600),
        ..WriterOptions::default()
    };
    // Made before writing, so that the writer hands chunks much faster
    // than the sealer compresses them (half noise, half runs: zstd works).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let pieces: Vec<Vec<u8>> = (0..24u64)
        .map(|i| {
            (0..(2u64 << 20) / 8)
                .flat_map(|j| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x & 0xffff_ffff) | ((i + j / 512) << 32)).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let mut behind = TraceWriter::new(Vec::new(), "b", &Meta::default(), opts).unwrap();
    let mut steady = TraceWriter::new(Vec::new(), "s", &Meta::default(), opts).unwrap();
    for (i, p) in pieces.iter().enumerate() {
        behind.append_contents(1, i as u64 + 1, p).unwrap();
    }
    let fast = behind.stats().fast_chunks;
    for (i, p) in pieces.iter().enumerate() {
        steady.append_contents(1, i as u64 + 1, p).unwrap();
        steady.flush().unwrap(); // never more than one chunk waits
    }
    let never = steady.stats().fast_chunks;
    assert!(
        fast > 0,
        "24 chunks of 2 MiB handed at once: none compressed at the fast level"
    );
    assert_eq!(never, 0);
    let records = |bytes: Vec<u8>| -> (Vec<u64>, usize) {
        let r = TraceReader::from_bytes(bytes, "m").unwrap();
        let mut hashes = Vec::new();
        r.for_each_record(|rec| {
            if matches!(rec, Record::Waited(_)) {
                return Ok(()); // the writer that fell behind waited, too
            }
            let mut h = DefaultHasher::new();
            match rec {
                Record::Contents(c) => (c.region, c.at_seq, c.offset, c.data).hash(&mut h),
                other => format!("{other:?}").hash(&mut h),
            }
            hashes.push(h.finish());
            Ok::<_, Error>(())
        })
        .unwrap();
        (hashes, r.chunks().len())
    };
    let (b, _) = behind.finish(25).unwrap();
    let (s, _) = steady.finish(25).unwrap();
    let (b_len, s_len) = (b.len(), s.len());
    let ((hb, _), (hs, chunks)) = (records(b), records(s));
    assert_eq!(hb.len(), hs.len());
    assert!(hb == hs, "the records read back differ");
    assert!(
        fast < chunks as u64,
        "{fast} of {chunks} chunks at the fast level: not only when behind"
    );
    // The fast level trades size for speed.
    assert!(
        b_len > s_len,
        "{b_len} bytes at the fast level, {s_len} at the default"
    );
}
