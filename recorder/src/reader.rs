//! `memwatch.open_trace`: reading a recorded trace from Python, with the
//! same `memwatch.Change` objects the live recorder produces.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use memwatch_analyzer::{self as analyzer, ChangeRow, Filter, RegionInfo, What};
use memwatch_cli::{parse_point, Point};
use memwatch_format::dtype::{Dtype, FloatFormat, Kind, Value};
use memwatch_format::TraceReader;
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::change::{Change, FrameRef, ObjectInfo};
use crate::engine::{Bytes, Layout};
use crate::errors::{trace_error, MemwatchError};

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

/// A recorded trace, opened for reading.
#[pyclass(module = "memwatch", frozen, name = "Trace")]
pub struct Trace {
    reader: TraceReader,
    #[pyo3(get)]
    path: PathBuf,
}

impl Trace {
    fn change_object(&self, row: &ChangeRow) -> Option<Change> {
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
            time_ns: self.reader.header().meta.start_time_ns + row.time_ns,
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
}

#[pymethods]
impl Trace {
    /// Every tag in the trace, sorted.
    #[getter]
    fn tags(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let syms = py
            .detach(|| {
                analyzer::for_each_change(&self.reader, &Filter::default(), |_| ControlFlow::Continue(()))
            })
            .map_err(analyzer_error)?;
        Ok(syms.tags())
    }

    /// The recorded process's metadata, and how the file ends.
    #[getter]
    fn meta<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        crate::trace_info_dict(py, &self.reader)
    }

    /// The changes (of buffers and of objects) matching every given filter,
    /// in seq order.
    #[pyo3(signature = (tag=None, file=None, line=None, function=None, thread=None, seq=None, limit=None))]
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
    ) -> PyResult<Bound<'py, PyAny>> {
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
        py.detach(|| {
            analyzer::for_each_change(&self.reader, &filter, |row| {
                if rows.len() >= limit {
                    return ControlFlow::Break(());
                }
                if let Some(c) = self.change_object(&row.to_row()) {
                    rows.push(c);
                }
                ControlFlow::Continue(())
            })
        })
        .map_err(analyzer_error)?;
        let objs: PyResult<Vec<Py<Change>>> = rows.into_iter().map(|c| Py::new(py, c)).collect();
        crate::change::change_list(py, objs?)
    }

    /// The region's contents after event `at` (default: the end), as a
    /// numpy array with the recorded dtype and shape (`bytes` when the
    /// region has no dtype or numpy is missing). numpy has no bfloat16,
    /// float8 or complex32: those regions come back as float32 (complex64)
    /// arrays, every value exact (`torch.from_numpy(a).to(torch.bfloat16)`
    /// gives the recorded tensor back bit for bit, NaN payloads aside). `at` is a seq (int) or a
    /// time since the trace started (`datetime.timedelta`, or `"2.5s"`):
    /// the last event at or before it.
    #[pyo3(signature = (tag, at=None))]
    fn state<'py>(
        &self,
        py: Python<'py>,
        tag: &str,
        at: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let at = point_of(at.as_ref())?;
        let mut st = py
            .detach(|| {
                let at = at.map(|p| p.seq(&self.reader)).transpose()?;
                analyzer::state(&self.reader, tag, at)
            })
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
    /// region; `None` if nothing did.
    #[pyo3(signature = (tag, index=None, offset=None, at=None))]
    fn blame(
        &self,
        py: Python<'_>,
        tag: &str,
        index: Option<Bound<'_, PyAny>>,
        offset: Option<u64>,
        at: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Option<Py<Change>>> {
        let at = point_of(at.as_ref())?;
        let at = py
            .detach(|| at.map(|p| p.seq(&self.reader)).transpose())
            .map_err(analyzer_error)?;
        let st = py
            .detach(|| analyzer::state(&self.reader, tag, at))
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
            .detach(|| analyzer::writes_to(&self.reader, tag, start, end, at))
            .map_err(analyzer_error)?;
        match writes.last().and_then(|r| self.change_object(r)) {
            Some(c) => Ok(Some(Py::new(py, c)?)),
            None => Ok(None),
        }
    }

    /// Every change as a pandas DataFrame (the columns of `memwatch
    /// export`, docs/export.md); `elements=True` gives a row per changed
    /// element. Needs pandas and pyarrow.
    #[pyo3(signature = (elements=false, tag=None))]
    fn to_pandas<'py>(
        &self,
        py: Python<'py>,
        elements: bool,
        tag: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let pd = py.import("pandas").map_err(|_| {
            pyo3::exceptions::PyImportError::new_err(
                "Trace.to_pandas() needs pandas and pyarrow: pip install pandas pyarrow",
            )
        })?;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = std::env::temp_dir().join(format!(
            "memwatch-{}-{}.parquet",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let filter = Filter {
            tag,
            ..Filter::default()
        };
        let granularity = if elements {
            analyzer::Granularity::Element
        } else {
            analyzer::Granularity::Change
        };
        let written = py.detach(|| {
            analyzer::export(
                &self.reader,
                &tmp,
                analyzer::ExportFormat::Parquet,
                granularity,
                &filter,
                &mut |_, _| {},
            )
        });
        let result = written
            .map_err(analyzer_error)
            .and_then(|_| pd.getattr("read_parquet")?.call1((&tmp,)));
        let _ = std::fs::remove_file(&tmp);
        result
    }

    fn __repr__(&self) -> String {
        format!("<memwatch.Trace {:?}>", self.path)
    }
}

/// Opens a trace for reading.
#[pyfunction]
pub fn open_trace(py: Python<'_>, path: PathBuf) -> PyResult<Trace> {
    let reader = py.detach(|| TraceReader::open(&path)).map_err(trace_error)?;
    Ok(Trace { reader, path })
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
