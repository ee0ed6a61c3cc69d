//! The one answer to "is anything watched?" and to "is this name taken?",
//! and the generation of watch state that the line fast path's copy is
//! checked against.
//!
//! Each watch kind (`watch::buffers`, `watch::objects`, `watch::vars`)
//! says here whether it has a watch left ([`set`]); everything that asks
//! ([`anything`], [`only_variables`], the boundary, the line fast path)
//! reads these flags instead of the kinds' own state, so no watch kind
//! asks another.
//!
//! State: three atomics, a counter, and the kinds' name look-ups (set
//! once); no lock of its own (a look-up takes its kind's). Nothing here runs in
//! signal context.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

/// A way of watching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `watch()`: memory.
    Buffers = 0,
    /// `watch_object()`.
    Objects = 1,
    /// `watch_var()` (and fingerprint watches, which ride on it).
    Variables = 2,
}

static WATCHED: [AtomicBool; 3] = [
    AtomicBool::new(false),
    AtomicBool::new(false),
    AtomicBool::new(false),
];

/// Says whether `kind` has a watch left; returns what it said before.
#[inline]
pub fn set(kind: Kind, any: bool) -> bool {
    WATCHED[kind as usize].swap(any, Ordering::AcqRel)
}

/// True while `kind` has a watch.
#[inline]
pub fn has(kind: Kind) -> bool {
    WATCHED[kind as usize].load(Ordering::Acquire)
}

/// True while anything at all is watched.
#[inline]
pub fn anything() -> bool {
    WATCHED.iter().any(|w| w.load(Ordering::Acquire))
}

/// True while variables are watched and nothing else (no buffer, no
/// object): only code that binds a watched variable needs line events.
#[inline]
pub fn only_variables() -> bool {
    has(Kind::Variables) && !has(Kind::Objects) && !has(Kind::Buffers)
}

/// How a way of watching answers "is `name` the name of one of your
/// watches?", given once per kind when the extension module is
/// initialised (`lib.rs`): the kinds live above this layer.
pub type Names = fn(&str) -> bool;

static NAMES: [OnceLock<Names>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];

/// Says how `kind` answers [`named`] (once; later calls keep the first).
pub fn answer_names(kind: Kind, names: Names) {
    let _ = NAMES[kind as usize].set(names);
}

/// The way of watching that has a watch named `name`, if any: the one
/// answer to "is this name taken?" (a name is watched once at a time,
/// whatever the way; watched variables are named apart, by their own
/// names).
pub fn named(name: &str) -> Option<Kind> {
    [Kind::Buffers, Kind::Objects]
        .into_iter()
        .find(|&k| has(k) && NAMES[k as usize].get().is_some_and(|f| f(name)))
}

/// Generation of the watch state: bumped by every acquisition of the
/// buffers' state lock and by every change of scope. Starts above 0, the
/// generation of "no valid copy".
static GEN: AtomicU64 = AtomicU64::new(1);

/// Marks every copy of watch state taken so far stale.
#[inline]
pub fn invalidate() {
    GEN.fetch_add(1, Ordering::Relaxed);
}

/// The current generation, for a copy taken under the buffers' state lock.
#[inline]
pub fn generation() -> u64 {
    GEN.load(Ordering::Relaxed)
}
