//! A run of several processes, read as one: the trace named on the command
//! line and the traces of the other processes of its run beside it
//! (`memwatch_format::run`), each with its pid (and rank), filtered by
//! `--pid`.

use std::path::Path;

use anyhow::Result;
use memwatch_format::TraceReader;

/// One process of a run and its trace.
pub struct Proc {
    pub reader: TraceReader,
    pub pid: u32,
    pub rank: Option<u32>,
    /// The trace's start, ns since the Unix epoch: a record's time plus
    /// this is comparable across the run's processes.
    pub start_ns: u64,
}

/// The processes of the run whose trace is `path` (that trace first, then
/// the others by rank and pid), keeping those in `pids` when it is not
/// empty. Refuses a `--pid` that no process of the run has.
pub fn open(path: &Path, pids: &[u32]) -> Result<Vec<Proc>> {
    let root = TraceReader::open(path)?;
    let members = memwatch_format::run::members(path, root.header());
    let mut procs = Vec::with_capacity(members.len() + 1);
    let root_pid = root.header().meta.pid;
    let root_rank = root.header().meta.property("rank").and_then(|r| r.parse().ok());
    let mut all = vec![root_pid];
    all.extend(members.iter().map(|m| m.pid));
    if let Some(bad) = pids.iter().find(|p| !all.contains(p)) {
        let list: Vec<String> = all.iter().map(u32::to_string).collect();
        anyhow::bail!(
            "--pid {bad}: no process of this run has that pid (its processes: {})",
            list.join(", ")
        );
    }
    let wanted = |pid: u32| pids.is_empty() || pids.contains(&pid);
    if wanted(root_pid) {
        procs.push(Proc {
            start_ns: root.header().meta.start_time_ns,
            reader: root,
            pid: root_pid,
            rank: root_rank,
        });
    }
    for m in members {
        if !wanted(m.pid) {
            continue;
        }
        let reader = TraceReader::open(&m.path)?;
        procs.push(Proc {
            start_ns: reader.header().meta.start_time_ns,
            reader,
            pid: m.pid,
            rank: m.rank,
        });
    }
    Ok(procs)
}

/// Prints the note of each trace of the run that did not end cleanly.
pub fn tail_notes(procs: &[Proc]) {
    for p in procs {
        if let Some(msg) = p.reader.tail_message() {
            eprintln!("memwatch: note: {}: {msg}", p.reader.path().display());
        }
    }
}
