//! Rebuilding a region's contents at any point, and who last wrote a byte.

use std::ops::ControlFlow;

use std::collections::{HashMap, HashSet};

use memwatch_format::{ChunkInfo, DecodedChunk, Record, TraceReader, NO_SEQ};

use crate::error::{Error, Result};
use crate::query::{for_each_change, ChangeRow, Filter, WhatRef};
use crate::symbols::{RegionInfo, Symbols};
use crate::text::duration_text;

/// A region's exact contents after event `at_seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub region: RegionInfo,
    pub at_seq: u64,
    pub data: Vec<u8>,
    /// The snapshot the state was rebuilt from (the region's initial
    /// contents or a checkpoint) and how many changes were replayed on it.
    pub from_snapshot: u64,
    pub replayed: u64,
}

/// The chunk decoded, or `None` for a chunk flagged contents only: it holds
/// no definition, watch, unwatch, checkpoint or change, which is all the
/// walks below look for.
fn decode_unless_contents<'r>(reader: &'r TraceReader, info: &ChunkInfo) -> Result<Option<DecodedChunk<'r>>> {
    if info.header.contents_only {
        return Ok(None);
    }
    Ok(Some(reader.decode_chunk(info)?))
}

/// The first and last seq of the trace's events, if it has any.
pub fn seq_bounds(reader: &TraceReader) -> Option<(u64, u64)> {
    let mut bounds: Option<(u64, u64)> = None;
    for c in reader.chunks() {
        let h = &c.header;
        if h.first_seq == NO_SEQ {
            continue;
        }
        bounds = Some(match bounds {
            None => (h.first_seq, h.last_seq),
            Some((a, b)) => (a.min(h.first_seq), b.max(h.last_seq)),
        });
    }
    bounds
}

/// Whether the trace watched a region under `tag` at all, reading from the
/// start only as far as its first `RegionWatched` (contents chunks are not
/// decompressed). A run's commands use it to find the process that watched
/// a tag.
pub fn has_region(reader: &TraceReader, tag: &str) -> Result<bool> {
    match find_region(reader, tag) {
        Ok(_) => Ok(true),
        Err(Error::UnknownTag { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Finds the region watched under `tag` (the first one), reading from the
/// start only as far as needed. Returns it, the symbols learned so far and
/// the index of the chunk that holds its `RegionWatched`.
fn find_region(reader: &TraceReader, tag: &str) -> Result<(RegionInfo, Symbols, usize)> {
    let mut syms = Symbols::default();
    for (k, info) in reader.chunks().iter().enumerate() {
        let chunk = decode_unless_contents(reader, info)?;
        for rec in chunk.iter().flat_map(|c| c.records()) {
            let rec = rec?;
            syms.learn(&rec);
            if let Record::RegionWatched(r) = &rec {
                if r.tag == tag {
                    let region = syms.region(r.region).expect("just learned").clone();
                    return Ok((region, syms, k));
                }
            }
        }
    }
    Err(Error::UnknownTag {
        tag: tag.to_string(),
        known: syms.tags(),
    })
}

/// The region tagged `tag` that is watched at event `at`, the seq to
/// rebuild it at, and the index of the chunk holding its `RegionWatched`.
///
/// A tag can be watched, unwatched and watched again: each watch is its
/// own region. The one picked is the latest watched at or before `at` and
/// not unwatched before it (a region is still watched at its own
/// `RegionUnwatched`). With no `at` (the end of the trace), the last region
/// watched under `tag` is picked, at the end or at its unwatch if earlier.
///
/// It walks back from the chunk holding `at` until it finds the region: for
/// a tag watched once, only as far back as the region's nearest checkpoint.
fn region_at(reader: &TraceReader, tag: &str, at: Option<u64>) -> Result<(RegionInfo, u64, usize)> {
    let (first, _, first_chunk) = find_region(reader, tag)?;
    let (lo, hi) = seq_bounds(reader).unwrap_or((first.watched_seq, first.watched_seq));
    let target = at.unwrap_or(hi);
    if target > hi {
        return Err(Error::SeqOutOfRange {
            seq: target,
            what: format!("the trace's events run from seq {lo} to {hi}"),
        });
    }
    if target < first.watched_seq {
        return Err(Error::SeqOutOfRange {
            seq: target,
            what: format!("{tag:?} was first watched at seq {}", first.watched_seq),
        });
    }
    let chunks = reader.chunks();
    let k = last_chunk_at_or_before(chunks, first_chunk, target);
    // What the walk has seen at or before the target, by region id.
    let mut watched: HashMap<u32, (RegionInfo, usize)> = HashMap::new();
    let mut unwatched: HashMap<u32, u64> = HashMap::new();
    let mut checkpointed: HashSet<u32> = HashSet::new();
    let mut j = k;
    loop {
        let chunk = decode_unless_contents(reader, &chunks[j])?;
        for rec in chunk.iter().flat_map(|c| c.records()) {
            match rec? {
                Record::RegionWatched(r) if r.tag == tag && r.seq <= target => {
                    let mut syms = Symbols::default();
                    syms.learn(&Record::RegionWatched(r.clone()));
                    let info = syms.region(r.region).expect("just learned").clone();
                    watched.insert(r.region, (info, j));
                }
                Record::RegionUnwatched(u) if u.seq <= target => {
                    unwatched.insert(u.region, u.seq);
                }
                Record::Checkpoint(c) if c.at_seq <= target => {
                    checkpointed.insert(c.region);
                }
                _ => {}
            }
        }
        // The latest watch of the tag seen: nothing watched it later up to
        // the target, since the walk has covered everything since.
        let latest = watched.values().max_by_key(|(r, _)| r.watched_seq).cloned();
        let found = match latest {
            Some(found) => Some(found),
            // The first region, still checkpointed (so still watched) in the
            // part walked, or unwatched in it.
            None if checkpointed.contains(&first.region)
                || unwatched.contains_key(&first.region)
                || j == first_chunk =>
            {
                Some((first.clone(), first_chunk))
            }
            None => None,
        };
        if let Some((mut region, chunk)) = found {
            let Some(&gone) = unwatched.get(&region.region).filter(|&&g| g < target) else {
                return Ok((region, target, chunk));
            };
            region.unwatched_seq = Some(gone);
            if at.is_none() {
                return Ok((region, gone, chunk));
            }
            return Err(Error::SeqOutOfRange {
                seq: target,
                what: format!(
                    "{tag:?} was not watched then: it was watched at seq {} and unwatched at seq {gone}, \
                     and not watched again before seq {target}",
                    region.watched_seq
                ),
            });
        }
        j -= 1;
    }
}

/// The seq of the last event at or before `time_ns` nanoseconds after the
/// trace started (events are in time order as in seq order).
///
/// Finds the chunk by a binary search on the time of each chunk's first
/// event, so it decodes a handful of chunks however long the trace is.
pub fn seq_at_time(reader: &TraceReader, time_ns: u64) -> Result<u64> {
    let chunks: Vec<_> = reader
        .chunks()
        .iter()
        .filter(|c| c.header.first_seq != NO_SEQ)
        .collect();
    let first_event = |i: usize| -> Result<u64> {
        let chunk = reader.decode_chunk(chunks[i])?;
        for rec in chunk.records() {
            if let Some(t) = event_time(&rec?) {
                return Ok(t);
            }
        }
        Ok(u64::MAX)
    };
    // The last chunk whose first event is at or before the time.
    let (mut lo, mut hi) = (0usize, chunks.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if first_event(mid)? <= time_ns {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let Some(i) = lo.checked_sub(1) else {
        let first = if chunks.is_empty() {
            None
        } else {
            Some(first_event(0)?)
        };
        return Err(Error::TimeOutOfRange {
            time_ns,
            what: match first {
                Some(t) => format!("the first event is at {}", duration_text(t)),
                None => "the trace has no events".to_string(),
            },
        });
    };
    let chunk = reader.decode_chunk(chunks[i])?;
    let mut best = None;
    for rec in chunk.records() {
        let rec = rec?;
        if let (Some(t), Some(seq)) = (event_time(&rec), rec.seq()) {
            if t <= time_ns {
                best = Some(best.map_or(seq, |b: u64| b.max(seq)));
            }
        }
    }
    Ok(best.unwrap_or(chunks[i].header.first_seq))
}

fn event_time(rec: &Record<'_>) -> Option<u64> {
    match rec {
        Record::RegionWatched(r) => Some(r.ctx.time_ns),
        Record::RegionUnwatched(r) => Some(r.ctx.time_ns),
        Record::Change(r) => Some(r.ctx.time_ns),
        Record::Delta(r) => Some(r.ctx.time_ns),
        Record::ObjectChange(r) => Some(r.ctx.time_ns),
        _ => None,
    }
}

/// The last chunk, from `first` on, that starts at or before seq `target`
/// (chunks with no events count as starting where the previous one did).
fn last_chunk_at_or_before(chunks: &[ChunkInfo], first: usize, target: u64) -> usize {
    let mut k = first;
    for (i, c) in chunks.iter().enumerate().skip(first) {
        if c.header.first_seq != NO_SEQ && c.header.first_seq > target {
            break;
        }
        k = i;
    }
    k
}

/// The contents of the region tagged `tag` after event `at` (default: the
/// last event of the trace).
///
/// A tag watched, unwatched and watched again is several regions: the one
/// rebuilt is the latest watched at or before `at` and not unwatched before
/// it (a region is still watched at its own unwatch); with no `at`, the
/// last one watched, at the end of the trace or at its unwatch if earlier.
/// When no region is watched under `tag` at `at`, the error says when it
/// was.
///
/// The cost does not grow with the number of changes before `at`: the
/// reader walks back from the chunk holding `at` to the nearest snapshot of
/// the region (a checkpoint, or the initial contents), then replays only the
/// changes after it. Checkpoints are written whenever a region's changes
/// since the last one reach its size, so that replay is at most about one
/// region's worth of changes.
pub fn state(reader: &TraceReader, tag: &str, at: Option<u64>) -> Result<State> {
    let (region, target, first_chunk) = region_at(reader, tag, at)?;
    let mut limit = target;
    loop {
        let (start, snap_seq) = nearest_snapshot(reader, &region, first_chunk, limit)?
            .unwrap_or((first_chunk, region.watched_seq));
        let (data, replayed, covered) = rebuild(reader, &region, start, snap_seq, target)?;
        if covered >= region.len || snap_seq <= region.watched_seq {
            return Ok(State {
                region,
                at_seq: target,
                data,
                from_snapshot: snap_seq,
                replayed,
            });
        }
        // A checkpoint whose contents did not all reach the trace (recording
        // stopped while they were written): rebuild from the one before.
        limit = snap_seq - 1;
    }
}

/// The chunk and seq of the region's nearest snapshot (a checkpoint, or its
/// initial contents) at or before `limit`, walking back from the chunk that
/// holds `limit`.
fn nearest_snapshot(
    reader: &TraceReader,
    region: &RegionInfo,
    first_chunk: usize,
    limit: u64,
) -> Result<Option<(usize, u64)>> {
    let chunks = reader.chunks();
    let mut j = last_chunk_at_or_before(chunks, first_chunk, limit);
    loop {
        let chunk = decode_unless_contents(reader, &chunks[j])?;
        let mut best: Option<u64> = None;
        for rec in chunk.iter().flat_map(|c| c.records()) {
            let s = match rec? {
                Record::Checkpoint(c) if c.region == region.region => c.at_seq,
                Record::RegionWatched(r) if r.region == region.region => r.seq,
                _ => continue,
            };
            if s <= limit {
                best = Some(best.map_or(s, |b: u64| b.max(s)));
            }
        }
        if let Some(s) = best {
            return Ok(Some((j, s)));
        }
        if j == first_chunk {
            return Ok(None);
        }
        j -= 1;
    }
}

/// The region's contents at `target`: the snapshot taken at `snap_seq`
/// (from chunk `start` on), then every change after it. Also returns how
/// many changes were replayed and how many bytes the snapshot covered.
fn rebuild(
    reader: &TraceReader,
    region: &RegionInfo,
    start: usize,
    snap_seq: u64,
    target: u64,
) -> Result<(Vec<u8>, u64, u64)> {
    let mut data = vec![0u8; region.len as usize];
    let (mut replayed, mut covered) = (0, 0u64);
    'chunks: for info in &reader.chunks()[start..] {
        let chunk = reader.decode_chunk(info)?;
        for rec in chunk.records() {
            match rec? {
                Record::Contents(c) if c.region == region.region && c.at_seq == snap_seq => {
                    let off = c.offset as usize;
                    let end = (off + c.data.len()).min(data.len());
                    if off < end {
                        data[off..end].copy_from_slice(&c.data[..end - off]);
                        covered += (end - off) as u64;
                    }
                }
                Record::Change(c) if c.region == region.region => {
                    if c.seq > target {
                        break 'chunks;
                    }
                    if c.seq > snap_seq {
                        for r in &c.ranges {
                            let off = r.offset as usize;
                            let end = (off + r.new.len()).min(data.len());
                            if off < end {
                                data[off..end].copy_from_slice(&r.new[..end - off]);
                            }
                        }
                        replayed += 1;
                    }
                }
                Record::Delta(d) if d.region == region.region => {
                    if d.seq > target {
                        break 'chunks;
                    }
                    // A whole-region `full` delta at the snapshot's seq is
                    // the checkpoint's contents; any other at or before it
                    // is in the snapshot already.
                    let snapshot = d.seq == snap_seq && d.full;
                    if d.seq > snap_seq || snapshot {
                        for r in &d.ranges {
                            let n =
                                memwatch_format::delta::apply(&mut data, r.offset, r.data, d.shuffle, d.full);
                            if snapshot {
                                covered += n as u64;
                            }
                        }
                        if !snapshot {
                            replayed += 1;
                        }
                    }
                }
                rec => {
                    if rec.seq().is_some_and(|s| s > target) {
                        break 'chunks;
                    }
                }
            }
        }
    }
    Ok((data, replayed, covered))
}

/// Every index of an array of `shape`, in C order (last dimension fastest).
pub fn c_order(shape: &[u64]) -> impl Iterator<Item = Vec<u64>> + '_ {
    // Saturating: a damaged trace's shape must not overflow (it only makes
    // the walk long).
    let count: u64 = shape.iter().fold(1u64, |a, n| a.saturating_mul(*n));
    let mut idx = vec![0u64; shape.len()];
    (0..count).map(move |_| {
        let out = idx.clone();
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
        out
    })
}

/// The shape of a region, treating a flat one as 1-D.
pub fn shape_of(region: &RegionInfo) -> Vec<u64> {
    if region.shape.is_empty() {
        vec![region.len / u64::from(region.itemsize.max(1))]
    } else {
        region.shape.clone()
    }
}

/// The byte range of element `index` (one entry per dimension, or one flat
/// index) of `region`.
pub fn element_bytes(region: &RegionInfo, index: &[u64]) -> Result<(u64, u64)> {
    let itemsize = u64::from(region.itemsize.max(1));
    let shape = if region.shape.is_empty() {
        vec![region.len / itemsize]
    } else {
        region.shape.clone()
    };
    let bad = |what: String| Error::OutOfRegion { what };
    let idx: Vec<u64> = if index.len() == 1 && shape.len() > 1 {
        // A flat index into a C-ordered array.
        let mut flat = index[0];
        let mut v = vec![0; shape.len()];
        for (d, n) in shape.iter().enumerate().rev() {
            v[d] = flat % n.max(&1);
            flat /= n.max(&1);
        }
        if flat != 0 {
            return Err(bad(format!("flat index {} is outside shape {shape:?}", index[0])));
        }
        v
    } else {
        index.to_vec()
    };
    if idx.len() != shape.len() || idx.iter().zip(&shape).any(|(i, n)| i >= n) {
        return Err(bad(format!("index {idx:?} is outside shape {shape:?}")));
    }
    let strides: Vec<i64> = if region.strides.is_empty() {
        let mut s = vec![0i64; shape.len()];
        let mut acc = itemsize as i64;
        for d in (0..shape.len()).rev() {
            s[d] = acc;
            acc *= shape[d] as i64;
        }
        s
    } else {
        region.strides.clone()
    };
    let off = region.origin as i64 + idx.iter().zip(&strides).map(|(i, s)| *i as i64 * s).sum::<i64>();
    Ok((off as u64, off as u64 + itemsize))
}

/// Every change to bytes `[start, end)` of the region tagged `tag` up to
/// event `at`, oldest first (the last one is the blame). The region is the
/// one [`state`] rebuilds at `at`.
pub fn writes_to(
    reader: &TraceReader,
    tag: &str,
    start: u64,
    end: u64,
    at: Option<u64>,
) -> Result<Vec<ChangeRow>> {
    let (region, target, _) = region_at(reader, tag, at)?;
    let filter = Filter {
        tag: Some(tag.to_string()),
        seq: Some((region.watched_seq, target)),
        ..Filter::default()
    };
    let mut out = Vec::new();
    for_each_change(reader, &filter, |row| {
        if let WhatRef::Bytes { ranges, region: id } = &row.what {
            if *id != region.region {
                return ControlFlow::Continue(());
            }
            if ranges
                .iter()
                .any(|r| r.offset < end && r.offset + r.old.len() as u64 > start)
            {
                out.push(row.to_row());
            }
        }
        ControlFlow::Continue(())
    })?;
    Ok(out)
}
