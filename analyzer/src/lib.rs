//! Questions asked of a memwatch trace, offline.
//!
//! This crate owns everything that reads a trace for meaning rather than for
//! bytes: resolving interned ids ([`Symbols`]), streaming changes through a
//! [`Filter`] ([`for_each_change`]), rebuilding a region's exact contents at
//! any point from its snapshots ([`state()`]), and finding who wrote a byte
//! ([`writes_to`]), and exporting changes as Parquet (through polars), CSV
//! or JSON lines ([`export()`]). It does not own the file layout
//! (`memwatch-format`) nor how results are printed (the `memwatch` CLI).
//!
//! ```
//! use memwatch_analyzer::Symbols;
//! use memwatch_format::{sample, TraceReader, TraceWriter, WriterOptions, Record, Error};
//!
//! let mut w = TraceWriter::new(Vec::new(), "s.mwt", &sample::sample_meta(), WriterOptions::default())?;
//! sample::write_sample(&mut w)?;
//! let trace = TraceReader::from_bytes(w.finish(0)?.0, "s.mwt")?;
//! let mut syms = Symbols::default();
//! let mut lines = Vec::new();
//! trace.for_each_record(|rec| {
//!     syms.learn(rec);
//!     if let Record::Change(c) = rec {
//!         let f = syms.frame(c.ctx.frame).unwrap();
//!         lines.push(format!("{} {}:{}", syms.region(c.region).unwrap().tag, f.file, f.line));
//!     }
//!     Ok::<_, Error>(())
//! })?;
//! assert_eq!(lines[0], "layer1_weight samples/train.py:52");
//! # Ok::<(), memwatch_format::Error>(())
//! ```

mod error;
mod export;
mod query;
mod scan;
mod state;
mod symbols;
mod text;

pub use error::{Error, Result};
pub use export::{
    csv_cell, element_f64, export, export_partitioned, export_run, hex, index_at, json_str, ExportFormat,
    ExportSource, Granularity, COLUMNS,
};
pub use query::{
    for_each_change, for_each_change_progress, for_each_event, ChangeRef, ChangeRow, Event, Filter, What,
    WhatRef,
};
pub use state::{
    c_order, element_bytes, has_region, seq_at_time, seq_bounds, shape_of, state, writes_to, State,
};
pub use symbols::{FrameInfo, RegionInfo, Symbols};
pub use text::duration_text;
