//! A run of several processes, read as one: the trace named on the command
//! line and the traces of the other processes of its run beside it
//! (`memwatch_format::run`), each with its pid (and rank), filtered by
//! `--pid`.
//!
//! Times across a run: each trace counts from its own start. A command
//! that merges processes puts a record at `time_ns + shift_ns(base)`, where
//! `base` ([`base_ns`]) is the earliest start of the run's processes, so
//! that "150ms" means 150 ms after the run began, in every process.

use std::path::Path;

use anyhow::Result;
use memwatch_format::TraceReader;

use crate::Point;

/// One process of a run and its trace.
pub struct Proc {
    pub reader: TraceReader,
    pub pid: u32,
    pub rank: Option<u32>,
    /// The pid of the process that started this one (none for the root).
    pub parent: Option<u32>,
    /// The trace's start, ns since the Unix epoch: a record's time plus
    /// this is comparable across the run's processes.
    pub start_ns: u64,
}

impl Proc {
    /// `4242`, or `4242 (rank 1)`.
    pub fn label(&self) -> String {
        match self.rank {
            Some(r) => format!("{} (rank {r})", self.pid),
            None => self.pid.to_string(),
        }
    }

    /// How much later than `base` this process's trace started, in ns.
    pub fn shift_ns(&self, base: u64) -> u64 {
        self.start_ns.saturating_sub(base)
    }

    /// The seq of this process's trace that `point` names, a time being
    /// counted from the run's start `base` (for a run of one process, its
    /// own start).
    pub fn seq_of(&self, point: Point, base: u64) -> Result<u64> {
        match point {
            Point::Seq(s) => Ok(s),
            Point::Time(t) => {
                let shift = self.shift_ns(base);
                if t < shift {
                    anyhow::bail!(
                        "--at {}: process {} started {} after the run did; give a later time",
                        memwatch_analyzer::duration_text(t),
                        self.label(),
                        memwatch_analyzer::duration_text(shift)
                    );
                }
                Ok(memwatch_analyzer::seq_at_time(&self.reader, t - shift)?)
            }
        }
    }
}

/// The earliest start of `procs` (ns since the Unix epoch).
pub fn base_ns(procs: &[Proc]) -> u64 {
    procs.iter().map(|p| p.start_ns).min().unwrap_or(0)
}

/// The processes of the run whose trace is `path` (that trace first, then
/// the others by rank and pid), keeping those in `pids` when it is not
/// empty. Refuses a `--pid` that no process of the run has.
pub fn open(path: &Path, pids: &[u32]) -> Result<Vec<Proc>> {
    let root = TraceReader::open(path)?;
    let members = memwatch_format::run::members(path, root.header());
    let mut procs = Vec::with_capacity(members.len() + 1);
    let root_pid = root.header().meta.pid;
    let root_rank = root
        .header()
        .meta
        .property(memwatch_format::run::PROP_RANK)
        .and_then(|r| r.parse().ok());
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
    // None for a run's root; a member's trace opened by its own name has one.
    let root_parent = root
        .header()
        .meta
        .property(memwatch_format::run::PROP_PARENT)
        .and_then(|p| p.parse().ok());
    if wanted(root_pid) {
        procs.push(Proc {
            start_ns: root.header().meta.start_time_ns,
            reader: root,
            pid: root_pid,
            rank: root_rank,
            parent: root_parent,
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
            parent: m.parent,
        });
    }
    Ok(procs)
}

/// The one process of `procs` that watched a region tagged `tag`, for the
/// commands that read one region (`state`, `blame`). With one process,
/// that one (the analyzer then says what tags it has, if not this one).
/// A tag watched in several processes (a fork's child keeps its parent's
/// watches) needs `--pid`: the error lists them.
pub fn with_tag<'a>(procs: &'a [Proc], tag: &str) -> Result<&'a Proc> {
    if procs.len() == 1 {
        return Ok(&procs[0]);
    }
    let mut found = Vec::new();
    for p in procs {
        if memwatch_analyzer::has_region(&p.reader, tag)? {
            found.push(p);
        }
    }
    match found.as_slice() {
        [one] => Ok(one),
        [] => {
            let list: Vec<String> = procs.iter().map(Proc::label).collect();
            anyhow::bail!(
                "no process of this run watched a region tagged {tag:?} (its processes: {}); \
                 `memwatch summary` lists each one's tags",
                list.join(", ")
            )
        }
        several => {
            let list: Vec<String> = several.iter().map(|p| p.label()).collect();
            anyhow::bail!(
                "{tag:?} was watched in {} processes of this run ({}): name one with --pid",
                several.len(),
                list.join(", ")
            )
        }
    }
}

/// The process of the run `procs` (all of its processes) to read the
/// region `tag` of: process `pid` if given, else the one that watched the
/// tag ([`with_tag`]).
pub fn pick<'a>(procs: &'a [Proc], pid: Option<u32>, tag: &str) -> Result<&'a Proc> {
    let Some(pid) = pid else {
        return with_tag(procs, tag);
    };
    procs.iter().find(|p| p.pid == pid).ok_or_else(|| {
        let list: Vec<String> = procs.iter().map(|p| p.pid.to_string()).collect();
        anyhow::anyhow!(
            "--pid {pid}: no process of this run has that pid (its processes: {})",
            list.join(", ")
        )
    })
}

/// Prints the note of each trace of the run that did not end cleanly.
pub fn tail_notes(procs: &[Proc]) {
    for p in procs {
        if let Some(msg) = p.reader.tail_message() {
            eprintln!("memwatch: note: {}: {msg}", p.reader.path().display());
        }
    }
}
