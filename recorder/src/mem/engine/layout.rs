//! The bytes of a change and how a region lays out its elements: [`Bytes`]
//! (owned, or a slice of a shadow snapshot shared with the region),
//! [`ChangedRange`], [`Layout`] (dtype, shape, strides, and which element
//! holds a byte) and [`view_mask`] (which bytes of a span belong to a
//! strided view).
//!
//! Plain data and pure functions: no state, no locks, no system calls.
//! Nothing here runs in signal context.

use std::sync::Arc;

/// Bytes of a change: owned, or a slice of a shadow snapshot shared with
/// the region (large rewrites report slices of the old and new snapshots
/// instead of copying them again).
#[derive(Clone)]
pub enum Bytes {
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>, usize, usize),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Shared(a, s, e) => &a[*s..*e],
        }
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Bytes) -> bool {
        **self == **other
    }
}

impl Eq for Bytes {}

/// One changed run: `(offset, old, new)`.
pub type ChangedRange = (u64, Bytes, Bytes);

/// How a region lays out its elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// The dtype string (`<f4`, `<bfloat16`: [`memwatch_format::dtype`]), or `None` for plain bytes.
    pub dtype: Option<String>,
    pub itemsize: u32,
    pub shape: Vec<u64>,
    /// Byte strides; empty means C-contiguous.
    pub strides: Vec<i64>,
    /// Offset of element `[0, ...]` from the region start.
    pub origin: u64,
}

impl Layout {
    /// The layout of changes that have none (objects, variables), shared.
    pub fn none() -> Arc<Layout> {
        static NONE: std::sync::OnceLock<Arc<Layout>> = std::sync::OnceLock::new();
        NONE.get_or_init(|| Arc::new(Layout::default())).clone()
    }

    /// The index of the element that holds byte `offset` of the region, if
    /// any (numpy order, one entry per dimension).
    pub fn index_of(&self, offset: u64) -> Option<Vec<u64>> {
        let itemsize = u64::from(self.itemsize.max(1));
        let rel = offset as i128 - self.origin as i128;
        if self.shape.is_empty() {
            return (rel >= 0).then(|| vec![rel as u64 / itemsize]);
        }
        if self.strides.is_empty() {
            if rel < 0 {
                return None;
            }
            let mut flat = rel as u64 / itemsize;
            let mut idx = vec![0; self.shape.len()];
            for (d, n) in self.shape.iter().enumerate().rev() {
                let n = (*n).max(1);
                idx[d] = flat % n;
                flat /= n;
            }
            return (flat == 0).then_some(idx);
        }
        // Strided: peel dimensions from the largest |stride| down.
        let mut order: Vec<usize> = (0..self.shape.len()).collect();
        order.sort_by_key(|&d| std::cmp::Reverse(self.strides[d].unsigned_abs()));
        let mut idx = vec![0u64; self.shape.len()];
        let mut rest = rel;
        for d in order {
            let s = self.strides[d] as i128;
            if s == 0 {
                continue;
            }
            let i = rest.div_euclid(s);
            let i = i.clamp(0, self.shape[d] as i128 - 1);
            idx[d] = i as u64;
            rest -= i * s;
        }
        (0..itemsize as i128).contains(&rest).then_some(idx)
    }
}

/// Builds the byte mask of a strided view over a span of `len` bytes.
pub fn view_mask(layout: &Layout, len: u64) -> Option<Vec<u64>> {
    if layout.strides.is_empty() {
        return None;
    }
    let itemsize = layout.itemsize.max(1) as u64;
    let count: u64 = layout.shape.iter().product();
    if count * itemsize == len {
        return None;
    }
    let mut mask = vec![0u64; (len as usize).div_ceil(64)];
    let nd = layout.shape.len();
    let mut idx = vec![0u64; nd];
    for _ in 0..count {
        let off = layout.origin as i64
            + idx
                .iter()
                .zip(&layout.strides)
                .map(|(i, s)| *i as i64 * s)
                .sum::<i64>();
        for b in off as u64..off as u64 + itemsize {
            if b < len {
                mask[b as usize / 64] |= 1 << (b % 64);
            }
        }
        for d in (0..nd).rev() {
            idx[d] += 1;
            if idx[d] < layout.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Some(mask)
}
