//! Watching Python objects (`memwatch.watch_object`): attribute and
//! container changes, delivered as `memwatch.Change`s whose `kind`, `key`,
//! `old_repr` and `new_repr` say what happened, through the same callbacks,
//! history, live report and trace as buffer changes.
//!
//! A watch is a small tree of *nodes*, one per thing that can change: the
//! attributes of an instance (its `__dict__`, or its `__slots__`) and the
//! items of a `dict`, `list` or `set`. With `depth=n`, the containers and
//! plain instances (of classes defined in Python) held by the watched
//! object's attributes or items, down to `n` levels, get nodes too; the tree
//! follows rebinding (`obj.items = [...]` moves the watch to the new list).
//!
//! How changes are found:
//!
//! - Dicts (instance `__dict__`s and plain dicts) on CPython 3.12+: a dict
//!   watcher (`PyDict_AddWatcher`; one watcher id for the process, claimed
//!   at the first watch and freed at shutdown). Its callback runs inside the
//!   mutation, before it happens, where running Python code could corrupt
//!   the dict, so it only takes references (key, old and new value) and the
//!   raw stack; reprs are made and the change delivered at the next safe
//!   point: a line boundary of in-scope code, `check()`, `unwatch`, `stop`
//!   or exit. Instance dicts that CPython keeps inline are materialised
//!   first (`PyObject_GenericGetDict`, what reading `obj.__dict__` does),
//!   which changes nothing a program can see.
//! - Lists, sets, `__slots__`, and dicts on 3.11: compared at line
//!   boundaries of in-scope code against a shallow copy (the identities of
//!   the items), so a change is the net effect of one line, attributed to
//!   it like a buffer change. The kind is derived from the difference (see
//!   `list_changes` and `set_changes`); where the state alone cannot
//!   tell (`pop(i)`, `remove(x)` and `del l[i]` leave the same list), the
//!   method names and operators the line's code uses decide.
//!
//! Reprs are bounded (`repr_limit` characters) and made at the safe point,
//! so a mutable value shows its state at the end of the line that stored it;
//! a failing `__repr__` gives `<repr failed: ExcType>`.
//!
//! A watched object that can be weakly referenced is held weakly: when it
//! is collected the watch ends with a `collected` change. Other objects
//! (`list`, `dict`, `set`, classes with `__slots__` and no `__weakref__`) are
//! held strongly, and the watch ends with a `collected` change at the first
//! line boundary at which memwatch holds the only reference.
//!
//! Locking: `OBJS` (the watches and nodes), `DICTS` (dict address to
//! nodes, read by the dict watcher callback) and `PENDING` (what the
//! callbacks queued) are separate and each is held only for short sections
//! that run no Python code and release no Python object, because releasing
//! one can run a weakref callback or `__del__` that comes back here.
//!
//! The submodules, in layers: each names only those above it in this
//! list, never one below, and this file holds nothing but their
//! declarations and what the crate uses of them.
//!
//! | module | owns | locks | runs inside a dict mutation |
//! |---|---|---|---|
//! | `frames` | the stacks of queued events: capturing them, resolving them at the flush, the per-thread memo | none (the monitor's `CODES` for a lookup) | `capture_frames`: no Python code, no release |
//! | `state` | the watches and nodes (`Node`, `Shape`, `Hold`, `Shadow`), the `OBJS`, `DICTS` and `PENDING` statics, the queue's entries, the lock-free flags (`any`) | `OBJS`, `DICTS`, `PENDING`, each for short sections | `push_pending`, `tid`, `thread_ident`: no Python code |
//! | `hooks` | the helpers from `memwatch._objects`, the dict watcher API and id, **the dict watcher callback** `on_dict_event`, the probe of attribute stores, how dicts are watched | the callback: `DICTS`, then `PENDING` | `on_dict_event`: runs no Python code, releases no reference, keeps the error indicator |
//! | `repr` | bounded reprs of values and keys | none | no (runs Python code) |
//! | `shadow` | building, removing and resyncing nodes; taking, checking and comparing shadows | `DICTS` inside the caller's `OBJS` | no |
//! | `diff` | the changes between two shadows, their kinds, the line hints | none | no |
//! | `flush` | `flush` in phases (queue, compare, rebinding, release, reprs and delivery) and `quiet` | `OBJS` and `PENDING`, for short sections | no |
//! | `handle` | the Python API: `_watch_object`, `ObjectWatchHandle`, unwatching, `shutdown`, the fork child | `OBJS` (and `PENDING` after a fork) | no |
//!
//! Nothing here runs in a signal handler. The one piece that runs inside
//! another operation is the dict watcher callback in `hooks.rs` (and what
//! it calls in `state.rs` and `frames.rs`): it runs before the mutation it
//! reports, so it must not run Python code, release a reference, or take
//! `OBJS`. The weak reference callback of a collected root (made in
//! `handle.rs`) runs wherever its object is freed and keeps the same rules:
//! it only queues. Everything else runs at safe points with the GIL held.

mod diff;
mod flush;
mod frames;
mod handle;
mod hooks;
mod repr;
mod shadow;
mod state;
#[cfg(test)]
mod tests;

pub use flush::{flush, quiet};
pub use handle::{
    _object_watches, _objects_after_fork_child, _unwatch_object, _watch_object, shutdown, ObjectWatchHandle,
};
pub use hooks::_set_object_hooks;
pub use state::{any, has_tag};
