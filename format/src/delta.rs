//! Compact changes (format version 3): a change stores `new XOR old`,
//! byte-shuffled by element size, and readers get the old bytes from the
//! region's state before it.
//!
//! Three pieces:
//! - [`encode_delta`] writes a [`Record::Delta`] straight from a change's
//!   old and new bytes (the XOR and the shuffle in one pass, no copy of
//!   either in between): what a writer appends.
//! - [`apply`] turns a range's stored data back into new bytes over a
//!   region's state: what rebuilding a state does.
//! - [`Expander`] keeps every region's state while a reader goes through a
//!   trace's chunks in order, and gives back each chunk with every `Delta`
//!   turned into the [`Record::Change`] it stands for (old and new bytes),
//!   so that queries, blame and exports read version 3 traces exactly as
//!   they read version 2 ones.
//!
//! Shuffle: a range of `n` whole elements of `w` bytes stores byte `j` of
//! element `i` at `j * n + i`; bytes past the last whole element follow
//! unshuffled. `w == 1` (or a range shorter than one element) stores the
//! bytes as they are.

use std::collections::HashMap;

use crate::error::Result;
use crate::reader::DecodedChunk;
use crate::record::{Context, Delta, Record};
use crate::view::take_view;
use crate::ByteRange;

/// Postcard's index of `Record::Change` and `Record::Delta` (the variant
/// order is the format).
const CHANGE_VARIANT: u64 = 6;
const DELTA_VARIANT: u64 = 11;

/// Appends `x` as a postcard varint (LEB128).
#[inline]
pub(crate) fn put_varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push(x as u8 | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

fn put_ctx(out: &mut Vec<u8>, ctx: &Context) {
    put_varint(out, ctx.time_ns);
    put_varint(out, ctx.thread);
    put_varint(out, u64::from(ctx.thread_name));
    put_varint(out, u64::from(ctx.frame));
    put_varint(out, u64::from(ctx.stack));
}

/// Appends the postcard encoding of the [`Record::Delta`] of a change
/// (`seq`, `ctx`, `region`, and its runs with their old and new bytes) to
/// `out`: each run's data is `new XOR old`, or with `full` the new bytes,
/// shuffled by `shuffle`. The bytes are exactly what
/// `postcard::to_io(&Record::Delta(..))` writes for the same record.
pub fn encode_delta(
    out: &mut Vec<u8>,
    seq: u64,
    ctx: &Context,
    region: u32,
    shuffle: u32,
    full: bool,
    ranges: &[ByteRange<'_>],
) {
    put_varint(out, DELTA_VARIANT);
    put_varint(out, seq);
    put_ctx(out, ctx);
    put_varint(out, u64::from(region));
    put_varint(out, u64::from(shuffle));
    out.push(u8::from(full));
    put_varint(out, ranges.len() as u64);
    for r in ranges {
        put_varint(out, r.offset);
        put_varint(out, r.new.len() as u64);
        let old = if full { None } else { Some(r.old) };
        shuffle_into(out, old, r.new, shuffle as usize);
    }
}

/// Appends `shuffle(new XOR old)` (`shuffle(new)` without `old`) to `out`.
fn shuffle_into(out: &mut Vec<u8>, old: Option<&[u8]>, new: &[u8], width: usize) {
    let len = new.len();
    let old = old.map(|o| &o[..len.min(o.len())]);
    out.reserve(len);
    let base = out.len();
    // SAFETY: `reserve` made room for `len` more bytes; every one of them
    // is written below before `set_len` makes them part of the vector.
    let dst = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().add(base), len) };
    match (width, old) {
        (2, Some(o)) if o.len() == len => shuffle_w::<2, true>(dst, o, new),
        (4, Some(o)) if o.len() == len => shuffle_w::<4, true>(dst, o, new),
        (8, Some(o)) if o.len() == len => shuffle_w::<8, true>(dst, o, new),
        (2, None) => shuffle_w::<2, false>(dst, new, new),
        (4, None) => shuffle_w::<4, false>(dst, new, new),
        (8, None) => shuffle_w::<8, false>(dst, new, new),
        _ => shuffle_any(dst, old, new, width),
    }
    // SAFETY: see above.
    unsafe { out.set_len(base + len) };
}

/// Shuffles `new` (XOR `old` when `XOR`) by `W` into `dst` (`dst`, `old`
/// and `new` of one length): sixteen elements at a time with SSSE3 where
/// the CPU has it (`simd`), the rest one element at a time.
#[inline(always)]
fn shuffle_w<const W: usize, const XOR: bool>(dst: &mut [u8], old: &[u8], new: &[u8]) {
    let n = new.len() / W;
    let body = n * W;
    let done = simd::shuffle::<W, XOR>(&mut dst[..body], &old[..body], &new[..body], n);
    let (planes, tail) = dst.split_at_mut(body);
    for (i, (o, x)) in old[done * W..body]
        .chunks_exact(W)
        .zip(new[done * W..body].chunks_exact(W))
        .enumerate()
    {
        let i = done + i;
        for j in 0..W {
            let b = if XOR { o[j] ^ x[j] } else { x[j] };
            // SAFETY: i < n and j < W, so j * n + i < body == planes.len().
            unsafe { *planes.get_unchecked_mut(j * n + i) = b };
        }
    }
    for (k, d) in tail.iter_mut().enumerate() {
        *d = if XOR {
            old[body + k] ^ new[body + k]
        } else {
            new[body + k]
        };
    }
}

/// The shuffle's vector kernel: 16 elements (16 bytes of each plane) per
/// step. Per 16 input bytes one `pshufb` gathers each plane's bytes, then
/// an unpack transpose puts each plane's 16 bytes together. A 16 MB float32
/// change shuffles in a fraction of the scalar loop's 7.5 ms.
mod simd {
    /// Shuffles the first `16 * (n / 16)` elements of `new` (XOR `old`)
    /// into `dst`'s `W` planes of `n` bytes; returns how many it did (0
    /// without SSSE3, or for a `W` it has no kernel for).
    #[inline(always)]
    pub(super) fn shuffle<const W: usize, const XOR: bool>(
        dst: &mut [u8],
        old: &[u8],
        new: &[u8],
        n: usize,
    ) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("ssse3") && (W == 2 || W == 4 || W == 8) {
                assert!(dst.len() == n * W && old.len() == n * W && new.len() == n * W);
                // SAFETY: SSSE3 is there; the lengths are checked above.
                return unsafe { x86::shuffle::<W, XOR>(dst, old, new, n) };
            }
        }
        let _ = (dst, old, new, n);
        0
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        #[inline(always)]
        unsafe fn load<const XOR: bool>(old: *const u8, new: *const u8) -> __m128i {
            let x = _mm_loadu_si128(new.cast());
            if XOR {
                _mm_xor_si128(x, _mm_loadu_si128(old.cast()))
            } else {
                x
            }
        }

        /// # Safety
        /// SSSE3; `dst`, `old` and `new` hold `n * W` bytes.
        #[target_feature(enable = "ssse3")]
        pub(super) unsafe fn shuffle<const W: usize, const XOR: bool>(
            dst: &mut [u8],
            old: &[u8],
            new: &[u8],
            n: usize,
        ) -> usize {
            let blocks = n / 16;
            let (o, x, d) = (old.as_ptr(), new.as_ptr(), dst.as_mut_ptr());
            let put = |plane: usize, b: usize, v: __m128i| {
                // SAFETY: plane < W and (b + 1) * 16 <= n.
                unsafe { _mm_storeu_si128(d.add(plane * n + b * 16).cast(), v) };
            };
            for b in 0..blocks {
                let at = b * 16 * W;
                match W {
                    2 => {
                        // Even bytes, then odd ones, of 8 elements per load.
                        let m = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
                        let v0 = _mm_shuffle_epi8(load::<XOR>(o.add(at), x.add(at)), m);
                        let v1 = _mm_shuffle_epi8(load::<XOR>(o.add(at + 16), x.add(at + 16)), m);
                        put(0, b, _mm_unpacklo_epi64(v0, v1));
                        put(1, b, _mm_unpackhi_epi64(v0, v1));
                    }
                    4 => {
                        // Per load of 4 elements: 4 bytes of each plane.
                        let m = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
                        let mut v = [_mm_setzero_si128(); 4];
                        for (k, v) in v.iter_mut().enumerate() {
                            *v = _mm_shuffle_epi8(load::<XOR>(o.add(at + 16 * k), x.add(at + 16 * k)), m);
                        }
                        let t0 = _mm_unpacklo_epi32(v[0], v[1]);
                        let t1 = _mm_unpacklo_epi32(v[2], v[3]);
                        let t2 = _mm_unpackhi_epi32(v[0], v[1]);
                        let t3 = _mm_unpackhi_epi32(v[2], v[3]);
                        put(0, b, _mm_unpacklo_epi64(t0, t1));
                        put(1, b, _mm_unpackhi_epi64(t0, t1));
                        put(2, b, _mm_unpacklo_epi64(t2, t3));
                        put(3, b, _mm_unpackhi_epi64(t2, t3));
                    }
                    8 => {
                        // Per load of 2 elements: 2 bytes of each plane.
                        let m = _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
                        let mut v = [_mm_setzero_si128(); 8];
                        for (k, v) in v.iter_mut().enumerate() {
                            *v = _mm_shuffle_epi8(load::<XOR>(o.add(at + 16 * k), x.add(at + 16 * k)), m);
                        }
                        // v[k] holds, as 16-bit lanes, planes 0..8 of
                        // elements 2k and 2k + 1: transpose 8 x 8 lanes.
                        let a0 = _mm_unpacklo_epi16(v[0], v[1]);
                        let a1 = _mm_unpackhi_epi16(v[0], v[1]);
                        let a2 = _mm_unpacklo_epi16(v[2], v[3]);
                        let a3 = _mm_unpackhi_epi16(v[2], v[3]);
                        let a4 = _mm_unpacklo_epi16(v[4], v[5]);
                        let a5 = _mm_unpackhi_epi16(v[4], v[5]);
                        let a6 = _mm_unpacklo_epi16(v[6], v[7]);
                        let a7 = _mm_unpackhi_epi16(v[6], v[7]);
                        let b0 = _mm_unpacklo_epi32(a0, a2);
                        let b1 = _mm_unpackhi_epi32(a0, a2);
                        let b2 = _mm_unpacklo_epi32(a1, a3);
                        let b3 = _mm_unpackhi_epi32(a1, a3);
                        let b4 = _mm_unpacklo_epi32(a4, a6);
                        let b5 = _mm_unpackhi_epi32(a4, a6);
                        let b6 = _mm_unpacklo_epi32(a5, a7);
                        let b7 = _mm_unpackhi_epi32(a5, a7);
                        put(0, b, _mm_unpacklo_epi64(b0, b4));
                        put(1, b, _mm_unpackhi_epi64(b0, b4));
                        put(2, b, _mm_unpacklo_epi64(b1, b5));
                        put(3, b, _mm_unpackhi_epi64(b1, b5));
                        put(4, b, _mm_unpacklo_epi64(b2, b6));
                        put(5, b, _mm_unpackhi_epi64(b2, b6));
                        put(6, b, _mm_unpacklo_epi64(b3, b7));
                        put(7, b, _mm_unpackhi_epi64(b3, b7));
                    }
                    _ => return 0,
                }
            }
            blocks * 16
        }
    }
}

fn shuffle_any(dst: &mut [u8], old: Option<&[u8]>, new: &[u8], width: usize) {
    let len = new.len();
    let at = |k: usize| match old {
        Some(o) if k < o.len() => o[k] ^ new[k],
        _ => new[k],
    };
    let w = width.max(1);
    let n = len / w;
    if w == 1 || n == 0 {
        for (k, d) in dst.iter_mut().enumerate() {
            *d = at(k);
        }
        return;
    }
    for i in 0..n {
        for j in 0..w {
            dst[j * n + i] = at(i * w + j);
        }
    }
    for (k, d) in dst.iter_mut().enumerate().skip(n * w) {
        *d = at(k);
    }
}

/// Writes the new bytes of one stored range into `dst`, given the bytes
/// before it in `old` (ignored with `full`): the inverse of the shuffle.
/// `dst`, `old` and `data` have one length.
fn unshuffle_into(dst: &mut [u8], old: &[u8], data: &[u8], width: usize, full: bool) {
    match (width, full) {
        (2, false) => unshuffle_w::<2, true>(dst, old, data),
        (4, false) => unshuffle_w::<4, true>(dst, old, data),
        (8, false) => unshuffle_w::<8, true>(dst, old, data),
        (2, true) => unshuffle_w::<2, false>(dst, old, data),
        (4, true) => unshuffle_w::<4, false>(dst, old, data),
        (8, true) => unshuffle_w::<8, false>(dst, old, data),
        _ => {
            let len = data.len();
            let w = width.max(1);
            let n = len / w;
            let src = |k: usize| -> usize {
                if w == 1 || k >= n * w {
                    k
                } else {
                    (k % w) * n + k / w
                }
            };
            for (k, d) in dst.iter_mut().enumerate() {
                let s = data[src(k)];
                *d = if full { s } else { old[k] ^ s };
            }
        }
    }
}

#[inline(always)]
fn unshuffle_w<const W: usize, const XOR: bool>(dst: &mut [u8], old: &[u8], data: &[u8]) {
    let n = data.len() / W;
    let body = n * W;
    let planes = &data[..body];
    for (i, (d, o)) in dst[..body]
        .chunks_exact_mut(W)
        .zip(old[..body].chunks_exact(W))
        .enumerate()
    {
        for j in 0..W {
            // SAFETY: i < n and j < W, so j * n + i < body == planes.len().
            let s = unsafe { *planes.get_unchecked(j * n + i) };
            d[j] = if XOR { o[j] ^ s } else { s };
        }
    }
    for k in body..data.len() {
        dst[k] = if XOR { old[k] ^ data[k] } else { data[k] };
    }
}

/// Applies one stored range of a [`Delta`] to `state` (the region's bytes
/// before the change; after the call, after it). Bytes past the end of
/// `state` are ignored; returns how many were applied.
pub fn apply(state: &mut [u8], offset: u64, data: &[u8], shuffle: u32, full: bool) -> usize {
    let Ok(off) = usize::try_from(offset) else {
        return 0;
    };
    if off >= state.len() || data.is_empty() {
        return 0;
    }
    let end = off.saturating_add(data.len()).min(state.len());
    if end - off < data.len() {
        // A range cut by the region's end (only in damaged input): the
        // shuffle needs the whole range, so decode it aside.
        let old = state[off..end].to_vec();
        let mut padded = old.clone();
        padded.resize(data.len(), 0);
        let mut new = vec![0; data.len()];
        unshuffle_into(&mut new, &padded, data, shuffle as usize, full);
        state[off..end].copy_from_slice(&new[..end - off]);
        return end - off;
    }
    let old = state[off..end].to_vec();
    unshuffle_into(&mut state[off..end], &old, data, shuffle as usize, full);
    end - off
}

/// A region's state as an [`Expander`] keeps it.
struct RegionState {
    len: u64,
    /// The seq of its watch: the initial contents are the ones at it.
    watched: u64,
    /// Allocated at the first contents or change (a region that never
    /// changes costs nothing).
    data: Vec<u8>,
}

impl RegionState {
    fn bytes(&mut self) -> std::result::Result<&mut Vec<u8>, String> {
        if self.data.len() as u64 != self.len {
            let len = usize::try_from(self.len).map_err(|_| format!("a region of {} bytes", self.len))?;
            self.data
                .try_reserve_exact(len)
                .map_err(|_| format!("a region of {} bytes does not fit in memory", self.len))?;
            self.data.resize(len, 0);
        }
        Ok(&mut self.data)
    }
}

/// Turns version 3's [`Record::Delta`]s back into [`Record::Change`]s, for
/// a reader that goes through a trace's chunks in file order (contents
/// chunks included): it keeps each watched region's bytes, from its
/// initial contents on, and applies every change to them.
///
/// ```
/// use memwatch_format::{ByteRange, Change, Context, Expander, Meta, Record, RegionWatched, TraceReader, TraceWriter, WriterOptions};
/// let mut w = TraceWriter::new(Vec::new(), "t.mwt", &Meta::default(), WriterOptions::default())?;
/// let watched = RegionWatched { seq: 1, ctx: Context::default(), region: 1, tag: "w", variable: None,
///     address: 0x1000, len: 4, layout: Default::default() };
/// w.append(&Record::RegionWatched(watched))?;
/// w.append_contents(1, 1, &[1, 2, 3, 4])?;
/// w.append_delta(2, &Context::default(), 1, 1, false, &[ByteRange { offset: 2, old: &[3], new: &[9] }])?;
/// let (bytes, _) = w.finish(0)?;
/// let trace = TraceReader::from_bytes(bytes, "t.mwt")?;
/// let mut ex = Expander::default();
/// let mut changes = Vec::new();
/// for info in trace.chunks() {
///     let chunk = trace.decode_chunk(info)?;
///     let chunk = ex.expand(&chunk)?.unwrap_or(chunk);
///     for rec in chunk.records() {
///         if let Record::Change(c) = rec? {
///             changes.push((c.ranges[0].offset, c.ranges[0].old.to_vec(), c.ranges[0].new.to_vec()));
///         }
///     }
/// }
/// assert_eq!(changes, vec![(2, vec![3], vec![9])]);
/// # Ok::<(), memwatch_format::Error>(())
/// ```
#[derive(Default)]
pub struct Expander {
    regions: HashMap<u32, RegionState>,
}

impl Expander {
    /// Learns what `chunk` says about regions' bytes and returns it with
    /// every `Delta` turned into the `Change` it stands for; `None` when it
    /// has no `Delta` (use the chunk as it is). Chunks must come in file
    /// order, none left out.
    pub fn expand<'r>(&mut self, chunk: &DecodedChunk<'r>) -> Result<Option<DecodedChunk<'r>>> {
        let raw = chunk.raw();
        let mut rest = raw;
        let mut out: Option<Vec<u8>> = None;
        let corrupt = |reason: String| chunk.corrupt(reason);
        let mut n = 0u32;
        while !rest.is_empty() && n < chunk.info().header.record_count {
            let start = raw.len() - rest.len();
            let (view, tail) =
                take_view(rest).map_err(|e| corrupt(format!("record {n} does not decode: {e}")))?;
            let span = &rest[..rest.len() - tail.len()];
            rest = tail;
            n += 1;
            let rec = match view {
                crate::RecordView::Change(c) => {
                    // A version 2 change in a version 3 trace (a journal's
                    // records): applied like any other.
                    if let Some(r) = self.regions.get_mut(&c.region) {
                        let bytes = r.bytes().map_err(corrupt)?;
                        for range in c.ranges.iter() {
                            let off = range.offset as usize;
                            let end = (off + range.new.len()).min(bytes.len());
                            if off < end {
                                bytes[off..end].copy_from_slice(&range.new[..end - off]);
                            }
                        }
                    }
                    if let Some(o) = out.as_mut() {
                        o.extend_from_slice(span);
                    }
                    continue;
                }
                crate::RecordView::Other(rec) => rec,
            };
            match &rec {
                Record::RegionWatched(r) => {
                    self.regions.insert(
                        r.region,
                        RegionState {
                            len: r.len,
                            watched: r.seq,
                            data: Vec::new(),
                        },
                    );
                }
                Record::RegionUnwatched(u) => {
                    self.regions.remove(&u.region);
                }
                Record::Contents(c) => {
                    // Initial contents only: a checkpoint's are the state
                    // this replay has already.
                    if let Some(r) = self.regions.get_mut(&c.region).filter(|r| r.watched == c.at_seq) {
                        let bytes = r.bytes().map_err(corrupt)?;
                        let off = usize::try_from(c.offset).unwrap_or(usize::MAX).min(bytes.len());
                        let end = off.saturating_add(c.data.len()).min(bytes.len());
                        bytes[off..end].copy_from_slice(&c.data[..end - off]);
                    }
                }
                Record::Delta(d) => {
                    let o = out.get_or_insert_with(|| {
                        let mut v = Vec::with_capacity(raw.len() * 2);
                        v.extend_from_slice(&raw[..start]);
                        v
                    });
                    self.expand_delta(d, o).map_err(corrupt)?;
                    continue;
                }
                _ => {}
            }
            if let Some(o) = out.as_mut() {
                o.extend_from_slice(span);
            }
        }
        Ok(out.map(|o| {
            if !rest.is_empty() {
                // Left for `records()` to report, as for any chunk.
                let mut o = o;
                o.extend_from_slice(rest);
                return chunk.with_payload(o);
            }
            chunk.with_payload(o)
        }))
    }

    /// Appends the `Change` that `d` stands for to `out` and applies it.
    fn expand_delta(&mut self, d: &Delta<'_>, out: &mut Vec<u8>) -> std::result::Result<(), String> {
        let state = self.regions.get_mut(&d.region).ok_or_else(|| {
            format!(
                "DELTA seq {} is of region {}, which no WATCH before it defines",
                d.seq, d.region
            )
        })?;
        let bytes = state.bytes()?;
        put_varint(out, CHANGE_VARIANT);
        put_varint(out, d.seq);
        put_ctx(out, &d.ctx);
        put_varint(out, u64::from(d.region));
        put_varint(out, d.ranges.len() as u64);
        for r in &d.ranges {
            let off = usize::try_from(r.offset).unwrap_or(usize::MAX);
            let end = off
                .checked_add(r.data.len())
                .filter(|&e| e <= bytes.len())
                .ok_or_else(|| {
                    format!(
                        "DELTA seq {} changes bytes {}..{} of region {}, which has {}",
                        d.seq,
                        r.offset,
                        r.offset as u128 + r.data.len() as u128,
                        d.region,
                        bytes.len()
                    )
                })?;
            let len = r.data.len();
            put_varint(out, r.offset);
            put_varint(out, len as u64);
            out.extend_from_slice(&bytes[off..end]);
            put_varint(out, len as u64);
            let at = out.len();
            out.resize(at + len, 0);
            unshuffle_into(
                &mut out[at..],
                &bytes[off..end],
                r.data,
                d.shuffle as usize,
                d.full,
            );
            bytes[off..end].copy_from_slice(&out[at..]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta_bytes(shuffle: u32, full: bool, ranges: &[ByteRange<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        let ctx = Context {
            time_ns: 300,
            thread: 70_000,
            thread_name: 2,
            frame: 3,
            stack: 4,
        };
        encode_delta(&mut out, 129, &ctx, 5, shuffle, full, ranges);
        out
    }

    #[test]
    fn the_direct_encoding_is_postcards() {
        let old: Vec<u8> = (0..203u32).map(|i| (i * 7) as u8).collect();
        let new: Vec<u8> = (0..203u32).map(|i| (i * 7 + i / 3) as u8).collect();
        for shuffle in [1, 2, 3, 4, 8, 16] {
            for full in [false, true] {
                let ranges = [
                    ByteRange {
                        offset: 0,
                        old: &old[..5],
                        new: &new[..5],
                    },
                    ByteRange {
                        offset: 300,
                        old: &old[5..],
                        new: &new[5..],
                    },
                ];
                let direct = delta_bytes(shuffle, full, &ranges);
                let (rec, rest) = postcard::take_from_bytes::<Record<'_>>(&direct).unwrap();
                assert!(rest.is_empty());
                let Record::Delta(d) = &rec else { panic!("{rec:?}") };
                assert_eq!(postcard::to_stdvec(&rec).unwrap(), direct);
                assert_eq!(
                    (d.seq, d.region, d.shuffle, d.full, d.ranges.len()),
                    (129, 5, shuffle, full, 2)
                );
                // Applying each range to the old bytes gives the new ones.
                for (r, (o, n)) in d
                    .ranges
                    .iter()
                    .zip([(&old[..5], &new[..5]), (&old[5..], &new[5..])])
                {
                    let mut state = o.to_vec();
                    assert_eq!(apply(&mut state, 0, r.data, shuffle, full), n.len());
                    assert_eq!(state, n, "shuffle {shuffle} full {full}");
                }
            }
        }
    }

    #[test]
    fn shuffled_planes_hold_each_elements_bytes_in_turn() {
        let old = [0u8; 10];
        let new = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        let mut out = Vec::new();
        shuffle_into(&mut out, Some(&old), &new, 4);
        // Two whole elements, then the two bytes past them as they are.
        assert_eq!(out, [1, 5, 2, 6, 3, 7, 4, 8, 9, 10]);
    }

    #[test]
    fn the_blocked_shuffle_is_the_plain_one_at_every_length() {
        // shuffle_any is the definition, byte by byte; shuffle_w does eight
        // elements at a time and the rest one by one.
        for w in [2usize, 4, 8] {
            for len in 0..(16 * w * 3 + 2 * w + 3) {
                let new: Vec<u8> = (0..len).map(|k| (k * 7 + 3) as u8).collect();
                let old: Vec<u8> = (0..len).map(|k| (k * 13 + 1) as u8).collect();
                for xor in [false, true] {
                    let o = xor.then_some(&old[..]);
                    let mut fast = Vec::new();
                    shuffle_into(&mut fast, o, &new, w);
                    let mut plain = vec![0u8; len];
                    shuffle_any(&mut plain, o, &new, w);
                    assert_eq!(fast, plain, "w {w} len {len} xor {xor}");
                    let mut back = vec![0u8; len];
                    unshuffle_into(&mut back, &old, &fast, w, !xor);
                    assert_eq!(back, new, "round trip, w {w} len {len} xor {xor}");
                }
            }
        }
    }

    #[test]
    fn a_range_past_the_state_applies_what_fits() {
        let mut state = vec![0u8; 6];
        let mut out = Vec::new();
        shuffle_into(&mut out, None, &[1, 2, 3, 4, 5, 6, 7, 8], 4);
        assert_eq!(apply(&mut state, 2, &out, 4, true), 4);
        assert_eq!(state, [0, 0, 1, 2, 3, 4]);
        assert_eq!(apply(&mut state, 9, &out, 4, true), 0);
    }
}
