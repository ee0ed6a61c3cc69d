//! The memwatch trace format (`.mwt`): bytes ↔ records.
//!
//! This crate owns the file layout (header, chunk framing, trailer), the
//! record types, the element types a region's dtype names and their
//! decoding ([`dtype`]), a [`TraceWriter`] that appends records and emits
//! independently zstd-compressed chunks, and a streaming [`TraceReader`]
//! that memory-maps a trace and decodes it chunk by chunk. It does not own
//! what gets recorded (that is `memwatch-recorder`) nor queries over a trace
//! (`memwatch-analyzer`); it has no Python and no polars in it.
//!
//! The byte-level specification is `docs/format.md`; the module docs of
//! [`header`] and [`chunk`] carry the same tables.
//!
//! Guarantees:
//! - A trace cut at any byte (a killed process, a full disk) still opens:
//!   every whole chunk reads back and [`TraceReader::tail`] says how many
//!   bytes were ignored.
//! - Bad input never panics: each problem is its own [`Error`] variant,
//!   naming the file (and the chunk).
//!
//! ```
//! use memwatch_format::{Change, ByteRange, Context, Meta, Record, TraceReader, TraceWriter, WriterOptions};
//!
//! let mut w = TraceWriter::new(Vec::new(), "example.mwt", &Meta::default(), WriterOptions::default())?;
//! let frame = w.intern_frame("train.py", "step", 52)?;
//! w.append(&Record::Change(Change {
//!     seq: 1,
//!     ctx: Context { frame, ..Context::default() },
//!     region: 1,
//!     ranges: vec![ByteRange { offset: 8, old: &[0, 0], new: &[1, 2] }],
//! }))?;
//! let (bytes, _stats) = w.finish(0)?;
//!
//! let trace = TraceReader::from_bytes(bytes, "example.mwt")?;
//! let mut changes = 0;
//! trace.for_each_record(|rec| {
//!     if let Record::Change(c) = rec {
//!         assert_eq!(c.ranges[0].new, &[1, 2]);
//!         changes += 1;
//!     }
//!     Ok::<_, memwatch_format::Error>(())
//! })?;
//! assert_eq!(changes, 1);
//! assert!(trace.tail_message().is_none()); // closed cleanly
//! # Ok::<(), memwatch_format::Error>(())
//! ```

pub mod chunk;
pub mod crash;
pub mod delta;
pub mod direct;
pub mod dtype;
mod error;
mod file;
pub mod header;
pub mod journal;
mod output;
mod reader;
mod record;
pub mod recover;
pub mod run;
pub mod sample;
pub mod sealer;
mod view;
mod writer;

pub use chunk::{ChunkHeader, ChunkKind, Codec, IndexEntry, Trailer, FLAG_CONTENTS_ONLY, NO_SEQ};
pub use delta::Expander;
pub use error::{Error, Result};
pub use file::create_private;
pub use header::{Header, Meta, FORMAT_VERSION, MAGIC};
pub use journal::journal_path;
pub use output::Output;
pub use reader::{ChunkInfo, DecodedChunk, Ending, Records, Tail, TraceReader, Views};
pub use record::{
    ByteRange, Change, Checkpoint, Contents, Context, Crashed, Delta, DeltaRange, FrameDef, Id, Layout, Lost,
    Note, ObjectChange, ObjectChangeKind, ObjectVariable, Record, RegionUnwatched, RegionWatched, StackDef,
    StringDef, UnwatchReason, Waited, NOTE_OP, NO_ID,
};
pub use view::{take_view, ChangeView, RangesIter, RangesView, RecordView};
pub use writer::{
    TraceWriter, WriterOptions, WriterStats, CONTENTS_PIECE, DEFAULT_LEVEL, JOURNAL_RING, SEPARATE_CONTENTS,
};

/// How a line is written for people: `file:line`, or `cell [3], line 2`
/// for a notebook cell (the recorder names code run in an IPython cell
/// `cell [N]`, after the cell's execution count).
///
/// ```
/// use memwatch_format::location;
/// assert_eq!(location("/src/train.py", 12), "/src/train.py:12");
/// assert_eq!(location("cell [3]", 2), "cell [3], line 2");
/// ```
pub fn location(file: &str, line: u32) -> String {
    if file.starts_with("cell [") && file.ends_with(']') {
        format!("{file}, line {line}")
    } else {
        format!("{file}:{line}")
    }
}
