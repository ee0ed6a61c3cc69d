//! What the recorder hands to Python: a `memwatch.Change` (its elements
//! decoded by dtype) and the exception classes, rooted at
//! `memwatch.MemwatchError`. Depends only on [`crate::mem`] (layouts and
//! changed ranges). No state beyond the process id and rank a change
//! carries; nothing here runs in signal context.

pub mod change;
pub mod errors;
