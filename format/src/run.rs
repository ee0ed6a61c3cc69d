//! Runs of several processes: a root trace and the traces beside it of
//! the processes started from the recorded one (`os.fork`,
//! multiprocessing, `subprocess`, torchrun's ranks).
//!
//! Each process of a run writes an ordinary trace of its own. The root
//! trace is `STEM.mwt` (the one `memwatch record` names); every other
//! process writes `STEM.PID.mwt` beside it, or `STEM.rankR.PID.mwt` when
//! it has a rank (`$RANK`). Their headers say which run they belong to,
//! with [`Meta`](crate::Meta) properties:
//!
//! | property | in | value |
//! |---|---|---|
//! | `run` | every trace of the run | the run's id (the same string in all of them) |
//! | `root` | the other processes' traces | the root trace's file name |
//! | `parent` | the other processes' traces | the pid of the process that started this one |
//! | `rank` | a process with `$RANK` | its rank |
//!
//! A reader finds the members of a run by their names and headers
//! ([`members`]); nothing about them is written to the root trace, so a
//! parent killed at any point, or one that never watched anything, loses
//! none of its children, and a trace of another run left with the same
//! name (an earlier `memwatch record -o` to the same path) is not taken
//! for one of them. No format version is involved: these are properties
//! of version 1's header.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::header::{decode_header, le_u32, Header, FIXED_HEADER_LEN, MAX_META_LEN};

/// The header property naming a trace's run.
pub const PROP_RUN: &str = "run";
/// The header property naming the run's root trace (file name).
pub const PROP_ROOT: &str = "root";
/// The header property holding the parent process's pid.
pub const PROP_PARENT: &str = "parent";
/// The header property holding the process's rank.
pub const PROP_RANK: &str = "rank";

/// One trace of a run, other than the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub path: PathBuf,
    pub pid: u32,
    pub parent: Option<u32>,
    pub rank: Option<u32>,
}

/// Reads only the header of the trace at `path`.
pub fn read_header(path: &Path) -> Result<Header> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut fixed = vec![0u8; FIXED_HEADER_LEN];
    let n = read_up_to(&mut f, &mut fixed).map_err(io)?;
    fixed.truncate(n);
    if n < FIXED_HEADER_LEN {
        return decode_header(&fixed, path);
    }
    let meta_len = le_u32(&fixed, 16).min(MAX_META_LEN + 1) as usize;
    let mut rest = vec![0u8; meta_len];
    let m = read_up_to(&mut f, &mut rest).map_err(io)?;
    fixed.extend_from_slice(&rest[..m]);
    decode_header(&fixed, path)
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The stem member traces of `root` are named after: its file name without
/// `.mwt`.
fn stem(root: &Path) -> Option<String> {
    let name = root.file_name()?.to_str()?;
    Some(match name.strip_suffix(".mwt") {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => name.to_string(),
    })
}

/// `(rank, pid)` from a member's file name `STEM.PID.mwt` or
/// `STEM.rankR.PID.mwt`, if it is one of `stem`'s.
fn parse_member_name(name: &str, stem: &str) -> Option<(Option<u32>, u32)> {
    let mid = name.strip_prefix(stem)?.strip_prefix('.')?.strip_suffix(".mwt")?;
    let (rank, pid) = match mid.split_once('.') {
        Some((r, p)) => (Some(r.strip_prefix("rank")?.parse().ok()?), p),
        None => (None, mid),
    };
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((rank, pid.parse().ok()?))
}

/// The path process `pid` (with rank `rank`) of the run rooted at `root`
/// writes its trace to.
pub fn member_path(root: &Path, pid: u32, rank: Option<u32>) -> PathBuf {
    let stem = stem(root).unwrap_or_else(|| "memwatch".into());
    let name = match rank {
        Some(r) => format!("{stem}.rank{r}.{pid}.mwt"),
        None => format!("{stem}.{pid}.mwt"),
    };
    root.with_file_name(name)
}

/// The other traces of the run whose root trace is `root` (whose header is
/// `root_header`), by rank and then pid. A root that names no run has
/// none. Files that are not traces, or are of another run, are skipped.
pub fn members(root: &Path, root_header: &Header) -> Vec<Member> {
    match root_header.meta.property(PROP_RUN) {
        Some(run) => scan(root, Some(run)),
        None => Vec::new(),
    }
}

/// The member traces beside `root` of run `run`, or with `None` of any run
/// (those an earlier run with the same root left), by rank and then pid.
pub fn scan(root: &Path, run: Option<&str>) -> Vec<Member> {
    let (Some(stem), Some(name)) = (stem(root), root.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let dir = match root.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(fname) = file_name.to_str() else { continue };
        let Some((rank, pid)) = parse_member_name(fname, &stem) else {
            continue;
        };
        let path = root.with_file_name(fname);
        let Ok(h) = read_header(&path) else { continue };
        let meta = &h.meta;
        let run_ok = match run {
            Some(r) => meta.property(PROP_RUN) == Some(r),
            None => meta.property(PROP_RUN).is_some(),
        };
        if !run_ok || meta.property(PROP_ROOT) != Some(name) || meta.pid != pid {
            continue;
        }
        found.push(Member {
            path,
            pid,
            parent: meta.property(PROP_PARENT).and_then(|p| p.parse().ok()),
            rank: rank.or_else(|| meta.property(PROP_RANK).and_then(|r| r.parse().ok())),
        });
    }
    found.sort_by_key(|m| (m.rank.unwrap_or(u32::MAX), m.pid));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_parse_back() {
        assert_eq!(parse_member_name("run.123.mwt", "run"), Some((None, 123)));
        assert_eq!(parse_member_name("run.rank2.77.mwt", "run"), Some((Some(2), 77)));
        assert_eq!(parse_member_name("run.mwt", "run"), None);
        assert_eq!(parse_member_name("run.x.mwt", "run"), None);
        assert_eq!(parse_member_name("run.mwt.journal", "run"), None);
        assert_eq!(parse_member_name("running.12.mwt", "run"), None);
        assert_eq!(parse_member_name("run.2.12.mwt", "run"), None);
        let p = member_path(Path::new("/t/run.mwt"), 5, Some(1));
        assert_eq!(p, Path::new("/t/run.rank1.5.mwt"));
        assert_eq!(member_path(Path::new("out"), 5, None), Path::new("out.5.mwt"));
    }
}
