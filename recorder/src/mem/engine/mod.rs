//! Watched regions and the check that finds what changed in them.
//!
//! A region keeps a shadow copy of its bytes. [`Engine::check`] finds the
//! bytes that differ from the shadow, reports them as [`RawChange`]s and
//! updates the shadow. Three ways to find them:
//!
//! - **pages** (regions larger than [`COMPARE_MAX`]): the region's pages are
//!   registered with the [`WriteTracker`](crate::mem::kernel::WriteTracker)
//!   (userfaultfd `WP_ASYNC`); a check asks the kernel which pages were
//!   written and diffs only those. Pages are shared between regions by
//!   reference count, and every scan's dirty pages are offered to every
//!   region overlapping them, so two regions in one page stay independent.
//! - **compare** (small regions, or memory the kernel cannot write-protect,
//!   such as a file-backed `mmap`): the check compares the whole region with
//!   its shadow. For a few KiB this is cheaper than a system call.
//!
//! Either of these two, a change is the net difference since the previous
//! check, from any writer: Python, native code, another thread, or the
//! kernel.
//!
//! - **store** (`mode="store"`): the region's pages are registered with the
//!   [`StoreTracker`](crate::mem::store::StoreTracker), which catches each store
//!   instruction; a check turns each caught store into its own change,
//!   carrying the writing thread and the time of the store, then diffs the
//!   pages that were let through (kernel writes) as a net change.
//!
//! Its parts, each naming only those above it in this list:
//!
//! - `layout.rs`: the bytes of a change ([`Bytes`], [`ChangedRange`]) and
//!   how a region lays out its elements ([`Layout`], [`view_mask`]).
//! - `region.rs`: one watched region ([`Region`], [`Tracking`]) and what a
//!   check reports of it ([`RawChange`], [`Writer`]).
//! - `diff.rs`: what changed in one region against its shadow (a span, a
//!   whole snapshot, or one caught store at a time), as whole elements of
//!   the view, updating the shadow.
//! - `register.rs`: the [`Engine`] and how regions enter and leave it: the
//!   tracking each gets ([`COMPARE_MAX`]), their pages' registration with
//!   the kernel trackers by reference count, and letting go of the trackers
//!   in a `fork()` child.
//! - `check.rs`: [`Engine::check`], phase by phase ([`BULK_MIN`],
//!   [`STALE_EVENTS`]), and [`Engine::fast_checkable`] for the line fast
//!   path.
//! - `tests.rs`: their unit tests.
//!
//! Locking: the engine takes no lock of its own. It lives in the
//! buffers' state and is used only under that state's lock
//! (`watch::buffers::state`, a layer above; a `fork()` child, single-threaded, rebuilds it outside
//! the lock before putting it back); whoever changes its regions or shadows
//! there also holds a [`Busy`](crate::mem::signals::crash::Busy) token, because the
//! fatal-signal handler compares the watched regions with the shadows and
//! masks published to it ([`publish`](crate::mem::signals::crash::publish)) as
//! that lock is released. The only lock taken below the engine is the
//! store tracker's event queue, for a moment, when a check collects the
//! caught stores.
//!
//! Signal context: nothing here runs in it. The signal handlers of
//! `mode="store"` ([`crate::mem::signals`]) write the events that a check reads
//! later, through the store tracker, and read the table of store-mode
//! spans that adding and removing a region updates (lock-free atomics).

mod check;
mod diff;
mod layout;
mod region;
mod register;
#[cfg(test)]
mod tests;

pub use check::{BULK_MIN, STALE_EVENTS};
pub use layout::{view_mask, Bytes, ChangedRange, Layout};
pub use region::{RawChange, Region, Tracking, Writer};
pub use register::{Engine, COMPARE_MAX};
