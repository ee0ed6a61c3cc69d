//! `memwatch.open_trace`: reading a recorded trace from Python, with the
//! same `memwatch.Change` objects the live recorder produces.
//!
//! A trace is read with the other traces of its run, if any (the processes
//! `memwatch record` followed: forks, multiprocessing, subprocesses,
//! torchrun's ranks; see [`mod@memwatch_cli::run`]): `Trace.processes` lists
//! them, `changes()` merges theirs by time, and `state()`/`blame()` read
//! the process that watched the tag. A trace of one process reads as it
//! always did.
//!
//! No shared state: each `Trace` owns its readers. Nothing here runs in
//! signal context.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use memwatch_analyzer::{self as analyzer, ChangeRow, Filter, RegionInfo, What};
use memwatch_cli::run::Proc;
use memwatch_cli::{parse_point, Point};
use memwatch_format::dtype::{Dtype, FloatFormat, Kind, Value};
use memwatch_format::Tail;
use pyo3::exceptions::{PyKeyError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::mem::engine::{Bytes, Layout};
use crate::model::change::{Change, FrameRef, ObjectInfo};
use crate::model::errors::{trace_error, MemwatchError};

fn analyzer_error(e: analyzer::Error) -> PyErr {
    match e {
        analyzer::Error::Format(f) => trace_error(f),
        e @ analyzer::Error::UnknownTag { .. } => PyKeyError::new_err(e.to_string()),
        e @ (analyzer::Error::SeqOutOfRange { .. }
        | analyzer::Error::TimeOutOfRange { .. }
        | analyzer::Error::OutOfRegion { .. }) => PyValueError::new_err(e.to_string()),
        e => MemwatchError::new_err(e.to_string()),
    }
}

/// An error of [`mod@memwatch_cli::run`] (opening a run's traces, a time
/// before a process started): the Python error of the format's or the
/// analyzer's error inside, else a `ValueError`.
fn run_error(e: anyhow::Error) -> PyErr {
    let e = match e.downcast::<memwatch_format::Error>() {
        Ok(f) => return trace_error(f),
        Err(e) => e,
    };
    match e.downcast::<analyzer::Error>() {
        Ok(a) => analyzer_error(a),
        Err(e) => PyValueError::new_err(e.to_string()),
    }
}

/// The pids a `pid=` names: an int or an iterable of ints (empty: all).
fn pids_of(pid: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<u32>> {
    let Some(pid) = pid else {
        return Ok(Vec::new());
    };
    if let Ok(one) = pid.extract::<u32>() {
        return Ok(vec![one]);
    }
    if !pid.is_instance_of::<pyo3::types::PyString>() {
        if let Ok(many) = pid.extract::<Vec<u32>>() {
            return Ok(many);
        }
    }
    Err(PyTypeError::new_err(format!(
        "pid= takes a process id (int) or a list of them, not {}",
        pid.repr()?
    )))
}

/// A tag filter's error when no process read has the tag: `errs` holds
/// each one's [`analyzer::Error::UnknownTag`]. A run's processes watch
/// different things (torchrun's launcher, a Pool's parent, watch none), so
/// a process without the tag is only skipped while another has it.
fn missing_tag(mut errs: Vec<analyzer::Error>) -> PyErr {
    if errs.len() == 1 {
        return analyzer_error(errs.remove(0));
    }
    let mut tag = String::new();
    let mut known: Vec<String> = Vec::new();
    for e in errs {
        if let analyzer::Error::UnknownTag { tag: t, known: k } = e {
            tag = t;
            known.extend(k);
        }
    }
    known.sort();
    known.dedup();
    let known = if known.is_empty() {
        "none".to_string()
    } else {
        known.join(", ")
    };
    PyKeyError::new_err(format!(
        "no process of this run has a tag {tag:?}; their tags are: {known}"
    ))
}

/// `4242, 4243 (rank 1)`: the processes `procs`, for an error.
fn labels<'a>(procs: impl IntoIterator<Item = &'a Proc>) -> String {
    procs.into_iter().map(Proc::label).collect::<Vec<_>>().join(", ")
}

/// A point of `Trace.state`/`blame`'s `at=`: a seq (an int), a time since
/// the trace started (a `datetime.timedelta`, or text with a unit as the
/// command line takes it: `"2.5s"`, `"150ms"`), or text holding a seq.
fn point_of(at: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Point>> {
    let Some(at) = at else {
        return Ok(None);
    };
    if at.is_instance_of::<pyo3::types::PyInt>() {
        return at
            .extract::<u64>()
            .map(|seq| Some(Point::Seq(seq)))
            .map_err(|_| PyValueError::new_err(format!("at={at} is not a seq: seqs are integers from 1")));
    }
    if let Ok(text) = at.extract::<String>() {
        return parse_point(&text).map(Some).map_err(PyValueError::new_err);
    }
    let timedelta = at.py().import("datetime")?.getattr("timedelta")?;
    if at.is_instance(&timedelta)? {
        let (days, secs, micros): (i64, i64, i64) = (
            at.getattr("days")?.extract()?,
            at.getattr("seconds")?.extract()?,
            at.getattr("microseconds")?.extract()?,
        );
        let us = (days * 86_400 + secs) as i128 * 1_000_000 + micros as i128;
        return u64::try_from(us * 1_000)
            .map(|ns| Some(Point::Time(ns)))
            .map_err(|_| {
                PyValueError::new_err(format!("at={at} is before the trace started: give a time >= 0"))
            });
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "at= takes a seq (int), a time since the trace started (datetime.timedelta, or text like \"2.5s\" or \"150ms\"), \
         not {}",
        at.get_type().name()?
    )))
}

fn layout_of(r: &RegionInfo) -> Layout {
    Layout {
        dtype: r.dtype.as_deref().map(String::from),
        itemsize: r.itemsize,
        shape: r.shape.clone(),
        strides: r.strides.clone(),
        origin: r.origin,
    }
}

/// One process of a run, as `Trace.processes` lists it.
#[pyclass(module = "memwatch", frozen, name = "Process", get_all)]
pub struct Process {
    /// Its pid.
    pid: u32,
    /// Its rank (`$RANK`, as torchrun sets it), if it had one.
    rank: Option<u32>,
    /// The pid of the process that started it; `None` for the run's root
    /// (the process `memwatch record` started).
    parent: Option<u32>,
    /// Its trace.
    path: PathBuf,
    /// Its command line.
    argv: Vec<String>,
    /// When its trace started, ns since the Unix epoch.
    start_time_ns: u64,
    /// How much later than the run's first process it started, in ns.
    start_offset_ns: u64,
    /// How its trace ends: `"closed"`, `"unclosed"` (the process was
    /// killed or ended by `os._exit`: read up to its last record, the
    /// journal's included) or `"truncated"`.
    tail: &'static str,
    /// What the reader says about an ending other than a clean close.
    note: Option<String>,
}

#[pymethods]
impl Process {
    fn __repr__(&self) -> String {
        let rank = self.rank.map(|r| format!(" rank={r}")).unwrap_or_default();
        let parent = self.parent.map(|p| format!(" parent={p}")).unwrap_or_default();
        format!(
            "<memwatch.Process pid={}{rank}{parent} {:?} {}>",
            self.pid, self.path, self.tail
        )
    }
}

/// A recorded trace, opened for reading: with the other traces of its
/// run, when it has some.
#[pyclass(module = "memwatch", frozen, name = "Trace")]
pub struct Trace {
    /// The processes read: the trace opened first, then the others of its
    /// run by rank and pid.
    procs: Vec<Proc>,
    /// The earliest start of `procs`: times count from it.
    base: u64,
    #[pyo3(get)]
    path: PathBuf,
}

impl Trace {
    fn change_object(p: &Proc, row: &ChangeRow) -> Option<Change> {
        let (region_start, ranges, layout, object) = match &row.what {
            What::Bytes { ranges, .. } => {
                let region = row.region.as_ref()?;
                let ranges = ranges
                    .iter()
                    .map(|(o, a, b)| (*o, Bytes::Owned(a.clone()), Bytes::Owned(b.clone())))
                    .collect();
                (region.address, ranges, layout_of(region), None)
            }
            What::Object { kind, key, old, new } => {
                let info = ObjectInfo {
                    kind: *kind,
                    key: key.clone(),
                    old: old.clone(),
                    new: new.clone(),
                };
                (0, Vec::new(), Layout::default(), Some(info))
            }
        };
        Some(Change {
            seq: row.seq,
            time_ns: p.start_ns + row.time_ns,
            pid: p.pid,
            rank: p.rank,
            tag: row.tag.as_ref().into(),
            variable: row.variable.as_deref().map(Arc::from),
            region_start,
            ranges,
            layout: Arc::new(layout),
            stack: row
                .stack
                .iter()
                .map(|f| FrameRef {
                    file: f.file.clone(),
                    line: f.line,
                    function: f.function.clone(),
                })
                .collect(),
            thread_id: row.thread,
            thread_name: row.thread_name.as_deref().unwrap_or("").into(),
            object,
            op: row.op.clone(),
        })
    }

    /// The processes `pids` names (every one when empty); a pid of none
    /// of them is a `ValueError` that lists them.
    fn selected(&self, pids: &[u32]) -> PyResult<Vec<&Proc>> {
        if let Some(bad) = pids.iter().find(|p| !self.procs.iter().any(|q| q.pid == **p)) {
            return Err(PyValueError::new_err(format!(
                "pid={bad}: no process of this run has that pid (its processes: {})",
                labels(&self.procs)
            )));
        }
        Ok(self
            .procs
            .iter()
            .filter(|p| pids.is_empty() || pids.contains(&p.pid))
            .collect())
    }

    /// The process whose region `tag` to read (`state`, `blame`): `pid`
    /// if given, else the one that watched the tag (the only one, in a
    /// trace of one process), as `memwatch state --pid` picks it
    /// ([`memwatch_cli::run::pick`]). No process with the tag is a
    /// `KeyError`; several (a fork's child keeps its parent's watches) a
    /// `ValueError` naming them.
    fn pick(&self, py: Python<'_>, pid: Option<u32>, tag: &str) -> PyResult<&Proc> {
        if let Some(pid) = pid {
            return Ok(self.selected(&[pid])?[0]);
        }
        if self.procs.len() == 1 {
            return Ok(&self.procs[0]);
        }
        let mut found = Vec::new();
        for p in &self.procs {
            if py
                .detach(|| analyzer::has_region(&p.reader, tag))
                .map_err(analyzer_error)?
            {
                found.push(p);
            }
        }
        match found.as_slice() {
            [one] => Ok(one),
            [] => Err(PyKeyError::new_err(format!(
                "no process of this run watched a region tagged {tag:?} (its processes: {}); \
                 Trace.tags lists every process's tags",
                labels(&self.procs)
            ))),
            several => Err(PyValueError::new_err(format!(
                "{tag:?} was watched in {} processes of this run ({}): name one with pid=",
                several.len(),
                labels(several.iter().copied())
            ))),
        }
    }

    /// The seq of `p`'s trace that `at=` names (a time counts from the
    /// run's start).
    fn seq_at(&self, py: Python<'_>, p: &Proc, at: Option<Point>) -> PyResult<Option<u64>> {
        py.detach(|| at.map(|a| p.seq_of(a, self.base)).transpose())
            .map_err(run_error)
    }
}

#[pymethods]
impl Trace {
    /// Every tag in the trace (in every process of its run), sorted.
    #[getter]
    fn tags(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let mut tags = Vec::new();
        for p in &self.procs {
            let syms = py
                .detach(|| {
                    analyzer::for_each_change(&p.reader, &Filter::default(), |_| ControlFlow::Continue(()))
                })
                .map_err(analyzer_error)?;
            tags.extend(syms.tags());
        }
        tags.sort();
        tags.dedup();
        Ok(tags)
    }

    /// The recorded process's metadata, and how the file ends: those of
    /// the trace opened (the run's root), not of the other processes
    /// (`processes` lists them).
    #[getter]
    fn meta<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        trace_info_dict(py, &self.procs[0].reader)
    }

    /// Every process of the run read (one for a trace of one process): the
    /// trace opened first, then the others by rank and pid.
    #[getter]
    fn processes(&self) -> Vec<Process> {
        self.procs
            .iter()
            .map(|p| Process {
                pid: p.pid,
                rank: p.rank,
                parent: p.parent,
                path: p.reader.path().to_path_buf(),
                argv: p.reader.header().meta.argv.clone(),
                start_time_ns: p.start_ns,
                start_offset_ns: p.shift_ns(self.base),
                tail: match p.reader.tail() {
                    Tail::Closed => "closed",
                    Tail::Unclosed => "unclosed",
                    Tail::Truncated { .. } => "truncated",
                },
                note: p.reader.tail_message(),
            })
            .collect()
    }

    /// The changes (of buffers and of objects) matching every given filter,
    /// in seq order; those of every process of a run merged by time (each
    /// process's in seq order), or of the processes `pid=` names (a pid or
    /// a list of them). `seq=` is each process's own seqs; `limit=` counts
    /// the changes returned.
    #[pyo3(signature = (tag=None, file=None, line=None, function=None, thread=None, seq=None, limit=None, pid=None))]
    #[allow(clippy::too_many_arguments)]
    fn changes<'py>(
        &self,
        py: Python<'py>,
        tag: Option<String>,
        file: Option<String>,
        line: Option<u32>,
        function: Option<String>,
        thread: Option<String>,
        seq: Option<(u64, u64)>,
        limit: Option<usize>,
        pid: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let procs = self.selected(&pids_of(pid.as_ref())?)?;
        let filter = Filter {
            tag,
            file,
            line,
            function,
            thread,
            seq,
            time: None,
        };
        let limit = limit.unwrap_or(usize::MAX);
        let mut rows: Vec<Change> = Vec::new();
        let mut unknown = Vec::new();
        py.detach(|| {
            for p in &procs {
                // The first `limit` of each process include the first `limit` of all.
                let mut n = 0;
                let scanned = analyzer::for_each_change(&p.reader, &filter, |row| {
                    if n >= limit {
                        return ControlFlow::Break(());
                    }
                    if let Some(c) = Self::change_object(p, &row.to_row()) {
                        rows.push(c);
                        n += 1;
                    }
                    ControlFlow::Continue(())
                });
                match scanned {
                    Ok(_) => {}
                    Err(e @ analyzer::Error::UnknownTag { .. }) => unknown.push(e),
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .map_err(analyzer_error)?;
        if unknown.len() == procs.len() {
            return Err(missing_tag(unknown));
        }
        // Each process's changes are in seq order: a stable sort by time
        // keeps them so and puts the others' between them, as `memwatch
        // query` does.
        if procs.len() > 1 {
            rows.sort_by_key(|c| c.time_ns);
        }
        rows.truncate(limit);
        let objs: PyResult<Vec<Py<Change>>> = rows.into_iter().map(|c| Py::new(py, c)).collect();
        crate::model::change::change_list(py, objs?)
    }

    /// The region's contents after event `at` (default: the end), as a
    /// numpy array with the recorded dtype and shape (`bytes` when the
    /// region has no dtype or numpy is missing). numpy has no bfloat16,
    /// float8 or complex32: those regions come back as float32 (complex64)
    /// arrays, every value exact (`torch.from_numpy(a).to(torch.bfloat16)`
    /// gives the recorded tensor back bit for bit, NaN payloads aside). `at` is a seq (int) or a
    /// time since the trace started (`datetime.timedelta`, or `"2.5s"`):
    /// the last event at or before it. In a run of several processes, the
    /// region of the process that watched the tag, or of process `pid`
    /// (needed when several did); a time then counts from the run's start
    /// and a seq is that process's.
    #[pyo3(signature = (tag, at=None, pid=None))]
    fn state<'py>(
        &self,
        py: Python<'py>,
        tag: &str,
        at: Option<Bound<'py, PyAny>>,
        pid: Option<u32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let at = point_of(at.as_ref())?;
        let p = self.pick(py, pid, tag)?;
        let at = self.seq_at(py, p, at)?;
        let mut st = py
            .detach(|| analyzer::state(&p.reader, tag, at))
            .map_err(analyzer_error)?;
        let raw = PyBytes::new(py, &st.data);
        let Some(dtype) = st.region.dtype.as_deref() else {
            return Ok(raw.into_any());
        };
        let Ok(np) = py.import("numpy") else {
            return Ok(raw.into_any());
        };
        let itemsize = st.region.itemsize.max(1) as i64;
        let shape: Vec<u64> = if st.region.shape.is_empty() {
            vec![st.region.len / itemsize as u64]
        } else {
            st.region.shape.clone()
        };
        // numpy has no bfloat16, float8 or complex32: such a region comes
        // back as float32 (complex64) values, each exact, NaN and inf kept.
        let Some(parsed) = Dtype::parse(dtype) else {
            // A dtype this build does not know (from a newer memwatch): the bytes.
            return Ok(raw.into_any());
        };
        let (raw, dtype) = match widened(parsed) {
            Some((wide, size)) => {
                let mut out = Vec::with_capacity(st.data.len() / itemsize as usize * size);
                for el in st.data.chunks_exact(itemsize as usize) {
                    match parsed.decode(el) {
                        Some(Value::Complex(re, im)) => {
                            out.extend((re as f32).to_le_bytes());
                            out.extend((im as f32).to_le_bytes());
                        }
                        Some(v) => out.extend((v.as_f64().unwrap_or(f64::NAN) as f32).to_le_bytes()),
                        None => out.extend(std::iter::repeat_n(0, size)),
                    }
                }
                st.region.origin = st.region.origin / itemsize as u64 * size as u64;
                for s in &mut st.region.strides {
                    *s = *s / itemsize * size as i64;
                }
                (PyBytes::new(py, &out), wide)
            }
            None => (raw, dtype),
        };
        let flat = np.getattr("frombuffer")?.call1((raw, dtype))?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("shape", shape.clone())?;
        kwargs.set_item("offset", st.region.origin)?;
        if !st.region.strides.is_empty() {
            kwargs.set_item("strides", st.region.strides.clone())?;
        }
        kwargs.set_item("dtype", dtype)?;
        kwargs.set_item("buffer", flat.call_method0("tobytes")?)?;
        let arr = np.getattr("ndarray")?.call((), Some(&kwargs))?;
        // A compact, writable copy that owns its memory.
        arr.call_method0("copy")
    }

    /// The last change (up to `at`, as in [`state`](Self::state)) that
    /// wrote element `index` (an int or a tuple) or byte `offset` of the
    /// region; `None` if nothing did. In a run of several processes, in
    /// the process that watched the tag, or in process `pid`, as
    /// [`state`](Self::state) picks it.
    #[pyo3(signature = (tag, index=None, offset=None, at=None, pid=None))]
    #[allow(clippy::too_many_arguments)]
    fn blame(
        &self,
        py: Python<'_>,
        tag: &str,
        index: Option<Bound<'_, PyAny>>,
        offset: Option<u64>,
        at: Option<Bound<'_, PyAny>>,
        pid: Option<u32>,
    ) -> PyResult<Option<Py<Change>>> {
        let at = point_of(at.as_ref())?;
        let p = self.pick(py, pid, tag)?;
        let at = self.seq_at(py, p, at)?;
        let st = py
            .detach(|| analyzer::state(&p.reader, tag, at))
            .map_err(analyzer_error)?;
        let (start, end) = match (index, offset) {
            (Some(i), None) => {
                let idx: Vec<u64> = match i.extract::<u64>() {
                    Ok(n) => vec![n],
                    Err(_) => i.extract()?,
                };
                analyzer::element_bytes(&st.region, &idx).map_err(analyzer_error)?
            }
            (None, Some(o)) => (o, o + 1),
            _ => {
                return Err(PyValueError::new_err(
                    "blame() needs exactly one of index= or offset=",
                ))
            }
        };
        let writes = py
            .detach(|| analyzer::writes_to(&p.reader, tag, start, end, at))
            .map_err(analyzer_error)?;
        match writes.last().and_then(|r| Self::change_object(p, r)) {
            Some(c) => Ok(Some(Py::new(py, c)?)),
            None => Ok(None),
        }
    }

    /// Every change as a pandas DataFrame (the columns of `memwatch
    /// export`, docs/export.md, then `pid` and `rank`); `elements=True`
    /// gives a row per changed element. A run's processes (or those `pid=`
    /// names) are merged by time, `time_ns` counting from the run's start
    /// (`wall_time_ns` is wall-clock). Needs pandas and pyarrow.
    #[pyo3(signature = (elements=false, tag=None, pid=None))]
    fn to_pandas<'py>(
        &self,
        py: Python<'py>,
        elements: bool,
        tag: Option<String>,
        pid: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let procs = self.selected(&pids_of(pid.as_ref())?)?;
        let pd = py.import("pandas").map_err(|_| {
            pyo3::exceptions::PyImportError::new_err(
                "Trace.to_pandas() needs pandas and pyarrow: pip install pandas pyarrow",
            )
        })?;
        let filter = Filter {
            tag,
            ..Filter::default()
        };
        let granularity = if elements {
            analyzer::Granularity::Element
        } else {
            analyzer::Granularity::Change
        };
        let mut frames = Vec::with_capacity(procs.len());
        let mut unknown = Vec::new();
        for p in &procs {
            let df = match export_frame(py, &pd, p, &filter, granularity)? {
                Ok(df) => df,
                Err(e) => {
                    unknown.push(e);
                    continue;
                }
            };
            let rows = df.len()?;
            let shift = p.shift_ns(self.base);
            if shift > 0 && df.contains("time_ns")? {
                df.set_item("time_ns", df.get_item("time_ns")?.add(shift)?)?;
            }
            df.set_item("pid", p.pid)?;
            let ranks = pd.getattr("array")?.call1((vec![p.rank; rows], "Int64"))?;
            df.set_item("rank", ranks)?;
            frames.push(df);
        }
        if frames.is_empty() {
            return Err(missing_tag(unknown));
        }
        if frames.len() == 1 {
            return Ok(frames.remove(0));
        }
        let kwargs = PyDict::new(py);
        kwargs.set_item("ignore_index", true)?;
        let all = pd.getattr("concat")?.call((frames,), Some(&kwargs))?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("kind", "stable")?;
        kwargs.set_item("ignore_index", true)?;
        all.call_method("sort_values", ("time_ns",), Some(&kwargs))
    }

    fn __repr__(&self) -> String {
        match self.procs.len() {
            1 => format!("<memwatch.Trace {:?}>", self.path),
            n => format!("<memwatch.Trace {:?}, a run of {n} processes>", self.path),
        }
    }
}

/// The changes of process `p` that `filter` keeps, as a DataFrame (through
/// a Parquet file of `memwatch export`'s columns); the analyzer's error
/// when `p` has no tag the filter names.
fn export_frame<'py>(
    py: Python<'py>,
    pd: &Bound<'py, PyModule>,
    p: &Proc,
    filter: &Filter,
    granularity: analyzer::Granularity,
) -> PyResult<Result<Bound<'py, PyAny>, analyzer::Error>> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = std::env::temp_dir().join(format!(
        "memwatch-{}-{}.parquet",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let written = py.detach(|| {
        analyzer::export(
            &p.reader,
            &tmp,
            analyzer::ExportFormat::Parquet,
            granularity,
            filter,
            &mut |_, _| {},
        )
    });
    let result = match written {
        Ok(_) => pd.getattr("read_parquet")?.call1((&tmp,)).map(Ok),
        Err(e @ analyzer::Error::UnknownTag { .. }) => Ok(Err(e)),
        Err(e) => Err(analyzer_error(e)),
    };
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Opens a trace for reading, with the other traces of its run beside it
/// (`memwatch record` of a program that forks, uses multiprocessing,
/// subprocess or torchrun), or only the processes `pid=` names.
#[pyfunction]
#[pyo3(signature = (path, pid=None))]
pub fn open_trace(py: Python<'_>, path: PathBuf, pid: Option<Bound<'_, PyAny>>) -> PyResult<Trace> {
    let pids = pids_of(pid.as_ref())?;
    let procs = py
        .detach(|| memwatch_cli::run::open(&path, &[]))
        .map_err(run_error)?;
    let base = memwatch_cli::run::base_ns(&procs);
    let mut trace = Trace { procs, base, path };
    if !pids.is_empty() {
        trace.selected(&pids)?;
        trace.procs.retain(|p| pids.contains(&p.pid));
        trace.base = memwatch_cli::run::base_ns(&trace.procs);
    }
    Ok(trace)
}

/// The numpy dtype (and its item size) that `Trace.state` widens a dtype
/// numpy lacks to: float32 for bfloat16 and float8, complex64 for
/// complex32; `None` for a dtype numpy has.
fn widened(d: Dtype) -> Option<(&'static str, usize)> {
    let numpy = |f: FloatFormat| matches!(f, FloatFormat::F16 | FloatFormat::F32 | FloatFormat::F64);
    match d.kind {
        Kind::Float(f) if !numpy(f) => Some(("<f4", 4)),
        Kind::Complex(FloatFormat::F16) => Some(("<c8", 8)),
        _ => None,
    }
}

/// Reads a trace's header and framing: a dict of the recorded process's
/// metadata, the number of chunks, and how the file ends.
#[pyfunction]
pub fn trace_info<'py>(py: Python<'py>, path: std::path::PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let reader = py
        .detach(|| memwatch_format::TraceReader::open(&path))
        .map_err(trace_error)?;
    trace_info_dict(py, &reader)
}

/// The dict `trace_info` and `Trace.meta` return.
pub(crate) fn trace_info_dict<'py>(
    py: Python<'py>,
    reader: &memwatch_format::TraceReader,
) -> PyResult<Bound<'py, PyDict>> {
    let h = reader.header();
    let d = PyDict::new(py);
    d.set_item("path", reader.path().to_string_lossy())?;
    d.set_item("version", h.version)?;
    d.set_item("pid", h.meta.pid)?;
    d.set_item("argv", PyList::new(py, &h.meta.argv)?)?;
    d.set_item("python_version", &h.meta.python_version)?;
    d.set_item("platform", &h.meta.platform)?;
    d.set_item("page_size", h.meta.page_size)?;
    d.set_item("start_time_ns", h.meta.start_time_ns)?;
    d.set_item("writer", &h.meta.writer)?;
    let props = PyDict::new(py);
    for (k, v) in &h.meta.properties {
        props.set_item(k, v)?;
    }
    d.set_item("properties", props)?;
    d.set_item("chunks", reader.chunks().len())?;
    d.set_item("file_bytes", reader.file_len())?;
    let (tail, ignored) = match reader.tail() {
        memwatch_format::Tail::Closed => ("closed", 0),
        memwatch_format::Tail::Unclosed => ("unclosed", 0),
        memwatch_format::Tail::Truncated { bytes_ignored } => ("truncated", bytes_ignored),
    };
    d.set_item("tail", tail)?;
    d.set_item("bytes_ignored", ignored)?;
    Ok(d)
}
