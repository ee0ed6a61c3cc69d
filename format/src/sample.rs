//! A small, deterministic, synthetic trace: every record type once or more.
//!
//! The golden file `format/tests/data/v1-sample.mwt` is this trace
//! ([`write_sample`]); `v2-sample.mwt` is the same followed by what format
//! version 2 added ([`write_v2_additions`]), `v3-sample.mwt` and
//! `v4-sample.mwt` add what versions 3 and 4 added
//! ([`write_v3_additions`], [`write_v4_additions`]), and
//! `cargo run -p memwatch-format --example sample_trace -- OUT` writes that
//! again. It is made up (no process was recorded): a 4×4 float32
//! `layer1_weight` updated over three steps, a `step` counter and a
//! `config` object.

use crate::{
    ByteRange, Change, Checkpoint, Context, Layout, Lost, Meta, ObjectChange, ObjectChangeKind,
    ObjectVariable, Output, Record, RegionUnwatched, RegionWatched, Result, TraceWriter, UnwatchReason,
};

/// The metadata of the sample trace.
pub fn sample_meta() -> Meta {
    Meta {
        pid: 4242,
        argv: vec!["python".into(), "samples/train.py".into()],
        python_version: "3.11.7 (sample)".into(),
        platform: "linux-x86_64".into(),
        page_size: 4096,
        start_time_ns: 1_764_115_200_000_000_000,
        writer: "memwatch-format sample".into(),
        properties: vec![
            ("backend".into(), "sample".into()),
            ("mode".into(), "line".into()),
        ],
    }
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes the sample trace's records to `w` (it does not call `finish`).
/// Returns the number of seq-bearing events written.
pub fn write_sample<W: Output>(w: &mut TraceWriter<W>) -> Result<u64> {
    let main = w.intern_str("MainThread")?;
    let worker = w.intern_str("loader-1")?;
    let train_main = w.intern_frame("samples/train.py", "<module>", 60)?;
    let step_frame = |w: &mut TraceWriter<W>, line| w.intern_frame("samples/train.py", "step", line);
    let ctx = |time_ns, thread, thread_name, frame, stack| Context {
        time_ns,
        thread,
        thread_name,
        frame,
        stack,
    };

    let mut weights: Vec<f32> = (0..16).map(|i| i as f32 * 0.25).collect();
    let main_stack = w.intern_stack(&[train_main])?;
    let watch_frame = w.intern_frame("samples/train.py", "<module>", 40)?;
    let watch_stack = w.intern_stack(&[watch_frame])?;
    w.append(&Record::RegionWatched(RegionWatched {
        seq: 1,
        ctx: ctx(1_000, 100, main, watch_frame, watch_stack),
        region: 1,
        tag: "layer1_weight",
        variable: Some("w1"),
        address: 0x7f00_1234_0000,
        len: 64,
        layout: Layout {
            dtype: Some("<f4"),
            itemsize: 4,
            shape: vec![4, 4],
            strides: vec![],
            origin: 0,
        },
    }))?;
    w.append_contents(1, 1, &f32s(&weights))?;

    let counter: u64 = 0;
    w.append(&Record::RegionWatched(RegionWatched {
        seq: 2,
        ctx: ctx(2_000, 100, main, watch_frame, watch_stack),
        region: 2,
        tag: "step",
        variable: Some("step_counter"),
        address: 0x7f00_1234_0040,
        len: 8,
        layout: Layout {
            dtype: Some("<u8"),
            itemsize: 8,
            shape: vec![1],
            strides: vec![],
            origin: 0,
        },
    }))?;
    w.append_contents(2, 2, &counter.to_le_bytes())?;

    let config = w.intern_str("config")?;
    let mut seq = 2;
    for step in 1..=3u64 {
        let line = 52;
        let frame = step_frame(w, line)?;
        let stack = w.intern_stack(&[frame, train_main])?;
        let old = weights.clone();
        for (i, x) in weights.iter_mut().enumerate() {
            if i % 3 == (step as usize) % 3 {
                *x -= 0.125 * step as f32;
            }
        }
        let (old_b, new_b) = (f32s(&old), f32s(&weights));
        let mut ranges = Vec::new();
        for i in 0..16 {
            let r = i * 4..i * 4 + 4;
            if old_b[r.clone()] != new_b[r.clone()] {
                ranges.push((r.start as u64, old_b[r.clone()].to_vec(), new_b[r].to_vec()));
            }
        }
        seq += 1;
        w.append(&Record::Change(Change {
            seq,
            ctx: ctx(10_000 * step, 100, main, frame, stack),
            region: 1,
            ranges: ranges
                .iter()
                .map(|(offset, old, new)| ByteRange {
                    offset: *offset,
                    old,
                    new,
                })
                .collect(),
        }))?;

        let counter_frame = step_frame(w, 55)?;
        let counter_stack = w.intern_stack(&[counter_frame, train_main])?;
        seq += 1;
        w.append(&Record::Change(Change {
            seq,
            ctx: ctx(10_000 * step + 500, 100, main, counter_frame, counter_stack),
            region: 2,
            ranges: vec![ByteRange {
                offset: 0,
                old: &(step - 1).to_le_bytes(),
                new: &step.to_le_bytes(),
            }],
        }))?;

        if step == 2 {
            w.append(&Record::Checkpoint(Checkpoint {
                region: 1,
                at_seq: seq,
            }))?;
            w.append_contents(1, seq, &f32s(&weights))?;
            seq += 1;
            let cfg_frame = w.intern_frame("samples/train.py", "<module>", 58)?;
            w.append(&Record::ObjectChange(ObjectChange {
                seq,
                ctx: ctx(25_000, 101, worker, cfg_frame, main_stack),
                tag: config,
                kind: ObjectChangeKind::SetAttr,
                key: Some("lr"),
                old: Some("0.125"),
                new: Some("0.0625"),
            }))?;
        }
    }
    w.append(&Record::Lost(Lost {
        after_seq: seq,
        events: 0,
        reason: "sample: nothing was lost",
    }))?;
    seq += 1;
    w.append(&Record::RegionUnwatched(RegionUnwatched {
        seq,
        ctx: ctx(40_000, 100, main, train_main, main_stack),
        region: 2,
        reason: UnwatchReason::Explicit,
    }))?;
    seq += 1;
    w.append(&Record::RegionUnwatched(RegionUnwatched {
        seq,
        ctx: ctx(41_000, 100, main, train_main, main_stack),
        region: 1,
        reason: UnwatchReason::Shutdown,
    }))?;
    Ok(seq)
}

/// What format version 2 added, after [`write_sample`] (which returned
/// `seq`): the `config` tag's variable, and one more change through it.
/// Returns the last seq written.
pub fn write_v2_additions<W: Output>(w: &mut TraceWriter<W>, mut seq: u64) -> Result<u64> {
    let config = w.intern_str("config")?;
    let main = w.intern_str("MainThread")?;
    let frame = w.intern_frame("samples/train.py", "<module>", 61)?;
    let stack = w.intern_stack(&[frame])?;
    w.append(&Record::ObjectVariable(ObjectVariable {
        tag: config,
        variable: Some("cfg"),
    }))?;
    seq += 1;
    w.append(&Record::ObjectChange(ObjectChange {
        seq,
        ctx: Context {
            time_ns: 45_000,
            thread: 100,
            thread_name: main,
            frame,
            stack,
        },
        tag: config,
        kind: ObjectChangeKind::SetAttr,
        key: Some("lr"),
        old: Some("0.0625"),
        new: Some("0.03125"),
    }))?;
    Ok(seq)
}

/// What format version 3 added, after [`write_v2_additions`] (which
/// returned `seq`): region 3 (`layer2_weight`, 16 float32 counting up by
/// 0.25) is watched; a change of it stored as a `Delta` (XOR, shuffled by
/// 4); then a checkpoint whose contents are a whole-region `full` delta;
/// and a `Waited` note. Returns the last seq written.
pub fn write_v3_additions<W: Output>(w: &mut TraceWriter<W>, mut seq: u64) -> Result<u64> {
    let main = w.intern_str("MainThread")?;
    let frame = w.intern_frame("samples/train.py", "step", 53)?;
    let stack = w.intern_stack(&[frame])?;
    let ctx = |time_ns| Context {
        time_ns,
        thread: 100,
        thread_name: main,
        frame,
        stack,
    };
    seq += 1;
    w.append(&Record::RegionWatched(RegionWatched {
        seq,
        ctx: ctx(45_500),
        region: 3,
        tag: "layer2_weight",
        variable: Some("w2"),
        address: 0x7f00_1235_0000,
        len: 64,
        layout: Layout {
            dtype: Some("<f4"),
            itemsize: 4,
            shape: vec![16],
            strides: vec![],
            origin: 0,
        },
    }))?;
    let start: Vec<f32> = (0..16).map(|i| i as f32 * 0.25).collect();
    w.append_contents(3, seq, &f32s(&start))?;
    // Elements 2 and 3 go from 0.5 and 0.75 to 0.25 and 1.5.
    let (old, new) = (f32s(&[0.5, 0.75]), f32s(&[0.25, 1.5]));
    seq += 1;
    w.append_delta(
        seq,
        &ctx(46_000),
        3,
        4,
        false,
        &[ByteRange {
            offset: 8,
            old: &old,
            new: &new,
        }],
    )?;
    // Every element set to 2.0: a whole-region rewrite that is a checkpoint.
    let all = f32s(&[2.0; 16]);
    seq += 1;
    w.append(&Record::Checkpoint(Checkpoint {
        region: 3,
        at_seq: seq,
    }))?;
    w.append_delta(
        seq,
        &ctx(47_000),
        3,
        4,
        true,
        &[ByteRange {
            offset: 0,
            old: &all,
            new: &all,
        }],
    )?;
    w.append(&Record::Waited(crate::Waited {
        after_seq: seq,
        waited_ns: 1_500_000,
        waits: 2,
    }))?;
    Ok(seq)
}

/// What format version 4 added, after [`write_v3_additions`] (which
/// returned `seq`): two changes of region 3 made by a torch op, each with
/// its `op` [`crate::Note`] (the second reuses the strings the first
/// defined), then one without. Returns the last seq written.
pub fn write_v4_additions<W: Output>(w: &mut TraceWriter<W>, mut seq: u64) -> Result<u64> {
    let main = w.intern_str("MainThread")?;
    let frame = w.intern_frame("samples/train.py", "step", 54)?;
    let stack = w.intern_stack(&[frame])?;
    let ctx = |time_ns| Context {
        time_ns,
        thread: 100,
        thread_name: main,
        frame,
        stack,
    };
    // Region 3 holds 2.0 everywhere (the checkpoint of version 3's additions).
    let steps = [
        (f32s(&[2.0, 2.0]), f32s(&[3.0, 3.0]), 0, Some("aten::add_.Tensor")),
        (f32s(&[3.0]), f32s(&[6.0]), 0, Some("aten::mul_.Tensor")),
        (f32s(&[2.0]), f32s(&[0.5]), 60, None),
    ];
    for (i, (old, new, offset, op)) in steps.into_iter().enumerate() {
        seq += 1;
        if let Some(op) = op {
            w.append_note(seq, crate::NOTE_OP, op)?;
        }
        w.append_delta(
            seq,
            &ctx(48_000 + 1_000 * i as u64),
            3,
            4,
            false,
            &[ByteRange {
                offset,
                old: &old,
                new: &new,
            }],
        )?;
    }
    Ok(seq)
}
