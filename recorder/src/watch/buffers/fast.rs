//! The line fast path's copy of the buffers' state: a line of in-scope
//! code that changed nothing costs a compare of each small watched region
//! (and, with page-tracked regions, a read of the process's fault count)
//! and no more.
//!
//! `unchanged` decides "watched memory is as the last check left it"
//! without the state lock, from a copy of the `Compare` regions' shadows
//! taken by `refresh` right after a check.
//!
//! Why the copy can be trusted: every acquisition of the buffers' state
//! lock marks it stale (`runtime::watched::invalidate`: it may change a
//! region or a shadow), and `refresh` runs under that lock right after a
//! check, recording the generation it copied. A copy whose generation is
//! not the current one is never used, so a region removed (or a shadow
//! changed) since cannot be read through it. The copy itself is only read
//! and written with the GIL held, which orders every use of it. Nothing
//! here runs in signal context.

use std::cell::UnsafeCell;

use pyo3::prelude::*;

use crate::mem::engine::{Engine, Tracking};
use crate::runtime::watched;
use crate::watch::buffers::state::Owner;

struct Copy {
    start: *const u8,
    bytes: Box<[u8]>,
}

struct Fast {
    /// The generation the copy was taken at; 0: none.
    generation: u64,
    regions: Vec<Copy>,
    /// With page-tracked regions: the process's fault count the engine's
    /// last scan read (an equal count now means no page was written).
    faults: Option<u64>,
    /// Watched objects and the references memwatch holds to each: one
    /// that only memwatch still refers to sends the line to a full check,
    /// which ends its watch.
    owners: Vec<Owner>,
}

/// State only touched with the GIL held.
struct GilCell(UnsafeCell<Fast>);

// SAFETY: every access goes through `GilCell::get`, which takes a `Python`
// token: the GIL serialises them. The raw pointers in `Copy` are only
// dereferenced while their generation is current (see the module docs).
unsafe impl Sync for GilCell {}

impl GilCell {
    /// # Safety
    /// No other reference from `get` may be alive (neither caller keeps
    /// one across code that could call back in).
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, _py: Python<'_>) -> &mut Fast {
        // SAFETY: as the caller promises; the GIL excludes other threads.
        unsafe { &mut *self.0.get() }
    }
}

static FAST: GilCell = GilCell(UnsafeCell::new(Fast {
    generation: 0,
    regions: Vec::new(),
    faults: None,
    owners: Vec::new(),
}));

/// Copies the engine's shadows for the fast path, right after a check,
/// under the state lock (`None`: no engine yet, nothing watched). Leaves no
/// usable copy when the engine tracks anything the fast path cannot check
/// (stores, pages not scanned yet).
pub(crate) fn refresh(
    py: Python<'_>,
    engine: Option<&Engine>,
    owners: impl Iterator<Item = Owner>,
    generation: u64,
) {
    // SAFETY: GIL held; no other reference is alive (see `unchanged`).
    let fast = unsafe { FAST.get(py) };
    fast.generation = 0;
    fast.owners.clear();
    fast.owners.extend(owners);
    let Some(engine) = engine else {
        fast.regions.clear();
        fast.faults = None;
        fast.generation = generation;
        return;
    };
    let Some(faults) = engine.fast_checkable() else {
        return;
    };
    fast.faults = faults;
    let compared = engine.regions.iter().filter(|r| r.tracking == Tracking::Compare);
    fast.regions.truncate(compared.clone().count());
    for (i, r) in compared.enumerate() {
        let start = r.start as usize as *const u8;
        match fast.regions.get_mut(i) {
            Some(c) if c.bytes.len() == r.shadow.len() => {
                c.start = start;
                c.bytes.copy_from_slice(&r.shadow);
            }
            _ => {
                let c = Copy {
                    start,
                    bytes: r.shadow.as_slice().into(),
                };
                if i < fast.regions.len() {
                    fast.regions[i] = c;
                } else {
                    fast.regions.push(c);
                }
            }
        }
    }
    fast.generation = generation;
}

/// True when watched memory needs no check at this boundary: no store-mode
/// region is watched, each `Compare` region's bytes equal the shadow the
/// last check left, and the process took no page fault since the last scan
/// of the page-tracked ones. Says nothing of objects and variables. Runs
/// no Python code and takes no lock. The GIL must be held.
#[inline]
pub(crate) fn unchanged(py: Python<'_>) -> bool {
    if crate::mem::store::active() {
        return false;
    }
    // SAFETY: GIL held; the reference does not outlive this function, which
    // calls nothing that could reach `refresh`.
    let fast = unsafe { FAST.get(py) };
    if fast.generation != watched::generation() {
        return false;
    }
    let compared_equal = fast.regions.iter().all(|c| {
        // SAFETY: the region is still watched (its generation is current,
        // so no state change, unwatching included, happened since the copy)
        // and so pinned; concurrent writers only make this read one of the
        // values they stored, as in `Region::current`.
        let now = unsafe { std::slice::from_raw_parts(c.start, c.bytes.len()) };
        now == &c.bytes[..]
    });
    // Page-tracked regions: the engine's own test (see `Engine::check`).
    compared_equal
        && fast.owners.iter().all(|o| !o.unreferenced())
        && fast
            .faults
            .is_none_or(|f| crate::mem::kernel::process_faults() == Some(f))
}

/// True when no buffer is watched, as the current copy says (call right
/// after [`unchanged`] said yes, so that the copy is current).
pub(crate) fn none(py: Python<'_>) -> bool {
    // SAFETY: GIL held; the reference does not outlive this function.
    let fast = unsafe { FAST.get(py) };
    fast.generation == watched::generation() && fast.regions.is_empty() && fast.faults.is_none()
}
