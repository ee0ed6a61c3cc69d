//! Exporting changes as a table: Parquet (through polars), CSV or JSON
//! lines, one row per change or per changed element. The schema is
//! `docs/export.md`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::ControlFlow;
use std::path::Path;

use memwatch_format::TraceReader;
use polars::prelude::*;
use polars_arrow::array::{MutableBinaryViewArray, Utf8ViewArray, View};
use polars_arrow::bitmap::Bitmap;
use polars_buffer::Buffer;

use crate::error::{Error, Result};
use crate::query::{for_each_change_progress, ChangeRef, Filter, WhatRef};
use crate::state::{c_order, element_bytes, shape_of};

/// File formats of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Parquet,
    Csv,
    Jsonl,
}

/// One row per change, or per changed element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Change,
    Element,
}

/// A string column built from few distinct values: each row holds an
/// index into a table of the values seen, so that no row allocates (the
/// values of a trace's string columns are its interned strings, or few).
#[derive(Default)]
struct StrCol {
    rows: Vec<u32>,
    values: Vec<String>,
    index: std::collections::HashMap<String, u32>,
    /// The value of the last row (rows mostly repeat it).
    last: u32,
}

impl StrCol {
    const NULL: u32 = u32::MAX;

    #[inline]
    fn push(&mut self, v: Option<&str>) {
        let id = match v {
            None => Self::NULL,
            Some(v) if self.values.get(self.last as usize).is_some_and(|l| l == v) => self.last,
            Some(v) => {
                let id = match self.index.get(v) {
                    Some(&id) => id,
                    None => {
                        let id = self.values.len() as u32;
                        self.values.push(v.to_string());
                        self.index.insert(v.to_string(), id);
                        id
                    }
                };
                self.last = id;
                id
            }
        };
        self.rows.push(id);
    }

    fn get(&self, i: usize) -> Option<&str> {
        self.values.get(self.rows[i] as usize).map(String::as_str)
    }

    /// Empties the column for the next batch, keeping its memory; the table
    /// of values is kept too while it is small (tags, files, functions),
    /// so that the next batch finds them without hashing.
    fn clear(&mut self) {
        self.rows.clear();
        if self.values.len() > 4096 {
            self.values.clear();
            self.index.clear();
            self.last = 0;
        }
    }

    /// The column as arrow string views of one buffer holding each
    /// distinct value once: building it copies 16 bytes a row.
    fn column(&self, name: &str) -> Column {
        if self.values.is_empty() {
            return Column::full_null(name.into(), self.rows.len(), &DataType::String);
        }
        let mut buffer = Vec::new();
        let mut value_views = Vec::with_capacity(self.values.len());
        for v in &self.values {
            value_views.push(View::new_from_bytes(v.as_bytes(), 0, buffer.len() as u32));
            buffer.extend_from_slice(v.as_bytes());
        }
        let mut total = 0usize;
        let views: Vec<View> = self
            .rows
            .iter()
            .map(|&id| match value_views.get(id as usize) {
                Some(v) => {
                    total += v.length as usize;
                    *v
                }
                None => View::default(),
            })
            .collect();
        let validity = self
            .rows
            .contains(&Self::NULL)
            .then(|| Bitmap::from_iter(self.rows.iter().map(|&id| id != Self::NULL)));
        let buffer_len = buffer.len();
        // SAFETY: every view is of a whole `String` (valid UTF-8) in
        // `buffer`, buffer 0, at the offset it was copied to; null rows are
        // masked by `validity`.
        let array = unsafe {
            Utf8ViewArray::new_unchecked(
                ArrowDataType::Utf8View,
                views.into(),
                vec![Buffer::from(buffer)].into(),
                validity,
                Some(total),
                buffer_len,
            )
        };
        StringChunked::with_chunk(name.into(), array).into_column()
    }
}

/// A binary column: every row's bytes one after another, with where each
/// row ends (rows without bytes are null).
#[derive(Default)]
struct BinCol {
    data: Vec<u8>,
    ends: Vec<usize>,
    valid: Vec<bool>,
}

impl BinCol {
    #[inline]
    fn push(&mut self, v: Option<&[u8]>) {
        if let Some(b) = v {
            self.data.extend_from_slice(b);
        }
        self.ends.push(self.data.len());
        self.valid.push(v.is_some());
    }

    fn get(&self, i: usize) -> Option<&[u8]> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.valid[i].then(|| &self.data[start..self.ends[i]])
    }

    fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
        self.valid.clear();
    }

    fn column(&self, name: &str) -> Column {
        if !self.valid.contains(&true) {
            return Column::full_null(name.into(), self.valid.len(), &DataType::Binary);
        }
        let mut array = MutableBinaryViewArray::<[u8]>::with_capacity(self.ends.len());
        for i in 0..self.ends.len() {
            array.push(self.get(i));
        }
        BinaryChunked::with_chunk(name.into(), array.freeze()).into_column()
    }
}

/// The columns, in order, as built up row by row: numbers in typed
/// vectors, strings through [`StrCol`], bytes through [`BinCol`].
#[derive(Default)]
struct Columns {
    seq: Vec<u64>,
    time_ns: Vec<u64>,
    tag: StrCol,
    variable: StrCol,
    kind: StrCol,
    file: StrCol,
    line: Vec<Option<u32>>,
    function: StrCol,
    thread: Vec<u64>,
    thread_name: StrCol,
    address: Vec<Option<u64>>,
    offset: Vec<Option<u64>>,
    bytes_changed: Vec<u64>,
    ranges: Vec<u32>,
    index: Vec<Option<String>>,
    old: BinCol,
    new: BinCol,
    old_value: Vec<Option<f64>>,
    new_value: Vec<Option<f64>>,
    key: StrCol,
    old_repr: StrCol,
    new_repr: StrCol,
    op: StrCol,
    wall_time_ns: Vec<u64>,
    pid: Vec<u32>,
    rank: Vec<Option<u32>>,
    /// The process whose changes [`push`](Self::push) adds: its trace's
    /// start (added to `time_ns` for `wall_time_ns`), pid and rank.
    start_ns: u64,
    src_pid: u32,
    src_rank: Option<u32>,
    /// A partitioned export's files leave out the pid column: the path
    /// holds it (`pid=N/`).
    no_pid: bool,
}

/// What one row says beyond the change's own fields.
struct RowParts<'a> {
    address: Option<u64>,
    offset: Option<u64>,
    bytes_changed: u64,
    ranges: u32,
    index: Option<String>,
    old: Option<&'a [u8]>,
    new: Option<&'a [u8]>,
    values: (Option<f64>, Option<f64>),
    object: (Option<&'a str>, Option<&'a str>, Option<&'a str>),
}

impl RowParts<'_> {
    const NONE: RowParts<'static> = RowParts {
        address: None,
        offset: None,
        bytes_changed: 0,
        ranges: 0,
        index: None,
        old: None,
        new: None,
        values: (None, None),
        object: (None, None, None),
    };
}

/// A numeric element as f64 (ints beyond 2^53 lose precision; every
/// float dtype, bfloat16 and float8 included, is exact); `None` for a
/// complex element or a dtype [`memwatch_format::dtype`] does not know.
pub fn element_f64(dtype: &str, b: &[u8]) -> Option<f64> {
    parsed_element_f64(memwatch_format::dtype::Dtype::parse(dtype), b)
}

/// [`element_f64`] with the dtype parsed once (per change, not per element).
fn parsed_element_f64(dtype: Option<memwatch_format::dtype::Dtype>, b: &[u8]) -> Option<f64> {
    dtype?.decode(b)?.as_f64()
}

impl Columns {
    fn new(src: &ExportSource<'_>, no_pid: bool) -> Columns {
        Columns {
            start_ns: src.reader.header().meta.start_time_ns,
            src_pid: src.pid,
            src_rank: src.rank,
            no_pid,
            ..Columns::default()
        }
    }

    /// An empty batch for rows of the same process (or of any, merged).
    fn like(&self) -> Columns {
        Columns {
            start_ns: self.start_ns,
            src_pid: self.src_pid,
            src_rank: self.src_rank,
            no_pid: self.no_pid,
            ..Columns::default()
        }
    }

    fn len(&self) -> usize {
        self.seq.len()
    }

    /// Empties every column for the next batch, keeping the memory: a
    /// batch of fresh vectors costs more in page faults (the kernel zeroing
    /// new pages) and regrowth than filling them does.
    fn clear(&mut self) {
        self.seq.clear();
        self.time_ns.clear();
        self.tag.clear();
        self.variable.clear();
        self.kind.clear();
        self.file.clear();
        self.line.clear();
        self.function.clear();
        self.thread.clear();
        self.thread_name.clear();
        self.address.clear();
        self.offset.clear();
        self.bytes_changed.clear();
        self.ranges.clear();
        self.index.clear();
        self.old.clear();
        self.new.clear();
        self.old_value.clear();
        self.new_value.clear();
        self.key.clear();
        self.old_repr.clear();
        self.new_repr.clear();
        self.op.clear();
        self.wall_time_ns.clear();
        self.pid.clear();
        self.rank.clear();
    }

    /// Appends row `i` of `src` (a batch of another process, in a merge).
    fn push_from(&mut self, src: &Columns, i: usize) {
        self.seq.push(src.seq[i]);
        self.time_ns.push(src.time_ns[i]);
        self.tag.push(src.tag.get(i));
        self.variable.push(src.variable.get(i));
        self.kind.push(src.kind.get(i));
        self.file.push(src.file.get(i));
        self.line.push(src.line[i]);
        self.function.push(src.function.get(i));
        self.thread.push(src.thread[i]);
        self.thread_name.push(src.thread_name.get(i));
        self.address.push(src.address[i]);
        self.offset.push(src.offset[i]);
        self.bytes_changed.push(src.bytes_changed[i]);
        self.ranges.push(src.ranges[i]);
        self.index.push(src.index[i].clone());
        self.old.push(src.old.get(i));
        self.new.push(src.new.get(i));
        self.old_value.push(src.old_value[i]);
        self.new_value.push(src.new_value[i]);
        self.key.push(src.key.get(i));
        self.old_repr.push(src.old_repr.get(i));
        self.new_repr.push(src.new_repr.get(i));
        self.op.push(src.op.get(i));
        self.wall_time_ns.push(src.wall_time_ns[i]);
        self.pid.push(src.pid[i]);
        self.rank.push(src.rank[i]);
    }

    fn push(&mut self, row: &ChangeRef<'_>, kind: &str, p: RowParts<'_>) {
        let f = row.frame;
        self.seq.push(row.seq);
        self.time_ns.push(row.time_ns);
        self.tag.push(Some(row.tag));
        self.variable.push(row.variable);
        self.kind.push(Some(kind));
        self.file.push(f.map(|f| &*f.file));
        self.line.push(f.map(|f| f.line));
        self.function.push(f.map(|f| &*f.function));
        self.thread.push(row.thread);
        self.thread_name.push(row.thread_name);
        self.address.push(p.address);
        self.offset.push(p.offset);
        self.bytes_changed.push(p.bytes_changed);
        self.ranges.push(p.ranges);
        self.index.push(p.index);
        self.old.push(p.old);
        self.new.push(p.new);
        self.old_value.push(p.values.0);
        self.new_value.push(p.values.1);
        self.key.push(p.object.0);
        self.old_repr.push(p.object.1);
        self.new_repr.push(p.object.2);
        self.op.push(row.op);
        self.wall_time_ns.push(self.start_ns + row.time_ns);
        self.pid.push(self.src_pid);
        self.rank.push(self.src_rank);
    }

    fn add(&mut self, row: &ChangeRef<'_>, granularity: Granularity) {
        match row.what {
            WhatRef::Object { kind, key, old, new } => self.push(
                row,
                kind.name(),
                RowParts {
                    object: (key, old, new),
                    ..RowParts::NONE
                },
            ),
            WhatRef::Bytes { ranges, .. } => {
                let region = row.region;
                let base = region.map(|r| r.address).unwrap_or(0);
                let dtype = region.and_then(|r| r.dtype.as_deref());
                let (Granularity::Element, Some(region), Some(dtype)) = (granularity, region, dtype) else {
                    let first = ranges.first();
                    let off = first.as_ref().map_or(0, |r| r.offset);
                    self.push(
                        row,
                        "bytes",
                        RowParts {
                            address: Some(base + off),
                            offset: Some(off),
                            bytes_changed: ranges.bytes_changed(),
                            ranges: ranges.len() as u32,
                            old: Some(first.as_ref().map_or(&[][..], |r| r.old)),
                            new: Some(first.as_ref().map_or(&[][..], |r| r.new)),
                            ..RowParts::NONE
                        },
                    );
                    return;
                };
                let size = region.itemsize.max(1) as usize;
                let parsed = memwatch_format::dtype::Dtype::parse(dtype);
                for r in ranges {
                    for (k, (o, n)) in r.old.chunks_exact(size).zip(r.new.chunks_exact(size)).enumerate() {
                        if o == n {
                            continue;
                        }
                        let at = r.offset + (k * size) as u64;
                        self.push(
                            row,
                            "bytes",
                            RowParts {
                                address: Some(base + at),
                                offset: Some(at),
                                bytes_changed: size as u64,
                                ranges: 1,
                                index: element_index(region, at),
                                old: Some(o),
                                new: Some(n),
                                values: (parsed_element_f64(parsed, o), parsed_element_f64(parsed, n)),
                                object: (None, None, None),
                            },
                        );
                    }
                }
            }
        }
    }

    /// A nullable column, built directly when every row is null (element
    /// and object columns of a change export).
    fn opt_column<T>(name: &str, v: &[Option<T>], dtype: DataType, make: impl FnOnce() -> Column) -> Column {
        if v.iter().all(Option::is_none) {
            Column::full_null(name.into(), v.len(), &dtype)
        } else {
            make()
        }
    }

    fn frame(&self) -> PolarsResult<DataFrame> {
        let cols: Vec<Column> = vec![
            UInt64Chunked::from_slice("seq".into(), &self.seq).into_column(),
            UInt64Chunked::from_slice("time_ns".into(), &self.time_ns).into_column(),
            UInt64Chunked::from_slice("wall_time_ns".into(), &self.wall_time_ns).into_column(),
            self.tag.column("tag"),
            self.variable.column("variable"),
            self.kind.column("kind"),
            self.file.column("file"),
            Self::opt_column("line", &self.line, DataType::UInt32, || {
                Column::new("line".into(), &self.line)
            }),
            self.function.column("function"),
            UInt64Chunked::from_slice("thread".into(), &self.thread).into_column(),
            self.thread_name.column("thread_name"),
            Self::opt_column("address", &self.address, DataType::UInt64, || {
                Column::new("address".into(), &self.address)
            }),
            Self::opt_column("offset", &self.offset, DataType::UInt64, || {
                Column::new("offset".into(), &self.offset)
            }),
            UInt64Chunked::from_slice("bytes_changed".into(), &self.bytes_changed).into_column(),
            UInt32Chunked::from_slice("ranges".into(), &self.ranges).into_column(),
            Self::opt_column("index", &self.index, DataType::String, || {
                Column::new("index".into(), &self.index)
            }),
            self.old.column("old"),
            self.new.column("new"),
            Self::opt_column("old_value", &self.old_value, DataType::Float64, || {
                Column::new("old_value".into(), &self.old_value)
            }),
            Self::opt_column("new_value", &self.new_value, DataType::Float64, || {
                Column::new("new_value".into(), &self.new_value)
            }),
            self.key.column("key"),
            self.old_repr.column("old_repr"),
            self.new_repr.column("new_repr"),
            self.op.column("op"),
        ];
        let mut cols = cols;
        if !self.no_pid {
            cols.push(UInt32Chunked::from_slice("pid".into(), &self.pid).into_column());
        }
        cols.push(Self::opt_column("rank", &self.rank, DataType::UInt32, || {
            Column::new("rank".into(), &self.rank)
        }));
        DataFrame::new_infer_height(cols)
    }
}

/// `3` or `1,2` for the element holding byte `at` of the region.
fn element_index(region: &crate::RegionInfo, at: u64) -> Option<String> {
    let idx = index_at(region, at)?;
    Some(idx.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
}

/// The index of the element of `region` whose bytes start at byte `at`
/// of it (`[1, 2]` in a 2-D region); `None` when no element starts there.
///
/// ```
/// use memwatch_analyzer::{index_at, RegionInfo};
/// let region = RegionInfo {
///     region: 1, tag: "w".into(), variable: None, address: 0, len: 64,
///     dtype: Some("<f4".into()), itemsize: 4, shape: vec![4, 4], strides: vec![],
///     origin: 0, watched_seq: 1, unwatched_seq: None,
/// };
/// assert_eq!(index_at(&region, 24), Some(vec![1, 2]));
/// ```
pub fn index_at(region: &crate::RegionInfo, at: u64) -> Option<Vec<u64>> {
    let itemsize = u64::from(region.itemsize.max(1));
    let shape = shape_of(region);
    if region.strides.is_empty() {
        // Contiguous: a division.
        let mut flat = at.checked_sub(region.origin)? / itemsize;
        let mut idx = vec![0u64; shape.len()];
        for d in (0..shape.len()).rev() {
            let n = shape[d].max(1);
            idx[d] = flat % n;
            flat /= n;
        }
        return Some(idx);
    }
    // Strided: the element whose bytes start there.
    let found = c_order(&shape).find(|idx| element_bytes(region, idx).is_ok_and(|(a, _)| a == at));
    found
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A CSV cell, quoted when it must be.
pub fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Column names, in order (a partitioned export's files leave out `pid`).
pub const COLUMNS: [&str; 26] = [
    "seq",
    "time_ns",
    "wall_time_ns",
    "tag",
    "variable",
    "kind",
    "file",
    "line",
    "function",
    "thread",
    "thread_name",
    "address",
    "offset",
    "bytes_changed",
    "ranges",
    "index",
    "old",
    "new",
    "old_value",
    "new_value",
    "key",
    "old_repr",
    "new_repr",
    "op",
    "pid",
    "rank",
];

impl Columns {
    /// Cells of row `i` as text (`None` for null); bytes as hex.
    fn cells(&self, i: usize) -> [Option<String>; 26] {
        let s = |c: &StrCol| c.get(i).map(String::from);
        let n = |x: Option<u64>| x.map(|v| v.to_string());
        [
            Some(self.seq[i].to_string()),
            Some(self.time_ns[i].to_string()),
            Some(self.wall_time_ns[i].to_string()),
            s(&self.tag),
            s(&self.variable),
            s(&self.kind),
            s(&self.file),
            self.line[i].map(|v| v.to_string()),
            s(&self.function),
            Some(self.thread[i].to_string()),
            s(&self.thread_name),
            n(self.address[i]),
            n(self.offset[i]),
            Some(self.bytes_changed[i].to_string()),
            Some(self.ranges[i].to_string()),
            self.index[i].clone(),
            self.old.get(i).map(hex),
            self.new.get(i).map(hex),
            self.old_value[i].map(|v| v.to_string()),
            self.new_value[i].map(|v| v.to_string()),
            s(&self.key),
            s(&self.old_repr),
            s(&self.new_repr),
            s(&self.op),
            Some(self.pid[i].to_string()),
            self.rank[i].map(|r| r.to_string()),
        ]
    }
}

/// Rows per batch: a Parquet row group, and the most rows an export holds
/// in memory at once (per process, in an export of a run).
const BATCH_ROWS: usize = 256 * 1024;

/// One process's trace in an export: its reader, pid and rank.
#[derive(Clone, Copy)]
pub struct ExportSource<'a> {
    pub reader: &'a TraceReader,
    pub pid: u32,
    pub rank: Option<u32>,
}

impl<'a> ExportSource<'a> {
    /// The trace as its own header describes its process.
    pub fn of(reader: &'a TraceReader) -> ExportSource<'a> {
        let meta = &reader.header().meta;
        ExportSource {
            reader,
            pid: meta.pid,
            rank: meta
                .property(memwatch_format::run::PROP_RANK)
                .and_then(|r| r.parse().ok()),
        }
    }
}

/// Exports the changes matching `filter` to `path`; returns the number of
/// rows. `progress(done, total)` is called as chunks are read.
///
/// Rows are built a batch at a time. For Parquet, a second thread turns
/// each full batch into a row group (a `DataFrame`, encoded, compressed and
/// written) while the scan fills the next. The file is written under a
/// temporary name next to `path` and renamed at the end, so a failed export
/// leaves no partial file (and an earlier file at `path` untouched); a
/// device or pipe (`/dev/stdout`) is written directly.
pub fn export(
    reader: &TraceReader,
    path: &Path,
    format: ExportFormat,
    granularity: Granularity,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<u64> {
    export_run(
        &[ExportSource::of(reader)],
        path,
        format,
        granularity,
        filter,
        progress,
    )
}

/// [`export`] of the changes of several processes (the traces of a run),
/// merged by wall-clock time: each process's trace is scanned on a thread
/// of its own and the batches are merged row by row. With one source this
/// is [`export`]'s single scan. A tag in `filter` that only some processes
/// watched keeps theirs; one that none did is [`Error::UnknownTag`].
pub fn export_run(
    sources: &[ExportSource<'_>],
    path: &Path,
    format: ExportFormat,
    granularity: Granularity,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<u64> {
    let io = |source: std::io::Error| {
        Error::Format(memwatch_format::Error::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    // A device or a pipe (`-o /dev/stdout`) is written as it is.
    let direct = std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir());
    let tmp = if direct {
        path.to_path_buf()
    } else {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".partial-{}", std::process::id()));
        path.with_file_name(name)
    };
    let file = File::create(&tmp).map_err(io)?;
    let written = match format {
        ExportFormat::Parquet => export_parquet(sources, file, granularity, filter, progress, false),
        ExportFormat::Csv | ExportFormat::Jsonl => {
            export_text(sources, file, format, granularity, filter, progress, &io)
        }
    };
    let done = match written {
        Ok(rows) if direct => return Ok(rows),
        Ok(rows) => std::fs::rename(&tmp, path).map(|()| rows).map_err(io),
        Err(e) if direct => return Err(e),
        Err(e) => Err(e),
    };
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// Exports each process of `sources` to its own Parquet file of a
/// hive-partitioned dataset in directory `dir`: `dir/pid=PID/part-0.parquet`,
/// without a pid column (the path holds it; DuckDB's
/// `read_parquet('dir/**/*.parquet', hive_partitioning=true)` and
/// `pyarrow.dataset.dataset(dir, partitioning="hive")` give it back).
/// Returns each process's pid and rows, a process with no matching row
/// included (its file has the schema and no rows, so that the dataset
/// lists every process).
///
/// The dataset is built in `dir.partial-PID` and moved into place at the
/// end: a failed export leaves nothing. An existing `dir` is replaced when
/// it is empty or holds only `pid=N` directories (an earlier export);
/// anything else in it is refused, untouched.
pub fn export_partitioned(
    sources: &[ExportSource<'_>],
    dir: &Path,
    granularity: Granularity,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<(u32, u64)>> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| Error::Format(memwatch_format::Error::Io { path, source })
    };
    if dir.is_file() {
        return Err(Error::Export(format!(
            "{}: is a file; --partition-by writes a directory of Parquet files: name a directory",
            dir.display()
        )));
    }
    if dir.is_dir() {
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let name = e.file_name();
            let ok = name
                .to_str()
                .and_then(|n| n.strip_prefix("pid="))
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                && e.path().is_dir();
            if !ok {
                return Err(Error::Export(format!(
                    "{}: holds {:?}, which an earlier export did not write; name an empty or new directory",
                    dir.display(),
                    name
                )));
            }
        }
    }
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{}", std::process::id()));
    let tmp = dir.with_file_name(name);
    let _ = std::fs::remove_dir_all(&tmp);
    let built = (|| -> Result<Vec<(u32, u64)>> {
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let total: usize = sources.iter().map(|s| s.reader.chunks().len()).sum();
        let mut before = 0usize;
        let mut out = Vec::with_capacity(sources.len());
        let mut missing: Vec<(String, Vec<String>)> = Vec::new();
        for src in sources {
            let part = tmp.join(format!("pid={}", src.pid));
            std::fs::create_dir_all(&part).map_err(io(&part))?;
            let path = part.join("part-0.parquet");
            let file = File::create(&path).map_err(io(&path))?;
            let mut each = |done: usize, _: usize| progress(before + done, total);
            let rows = match export_parquet(&[*src], file, granularity, filter, &mut each, true) {
                // A tag this process did not watch: no rows of it, and the
                // file still has the schema.
                Err(Error::UnknownTag { tag, known }) if sources.len() > 1 => {
                    missing.push((tag, known));
                    let file = File::create(&path).map_err(io(&path))?;
                    let none = Filter {
                        seq: Some((1, 0)),
                        ..Filter::default()
                    };
                    export_parquet(&[*src], file, granularity, &none, &mut |_, _| {}, true)?;
                    0
                }
                r => r?,
            };
            before += src.reader.chunks().len();
            out.push((src.pid, rows));
        }
        if missing.len() == sources.len() && sources.len() > 1 {
            // No process of the run watched the tag.
            let tag = missing[0].0.clone();
            let mut known: Vec<String> = missing.into_iter().flat_map(|(_, k)| k).collect();
            known.sort();
            known.dedup();
            return Err(Error::UnknownTag { tag, known });
        }
        if dir.is_dir() {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
        Ok(out)
    })();
    if built.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    built
}

/// zstd at level 1. Measured on 2M changes (bench/analyzer_throughput.rs,
/// this 2-core machine): polars' default zstd level spends 0.62 s writing
/// them, level 1 0.52 s for a file no larger (24.6 MB), LZ4 0.41 s for
/// twice the size (50.6 MB).
fn parquet_compression() -> ParquetCompression {
    ParquetCompression::Zstd(polars::polars_utils::compression::ZstdLevel::try_new(1).ok())
}

fn polars_error(e: PolarsError) -> Error {
    Error::Export(e.to_string())
}

/// Scans `sources` into batches of rows, handing each full batch (and
/// the last, if not empty) to `emit`, which returns it emptied or not at
/// all; `fresh` makes a new empty batch. Rows of several sources are
/// merged by `wall_time_ns` (a stable merge: a process's rows keep their
/// seq order, and ties go to the earlier source). Returns the rows.
fn for_each_batch(
    sources: &[ExportSource<'_>],
    filter: &Filter,
    granularity: Granularity,
    progress: &mut dyn FnMut(usize, usize),
    no_pid: bool,
    emit: &mut dyn FnMut(Columns) -> std::result::Result<Option<Columns>, ()>,
) -> Result<u64> {
    let mut rows = 0u64;
    if let [src] = sources {
        let mut cols = Columns::new(src, no_pid);
        let mut stopped = false;
        let scanned = for_each_change_progress(src.reader, filter, progress, |row| {
            cols.add(row, granularity);
            if cols.len() >= BATCH_ROWS {
                rows += cols.len() as u64;
                let next = cols.like();
                match emit(std::mem::replace(&mut cols, next)) {
                    Ok(Some(back)) => cols = back,
                    Ok(None) => {}
                    Err(()) => {
                        stopped = true;
                        return ControlFlow::Break(());
                    }
                }
            }
            ControlFlow::Continue(())
        });
        scanned?;
        if !stopped && cols.len() > 0 {
            rows += cols.len() as u64;
            let _ = emit(cols);
        }
        return Ok(rows);
    }
    let total: usize = sources.iter().map(|s| s.reader.chunks().len()).sum();
    let done: Vec<std::sync::atomic::AtomicUsize> = sources
        .iter()
        .map(|_| std::sync::atomic::AtomicUsize::new(0))
        .collect();
    std::thread::scope(|s| -> Result<u64> {
        let mut rxs = Vec::with_capacity(sources.len());
        for (k, src) in sources.iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Columns>>(1);
            let done = &done[k];
            s.spawn(move || {
                let mut cols = Columns::new(src, no_pid);
                let mut progress = |d: usize, _: usize| done.store(d, std::sync::atomic::Ordering::Relaxed);
                let scanned = for_each_change_progress(src.reader, filter, &mut progress, |row| {
                    cols.add(row, granularity);
                    if cols.len() >= BATCH_ROWS {
                        let next = cols.like();
                        if tx.send(Ok(std::mem::replace(&mut cols, next))).is_err() {
                            return ControlFlow::Break(());
                        }
                    }
                    ControlFlow::Continue(())
                });
                let _ = match scanned {
                    Ok(_) if cols.len() > 0 => tx.send(Ok(cols)),
                    Ok(_) => Ok(()),
                    Err(e) => tx.send(Err(e)),
                };
            });
            rxs.push(rx);
        }
        // Each source's current batch and the row of it next in line; a
        // source whose trace never had the filter's tag has none.
        let mut missing: Vec<Error> = Vec::new();
        let mut next_of = |k: usize, missing: &mut Vec<Error>| -> Result<Option<(Columns, usize)>> {
            progress(
                done.iter()
                    .map(|d| d.load(std::sync::atomic::Ordering::Relaxed))
                    .sum(),
                total,
            );
            match rxs[k].recv() {
                Ok(Ok(c)) => Ok(Some((c, 0))),
                Ok(Err(e @ Error::UnknownTag { .. })) => {
                    missing.push(e);
                    Ok(None)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Ok(None),
            }
        };
        let mut heads: Vec<Option<(Columns, usize)>> = Vec::with_capacity(sources.len());
        for k in 0..sources.len() {
            heads.push(next_of(k, &mut missing)?);
        }
        let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize)>> = heads
            .iter()
            .enumerate()
            .filter_map(|(k, h)| {
                h.as_ref()
                    .map(|(c, i)| std::cmp::Reverse((c.wall_time_ns[*i], k)))
            })
            .collect();
        let mut out = Columns::new(&sources[0], no_pid);
        while let Some(std::cmp::Reverse((_, k))) = heap.pop() {
            let (cols, i) = heads[k].as_mut().expect("a source in the heap has a batch");
            out.push_from(cols, *i);
            *i += 1;
            if *i == cols.len() {
                heads[k] = next_of(k, &mut missing)?;
            }
            if let Some((c, i)) = &heads[k] {
                heap.push(std::cmp::Reverse((c.wall_time_ns[*i], k)));
            }
            if out.len() >= BATCH_ROWS {
                rows += out.len() as u64;
                let next = out.like();
                match emit(std::mem::replace(&mut out, next)) {
                    Ok(Some(back)) => out = back,
                    Ok(None) => {}
                    // The sink failed: dropping the receivers stops the scans.
                    Err(()) => return Ok(rows),
                }
            }
        }
        if missing.len() == sources.len() {
            // No process of the run watched the tag: say so, with every
            // process's tags.
            let mut known: Vec<String> = Vec::new();
            let mut tag = String::new();
            for e in missing {
                if let Error::UnknownTag { tag: t, known: k } = e {
                    tag = t;
                    known.extend(k);
                }
            }
            known.sort();
            known.dedup();
            return Err(Error::UnknownTag { tag, known });
        }
        if out.len() > 0 {
            rows += out.len() as u64;
            let _ = emit(out);
        }
        Ok(rows)
    })
}

fn export_parquet(
    sources: &[ExportSource<'_>],
    file: File,
    granularity: Granularity,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
    no_pid: bool,
) -> Result<u64> {
    let schema = Columns::new(&sources[0], no_pid)
        .frame()
        .map_err(polars_error)?
        .schema()
        .as_ref()
        .clone();
    std::thread::scope(|s| {
        // One batch waits while the writer works on another; the writer
        // hands each batch's columns back, emptied, to be filled again.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Columns>(1);
        let (back_tx, back_rx) = std::sync::mpsc::sync_channel::<Columns>(2);
        let writer = s.spawn(move || -> Result<()> {
            let mut w = ParquetWriter::new(BufWriter::with_capacity(1 << 20, file))
                .with_compression(parquet_compression())
                .batched(&schema)
                .map_err(polars_error)?;
            for mut cols in rx {
                let mut df = cols.frame().map_err(polars_error)?;
                cols.clear();
                let _ = back_tx.try_send(cols);
                df.align_chunks_par();
                w.write_batch(&df).map_err(polars_error)?;
            }
            w.finish().map_err(polars_error)?;
            Ok(())
        });
        let scanned = for_each_batch(sources, filter, granularity, progress, no_pid, &mut |full| {
            // The writer failed: its error is returned below.
            tx.send(full).map_err(|_| ())?;
            Ok(back_rx.try_recv().ok())
        });
        drop(tx);
        let written = match writer.join() {
            Ok(w) => w,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let rows = scanned?;
        written?;
        Ok(rows)
    })
}

fn export_text(
    sources: &[ExportSource<'_>],
    file: File,
    format: ExportFormat,
    granularity: Granularity,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
    io: &dyn Fn(std::io::Error) -> Error,
) -> Result<u64> {
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut failed: Option<std::io::Error> = None;
    if format == ExportFormat::Csv {
        writeln!(w, "{}", COLUMNS.join(",")).map_err(io)?;
    }
    let rows =
        for_each_batch(
            sources,
            filter,
            granularity,
            progress,
            false,
            &mut |mut cols| match write_text_rows(&cols, format, &mut w) {
                Ok(()) => {
                    cols.clear();
                    Ok(Some(cols))
                }
                Err(e) => {
                    failed = Some(e);
                    Err(())
                }
            },
        );
    if let Some(e) = failed {
        return Err(io(e));
    }
    let rows = rows?;
    w.flush().map_err(io)?;
    Ok(rows)
}

/// Writes the batch's rows as CSV rows or JSON lines.
fn write_text_rows(cols: &Columns, format: ExportFormat, w: &mut impl Write) -> std::io::Result<()> {
    let numeric = [0, 1, 2, 7, 9, 11, 12, 13, 14, 18, 19, 24, 25];
    for i in 0..cols.len() {
        let cells = cols.cells(i);
        if format == ExportFormat::Csv {
            let cells: Vec<String> = cells
                .iter()
                .map(|c| c.as_deref().map(csv_cell).unwrap_or_default())
                .collect();
            writeln!(w, "{}", cells.join(","))?;
            continue;
        }
        let fields: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let v = match c {
                    None => "null".to_string(),
                    Some(v) if numeric.contains(&k) && v.parse::<f64>().is_ok_and(f64::is_finite) => {
                        v.clone()
                    }
                    Some(v) => json_str(v),
                };
                format!("{}:{v}", json_str(COLUMNS[k]))
            })
            .collect();
        writeln!(w, "{{{}}}", fields.join(","))?;
    }
    Ok(())
}
