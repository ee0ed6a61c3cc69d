//! What changed in one region against its shadow, reported as whole
//! elements limited to the view's bytes, with the shadow updated to exactly
//! the bytes reported: a span at a time ([`diff_into`]: equal 32-byte blocks
//! skipped, changed ones split into runs of elements by [`element_runs`]),
//! through a whole snapshot for a region most of which was written
//! ([`bulk_diff`], reporting slices of the old and new snapshots), or one
//! caught store ([`store_diff`]).
//!
//! Works on one `&mut Region` at a time: no state of its own, no locks, no
//! system calls. Nothing here runs in signal context (the fatal-signal
//! handler compares regions with its own code, in `signals::crash`).

use std::sync::Arc;

use super::layout::{Bytes, ChangedRange};
use super::region::{in_mask, RawChange, Region};
use crate::mem::signals::Event;

/// The changed elements of region `r` in one caught store: the bytes the
/// store changed, on top of the shadow; `None`, changing nothing, when the
/// store's old bytes are not what the shadow holds (another thread's store
/// no event holds came in between, or the event is stale): the caller then
/// diffs the page, so that every reported change starts from the value
/// reported last. Updates the shadow.
pub(super) fn store_diff(r: &mut Region, ev: &Event) -> Option<Vec<ChangedRange>> {
    let grid = ElementGrid::of(r);
    let (ea, ee) = (ev.addr, ev.addr + u64::from(ev.len));
    let a = (ea.max(r.start) - r.start) as usize;
    let b = (ee.min(r.start + r.len) - r.start) as usize;
    let (from, to) = (grid.down(a), grid.up(b));
    let old = r.shadow[from..to].to_vec();
    let mut new = old.clone();
    for k in a..b {
        let w = (r.start + k as u64 - ea) as usize;
        if ev.old[w] != ev.new[w] {
            if old[k - from] != ev.old[w] && in_mask(&r.mask, k) {
                return None;
            }
            new[k - from] = ev.new[w];
        }
    }
    let mut ranges: Vec<ChangedRange> = Vec::new();
    let shadow = Arc::make_mut(&mut r.shadow);
    for (x, y) in element_runs(&new, &old, grid.itemsize) {
        let mut k = x;
        while k < y {
            while k < y && !in_mask(&r.mask, from + k) {
                k += 1;
            }
            let s = k;
            while k < y && in_mask(&r.mask, from + k) {
                k += 1;
            }
            if s < k {
                shadow[from + s..from + k].copy_from_slice(&new[s..k]);
                ranges.push((
                    (from + s) as u64,
                    Bytes::Owned(old[s..k].to_vec()),
                    Bytes::Owned(new[s..k].to_vec()),
                ));
            }
        }
    }
    Some(ranges)
}

pub(super) fn push_diff(r: &mut Region, from: usize, to: usize, out: &mut Vec<RawChange>) {
    let mut ranges = Vec::new();
    diff_into(r, from, to, &mut ranges);
    if !ranges.is_empty() {
        out.push(RawChange {
            region: r.id,
            ranges,
            writer: None,
        });
    }
}

/// Where a region's element boundaries fall.
struct ElementGrid {
    itemsize: usize,
    phase: usize,
    len: usize,
}

impl ElementGrid {
    fn of(r: &Region) -> ElementGrid {
        let itemsize = r.layout.itemsize.max(1) as usize;
        ElementGrid {
            itemsize,
            phase: r.layout.origin as usize % itemsize,
            len: r.len as usize,
        }
    }

    /// The element boundary at or before byte `x`.
    fn down(&self, x: usize) -> usize {
        if x >= self.phase {
            x - (x - self.phase) % self.itemsize
        } else {
            0
        }
    }

    /// The element boundary at or after byte `x` (at most the region's end).
    fn up(&self, x: usize) -> usize {
        if x > self.phase {
            ((x - self.phase).div_ceil(self.itemsize) * self.itemsize + self.phase).min(self.len)
        } else {
            x.min(self.len)
        }
    }
}

/// Appends the changed runs of bytes `[from, to)` of `r` (whole elements,
/// limited to the view's bytes) and updates the shadow.
///
/// Finds differing 32-byte blocks first (a memcmp each), then splits each
/// run of them into exact runs of differing elements, so unchanged memory
/// costs one comparison per block and changed memory one per element.
pub(super) fn diff_into(r: &mut Region, from: usize, to: usize, ranges: &mut Vec<ChangedRange>) {
    let grid = ElementGrid::of(r);
    let (itemsize, len) = (grid.itemsize, grid.len);
    let (down, up) = (|x: usize| grid.down(x), |x: usize| grid.up(x));
    let (from, to) = (down(from), up(to));
    // SAFETY: as in `Region::current`; a separate borrow so the shadow can
    // be updated while reading.
    let cur: &[u8] = unsafe { std::slice::from_raw_parts(r.start as *const u8, len) };
    let blk = itemsize * 32usize.div_ceil(itemsize);
    let mut i = from;
    while i < to {
        let e = (i + blk).min(to);
        if cur[i..e] == r.shadow[i..e] {
            i = e;
            continue;
        }
        // Extend over following differing blocks.
        let mut j = e;
        while j < to {
            let e2 = (j + blk).min(to);
            if cur[j..e2] == r.shadow[j..e2] {
                break;
            }
            j = e2;
        }
        for (a, b) in element_runs(&cur[i..j], &r.shadow[i..j], itemsize) {
            push_run(r, cur, i + a, i + b, ranges);
        }
        i = j;
    }
}

/// Whether every `N`-byte element of the 32-byte blocks `x` and `y`
/// differs, a 64-bit word at a time: an element is equal where its lane of
/// `x ^ y` is zero, and the classic "has a zero lane" test finds one
/// (`(v - ones) & !v & highs` is non-zero exactly when some lane of `v` is
/// zero).
#[inline(always)]
fn all_differ<const N: usize>(x: &[u8], y: &[u8]) -> bool {
    let word = |s: &[u8], i: usize| u64::from_le_bytes(s[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let lanes = |ones: u64, highs: u64| {
        (0..4).all(|i| {
            let v = word(x, i) ^ word(y, i);
            v.wrapping_sub(ones) & !v & highs == 0
        })
    };
    match N {
        1 => lanes(0x0101_0101_0101_0101, 0x8080_8080_8080_8080),
        2 => lanes(0x0001_0001_0001_0001, 0x8000_8000_8000_8000),
        4 => lanes(0x0000_0001_0000_0001, 0x8000_0000_8000_0000),
        8 => (0..4).all(|i| word(x, i) != word(y, i)),
        16 => (0..2).all(|i| word(x, 2 * i) != word(y, 2 * i) || word(x, 2 * i + 1) != word(y, 2 * i + 1)),
        _ => false,
    }
}

/// Maximal runs `[a, b)` of elements that differ between `x` and `y`.
pub(super) fn element_runs(x: &[u8], y: &[u8], itemsize: usize) -> Vec<(usize, usize)> {
    fn runs<const N: usize>(x: &[u8], y: &[u8]) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let n = x.len() / N;
        // Fixed-size array compares compile to plain loads, not memcmp calls.
        let el = |s: &[u8], k: usize| -> [u8; N] { s[k * N..k * N + N].try_into().expect("N bytes") };
        // Elements per 32-byte block, for skipping whole blocks (N divides
        // 32); compared as arrays, which compiles to vector compares rather
        // than a memcmp call per block.
        let per = 32 / N;
        let block = |s: &[u8], k: usize| -> [u8; 32] { s[k * N..k * N + 32].try_into().expect("32 bytes") };
        let mut k = 0;
        while k < n {
            // Equal blocks, then equal elements.
            while k + per <= n && block(x, k) == block(y, k) {
                k += per;
            }
            if k < n && el(x, k) == el(y, k) {
                k += 1;
                continue;
            }
            if k >= n {
                break;
            }
            let start = k;
            // Blocks whose every element differs (a whole array rewritten),
            // then element by element to the run's end.
            while k + per <= n && all_differ::<N>(&x[k * N..(k + per) * N], &y[k * N..(k + per) * N]) {
                k += per;
            }
            while k < n && el(x, k) != el(y, k) {
                k += 1;
            }
            out.push((start * N, k * N));
        }
        // A partial element at the end (a span that is not a whole number
        // of elements) counts as one.
        let tail = n * N;
        if tail < x.len() && x[tail..] != y[tail..] {
            match out.last_mut() {
                Some((_, b)) if *b == tail => *b = x.len(),
                _ => out.push((tail, x.len())),
            }
        }
        out
    }
    match itemsize {
        1 => runs::<1>(x, y),
        2 => runs::<2>(x, y),
        4 => runs::<4>(x, y),
        8 => runs::<8>(x, y),
        16 => runs::<16>(x, y),
        n => {
            let mut out: Vec<(usize, usize)> = Vec::new();
            // Equal stretches are skipped whole elements at a time, about
            // 64 bytes per compare.
            let step = n * 64usize.div_ceil(n);
            let mut a = 0;
            while a < x.len() {
                if a + step <= x.len() && x[a..a + step] == y[a..a + step] {
                    a += step;
                    continue;
                }
                let b = (a + n).min(x.len());
                if x[a..b] != y[a..b] {
                    match out.last_mut() {
                        Some((_, e)) if *e == a => *e = b,
                        _ => out.push((a, b)),
                    }
                }
                a = b;
            }
            out
        }
    }
}

/// Records bytes `[a, b)` as changed (split by the view mask), updating
/// the shadow with exactly the bytes reported.
fn push_run(r: &mut Region, cur: &[u8], a: usize, b: usize, ranges: &mut Vec<ChangedRange>) {
    let mask = &r.mask;
    let shadow = Arc::make_mut(&mut r.shadow);
    let mut emit = |shadow: &mut Vec<u8>, s: usize, e: usize| {
        let new = cur[s..e].to_vec();
        if new[..] != shadow[s..e] {
            let old = shadow[s..e].to_vec();
            shadow[s..e].copy_from_slice(&new);
            match ranges.last_mut() {
                Some((o, Bytes::Owned(po), Bytes::Owned(pn))) if *o as usize + po.len() == s => {
                    po.extend_from_slice(&old);
                    pn.extend_from_slice(&new);
                }
                _ => ranges.push((s as u64, Bytes::Owned(old), Bytes::Owned(new))),
            }
        }
    };
    if mask.is_none() {
        emit(shadow, a, b);
        return;
    }
    let mut k = a;
    while k < b {
        while k < b && !in_mask(mask, k) {
            // Bytes between a view's elements are not its own: keep the
            // shadow in step so they are not looked at again.
            shadow[k] = cur[k];
            k += 1;
        }
        let s = k;
        while k < b && in_mask(mask, k) {
            k += 1;
        }
        if s < k {
            emit(shadow, s, k);
        }
    }
}

/// Diffs a region most of which was written: builds the next snapshot (the
/// live bytes of the dirty spans, the old shadow elsewhere) in a reused
/// buffer, and reports slices of the old and new snapshots, so a large
/// rewrite costs one copy of the written memory and one comparison.
pub(super) fn bulk_diff(r: &mut Region, spans: &[(usize, usize)], ranges: &mut Vec<ChangedRange>) {
    let grid = ElementGrid::of(r);
    let (itemsize, len) = (grid.itemsize, grid.len);
    let (down, up) = (|x: usize| grid.down(x), |x: usize| grid.up(x));
    // SAFETY: as in `Region::current`.
    let cur: &[u8] = unsafe { std::slice::from_raw_parts(r.start as *const u8, len) };
    let mut next = match r.spare.take().map(Arc::try_unwrap) {
        Some(Ok(mut v)) => {
            v.clear();
            v
        }
        _ => Vec::with_capacity(len),
    };
    let old = r.shadow.clone();
    let mut aligned: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for &(s, e) in spans {
        let (s, e) = (down(s), up(e));
        match aligned.last_mut() {
            Some((_, pe)) if *pe >= s => *pe = (*pe).max(e),
            _ => aligned.push((s, e)),
        }
    }
    let mut pos = 0;
    for &(s, e) in &aligned {
        next.extend_from_slice(&old[pos..s]);
        next.extend_from_slice(&cur[s..e]);
        pos = e;
    }
    next.extend_from_slice(&old[pos..len]);
    let next = Arc::new(next);
    // `element_runs` skips equal stretches a block at a time itself.
    for &(from, to) in &aligned {
        for (a, b) in element_runs(&next[from..to], &old[from..to], itemsize) {
            let (a, b) = (from + a, from + b);
            ranges.push((
                a as u64,
                Bytes::Shared(old.clone(), a, b),
                Bytes::Shared(next.clone(), a, b),
            ));
        }
    }
    r.shadow = next;
    r.spare = Some(old);
}

pub(super) fn merge_adjacent(ranges: &mut Vec<ChangedRange>) {
    ranges.sort_by_key(|r| r.0);
    let mut out: Vec<ChangedRange> = Vec::with_capacity(ranges.len());
    for (off, old, new) in ranges.drain(..) {
        match out.last_mut() {
            Some((o, Bytes::Owned(po), Bytes::Owned(pn))) if *o + po.len() as u64 == off => {
                po.extend_from_slice(&old);
                pn.extend_from_slice(&new);
            }
            _ => out.push((off, old, new)),
        }
    }
    *ranges = out;
}
