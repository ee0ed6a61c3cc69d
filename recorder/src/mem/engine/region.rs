//! One watched region and what a check reports of it: [`Tracking`] (how
//! its changes are found), [`Region`] (its span, layout, view mask and
//! shadow), [`RawChange`] and [`Writer`].
//!
//! No state or locks of its own: regions belong to the `Engine`, which is
//! used under the buffers' state lock (`watch::buffers::state`). Nothing here runs in signal
//! context. [`Region::current`] reads the live bytes while other threads
//! may be writing them, which only makes the read one of the values they
//! stored.

use std::sync::Arc;

use super::layout::{ChangedRange, Layout};

/// How a region's changes are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// Whole-region comparison at each check.
    Compare,
    /// Kernel write tracking of the region's pages.
    Pages,
    /// One change per store instruction (`mode="store"`).
    Store,
}

impl Tracking {
    pub fn name(self) -> &'static str {
        match self {
            Tracking::Compare => "compare",
            Tracking::Pages => "uffd-wp-async",
            Tracking::Store => "uffd-wp-step",
        }
    }
}

/// One watched region.
#[derive(Debug)]
pub struct Region {
    pub id: u32,
    pub tag: Arc<str>,
    pub variable: Option<Arc<str>>,
    /// Address of the first byte of the span.
    pub start: u64,
    pub len: u64,
    pub layout: Layout,
    /// Bit per byte of the span: set where the byte belongs to an element
    /// of the view; `None` when every byte does.
    pub mask: Option<Vec<u64>>,
    /// The region's contents as of the last check.
    pub shadow: Arc<Vec<u8>>,
    /// The snapshot before the last bulk diff, reused for the next one once
    /// no change refers to it any more.
    pub spare: Option<Arc<Vec<u8>>>,
    pub tracking: Tracking,
    /// Why page tracking was not used, when it was wanted.
    pub tracking_note: Option<String>,
}

impl Region {
    pub(super) fn current(&self) -> &[u8] {
        // SAFETY: the span is pinned by the buffer export the API layer
        // holds for as long as the region exists (or, for raw memory, the
        // user promised it stays mapped); concurrent writers may change
        // bytes while we read them, which only makes this read one of the
        // values they stored.
        unsafe { std::slice::from_raw_parts(self.start as *const u8, self.len as usize) }
    }
}

pub(super) fn in_mask(mask: &Option<Vec<u64>>, off: usize) -> bool {
    match mask {
        None => true,
        Some(m) => m[off / 64] >> (off % 64) & 1 == 1,
    }
}

/// Changed runs of one region found by one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawChange {
    pub region: u32,
    /// `(offset, old, new)`, increasing offsets, not overlapping.
    pub ranges: Vec<ChangedRange>,
    /// For one caught store: who stored it, and when.
    pub writer: Option<Writer>,
}

/// The thread and time of one caught store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Writer {
    pub tid: u64,
    /// Unix time of the store, nanoseconds.
    pub time_ns: u64,
}
