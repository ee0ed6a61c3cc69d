//! Traces: [`sink`] records changes to a `.mwt` file while the program
//! runs (through `memwatch-format`'s writer and journal), and [`reader`]
//! opens one from Python (`memwatch.open_trace`, `memwatch.trace_info`).
//! Below the runtime and the watch kinds: it is told what to write and
//! calls nothing above [`crate::model`] and [`crate::mem`].
//!
//! Locking and signal context: see [`sink`]; nothing here runs in a signal
//! handler.

pub mod reader;
pub mod sink;
