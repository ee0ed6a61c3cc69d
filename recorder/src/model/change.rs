//! `memwatch.Change`: one change to one watched region, as Python sees it,
//! with its elements decoded by dtype ([`memwatch_format::dtype`]).
//!
//! State: the process id and `torchrun` rank a change carries, cached in
//! atomics (no lock). Nothing here runs in signal context.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyComplex, PyList, PyTuple};

use memwatch_format::dtype::{Dtype, Value};
use memwatch_format::ObjectChangeKind;

use crate::mem::engine::{ChangedRange, Layout};

/// A frame of a change's stack: file, line, function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRef {
    pub file: Arc<str>,
    pub line: u32,
    pub function: Arc<str>,
}

/// What changed in a watched Python object (`watch_object`): the kind of
/// change, where in the object, and bounded reprs of the values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub kind: ObjectChangeKind,
    /// Where in the watched object, as a Python expression suffix
    /// (`.lr`, `.layers[3]`, `['beta']`); `None` for the object itself.
    pub key: Option<String>,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// One change to one watched region (the exact bytes that differ, their old
/// and new values) or to one watched Python object, and who changed it where.
#[pyclass(module = "memwatch", frozen, name = "Change")]
#[derive(Debug)]
pub struct Change {
    /// Position in the process's sequence of events, from 1.
    #[pyo3(get)]
    pub seq: u64,
    /// When the change was seen, nanoseconds since the Unix epoch.
    #[pyo3(get)]
    pub time_ns: u64,
    /// The process that made the change: this one for a live change, the
    /// recorded process for one read from a trace (`open_trace`), where a
    /// run's processes each have their own seqs.
    #[pyo3(get)]
    pub pid: u32,
    /// That process's rank (`$RANK`, as torchrun sets it), if it had one.
    #[pyo3(get)]
    pub rank: Option<u32>,
    /// Shared with the watch (and `thread_name` with the thread's other
    /// changes): a change copies no text it does not own.
    pub tag: Arc<str>,
    /// The variable through which the buffer was passed to `watch`.
    pub variable: Option<Arc<str>>,
    /// Start address of the watched region (0 for an object change).
    pub region_start: u64,
    /// Empty for an object change.
    pub ranges: Vec<ChangedRange>,
    pub layout: Arc<Layout>,
    /// Innermost first.
    pub stack: Arc<[FrameRef]>,
    #[pyo3(get)]
    pub thread_id: u64,
    pub thread_name: Arc<str>,
    /// Set for a change of a watched Python object.
    pub object: Option<ObjectInfo>,
    /// The op that made the change (`aten::add_.Tensor`), for a change
    /// found by `watch(t, via="dispatch")`; shared with the other changes
    /// the op made.
    pub op: Option<Arc<str>>,
}

/// Decodes one element of `dtype` (a region's dtype string parsed once by
/// the caller, see [`memwatch_format::dtype`]) from `b`: a `float`,
/// `complex`, `bool` or `int`; the bytes' unsigned integer for a dtype
/// this build does not know (`None`).
fn decode<'py>(py: Python<'py>, dtype: Option<Dtype>, b: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let value = dtype.and_then(|d| d.decode(b));
    Ok(match value {
        Some(Value::Float(x)) => x.into_pyobject(py)?.into_any(),
        Some(Value::Complex(re, im)) => PyComplex::from_doubles(py, re, im).into_any(),
        Some(Value::Bool(v)) => pyo3::types::PyBool::new(py, v).to_owned().into_any(),
        Some(Value::Int(i)) => i.into_pyobject(py)?.into_any(),
        Some(Value::UInt(u)) => u.into_pyobject(py)?.into_any(),
        None => {
            let mut a = [0u8; 8];
            let n = b.len().min(8);
            a[..n].copy_from_slice(&b[..n]);
            u64::from_le_bytes(a).into_pyobject(py)?.into_any()
        }
    })
}

/// Decodes `b` as one element of `dtype` (`_memwatch._decode`), the way
/// `Change.old_values` does; for tests and tools.
#[pyfunction]
pub fn _decode<'py>(py: Python<'py>, dtype: &str, b: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let parsed = Dtype::parse(dtype);
    if parsed.map(|d| d.itemsize as usize) != Some(b.len()) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{} bytes are not one element of dtype {dtype:?}",
            b.len()
        )));
    }
    decode(py, parsed, b)
}

impl Change {
    /// `(index, old, new)` for each changed element, in offset order.
    fn elements(&self) -> Vec<(Vec<u64>, &[u8], &[u8])> {
        let itemsize = self.layout.itemsize.max(1) as usize;
        let mut out = Vec::new();
        for (off, old, new) in &self.ranges {
            let mut i = 0;
            while i + itemsize <= old.len() {
                let at = off + i as u64;
                let (o, n) = (&old[i..i + itemsize], &new[i..i + itemsize]);
                if o != n {
                    if let Some(idx) = self.layout.index_of(at) {
                        out.push((idx, o, n));
                    }
                }
                i += itemsize;
            }
        }
        out
    }

    fn index_object<'py>(&self, py: Python<'py>, idx: &[u64]) -> PyResult<Bound<'py, PyAny>> {
        if idx.len() == 1 {
            Ok(idx[0].into_pyobject(py)?.into_any())
        } else {
            Ok(PyTuple::new(py, idx)?.into_any())
        }
    }

    /// The report printed for this change when nobody else listens.
    pub fn report(&self) -> String {
        if let Some(o) = &self.object {
            return self.object_report(o);
        }
        let sample = |b: &[u8]| -> String {
            let shown = &b[..b.len().min(32)];
            let mut s = String::from("b'");
            for &x in shown {
                match x {
                    b'\\' => s.push_str("\\\\"),
                    b'\'' => s.push_str("\\'"),
                    0x20..=0x7e => s.push(x as char),
                    _ => s.push_str(&format!("\\x{x:02x}")),
                }
            }
            s.push('\'');
            if b.len() > shown.len() {
                s.push_str(&format!(" (+{} bytes)", b.len() - shown.len()));
            }
            s
        };
        let (off, old, new) = (&self.ranges[0].0, &self.ranges[0].1[..], &self.ranges[0].2[..]);
        let changed: usize = self.ranges.iter().map(|r| r.1.len()).sum();
        let mut s = format!(
            "[MEMWATCH] Tag: {}\nAddress: {:#x}\nOld Value (sample): {}\nNew Value (sample): {}\n",
            self.tag,
            self.region_start + off,
            sample(old),
            sample(new)
        );
        if self.layout.dtype.is_some() {
            Python::attach(|py| {
                let els = self.elements();
                let dtype = Dtype::parse(self.layout.dtype.as_deref().unwrap_or("|u1"));
                let shown: Vec<String> = els
                    .iter()
                    .take(4)
                    .map(|(idx, o, n)| {
                        let show = |b: &[u8]| {
                            decode(py, dtype, b)
                                .and_then(|v| v.repr().map(|r| r.to_string()))
                                .unwrap_or_else(|_| "?".into())
                        };
                        let i: Vec<String> = idx.iter().map(|x| x.to_string()).collect();
                        format!("[{}] {} -> {}", i.join(", "), show(o), show(n))
                    })
                    .collect();
                let more = if els.len() > 4 {
                    format!(" (+{} more)", els.len() - 4)
                } else {
                    String::new()
                };
                s.push_str(&format!("Elements: {}{more}\n", shown.join("; ")));
            });
        }
        if let Some(op) = &self.op {
            s.push_str(&format!("Op: {op}\n"));
        }
        self.push_variable_and_line(&mut s);
        if changed > old.len() {
            s.push_str(&format!(
                "Changed: {changed} bytes in {} ranges\n",
                self.ranges.len()
            ));
        }
        s
    }

    /// The one-line report (`memwatch record --live=short`,
    /// `configure(live="short")`), newline included:
    ///
    /// `memwatch: #12 w [3, 4] 0.5 -> 0.25 (+15 more) train.py:12 in step`
    ///
    /// The seq, the tag, then what changed: the first changed element,
    /// its index and old and new value (as `memwatch query` writes them),
    /// and how many more changed, when the dtype is known; otherwise how
    /// many bytes changed, where, and the first few of them in hex; for an
    /// object change `tag.key old -> new` (the kind too, unless the
    /// change is an assignment). Then the line (the file without its
    /// directory) and function, and the thread in brackets when it is
    /// not the main thread.
    ///
    /// It runs for every change while printing is on, so it allocates
    /// only the line itself (no list of the changed elements).
    pub fn short_report(&self) -> String {
        let mut s = String::with_capacity(96);
        let _ = write!(s, "memwatch: #{} ", self.seq);
        match &self.object {
            Some(o) => self.push_short_object(&mut s, o),
            None => self.push_short_bytes(&mut s),
        }
        match self.stack.first() {
            Some(f) if f.file.starts_with("cell [") && f.file.ends_with(']') => {
                let _ = write!(s, " {}, line {} in {}", f.file, f.line, f.function);
            }
            Some(f) => {
                let file = f.file.rsplit('/').next().unwrap_or(&f.file);
                let _ = write!(s, " {file}:{} in {}", f.line, f.function);
            }
            None => s.push_str(" at <unknown line>"),
        }
        if self.thread_id != u64::from(pid()) {
            if self.thread_name.is_empty() {
                let _ = write!(s, " [thread {}]", self.thread_id);
            } else {
                let _ = write!(s, " [{}]", self.thread_name);
            }
        }
        s.push('\n');
        s
    }

    /// The first changed element (its offset, old and new bytes) and how
    /// many changed, without collecting them.
    fn first_element(&self) -> (Option<Element<'_>>, usize) {
        let size = self.layout.itemsize.max(1) as usize;
        let (mut first, mut n) = (None, 0);
        for (off, old, new) in &self.ranges {
            for (k, (o, w)) in old.chunks_exact(size).zip(new.chunks_exact(size)).enumerate() {
                if o != w {
                    n += 1;
                    first.get_or_insert((off + (k * size) as u64, o, w));
                }
            }
        }
        (first, n)
    }

    fn push_short_bytes(&self, s: &mut String) {
        s.push_str(&self.tag);
        if let Some(dtype) = self.layout.dtype.as_deref() {
            let (first, n) = self.first_element();
            let shown = first.and_then(|(at, o, w)| {
                let idx = self.layout.index_of(at)?;
                Some((
                    idx,
                    memwatch_cli::element_text(dtype, o)?,
                    memwatch_cli::element_text(dtype, w)?,
                ))
            });
            if let Some((idx, old, new)) = shown {
                s.push_str(" [");
                for (i, x) in idx.iter().enumerate() {
                    let _ = write!(s, "{}{x}", if i == 0 { "" } else { ", " });
                }
                let _ = write!(s, "] {old} -> {new}");
                if n > 1 {
                    let _ = write!(s, " (+{} more)", n - 1);
                }
                return;
            }
        }
        let Some((off, old, new)) = self.ranges.first() else {
            return;
        };
        let changed: usize = self.ranges.iter().map(|r| r.1.len()).sum();
        let _ = write!(
            s,
            " {changed} byte{} at offset {off}",
            if changed == 1 { "" } else { "s" }
        );
        if self.ranges.len() > 1 {
            let _ = write!(s, " (in {} ranges)", self.ranges.len());
        }
        let hex = |s: &mut String, b: &[u8]| {
            for x in b.iter().take(8) {
                let _ = write!(s, "{x:02x}");
            }
            if b.len() > 8 {
                s.push_str("..");
            }
        };
        s.push(' ');
        hex(s, old);
        s.push_str(" -> ");
        hex(s, new);
    }

    fn push_short_object(&self, s: &mut String, o: &ObjectInfo) {
        match (o.kind, o.key.as_deref()) {
            (ObjectChangeKind::Rebind | ObjectChangeKind::Unbind, Some(name)) => s.push_str(name),
            (_, key) => {
                s.push_str(&self.tag);
                s.push_str(key.unwrap_or(""));
            }
        }
        let assignment = matches!(
            o.kind,
            ObjectChangeKind::SetAttr | ObjectChangeKind::SetItem | ObjectChangeKind::Rebind
        );
        if !assignment {
            s.push(' ');
            s.push_str(o.kind.name());
        }
        let _ = match (&o.old, &o.new) {
            (Some(old), Some(new)) => write!(s, " {old} -> {new}"),
            (None, Some(new)) if assignment => write!(s, " = {new}"),
            (None, Some(v)) | (Some(v), None) => write!(s, " {v}"),
            (None, None) => Ok(()),
        };
    }

    /// The report's last lines: the variable and the line.
    fn push_variable_and_line(&self, s: &mut String) {
        s.push_str(&format!(
            "Python Variable: {}\n",
            self.variable.as_deref().unwrap_or("<unknown>")
        ));
        match self.stack.first() {
            Some(f) => s.push_str(&format!(
                "Line: {} in {}\n",
                memwatch_format::location(&f.file, f.line),
                f.function
            )),
            None => s.push_str("Line: <unknown>\n"),
        }
    }

    /// The report of an object change.
    fn object_report(&self, o: &ObjectInfo) -> String {
        // A variable's key is its name; an object's is a suffix of the tag.
        let what = match (o.kind, o.key.as_deref()) {
            (ObjectChangeKind::Rebind | ObjectChangeKind::Unbind, Some(name)) => name.to_string(),
            (_, key) => format!("{}{}", self.tag, key.unwrap_or("")),
        };
        let mut s = format!("[MEMWATCH] Tag: {}\nChange: {} {what}\n", self.tag, o.kind.name());
        if let Some(old) = &o.old {
            s.push_str(&format!("Old Value: {old}\n"));
        }
        if let Some(new) = &o.new {
            s.push_str(&format!("New Value: {new}\n"));
        }
        self.push_variable_and_line(&mut s);
        s
    }
}

/// One changed element: its byte offset in the region, old and new bytes.
type Element<'a> = (u64, &'a [u8], &'a [u8]);

/// The process id, cached: `getpid` is a system call, and the short
/// report asks per change whether the main thread (whose thread id is the
/// pid) made it. A fork child forgets it ([`forget_pid`]).
static PID: AtomicU32 = AtomicU32::new(0);

fn pid() -> u32 {
    match PID.load(Ordering::Relaxed) {
        0 => {
            let p = std::process::id();
            PID.store(p, Ordering::Relaxed);
            p
        }
        p => p,
    }
}

/// In a fork child: the pid is the child's now.
pub(crate) fn forget_pid() {
    PID.store(0, Ordering::Relaxed);
    RANK.store(RANK_UNREAD, Ordering::Relaxed);
}

/// `$RANK`, read once: [`RANK_UNREAD`], [`RANK_NONE`] or the rank.
static RANK: AtomicI64 = AtomicI64::new(RANK_UNREAD);
const RANK_UNREAD: i64 = -2;
const RANK_NONE: i64 = -1;

/// This process's pid, for a live change.
pub(crate) fn live_pid() -> u32 {
    pid()
}

/// This process's rank, for a live change: `$RANK` when it is a number
/// (as the recorder names a trace by it).
pub(crate) fn live_rank() -> Option<u32> {
    match RANK.load(Ordering::Relaxed) {
        RANK_UNREAD => {
            let r = std::env::var("RANK")
                .ok()
                .and_then(|r| r.trim().parse::<u32>().ok());
            RANK.store(r.map_or(RANK_NONE, i64::from), Ordering::Relaxed);
            r
        }
        RANK_NONE => None,
        r => u32::try_from(r).ok(),
    }
}

/// `file:line`, or `cell [3], line 2` for a notebook cell
/// ([`memwatch_format::location`]).
#[pyfunction]
pub fn location(file: &str, line: u32) -> String {
    memwatch_format::location(file, line)
}

/// A list of changes as Python sees it: a `memwatch._display.ChangeList`
/// (a `list` that Jupyter shows as a table), or a plain list should that
/// module be missing.
pub fn change_list<'py>(py: Python<'py>, items: Vec<Py<Change>>) -> PyResult<Bound<'py, PyAny>> {
    let list = PyList::new(py, items)?;
    match py
        .import("memwatch._display")
        .and_then(|m| m.getattr("ChangeList"))
    {
        Ok(cls) => cls.call1((list,)),
        Err(_) => Ok(list.into_any()),
    }
}

#[pymethods]
impl Change {
    /// The watch's tag.
    #[getter]
    fn tag(&self) -> &str {
        &self.tag
    }

    /// The variable through which the buffer was passed to `watch`.
    #[getter]
    fn variable(&self) -> Option<&str> {
        self.variable.as_deref()
    }

    /// The `threading` name of the thread that made the change.
    #[getter]
    fn thread_name(&self) -> &str {
        &self.thread_name
    }

    /// Address of the first changed byte; `None` for an object change.
    #[getter]
    fn address(&self) -> Option<u64> {
        self.ranges.first().map(|r| self.region_start + r.0)
    }

    /// Offset of the first changed byte within the region; `None` for an
    /// object change.
    #[getter]
    fn offset(&self) -> Option<u64> {
        self.ranges.first().map(|r| r.0)
    }

    /// The op that made the change, as torch names it
    /// (`"aten::add_.Tensor"`), for a change recorded through
    /// `watch(t, via="dispatch")`; `None` for every other change.
    #[getter]
    fn op(&self) -> Option<&str> {
        self.op.as_deref()
    }

    /// `"bytes"` for a buffer change; for an object change what happened
    /// (`"setattr"`, `"append"`, `"collected"`, ...).
    #[getter]
    fn kind(&self) -> &'static str {
        self.object.as_ref().map_or("bytes", |o| o.kind.name())
    }

    /// Where in the watched object the change is, as a Python expression
    /// suffix (`.lr`, `.layers[3]`, `['beta']`); `None` for a buffer change
    /// or a change of the object as a whole.
    #[getter]
    fn key(&self) -> Option<String> {
        self.object.as_ref().and_then(|o| o.key.clone())
    }

    /// Bounded `repr` of the old value of an object change, if there was one.
    #[getter]
    fn old_repr(&self) -> Option<String> {
        self.object.as_ref().and_then(|o| o.old.clone())
    }

    /// Bounded `repr` of the new value of an object change, if there is one.
    #[getter]
    fn new_repr(&self) -> Option<String> {
        self.object.as_ref().and_then(|o| o.new.clone())
    }

    /// Every changed run: `(offset, old bytes, new bytes)`.
    #[getter]
    fn ranges<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self
            .ranges
            .iter()
            .map(|(o, a, b)| (*o, PyBytes::new(py, &a[..]), PyBytes::new(py, &b[..])));
        PyList::new(py, items)
    }

    /// Old bytes of the first range; `None` for an object change.
    #[getter]
    fn old<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.ranges.first().map(|r| PyBytes::new(py, &r.1))
    }

    /// New bytes of the first range; `None` for an object change.
    #[getter(new)]
    fn new_bytes<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.ranges.first().map(|r| PyBytes::new(py, &r.2))
    }

    /// The region's dtype (`"<f4"`), or `None` for plain bytes.
    #[getter]
    fn dtype(&self) -> Option<String> {
        self.layout.dtype.clone()
    }

    /// Indices of the changed elements (an int per element of a 1-D region,
    /// a tuple for more dimensions); `None` without a dtype.
    #[getter]
    fn indices<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        if self.layout.dtype.is_none() {
            return Ok(None);
        }
        let items: PyResult<Vec<_>> = self
            .elements()
            .iter()
            .map(|(idx, _, _)| self.index_object(py, idx))
            .collect();
        Ok(Some(PyList::new(py, items?)?))
    }

    /// Old values of the changed elements; `None` without a dtype.
    #[getter]
    fn old_values<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        self.values(py, true)
    }

    /// New values of the changed elements; `None` without a dtype.
    #[getter]
    fn new_values<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        self.values(py, false)
    }

    /// File of the line the change is attributed to.
    #[getter]
    fn file(&self) -> Option<String> {
        self.stack.first().map(|f| f.file.to_string())
    }

    /// The line the change is attributed to, as people write it:
    /// `file:line`, or `cell [3], line 2` for a notebook cell.
    #[getter]
    fn location(&self) -> Option<String> {
        self.stack
            .first()
            .map(|f| memwatch_format::location(&f.file, f.line))
    }

    #[getter]
    fn line(&self) -> Option<u32> {
        self.stack.first().map(|f| f.line)
    }

    #[getter]
    fn function(&self) -> Option<String> {
        self.stack.first().map(|f| f.function.to_string())
    }

    /// `(file, line, function)` per frame, innermost first.
    #[getter]
    fn stack<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self
            .stack
            .iter()
            .map(|f| (f.file.to_string(), f.line, f.function.to_string()));
        PyList::new(py, items)
    }

    /// The `[MEMWATCH]` report of this change, as the live report prints it.
    #[pyo3(name = "report")]
    fn py_report(&self) -> String {
        self.report()
    }

    /// True when a new value of a changed element is a NaN or an infinity
    /// (float and complex dtypes; false for any other).
    fn _nonfinite(&self) -> bool {
        let Some(dtype) = self.layout.dtype.as_deref().and_then(Dtype::parse) else {
            return false;
        };
        if dtype.float_format().is_none() {
            return false;
        }
        self.elements()
            .iter()
            .any(|(_, _, new)| dtype.decode(new).is_some_and(|v| v.is_nonfinite()))
    }

    /// The change as an HTML table, for Jupyter (`memwatch._display`).
    fn _repr_html_(slf: &Bound<'_, Self>) -> PyResult<String> {
        let py = slf.py();
        py.import("memwatch._display")?
            .getattr("change_html")?
            .call1((slf,))?
            .extract()
    }

    fn __repr__(&self) -> String {
        let at = self
            .stack
            .first()
            .map(|f| memwatch_format::location(&f.file, f.line))
            .unwrap_or_else(|| "?".into());
        if let Some(o) = &self.object {
            return format!(
                "<memwatch.Change seq={} tag={:?} kind={} key={:?} at {}>",
                self.seq,
                self.tag,
                o.kind.name(),
                o.key.as_deref().unwrap_or(""),
                at
            );
        }
        let n: usize = self.ranges.iter().map(|r| r.1.len()).sum();
        let op = self
            .op
            .as_deref()
            .map(|op| format!(" op={op}"))
            .unwrap_or_default();
        format!(
            "<memwatch.Change seq={} tag={:?} offset={} bytes={}{op} at {}>",
            self.seq, self.tag, self.ranges[0].0, n, at
        )
    }
}

impl Change {
    fn values<'py>(&self, py: Python<'py>, old: bool) -> PyResult<Option<Bound<'py, PyList>>> {
        let Some(dtype) = self.layout.dtype.as_deref() else {
            return Ok(None);
        };
        let dtype = Dtype::parse(dtype);
        let items: PyResult<Vec<_>> = self
            .elements()
            .iter()
            .map(|(_, o, n)| decode(py, dtype, if old { o } else { n }))
            .collect();
        Ok(Some(PyList::new(py, items?)?))
    }
}
