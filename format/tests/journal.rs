//! A writer that dies loses nothing: every appended record is in the
//! trace's journal, and a reader of the unclosed trace reads it there.

use std::path::PathBuf;

use memwatch_format::*;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mwj-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn change(seq: u64, byte: u8) -> Record<'static> {
    let new: &'static [u8] = Box::leak(vec![byte; 4].into_boxed_slice());
    Record::Change(Change {
        seq,
        ctx: Context::default(),
        region: 1,
        ranges: vec![ByteRange {
            offset: 0,
            old: &[0; 4],
            new,
        }],
    })
}

fn seqs(r: &TraceReader) -> Vec<u64> {
    let mut out = Vec::new();
    r.for_each_record(|rec| {
        if let Record::Change(c) = rec {
            out.push(c.seq);
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    out
}

/// A writer with long chunks: what it appended stays pending.
fn options() -> WriterOptions {
    WriterOptions {
        chunk_bytes: 64 << 10,
        max_age: std::time::Duration::from_secs(3600),
        zstd_level: 3,
        direct_io: true,
    }
}

/// A writer of trace `name` in `d` (with its journal), and the trace's path.
fn writer(d: &std::path::Path, name: &str) -> (PathBuf, TraceWriter) {
    let path = d.join(name);
    let w = TraceWriter::create(&path, &Meta::default(), options()).unwrap();
    (path, w)
}

#[test]
fn a_killed_writer_leaves_every_record_readable() {
    let (path, mut w) = writer(&dir("killed"), "run.mwt");
    for seq in 1..=10_000 {
        w.append(&change(seq, seq as u8)).unwrap();
    }
    // As SIGKILL leaves it: no flush, no trailer, nothing dropped. The
    // sealer thread goes on writing the chunks queued for it: whatever it
    // has written when the trace is read, every record reads once.
    std::mem::forget(w);
    let t = std::time::Instant::now();
    let r = loop {
        let r = TraceReader::open(&path).unwrap();
        assert_eq!(seqs(&r), (1..=10_000).collect::<Vec<_>>());
        if r.chunks().len() >= 2 || t.elapsed().as_secs() > 20 {
            break r;
        }
    };
    assert!(r.chunks().len() >= 2, "some chunks reached the trace");
    let (n, jpath) = r.recovered().expect("the pending records came from the journal");
    assert!(n > 0 && jpath == journal_path(&path));
    let msg = r.tail_message().unwrap();
    assert!(msg.contains("read from the journal"), "{msg}");
}

#[test]
fn a_writer_killed_in_the_middle_of_a_chunk_loses_nothing_either() {
    let (path, mut w) = writer(&dir("partial"), "run.mwt");
    for seq in 1..=100 {
        w.append(&change(seq, 1)).unwrap();
    }
    w.flush().unwrap();
    for seq in 101..=200 {
        w.append(&change(seq, 2)).unwrap();
    }
    std::mem::forget(w);
    // The process died while writing the second chunk: part of it is there.
    let whole = std::fs::read(&path).unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, b"MWCK\x01\x01\x00\x00partial").unwrap();
    drop(f);
    let r = TraceReader::open(&path).unwrap();
    assert!(matches!(r.tail(), Tail::Truncated { .. }));
    assert_eq!(seqs(&r), (1..=200).collect::<Vec<_>>());
    // `memwatch record` folds the journal into the trace: the trace then
    // holds everything alone, and the journal is gone.
    assert_eq!(recover::fold(&path).unwrap(), Some(100));
    assert!(!journal_path(&path).exists());
    assert!(std::fs::read(&path).unwrap().len() > whole.len());
    let r = TraceReader::open(&path).unwrap();
    assert_eq!(r.tail(), Tail::Unclosed);
    assert!(r.recovered().is_none());
    assert_eq!(seqs(&r), (1..=200).collect::<Vec<_>>());
}

#[test]
fn a_closed_trace_has_no_journal_and_a_stale_one_is_ignored() {
    let d = dir("closed");
    let (path, mut w) = writer(&d, "run.mwt");
    assert!(journal_path(&path).exists());
    w.append(&change(1, 1)).unwrap();
    w.finish(0).unwrap();
    assert!(!journal_path(&path).exists());
    // Records that reached the trace are not read twice: a writer that
    // died right after emitting its chunk leaves a journal naming it.
    let (path, mut w) = writer(&d, "emitted.mwt");
    w.append(&change(1, 1)).unwrap();
    w.flush().unwrap();
    std::mem::forget(w);
    let r = TraceReader::open(&path).unwrap();
    assert_eq!(seqs(&r), vec![1]);
    assert!(r.recovered().is_none());
    // Another trace's journal under this name is not read.
    let other = d.join("other.mwt");
    let mut w = TraceWriter::create(
        &other,
        &Meta {
            pid: 42,
            ..Meta::default()
        },
        options(),
    )
    .unwrap();
    w.append(&change(7, 7)).unwrap();
    std::mem::forget(w);
    std::fs::rename(journal_path(&other), journal_path(&path)).unwrap();
    assert_eq!(seqs(&TraceReader::open(&path).unwrap()), vec![1]);
}

#[test]
fn a_killed_writer_of_large_records_loses_none_and_its_journal_stays_bounded() {
    // 16 records of 8 MiB (4 MiB old, 4 MiB new): twice the journal's
    // ring. The writer forgets what the sealer wrote rather than letting
    // the journal grow with the trace.
    let (path, mut w) = writer(&dir("large"), "run.mwt");
    let old = vec![0u8; 4 << 20];
    let mut most = 0;
    for seq in 1..=16u64 {
        let new = vec![seq as u8; 4 << 20];
        w.append(&Record::Change(Change {
            seq,
            ctx: Context::default(),
            region: 1,
            ranges: vec![ByteRange {
                offset: 0,
                old: &old,
                new: &new,
            }],
        }))
        .unwrap();
        most = most.max(std::fs::metadata(journal_path(&path)).unwrap().len());
    }
    std::mem::forget(w);
    let r = TraceReader::open(&path).unwrap();
    let mut got = Vec::new();
    r.for_each_record(|rec| {
        if let Record::Change(c) = rec {
            assert!(
                c.ranges[0].new.iter().all(|&b| b == c.seq as u8),
                "seq {} reads its own bytes",
                c.seq
            );
            got.push(c.seq);
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(got, (1..=16).collect::<Vec<_>>());
    assert!(
        most <= JOURNAL_RING as u64,
        "the journal grows no larger than its ring: {most} bytes"
    );
}
