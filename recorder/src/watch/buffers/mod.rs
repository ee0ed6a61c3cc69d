//! Watching memory (`memwatch.watch`): buffers, arrays, tensors, raw
//! addresses.
//!
//! Layers inside, each calling only those before it: [`state`] (the
//! engine, the watches and the one lock of buffer watching) → [`export`]
//! (what an object's buffer covers) → [`fast`] (the line fast path's copy
//! of the shadows) → [`check`] (running the engine and emitting its
//! changes) → [`end`] (ending watches) → [`watch`] (starting them) →
//! [`session`] (a trace starting, a fork child).
//!
//! Nothing here runs in signal context; the shadows are published to the
//! fatal-signal handler (`mem::signals::crash`) each time the state lock is
//! let go.

pub mod check;
pub mod end;
pub mod export;
pub mod fast;
pub mod session;
pub mod state;
pub mod watch;
