//! Per-thread recorder state every layer reads: the thread's last in-scope
//! line ([`LAST`]) and memwatch's re-entry guard ([`GUARD`]).
//!
//! Thread-locals only (no lock). [`set_last`] also tells the fatal-signal
//! handler where the thread is (`mem::signals::crash::note_line`, which
//! writes an atomic); nothing here runs in signal context.

use std::cell::Cell;

thread_local! {
    /// The in-scope line this thread executed last: (code address, line).
    pub static LAST: Cell<(usize, u32)> = const { Cell::new((0, 0)) };
    /// Set while memwatch itself runs Python code (callbacks, reports), so
    /// that it never records itself.
    pub static GUARD: Cell<bool> = const { Cell::new(false) };
}

/// Moves this thread's last in-scope line to `last` (and tells the
/// fatal-signal handler, which cannot read thread-locals).
#[inline]
pub fn set_last(last: (usize, u32)) {
    LAST.with(|l| l.set(last));
    crate::mem::signals::crash::note_line(last.0, last.1);
}

/// Runs `f` with the reentrancy guard set.
pub fn guarded<R>(f: impl FnOnce() -> R) -> R {
    let was = GUARD.with(|g| g.replace(true));
    let r = f();
    GUARD.with(|g| g.set(was));
    r
}
