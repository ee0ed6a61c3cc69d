//! The analyzer on the synthetic sample trace: state from checkpoints,
//! blame, filters and export.

use std::ops::ControlFlow;

use memwatch_analyzer::*;
use memwatch_format::{sample, TraceReader, TraceWriter, WriterOptions};

fn sample_trace() -> TraceReader {
    let opts = WriterOptions {
        chunk_bytes: 160,
        ..WriterOptions::default()
    };
    let mut w = TraceWriter::new(Vec::new(), "sample.mwt", &sample::sample_meta(), opts).unwrap();
    sample::write_sample(&mut w).unwrap();
    let (bytes, _) = w.finish(50_000).unwrap();
    TraceReader::from_bytes(bytes, "sample.mwt").unwrap()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The sample's weights after `steps` updates (see `format/src/sample.rs`).
fn weights_after(steps: u64) -> Vec<f32> {
    let mut w: Vec<f32> = (0..16).map(|i| i as f32 * 0.25).collect();
    for step in 1..=steps {
        for (i, x) in w.iter_mut().enumerate() {
            if i % 3 == (step as usize) % 3 {
                *x -= 0.125 * step as f32;
            }
        }
    }
    w
}

#[test]
fn state_at_each_point_matches_the_sample() {
    let r = sample_trace();
    assert_eq!(seq_bounds(&r), Some((1, 11)));
    // Seqs 3, 5 and 8 are the three weight updates.
    for (at, steps) in [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (7, 2), (8, 3), (11, 3)] {
        let st = state(&r, "layer1_weight", Some(at)).unwrap();
        assert_eq!(f32s(&st.data), weights_after(steps), "at seq {at}");
    }
    // After the checkpoint at seq 6, the rebuild starts there.
    let st = state(&r, "layer1_weight", Some(8)).unwrap();
    assert_eq!((st.from_snapshot, st.replayed), (6, 1));
    let st = state(&r, "layer1_weight", Some(4)).unwrap();
    assert_eq!((st.from_snapshot, st.replayed), (1, 1));
    let step = state(&r, "step", None).unwrap();
    assert_eq!(u64::from_le_bytes(step.data.try_into().unwrap()), 3);
}

#[test]
fn state_errors_name_the_problem() {
    let r = sample_trace();
    let e = state(&r, "nope", None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the trace has no tag \"nope\"; its tags are: config, layer1_weight, step"
    );
    let e = state(&r, "step", Some(99)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "seq 99 is out of range: the trace's events run from seq 1 to 11"
    );
    let e = state(&r, "step", Some(1)).unwrap_err();
    assert!(e.to_string().contains("was first watched at seq 2"), "{e}");
}

#[test]
fn blame_finds_the_last_writer_of_an_element() {
    let r = sample_trace();
    let region = state(&r, "layer1_weight", None).unwrap().region;
    // Element [0, 1] (flat 1) changes at step 1 only (1 % 3 == 1).
    let (a, b) = element_bytes(&region, &[0, 1]).unwrap();
    assert_eq!((a, b), (4, 8));
    let writes = writes_to(&r, "layer1_weight", a, b, None).unwrap();
    assert_eq!(writes.iter().map(|w| w.seq).collect::<Vec<_>>(), vec![3]);
    assert_eq!(writes[0].frame.as_ref().unwrap().line, 52);
    // Flat indices work too, and out-of-shape ones are refused.
    assert_eq!(element_bytes(&region, &[5]).unwrap(), (20, 24));
    assert!(element_bytes(&region, &[4, 0]).is_err());
}

#[test]
fn filters_select_by_line_thread_and_seq() {
    let r = sample_trace();
    let collect = |f: Filter| {
        let mut seqs = Vec::new();
        for_each_change(&r, &f, |row| {
            seqs.push(row.seq);
            ControlFlow::Continue(())
        })
        .unwrap();
        seqs
    };
    assert_eq!(collect(Filter::default()), vec![3, 4, 5, 6, 7, 8, 9]);
    let by_line = Filter {
        file: Some("train.py".into()),
        line: Some(55),
        ..Filter::default()
    };
    assert_eq!(collect(by_line), vec![4, 6, 9]);
    let by_thread = Filter {
        thread: Some("loader-1".into()),
        ..Filter::default()
    };
    assert_eq!(collect(by_thread), vec![7]);
    let by_seq = Filter {
        seq: Some((5, 7)),
        tag: Some("layer1_weight".into()),
        ..Filter::default()
    };
    assert_eq!(collect(by_seq), vec![5]);
}

/// The sample with every format version's additions (version 4: changes
/// made by a torch op, each after the `Note` that names it).
fn sample_trace_v4() -> TraceReader {
    let opts = WriterOptions {
        chunk_bytes: 160,
        ..WriterOptions::default()
    };
    let mut w = TraceWriter::new(Vec::new(), "sample.mwt", &sample::sample_meta(), opts).unwrap();
    let seq = sample::write_sample(&mut w).unwrap();
    let seq = sample::write_v2_additions(&mut w, seq).unwrap();
    let seq = sample::write_v3_additions(&mut w, seq).unwrap();
    sample::write_v4_additions(&mut w, seq).unwrap();
    let (bytes, _) = w.finish(50_000).unwrap();
    TraceReader::from_bytes(bytes, "sample.mwt").unwrap()
}

#[test]
fn a_change_has_the_op_its_note_names_and_exports_it() {
    let r = sample_trace_v4();
    let filter = Filter {
        tag: Some("layer2_weight".into()),
        ..Filter::default()
    };
    let mut ops = Vec::new();
    for_each_change(&r, &filter, |row| {
        ops.push((
            row.seq,
            row.op.map(String::from),
            row.to_row().op.map(|o| o.to_string()),
        ));
        ControlFlow::Continue(())
    })
    .unwrap();
    let n = ops.len();
    let want = |op: Option<&str>| (op.map(String::from), op.map(String::from));
    let got: Vec<_> = ops.iter().map(|(_, a, b)| (a.clone(), b.clone())).collect();
    assert_eq!(
        got,
        vec![
            want(None),
            want(None),
            want(Some("aten::add_.Tensor")),
            want(Some("aten::mul_.Tensor")),
            want(None)
        ],
        "{ops:?}"
    );
    // The note of seq N is not the op of seq N + 1 (read through a seq filter, too).
    let (last, ..) = ops[n - 1];
    let filter = Filter {
        seq: Some((last - 1, last)),
        ..Filter::default()
    };
    let mut got = Vec::new();
    for_each_change(&r, &filter, |row| {
        got.push(row.op.map(String::from));
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(got, vec![Some("aten::mul_.Tensor".to_string()), None]);

    let dir = std::env::temp_dir().join(format!("memwatch-analyzer-op-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("c.csv");
    export(
        &r,
        &csv,
        ExportFormat::Csv,
        Granularity::Element,
        &Filter::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(COLUMNS[23], "op");
    assert_eq!(COLUMNS[24..], ["pid", "rank"]);
    let pid = r.header().meta.pid;
    let with_op: Vec<&str> = text.lines().filter(|l| l.contains("aten::")).collect();
    // Two elements by add_, one by mul_, each row ending with its op, the
    // trace's pid and no rank.
    assert_eq!(with_op.len(), 3, "{text}");
    assert!(
        with_op[..2]
            .iter()
            .all(|l| l.ends_with(&format!(",aten::add_.Tensor,{pid},"))),
        "{text}"
    );
    assert!(
        with_op[2].ends_with(&format!(",aten::mul_.Tensor,{pid},")),
        "{text}"
    );
    let pq = dir.join("c.parquet");
    export(
        &r,
        &pq,
        ExportFormat::Parquet,
        Granularity::Change,
        &Filter::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert!(std::fs::metadata(&pq).unwrap().len() > 0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn export_writes_one_row_per_change_or_element() {
    let r = sample_trace();
    let dir = std::env::temp_dir().join(format!("memwatch-analyzer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("c.csv");
    let n = export(
        &r,
        &csv,
        ExportFormat::Csv,
        Granularity::Change,
        &Filter::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(n, 7);
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().next().unwrap(), COLUMNS.join(","));
    let obj = text.lines().find(|l| l.contains(",setattr,")).unwrap();
    // Then op, empty (no change of this sample has one), the trace's pid
    // and no rank.
    let pid = r.header().meta.pid;
    assert!(obj.ends_with(&format!(",lr,0.125,0.0625,,{pid},")), "{obj}");
    let el = dir.join("e.jsonl");
    let filter = Filter {
        tag: Some("layer1_weight".into()),
        ..Filter::default()
    };
    let n = export(
        &r,
        &el,
        ExportFormat::Jsonl,
        Granularity::Element,
        &filter,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(n, 5 + 5 + 6);
    let first = std::fs::read_to_string(&el)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(first.contains("\"index\":\"0,1\""), "{first}");
    assert!(
        first.contains("\"old_value\":0.25,\"new_value\":0.125"),
        "{first}"
    );
    let pq = dir.join("c.parquet");
    let n = export(
        &r,
        &pq,
        ExportFormat::Parquet,
        Granularity::Change,
        &Filter::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(n, 7);
    assert_eq!(&std::fs::read(&pq).unwrap()[..4], b"PAR1");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Tag `w` watched (region 1, seq 1), changed at seqs 2 and 3, unwatched at
/// seq 4; `w` watched again (region 2, seq 6) and changed at seq 7; `other`
/// (region 3) watched at seq 5 and changed at seq 8. Seq `s` happens at
/// `s` milliseconds. Small chunks, and region 2's checkpoint after seq 7.
/// The context of an event of thread 1 at `frame`, `time_ns` after the start.
fn main_ctx(time_ns: u64, frame: memwatch_format::Id) -> memwatch_format::Context {
    memwatch_format::Context {
        time_ns,
        thread: 1,
        thread_name: 0,
        frame,
        stack: 0,
    }
}

fn rewatched_trace() -> TraceReader {
    use memwatch_format::*;
    let opts = WriterOptions {
        chunk_bytes: 1,
        ..WriterOptions::default()
    };
    let mut w = TraceWriter::new(Vec::new(), "rewatch.mwt", &Meta::default(), opts).unwrap();
    let frame = w.intern_frame("prog.py", "main", 3).unwrap();
    let ctx = |seq: u64| main_ctx(seq * 1_000_000, frame);
    let watch = |w: &mut TraceWriter<Vec<u8>>, seq: u64, region: u32, tag: &str, init: &[u8]| {
        w.append(&Record::RegionWatched(RegionWatched {
            seq,
            ctx: ctx(seq),
            region,
            tag,
            variable: None,
            address: 0x1000 * u64::from(region),
            len: 4,
            layout: Layout::default(),
        }))
        .unwrap();
        w.append_contents(region, seq, init).unwrap();
    };
    let change = |w: &mut TraceWriter<Vec<u8>>, seq: u64, region: u32, offset: u64, old: u8, new: u8| {
        w.append(&Record::Change(Change {
            seq,
            ctx: ctx(seq),
            region,
            ranges: vec![ByteRange {
                offset,
                old: &[old],
                new: &[new],
            }],
        }))
        .unwrap();
    };
    watch(&mut w, 1, 1, "w", &[1, 1, 1, 1]);
    change(&mut w, 2, 1, 0, 1, 2);
    change(&mut w, 3, 1, 1, 1, 3);
    w.append(&Record::RegionUnwatched(RegionUnwatched {
        seq: 4,
        ctx: ctx(4),
        region: 1,
        reason: UnwatchReason::Explicit,
    }))
    .unwrap();
    watch(&mut w, 5, 3, "other", &[0; 4]);
    watch(&mut w, 6, 2, "w", &[9, 9, 9, 9]);
    change(&mut w, 7, 2, 0, 9, 8);
    w.append(&Record::Checkpoint(Checkpoint { region: 2, at_seq: 7 }))
        .unwrap();
    w.append_contents(2, 7, &[8, 9, 9, 9]).unwrap();
    change(&mut w, 8, 3, 2, 0, 5);
    let (bytes, _) = w.finish(9_000_000).unwrap();
    TraceReader::from_bytes(bytes, "rewatch.mwt").unwrap()
}

#[test]
fn a_rewatched_tag_is_the_region_watched_at_the_point() {
    let r = rewatched_trace();
    assert!(r.chunks().len() > 12, "{} chunks", r.chunks().len());
    let at = |seq: Option<u64>| state(&r, "w", seq).map(|s| (s.region.region, s.data));
    assert_eq!(at(Some(1)).unwrap(), (1, vec![1, 1, 1, 1]));
    assert_eq!(at(Some(3)).unwrap(), (1, vec![2, 3, 1, 1]));
    // Still watched at its own unwatch.
    assert_eq!(at(Some(4)).unwrap(), (1, vec![2, 3, 1, 1]));
    let e = at(Some(5)).unwrap_err().to_string();
    assert_eq!(
        e,
        "seq 5 is out of range: \"w\" was not watched then: it was watched at seq 1 and \
         unwatched at seq 4, and not watched again before seq 5"
    );
    assert_eq!(at(Some(6)).unwrap(), (2, vec![9, 9, 9, 9]));
    assert_eq!(at(Some(7)).unwrap(), (2, vec![8, 9, 9, 9]));
    let end = state(&r, "w", None).unwrap();
    assert_eq!(
        (end.region.region, end.at_seq, end.data.clone()),
        (2, 8, vec![8, 9, 9, 9])
    );
    assert_eq!((end.from_snapshot, end.replayed), (7, 0));
    // Blame looks only at the region watched at the point.
    let seqs = |at| {
        writes_to(&r, "w", 0, 1, at)
            .unwrap()
            .iter()
            .map(|c| c.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(Some(3)), vec![2]);
    assert_eq!(seqs(None), vec![7]);
    assert!(writes_to(&r, "w", 0, 1, Some(5)).is_err());
    // A query by tag lists the changes of every region watched under it.
    let mut got = Vec::new();
    let filter = Filter {
        tag: Some("w".into()),
        ..Filter::default()
    };
    for_each_change(&r, &filter, |c| {
        got.push((c.seq, c.region.unwrap().region));
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(got, vec![(2, 1), (3, 1), (7, 2)]);
}

#[test]
fn a_time_is_the_last_event_at_or_before_it() {
    let r = rewatched_trace();
    assert_eq!(seq_at_time(&r, 1_000_000).unwrap(), 1);
    assert_eq!(seq_at_time(&r, 6_500_000).unwrap(), 6);
    assert_eq!(seq_at_time(&r, 7_000_000).unwrap(), 7);
    assert_eq!(seq_at_time(&r, 60_000_000_000).unwrap(), 8);
    let e = seq_at_time(&r, 999_999).unwrap_err().to_string();
    assert_eq!(e, "time 999.999us is out of range: the first event is at 1ms");
    assert_eq!(duration_text(2_500_000_000), "2.5s");
    assert_eq!(duration_text(150_000_000), "150ms");
    assert_eq!(duration_text(1_000_001), "1.000001ms");
    assert_eq!(duration_text(7), "7ns");
}

/// A 256 KiB region (its initial contents and checkpoints go into chunks
/// flagged contents only) next to a small one, changed in turns.
#[test]
fn contents_only_chunks_are_skipped_by_scans_and_used_by_state() {
    use memwatch_format::*;
    const BIG: usize = 256 << 10;
    let mut w = TraceWriter::new(Vec::new(), "big.mwt", &Meta::default(), WriterOptions::default()).unwrap();
    let frame = w.intern_frame("prog.py", "main", 3).unwrap();
    let ctx = |seq: u64| main_ctx(seq * 1_000, frame);
    let mut big = vec![0u8; BIG];
    let mut small = [0u8; 4];
    for (region, tag, len) in [(1u32, "big", BIG), (2, "small", 4)] {
        w.append(&Record::RegionWatched(RegionWatched {
            seq: u64::from(region),
            ctx: ctx(u64::from(region)),
            region,
            tag,
            variable: None,
            address: 0x10_0000 * u64::from(region),
            len: len as u64,
            layout: Layout::default(),
        }))
        .unwrap();
        w.append_contents(region, u64::from(region), if region == 1 { &big } else { &small })
            .unwrap();
    }
    // What each region held after each seq.
    let mut expected: Vec<(u64, Vec<u8>, [u8; 4])> = Vec::new();
    for seq in 3..2003u64 {
        let (region, offset, old, new) = if seq % 2 == 0 {
            let off = (seq as usize * 7919) % BIG;
            let old = big[off];
            big[off] = old.wrapping_add(1);
            (1, off, old, big[off])
        } else {
            let off = seq as usize % 4;
            let old = small[off];
            small[off] = old.wrapping_add(3);
            (2, off, old, small[off])
        };
        w.append(&Record::Change(Change {
            seq,
            ctx: ctx(seq),
            region,
            ranges: vec![ByteRange {
                offset: offset as u64,
                old: &[old],
                new: &[new],
            }],
        }))
        .unwrap();
        if seq == 1000 {
            w.append(&Record::Checkpoint(Checkpoint {
                region: 1,
                at_seq: seq,
            }))
            .unwrap();
            w.append_contents(1, seq, &big).unwrap();
        }
        if seq % 250 == 0 || seq == 1001 || seq == 2002 {
            expected.push((seq, big.clone(), small));
        }
    }
    let (bytes, _) = w.finish(10_000_000).unwrap();
    let r = TraceReader::from_bytes(bytes, "big.mwt").unwrap();
    let flagged = r.chunks().iter().filter(|c| c.header.contents_only).count();
    // The initial contents and the checkpoint: 256 KiB each, one chunk each.
    assert_eq!(flagged, 2, "{:?}", r.chunks());

    // Every change, in order, with its values.
    let mut seen = Vec::new();
    for_each_change(&r, &Filter::default(), |c| {
        let WhatRef::Bytes { region, ranges } = c.what else {
            panic!("a byte change")
        };
        let first = ranges.first().unwrap();
        seen.push((c.seq, region, first.offset));
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(seen.len(), 2000);
    assert!(seen
        .iter()
        .zip(3u64..)
        .all(|(s, seq)| s.0 == seq && s.1 == if seq % 2 == 0 { 1 } else { 2 }));

    // The state at each point, before and after the checkpoint.
    for (seq, big_then, small_then) in &expected {
        let st = state(&r, "big", Some(*seq)).unwrap();
        assert!(st.data == *big_then, "big at {seq}");
        assert_eq!(
            st.from_snapshot,
            if *seq >= 1000 { 1000 } else { 1 },
            "big at {seq}"
        );
        assert_eq!(
            state(&r, "small", Some(*seq)).unwrap().data,
            small_then.to_vec(),
            "small at {seq}"
        );
    }
    // Blame finds the last writer of a byte of the big region.
    let off = (2000usize * 7919) % BIG;
    let last = writes_to(&r, "big", off as u64, off as u64 + 1, None).unwrap();
    assert_eq!(last.last().map(|c| c.seq), Some(2000));
}

#[test]
fn a_checkpoint_whose_contents_were_cut_off_is_passed_over() {
    // Recording stopped while a checkpoint's contents were written: the
    // checkpoint record is there, part of its contents is not. The state
    // at and after it is rebuilt from the snapshot before.
    use memwatch_format::*;
    let mut w = TraceWriter::new(Vec::new(), "cut.mwt", &Meta::default(), WriterOptions::default()).unwrap();
    let frame = w.intern_frame("prog.py", "main", 3).unwrap();
    let ctx = |seq: u64| main_ctx(seq * 1_000, frame);
    w.append(&Record::RegionWatched(RegionWatched {
        seq: 1,
        ctx: ctx(1),
        region: 1,
        tag: "a",
        variable: None,
        address: 0x1000,
        len: 8,
        layout: Layout::default(),
    }))
    .unwrap();
    w.append_contents(1, 1, &[0; 8]).unwrap();
    w.append(&Record::Change(Change {
        seq: 2,
        ctx: ctx(2),
        region: 1,
        ranges: vec![ByteRange {
            offset: 0,
            old: &[0; 8],
            new: &[7; 8],
        }],
    }))
    .unwrap();
    w.append(&Record::Checkpoint(Checkpoint { region: 1, at_seq: 2 }))
        .unwrap();
    // Only the first half of the checkpoint's contents made it.
    w.append(&Record::Contents(Contents {
        region: 1,
        at_seq: 2,
        offset: 0,
        data: &[7; 4],
    }))
    .unwrap();
    w.flush().unwrap();
    let bytes = w.into_output();
    let r = TraceReader::from_bytes(bytes, "cut.mwt").unwrap();
    let st = memwatch_analyzer::state(&r, "a", Some(2)).unwrap();
    assert_eq!(st.data, vec![7; 8]);
    assert_eq!((st.from_snapshot, st.replayed), (1, 1));
}
