//! Exporting changes as a table: Parquet (through polars), CSV or JSON
//! lines, one row per change or per changed element. The schema is
//! `docs/export.md`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::ControlFlow;
use std::path::Path;

use memwatch_format::TraceReader;
use polars::prelude::*;

use crate::error::{Error, Result};
use crate::query::{for_each_change_progress, ChangeRow, Filter, What};
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

/// The columns, in order, as built up row by row.
#[derive(Default)]
struct Columns {
    seq: Vec<u64>,
    time_ns: Vec<u64>,
    wall_time_ns: Vec<u64>,
    tag: Vec<String>,
    variable: Vec<Option<String>>,
    kind: Vec<String>,
    file: Vec<Option<String>>,
    line: Vec<Option<u32>>,
    function: Vec<Option<String>>,
    thread: Vec<u64>,
    thread_name: Vec<Option<String>>,
    address: Vec<Option<u64>>,
    offset: Vec<Option<u64>>,
    bytes_changed: Vec<u64>,
    ranges: Vec<u32>,
    index: Vec<Option<String>>,
    old: Vec<Option<Vec<u8>>>,
    new: Vec<Option<Vec<u8>>>,
    old_value: Vec<Option<f64>>,
    new_value: Vec<Option<f64>>,
    key: Vec<Option<String>>,
    old_repr: Vec<Option<String>>,
    new_repr: Vec<Option<String>>,
}

/// A numeric element as f64 (ints beyond 2^53 lose precision).
pub fn element_f64(dtype: &str, b: &[u8]) -> Option<f64> {
    let (order, rest) = dtype.split_at(1);
    let mut le = b.to_vec();
    if order == ">" {
        le.reverse();
    }
    let n = le.len();
    let mut a = [0u8; 8];
    a[..n.min(8)].copy_from_slice(&le[..n.min(8)]);
    Some(match (rest.chars().next()?, n) {
        ('f', 4) => f64::from(f32::from_le_bytes(le[..4].try_into().ok()?)),
        ('f', 8) => f64::from_le_bytes(a),
        ('i', 1..=8) => {
            let shift = 64 - 8 * n as u32;
            ((i64::from_le_bytes(a) << shift) >> shift) as f64
        }
        ('u', 1..=8) => u64::from_le_bytes(a) as f64,
        ('b', 1) => f64::from(u8::from(le[0] != 0)),
        _ => return None,
    })
}

impl Columns {
    fn len(&self) -> usize {
        self.seq.len()
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        row: &ChangeRow,
        start_ns: u64,
        kind: &str,
        address: Option<u64>,
        offset: Option<u64>,
        bytes_changed: u64,
        ranges: u32,
        index: Option<String>,
        old: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
        values: (Option<f64>, Option<f64>),
        object: (Option<String>, Option<String>, Option<String>),
    ) {
        let f = row.frame.as_ref();
        self.seq.push(row.seq);
        self.time_ns.push(row.time_ns);
        self.wall_time_ns.push(start_ns + row.time_ns);
        self.tag.push(row.tag.to_string());
        self.variable.push(row.variable.as_deref().map(String::from));
        self.kind.push(kind.to_string());
        self.file.push(f.map(|f| f.file.to_string()));
        self.line.push(f.map(|f| f.line));
        self.function.push(f.map(|f| f.function.to_string()));
        self.thread.push(row.thread);
        self.thread_name
            .push(row.thread_name.as_deref().map(String::from));
        self.address.push(address);
        self.offset.push(offset);
        self.bytes_changed.push(bytes_changed);
        self.ranges.push(ranges);
        self.index.push(index);
        self.old.push(old);
        self.new.push(new);
        self.old_value.push(values.0);
        self.new_value.push(values.1);
        self.key.push(object.0);
        self.old_repr.push(object.1);
        self.new_repr.push(object.2);
    }

    fn add(&mut self, row: &ChangeRow, start_ns: u64, granularity: Granularity) {
        match &row.what {
            What::Object { kind, key, old, new } => self.push(
                row,
                start_ns,
                kind.name(),
                None,
                None,
                0,
                0,
                None,
                None,
                None,
                (None, None),
                (key.clone(), old.clone(), new.clone()),
            ),
            What::Bytes { ranges, .. } => {
                let region = row.region.as_ref();
                let base = region.map(|r| r.address).unwrap_or(0);
                if granularity == Granularity::Change || region.and_then(|r| r.dtype.as_ref()).is_none() {
                    let (off, old, new) = &ranges[0];
                    self.push(
                        row,
                        start_ns,
                        "bytes",
                        Some(base + off),
                        Some(*off),
                        row.bytes_changed(),
                        ranges.len() as u32,
                        None,
                        Some(old.clone()),
                        Some(new.clone()),
                        (None, None),
                        (None, None, None),
                    );
                    return;
                }
                let region = region.expect("checked above");
                let dtype = region.dtype.as_deref().unwrap_or("|u1");
                let size = region.itemsize.max(1) as usize;
                for (off, old, new) in ranges {
                    for k in 0..old.len() / size {
                        let (o, n) = (&old[k * size..(k + 1) * size], &new[k * size..(k + 1) * size]);
                        if o == n {
                            continue;
                        }
                        let at = off + (k * size) as u64;
                        let index = element_index(region, at);
                        self.push(
                            row,
                            start_ns,
                            "bytes",
                            Some(base + at),
                            Some(at),
                            size as u64,
                            1,
                            index,
                            Some(o.to_vec()),
                            Some(n.to_vec()),
                            (element_f64(dtype, o), element_f64(dtype, n)),
                            (None, None, None),
                        );
                    }
                }
            }
        }
    }

    fn frame(self) -> PolarsResult<DataFrame> {
        let bin = |v: Vec<Option<Vec<u8>>>| -> Vec<Option<Vec<u8>>> { v };
        let cols: Vec<Column> = vec![
            Column::new("seq".into(), self.seq),
            Column::new("time_ns".into(), self.time_ns),
            Column::new("wall_time_ns".into(), self.wall_time_ns),
            Column::new("tag".into(), self.tag),
            Column::new("variable".into(), self.variable),
            Column::new("kind".into(), self.kind),
            Column::new("file".into(), self.file),
            Column::new("line".into(), self.line),
            Column::new("function".into(), self.function),
            Column::new("thread".into(), self.thread),
            Column::new("thread_name".into(), self.thread_name),
            Column::new("address".into(), self.address),
            Column::new("offset".into(), self.offset),
            Column::new("bytes_changed".into(), self.bytes_changed),
            Column::new("ranges".into(), self.ranges),
            Column::new("index".into(), self.index),
            Column::new("old".into(), bin(self.old)),
            Column::new("new".into(), bin(self.new)),
            Column::new("old_value".into(), self.old_value),
            Column::new("new_value".into(), self.new_value),
            Column::new("key".into(), self.key),
            Column::new("old_repr".into(), self.old_repr),
            Column::new("new_repr".into(), self.new_repr),
        ];
        DataFrame::new_infer_height(cols)
    }
}

/// `3` or `1,2` for the element holding byte `at` of the region.
fn element_index(region: &crate::RegionInfo, at: u64) -> Option<String> {
    let itemsize = u64::from(region.itemsize.max(1));
    let shape = shape_of(region);
    let text = |idx: &[u64]| idx.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    if region.strides.is_empty() {
        // Contiguous: a division.
        let mut flat = at.checked_sub(region.origin)? / itemsize;
        let mut idx = vec![0u64; shape.len()];
        for d in (0..shape.len()).rev() {
            let n = shape[d].max(1);
            idx[d] = flat % n;
            flat /= n;
        }
        return Some(text(&idx));
    }
    // Strided: the element whose bytes start there.
    let found = c_order(&shape).find(|idx| element_bytes(region, idx).is_ok_and(|(a, _)| a == at));
    found.map(|idx| text(&idx))
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

/// Column names, in order.
pub const COLUMNS: [&str; 23] = [
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
];

impl Columns {
    /// Cells of row `i` as text (`None` for null); bytes as hex.
    fn cells(&self, i: usize) -> [Option<String>; 23] {
        let s = |x: &Option<String>| x.clone();
        let n = |x: Option<u64>| x.map(|v| v.to_string());
        [
            Some(self.seq[i].to_string()),
            Some(self.time_ns[i].to_string()),
            Some(self.wall_time_ns[i].to_string()),
            Some(self.tag[i].clone()),
            s(&self.variable[i]),
            Some(self.kind[i].clone()),
            s(&self.file[i]),
            self.line[i].map(|v| v.to_string()),
            s(&self.function[i]),
            Some(self.thread[i].to_string()),
            s(&self.thread_name[i]),
            n(self.address[i]),
            n(self.offset[i]),
            Some(self.bytes_changed[i].to_string()),
            Some(self.ranges[i].to_string()),
            s(&self.index[i]),
            self.old[i].as_deref().map(hex),
            self.new[i].as_deref().map(hex),
            self.old_value[i].map(|v| v.to_string()),
            self.new_value[i].map(|v| v.to_string()),
            s(&self.key[i]),
            s(&self.old_repr[i]),
            s(&self.new_repr[i]),
        ]
    }
}

/// Exports the changes matching `filter` to `path`; returns the number of
/// rows. `progress(done, total)` is called as chunks are read.
pub fn export(
    reader: &TraceReader,
    path: &Path,
    format: ExportFormat,
    granularity: Granularity,
    filter: &Filter,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<u64> {
    let start_ns = reader.header().meta.start_time_ns;
    let mut cols = Columns::default();
    for_each_change_progress(reader, filter, progress, |row| {
        cols.add(row, start_ns, granularity);
        ControlFlow::Continue(())
    })?;
    let rows = cols.len() as u64;
    let io = |source: std::io::Error| {
        Error::Format(memwatch_format::Error::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let file = File::create(path).map_err(io)?;
    match format {
        ExportFormat::Parquet => {
            let mut df = cols.frame().map_err(|e| Error::Export(e.to_string()))?;
            ParquetWriter::new(file)
                .finish(&mut df)
                .map_err(|e| Error::Export(e.to_string()))?;
        }
        ExportFormat::Csv => {
            let mut w = BufWriter::new(file);
            writeln!(w, "{}", COLUMNS.join(",")).map_err(io)?;
            for i in 0..cols.len() {
                let cells: Vec<String> = cols
                    .cells(i)
                    .iter()
                    .map(|c| c.as_deref().map(csv_cell).unwrap_or_default())
                    .collect();
                writeln!(w, "{}", cells.join(",")).map_err(io)?;
            }
            w.flush().map_err(io)?;
        }
        ExportFormat::Jsonl => {
            let mut w = BufWriter::new(file);
            let numeric = [0, 1, 2, 7, 9, 11, 12, 13, 14, 18, 19];
            for i in 0..cols.len() {
                let fields: Vec<String> = cols
                    .cells(i)
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
                writeln!(w, "{{{}}}", fields.join(",")).map_err(io)?;
            }
            w.flush().map_err(io)?;
        }
    }
    Ok(rows)
}
