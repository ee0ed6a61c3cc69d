//! Decoding for scans: a [`Record::Change`] read without allocating.
//!
//! Decoding a [`Change`](crate::Change) through serde allocates a `Vec` for
//! its ranges, which is most of the cost of a scan over millions of small
//! changes. [`RecordView::Change`] instead keeps the ranges as the encoded
//! bytes ([`RangesView`]) and decodes them when iterated. Every other record
//! is decoded by postcard as usual. Both read exactly the same bytes and
//! accept and refuse exactly the same input: the decoder below mirrors
//! postcard's varints (LEB128, at most 5 bytes for a `u32` and 10 for a
//! `u64`, the last byte not overflowing), and a property test checks the
//! two against each other on arbitrary bytes.

use crate::record::{ByteRange, Context, Record};

/// Postcard's index of `Record::Change` (the variant order is the format).
const CHANGE_VARIANT: u32 = 6;

/// A record as a scan sees it: byte changes decoded lazily, the rest as
/// [`Record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordView<'a> {
    Change(ChangeView<'a>),
    Other(Record<'a>),
}

/// A [`Change`](crate::Change) whose ranges stay encoded until iterated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeView<'a> {
    pub seq: u64,
    pub ctx: Context,
    pub region: u32,
    pub ranges: RangesView<'a>,
}

/// The encoded ranges of a change: validated when the record was decoded,
/// so iterating them cannot fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangesView<'a> {
    count: usize,
    bytes: &'a [u8],
}

impl<'a> RangesView<'a> {
    /// Number of runs.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The runs, in the order recorded (increasing offset).
    pub fn iter(&self) -> RangesIter<'a> {
        RangesIter {
            left: self.count,
            rest: self.bytes,
        }
    }

    /// The first run, if any.
    pub fn first(&self) -> Option<ByteRange<'a>> {
        self.iter().next()
    }

    /// Bytes changed: the sum of the runs' lengths.
    pub fn bytes_changed(&self) -> u64 {
        self.iter().map(|r| r.old.len() as u64).sum()
    }
}

impl<'a> IntoIterator for RangesView<'a> {
    type Item = ByteRange<'a>;
    type IntoIter = RangesIter<'a>;
    fn into_iter(self) -> RangesIter<'a> {
        self.iter()
    }
}

/// Iterator over a [`RangesView`].
#[derive(Debug, Clone)]
pub struct RangesIter<'a> {
    left: usize,
    rest: &'a [u8],
}

impl<'a> Iterator for RangesIter<'a> {
    type Item = ByteRange<'a>;

    fn next(&mut self) -> Option<ByteRange<'a>> {
        if self.left == 0 {
            return None;
        }
        let mut cur = Cursor(self.rest);
        // Validated at decode time; a failure here would be a bug, and ends
        // the iteration rather than panicking.
        let range = take_range(&mut cur)?;
        self.left -= 1;
        self.rest = cur.0;
        Some(range)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for RangesIter<'_> {}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    /// A varint of at most `MAX` bytes holding a `BITS`-bit integer; most
    /// are one byte, which is checked first.
    #[inline(always)]
    fn varint<const MAX: usize, const BITS: u32>(&mut self) -> Option<u64> {
        match self.0.split_first() {
            Some((&b, rest)) if b < 0x80 => {
                self.0 = rest;
                Some(u64::from(b))
            }
            _ => self.varint_multi::<MAX, BITS>(),
        }
    }

    /// A varint of more than one byte, from 8 bytes read at once when the
    /// buffer has them and the varint ends within them (branch-free: the
    /// 7-bit groups are packed together in three steps); otherwise, and
    /// for the 9- and 10-byte forms, byte by byte.
    #[inline(always)]
    fn varint_multi<const MAX: usize, const BITS: u32>(&mut self) -> Option<u64> {
        let Some(head) = self.0.first_chunk::<8>() else {
            return self.varint_long::<MAX, BITS>();
        };
        let word = u64::from_le_bytes(*head);
        // A set bit at the top of each byte that ends a varint.
        let ends = !word & 0x8080_8080_8080_8080;
        if ends == 0 {
            return self.varint_long::<MAX, BITS>();
        }
        let len = (ends.trailing_zeros() / 8 + 1) as usize;
        if len > MAX {
            return None;
        }
        let last = (word >> (8 * (len - 1))) & 0xff;
        // The last possible byte may only hold the bits that are left.
        if len == MAX && last >> (BITS - 7 * (MAX as u32 - 1)) != 0 {
            return None;
        }
        let keep = if len == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * len)) - 1
        };
        let mut x = word & keep & 0x7f7f_7f7f_7f7f_7f7f;
        x = ((x & 0x7f00_7f00_7f00_7f00) >> 1) | (x & 0x007f_007f_007f_007f);
        x = ((x & 0x3fff_0000_3fff_0000) >> 2) | (x & 0x0000_3fff_0000_3fff);
        x = ((x & 0x0fff_ffff_0000_0000) >> 4) | (x & 0x0000_0000_0fff_ffff);
        self.0 = &self.0[len..];
        Some(x)
    }

    #[inline(never)]
    fn varint_long<const MAX: usize, const BITS: u32>(&mut self) -> Option<u64> {
        let mut out = 0u64;
        let bytes = self.0;
        for (i, &b) in bytes.iter().take(MAX).enumerate() {
            out |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                // The last possible byte may only hold the bits that are left.
                if i == MAX - 1 && u64::from(b) >> (BITS - 7 * (MAX as u32 - 1)) != 0 {
                    return None;
                }
                self.0 = &bytes[i + 1..];
                return Some(out);
            }
        }
        None
    }

    #[inline(always)]
    fn u32(&mut self) -> Option<u32> {
        self.varint::<5, 32>().map(|v| v as u32)
    }

    #[inline(always)]
    fn u64(&mut self) -> Option<u64> {
        self.varint::<10, 64>()
    }

    #[inline(always)]
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        if n > self.0.len() {
            return None;
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(b)
    }
}

#[inline(always)]
fn take_range<'a>(cur: &mut Cursor<'a>) -> Option<ByteRange<'a>> {
    Some(ByteRange {
        offset: cur.u64()?,
        old: cur.bytes()?,
        new: cur.bytes()?,
    })
}

#[inline]
fn take_change<'a>(cur: &mut Cursor<'a>) -> Option<ChangeView<'a>> {
    let seq = cur.u64()?;
    let ctx = Context {
        time_ns: cur.u64()?,
        thread: cur.u64()?,
        thread_name: cur.u32()?,
        frame: cur.u32()?,
        stack: cur.u32()?,
    };
    let region = cur.u32()?;
    let count = usize::try_from(cur.u64()?).ok()?;
    let start = cur.0;
    for _ in 0..count {
        take_range(cur)?;
    }
    let used = start.len() - cur.0.len();
    Some(ChangeView {
        seq,
        ctx,
        region,
        ranges: RangesView {
            count,
            bytes: &start[..used],
        },
    })
}

/// Decodes one record from the front of `bytes`, like
/// `postcard::take_from_bytes::<Record>`, returning it and the bytes after
/// it. A `Change` is decoded here without allocating; anything else goes
/// through postcard.
pub fn take_view(bytes: &[u8]) -> postcard::Result<(RecordView<'_>, &[u8])> {
    let mut cur = Cursor(bytes);
    if cur.u32() == Some(CHANGE_VARIANT) {
        return match take_change(&mut cur) {
            Some(c) => Ok((RecordView::Change(c), cur.0)),
            // Postcard's own error, so that messages do not depend on the path.
            None => Err(postcard::take_from_bytes::<Record<'_>>(bytes)
                .err()
                .unwrap_or(postcard::Error::DeserializeUnexpectedEnd)),
        };
    }
    postcard::take_from_bytes::<Record<'_>>(bytes).map(|(r, rest)| (RecordView::Other(r), rest))
}

impl<'a> RecordView<'a> {
    /// The full [`Record`] (allocating a change's ranges).
    pub fn to_record(&self) -> Record<'a> {
        match self {
            RecordView::Change(c) => Record::Change(crate::Change {
                seq: c.seq,
                ctx: c.ctx,
                region: c.region,
                ranges: c.ranges.iter().collect(),
            }),
            RecordView::Other(r) => r.clone(),
        }
    }

    /// The seq of an event record (see [`Record::seq`]).
    pub fn seq(&self) -> Option<u64> {
        match self {
            RecordView::Change(c) => Some(c.seq),
            RecordView::Other(r) => r.seq(),
        }
    }
}
