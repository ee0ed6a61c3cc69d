//! What the watch kinds, the boundary and the interpreter hooks share, all
//! used with the GIL held: the hooks into the Python package, the code
//! objects seen and their scope, the thread's last in-scope line and
//! re-entry guard, frame walking and attribution, whether line events are
//! on (through the family installed by `crate::monitor`), and what is
//! watched.
//!
//! Layers inside, each calling only those before it: [`addr`] →
//! [`thread`] → [`hooks`] → [`watched`] → [`events`] → [`codes`] →
//! [`frames`] → [`attrib`]; [`fork`] stands alone.
//!
//! Nothing here runs in signal context; [`thread::set_last`] and
//! [`codes::code_info`] hand the fatal-signal handler what it needs through
//! `mem::signals::crash`, which only stores atomics.

pub mod addr;
pub mod attrib;
pub mod codes;
pub mod events;
pub mod fork;
pub mod frames;
pub mod hooks;
pub mod thread;
pub mod watched;
