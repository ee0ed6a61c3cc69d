//! Owned mirrors of the records, proptest strategies for them, and helpers
//! that write and read traces in memory.

use memwatch_format::*;
use proptest::prelude::*;

/// A record with owned data; [`Owned::as_record`] borrows a [`Record`] from it.
#[derive(Debug, Clone)]
pub enum Owned {
    String(u32, String),
    Frame(FrameDef),
    Stack(u32, Vec<u32>),
    Watched {
        seq: u64,
        ctx: Context,
        region: u32,
        tag: String,
        variable: Option<String>,
        address: u64,
        len: u64,
        dtype: Option<String>,
        itemsize: u32,
        shape: Vec<u64>,
        strides: Vec<i64>,
        origin: u64,
    },
    Contents {
        region: u32,
        at_seq: u64,
        offset: u64,
        data: Vec<u8>,
    },
    Unwatched(RegionUnwatched),
    Change {
        seq: u64,
        ctx: Context,
        region: u32,
        ranges: Vec<(u64, Vec<u8>, Vec<u8>)>,
    },
    Object {
        seq: u64,
        ctx: Context,
        tag: u32,
        kind: ObjectChangeKind,
        key: Option<String>,
        old: Option<String>,
        new: Option<String>,
    },
    Checkpoint(Checkpoint),
    Lost {
        after_seq: u64,
        events: u64,
        reason: String,
    },
    ObjectVariable(u32, Option<String>),
    Note(Note),
}

impl Owned {
    pub fn as_record(&self) -> Record<'_> {
        match self {
            Owned::String(id, value) => Record::String(StringDef { id: *id, value }),
            Owned::Frame(f) => Record::Frame(*f),
            Owned::Stack(id, frames) => Record::Stack(StackDef {
                id: *id,
                frames: frames.clone(),
            }),
            Owned::Watched {
                seq,
                ctx,
                region,
                tag,
                variable,
                address,
                len,
                dtype,
                itemsize,
                shape,
                strides,
                origin,
            } => Record::RegionWatched(RegionWatched {
                seq: *seq,
                ctx: *ctx,
                region: *region,
                tag,
                variable: variable.as_deref(),
                address: *address,
                len: *len,
                layout: Layout {
                    dtype: dtype.as_deref(),
                    itemsize: *itemsize,
                    shape: shape.clone(),
                    strides: strides.clone(),
                    origin: *origin,
                },
            }),
            Owned::Contents {
                region,
                at_seq,
                offset,
                data,
            } => Record::Contents(Contents {
                region: *region,
                at_seq: *at_seq,
                offset: *offset,
                data,
            }),
            Owned::Unwatched(u) => Record::RegionUnwatched(*u),
            Owned::Change {
                seq,
                ctx,
                region,
                ranges,
            } => Record::Change(Change {
                seq: *seq,
                ctx: *ctx,
                region: *region,
                ranges: ranges
                    .iter()
                    .map(|(offset, old, new)| ByteRange {
                        offset: *offset,
                        old,
                        new,
                    })
                    .collect(),
            }),
            Owned::Object {
                seq,
                ctx,
                tag,
                kind,
                key,
                old,
                new,
            } => Record::ObjectChange(ObjectChange {
                seq: *seq,
                ctx: *ctx,
                tag: *tag,
                kind: *kind,
                key: key.as_deref(),
                old: old.as_deref(),
                new: new.as_deref(),
            }),
            Owned::Checkpoint(c) => Record::Checkpoint(*c),
            Owned::Lost {
                after_seq,
                events,
                reason,
            } => Record::Lost(Lost {
                after_seq: *after_seq,
                events: *events,
                reason,
            }),
            Owned::ObjectVariable(tag, variable) => Record::ObjectVariable(ObjectVariable {
                tag: *tag,
                variable: variable.as_deref(),
            }),
            Owned::Note(n) => Record::Note(*n),
        }
    }
}

fn ctx() -> impl Strategy<Value = Context> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(time_ns, thread, thread_name, frame, stack)| Context {
            time_ns,
            thread,
            thread_name,
            frame,
            stack,
        })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn text() -> impl Strategy<Value = String> {
    ".{0,24}"
}

pub fn owned_record() -> impl Strategy<Value = Owned> {
    prop_oneof![
        (any::<u32>(), text()).prop_map(|(id, s)| Owned::String(id, s)),
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(id, file, function, line)| {
            Owned::Frame(FrameDef {
                id,
                file,
                function,
                line,
            })
        }),
        (any::<u32>(), prop::collection::vec(any::<u32>(), 0..8)).prop_map(|(id, f)| Owned::Stack(id, f)),
        (
            (
                any::<u64>(),
                ctx(),
                any::<u32>(),
                text(),
                prop::option::of(text())
            ),
            (any::<u64>(), any::<u64>(), prop::option::of(text()), any::<u32>()),
            (
                prop::collection::vec(any::<u64>(), 0..4),
                prop::collection::vec(any::<i64>(), 0..4),
                any::<u64>()
            ),
        )
            .prop_map(
                |(
                    (seq, ctx, region, tag, variable),
                    (address, len, dtype, itemsize),
                    (shape, strides, origin),
                )| Owned::Watched {
                    seq,
                    ctx,
                    region,
                    tag,
                    variable,
                    address,
                    len,
                    dtype,
                    itemsize,
                    shape,
                    strides,
                    origin,
                }
            ),
        (any::<u32>(), any::<u64>(), any::<u64>(), bytes(300)).prop_map(|(region, at_seq, offset, data)| {
            Owned::Contents {
                region,
                at_seq,
                offset,
                data,
            }
        }),
        (any::<u64>(), ctx(), any::<u32>(), 0..3u8).prop_map(|(seq, ctx, region, r)| {
            Owned::Unwatched(RegionUnwatched {
                seq,
                ctx,
                region,
                reason: [
                    UnwatchReason::Explicit,
                    UnwatchReason::Shutdown,
                    UnwatchReason::Collected,
                ][r as usize],
            })
        }),
        (
            any::<u64>(),
            ctx(),
            any::<u32>(),
            prop::collection::vec((any::<u64>(), bytes(16)), 0..5)
        )
            .prop_map(|(seq, ctx, region, rs)| Owned::Change {
                seq,
                ctx,
                region,
                ranges: rs
                    .into_iter()
                    .map(|(off, old)| {
                        let new = old.iter().map(|b| b ^ 0x5a).collect();
                        (off, old, new)
                    })
                    .collect(),
            }),
        (
            any::<u64>(),
            ctx(),
            any::<u32>(),
            0..ObjectChangeKind::ALL.len(),
            prop::option::of(text()),
            prop::option::of(text()),
            prop::option::of(text())
        )
            .prop_map(|(seq, ctx, tag, k, key, old, new)| Owned::Object {
                seq,
                ctx,
                tag,
                kind: ObjectChangeKind::ALL[k],
                key,
                old,
                new,
            }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(region, at_seq)| Owned::Checkpoint(Checkpoint { region, at_seq })),
        (any::<u64>(), any::<u64>(), text()).prop_map(|(after_seq, events, reason)| Owned::Lost {
            after_seq,
            events,
            reason,
        }),
        (any::<u32>(), prop::option::of(text())).prop_map(|(tag, v)| Owned::ObjectVariable(tag, v)),
        (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(seq, key, value)| Owned::Note(Note {
            seq,
            key,
            value
        })),
    ]
}

/// Writes `recs` to an in-memory trace.
pub fn write_trace(meta: &Meta, recs: &[Owned], opts: WriterOptions, close: bool) -> Vec<u8> {
    let mut w = TraceWriter::new(Vec::new(), "mem.mwt", meta, opts).unwrap();
    for r in recs {
        w.append(&r.as_record()).unwrap();
    }
    if close {
        w.finish(7).unwrap().0
    } else {
        w.flush().unwrap();
        // The bytes without a trailer, as a killed process leaves them.
        w.into_output()
    }
}

/// Every record of a trace, in order, as `Debug` strings (owned, so they
/// outlive the reader).
pub fn read_all(reader: &TraceReader) -> Result<Vec<String>> {
    let mut out = Vec::new();
    reader.for_each_record(|r| {
        out.push(format!("{r:?}"));
        Ok::<_, Error>(())
    })?;
    Ok(out)
}

pub fn debug_all(recs: &[Owned]) -> Vec<String> {
    recs.iter().map(|r| format!("{:?}", r.as_record())).collect()
}

/// The sample trace, written with small chunks so it has several.
pub fn sample_bytes(chunk_bytes: usize) -> (Vec<u8>, Vec<String>) {
    sample_bytes_of(chunk_bytes, 1)
}

/// [`sample_bytes`], with `v2`: followed by what format version 2 added.
/// The sample with the additions of format versions up to `version`.
pub fn sample_bytes_of(chunk_bytes: usize, version: u32) -> (Vec<u8>, Vec<String>) {
    let mut w = TraceWriter::new(
        Vec::new(),
        "sample.mwt",
        &sample::sample_meta(),
        WriterOptions {
            chunk_bytes,
            ..WriterOptions::default()
        },
    )
    .unwrap();
    let mut seq = sample::write_sample(&mut w).unwrap();
    if version >= 2 {
        seq = sample::write_v2_additions(&mut w, seq).unwrap();
    }
    if version >= 3 {
        seq = sample::write_v3_additions(&mut w, seq).unwrap();
    }
    if version >= 4 {
        sample::write_v4_additions(&mut w, seq).unwrap();
    }
    let (bytes, _) = w.finish(50_000).unwrap();
    let all = read_all(&TraceReader::from_bytes(bytes.clone(), "sample.mwt").unwrap()).unwrap();
    (bytes, all)
}
