//! What the recorder knows about each code object: its file as recorded,
//! its function, and whether it is in scope (`configure(include=,
//! exclude=)`), decided once per code object through the Python hook
//! `in_scope` and forgotten by [`rescope`].
//!
//! Locking: one mutex ([`CODES`]), held only to read or insert an entry,
//! never while Python code runs. Nothing here runs in signal context;
//! [`code_info`] tells the fatal-signal handler each new code object's
//! names (`mem::signals::crash::learn_code`).

use std::sync::{Arc, Mutex};

use pyo3::prelude::*;

use crate::runtime::addr::AddrMap;
use crate::runtime::events;
use crate::runtime::hooks::hooks;
use crate::runtime::thread::guarded;
use crate::runtime::watched;

/// What we know about a code object.
pub struct CodeInfo {
    /// Keeps the code object (and so the map's key) alive.
    pub code: Py<PyAny>,
    /// The file as recorded and reported (see [`crate::runtime::hooks::Hooks::display_name`]).
    pub file: Arc<str>,
    /// The code object's own (normalized) file name, which scope decides on.
    pub path: Arc<str>,
    pub function: Arc<str>,
    pub in_scope: bool,
}

/// Code objects seen, by address. Entries hold a reference to their code
/// object, so an address is never reused while it is a key.
pub static CODES: Mutex<Option<AddrMap<usize, CodeInfo>>> = Mutex::new(None);

pub(crate) fn codes() -> std::sync::MutexGuard<'static, Option<AddrMap<usize, CodeInfo>>> {
    CODES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Looks up (or learns) the code object `code`. `decide` says whether a
/// file is in scope; it is only called for code objects not seen before.
pub fn code_info(py: Python<'_>, code: &Bound<'_, PyAny>) -> PyResult<(Arc<str>, Arc<str>, bool)> {
    let key = code.as_ptr() as usize;
    if let Some(i) = codes().as_ref().and_then(|m| m.get(&key)) {
        return Ok((i.file.clone(), i.function.clone(), i.in_scope));
    }
    let path = normalize(&code.getattr("co_filename")?.extract::<String>()?);
    let function: String = code
        .getattr("co_qualname")
        .or_else(|_| code.getattr("co_name"))?
        .extract()?;
    let (in_scope, file) = guarded(|| -> PyResult<(bool, String)> {
        let h = hooks()?;
        let in_scope = h.in_scope.bind(py).call1((&path,))?.extract()?;
        let file = h.display_name.bind(py).call1((&path,))?.extract()?;
        Ok((in_scope, file))
    })?;
    let info = CodeInfo {
        code: code.clone().unbind(),
        file: file.into(),
        path: path.into(),
        function: function.into(),
        in_scope,
    };
    let out = (info.file.clone(), info.function.clone(), info.in_scope);
    crate::mem::signals::crash::learn_code(key, &info.file, &info.function);
    codes().get_or_insert_with(AddrMap::default).insert(key, info);
    Ok(out)
}

/// `a/b/../c` -> `a/c`, lexically, for absolute paths (what a program run as
/// `python ../train.py` from another folder records).
fn normalize(file: &str) -> String {
    if !file.starts_with('/') || !(file.contains("/./") || file.contains("/../")) {
        return file.to_string();
    }
    let mut parts: Vec<&str> = Vec::new();
    for p in file.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// File and function of a code object we already know, by address.
pub fn known_code(key: usize) -> Option<(Arc<str>, Arc<str>)> {
    codes()
        .as_ref()
        .and_then(|m| m.get(&key))
        .map(|i| (i.file.clone(), i.function.clone()))
}

/// A known code object's file, function and whether it is in scope.
pub type Described = (Arc<str>, Arc<str>, bool);

/// File, function and scope of each code object in `keys` that is known,
/// with one look-up of the map for all of them (a stack's frames).
pub fn describe(keys: &[usize]) -> Vec<Option<Described>> {
    let g = codes();
    keys.iter()
        .map(|k| {
            g.as_ref()
                .and_then(|m| m.get(k))
                .map(|i| (i.file.clone(), i.function.clone(), i.in_scope))
        })
        .collect()
}

/// True if the code object at `key` is known and in scope.
pub fn code_in_scope(key: usize) -> bool {
    codes()
        .as_ref()
        .and_then(|m| m.get(&key))
        .is_some_and(|i| i.in_scope)
}

/// Bumped whenever scope decisions may change (`rescope`).
static SCOPE_GEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The generation of scope decisions: what was worked out from them (where
/// a stack starts) holds while it is unchanged.
pub fn scope_generation() -> u64 {
    SCOPE_GEN.load(std::sync::atomic::Ordering::Relaxed)
}

/// Decides every known code object's scope again (after
/// `configure(include=..., exclude=...)`), turning line events on or off
/// for those whose decision changed.
pub fn rescope(py: Python<'_>) -> PyResult<()> {
    // Scope decisions feed the line fast path's shortcuts: start it over.
    watched::invalidate();
    SCOPE_GEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let entries: Vec<(usize, Py<PyAny>, Arc<str>, bool)> = codes()
        .as_ref()
        .map(|m| {
            m.iter()
                .map(|(k, i)| (*k, i.code.clone_ref(py), i.path.clone(), i.in_scope))
                .collect()
        })
        .unwrap_or_default();
    let scope = hooks()?.in_scope.bind(py);
    for (key, code, file, was) in entries {
        let now: bool = guarded(|| scope.call1((&*file,)).and_then(|v| v.extract()))?;
        if now != was {
            if let Some(i) = codes().as_mut().and_then(|m| m.get_mut(&key)) {
                i.in_scope = now;
            }
            if events::is_active() {
                events::set_code_events(py, code.bind(py), now)?;
            }
        }
    }
    Ok(())
}
