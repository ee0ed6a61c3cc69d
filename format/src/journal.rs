//! The journal: records that wait for their chunk, kept where a dying
//! process cannot take them.
//!
//! A [`TraceWriter`](crate::TraceWriter) gathers records in memory until it
//! emits them as one compressed chunk (at 1 MiB, or after 500 ms). With a
//! journal, every record is also copied, as it is appended, into a shared
//! mapping (`MAP_SHARED`) of the file `<trace>.journal` beside the trace:
//! once the copy is done the bytes are in the kernel's page cache, and they
//! stay there whatever ends the process (an exception, `os._exit`, `abort`,
//! `SIGSEGV`, `SIGKILL`). Only the loss of the machine itself can lose
//! them.
//!
//! Chunks are written by the writer's sealer thread ([`crate::sealer`]),
//! so the journal holds the records of several chunks: those still pending
//! and those queued for the sealer, from chunk `chunk` on. Some of them may
//! have reached the trace already; a reader skips as many records as the
//! trace's chunks from `chunk` on hold. The journal starts over when the
//! sealer has written everything handed to it (at the start of a chunk, or,
//! once it holds [`JOURNAL_RESTART`](crate::writer::JOURNAL_RESTART) bytes,
//! after waiting for it).
//!
//! A reader that opens a trace that was not closed cleanly looks for its
//! journal and reads the records it holds as one more chunk, after the
//! trace's whole chunks ([`TraceReader::open`](crate::TraceReader::open)).
//! A cleanly closed trace has no journal: closing removes it.
//!
//! Layout (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `MWJRNL\0\x01` |
//! | 8 | 4 | CRC-32 of the trace's header bytes: which trace this is the journal of |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 8 | chunk: the index the first of its records' chunks has among the trace's records chunks |
//! | 24 | 8 | committed: the length of the whole records that follow the header |
//! | 32 | 8 | stop: the last seq recorded before recording stopped |
//! | 40 | 8 | stop: when, nanoseconds since the Unix epoch |
//! | 48 | 8 | stop: events not recorded after it (as counted when the writer closed) |
//! | 56 | 4 | stop: the error (`errno`) that stopped it |
//! | 60 | 4 | stop: 1 once the fields above are set, else 0 |
//! | 64 | committed | records, postcard-encoded one after another, as in a chunk's raw payload |
//!
//! Commit order, so that a process that dies between any two stores
//! leaves a journal that reads right: a record's bytes are copied first and
//! `committed` grows after them; starting over sets `committed` to 0 before
//! `chunk` moves on, so a journal whose records already reached the trace
//! names a chunk the trace has (and is ignored), and never names the next
//! chunk while still holding the old records.
//!
//! The file's blocks are allocated (`posix_fallocate`) before they are
//! mapped, so a full disk is an error when the journal grows, never a
//! `SIGBUS` when a record is copied in. For the same reason the journal is
//! where a writer that can no longer write the trace (a full disk, a file
//! size limit) notes that recording stopped, after which seq, when and why:
//! readers turn that into a `Lost` record at the end of what they read.
//!
//! Nothing here runs in signal context; the writer's owner serialises all
//! calls.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

/// The first 8 bytes of a journal.
pub const JOURNAL_MAGIC: [u8; 8] = *b"MWJRNL\0\x01";
/// Bytes before the first record.
pub const JOURNAL_HEADER_LEN: usize = 64;
/// The journal's first size; it doubles when a record does not fit (a
/// chunk's worth of records is 1 MiB by default).
const INITIAL_LEN: usize = 256 << 10;

const CHUNK_AT: usize = 16;
const COMMITTED_AT: usize = 24;
const STOP_SEQ_AT: usize = 32;
const STOP_TIME_AT: usize = 40;
const STOP_LOST_AT: usize = 48;
const STOP_ERRNO_AT: usize = 56;
const STOP_SET_AT: usize = 60;

/// The journal of `trace`: `<trace>.journal`.
pub fn journal_path(trace: &Path) -> PathBuf {
    let mut p = trace.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

/// An open journal, written by one [`TraceWriter`](crate::TraceWriter).
pub struct Journal {
    path: PathBuf,
    file: File,
    map: MmapMut,
    committed: usize,
}

impl Journal {
    /// Creates (or truncates) the journal at `path` for the trace whose
    /// header bytes hash to `header_crc`, private to its owner (`0600`).
    pub fn create(path: &Path, header_crc: u32, chunk: u64) -> io::Result<Journal> {
        let file = crate::writer::create_private(path)?;
        allocate(&file, INITIAL_LEN)?;
        // SAFETY: the file is ours (just created, 0600) and only this
        // writer maps it for writing; its length only grows while mapped.
        let mut map = unsafe { MmapMut::map_mut(&file)? };
        map[..8].copy_from_slice(&JOURNAL_MAGIC);
        map[8..12].copy_from_slice(&header_crc.to_le_bytes());
        let mut j = Journal {
            path: path.to_path_buf(),
            file,
            map,
            committed: 0,
        };
        j.word(CHUNK_AT).store(chunk, Ordering::Release);
        j.word(COMMITTED_AT).store(0, Ordering::Release);
        Ok(j)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn word(&mut self, at: usize) -> &AtomicU64 {
        let p = self.map[at..at + 8].as_mut_ptr();
        // SAFETY: 8 bytes inside the map, 8-aligned (the map is page
        // aligned and `at` a multiple of 8); the map outlives the borrow.
        unsafe { AtomicU64::from_ptr(p.cast::<u64>()) }
    }

    /// Copies `record` (whole records, encoded) after the committed ones,
    /// then commits it.
    pub fn append(&mut self, record: &[u8]) -> io::Result<()> {
        let start = JOURNAL_HEADER_LEN + self.committed;
        let end = start + record.len();
        if end > self.map.len() {
            self.grow(end)?;
        }
        self.map[start..end].copy_from_slice(record);
        self.committed += record.len();
        let c = self.committed as u64;
        self.word(COMMITTED_AT).store(c, Ordering::Release);
        Ok(())
    }

    /// Bytes of records committed since the journal last started over.
    pub fn committed(&self) -> usize {
        self.committed
    }

    /// Starts over: the committed records reached the trace, and the next
    /// ones will be chunk `chunk`.
    pub fn restart(&mut self, chunk: u64) {
        self.word(COMMITTED_AT).store(0, Ordering::Release);
        self.word(CHUNK_AT).store(chunk, Ordering::Release);
        self.committed = 0;
    }

    /// Notes that recording stopped after `after_seq` at `unix_ns` because
    /// of `errno`. The journal's blocks are allocated: this cannot fail.
    pub fn mark_stopped(&mut self, after_seq: u64, unix_ns: u64, errno: i32) {
        self.map[STOP_SEQ_AT..STOP_SEQ_AT + 8].copy_from_slice(&after_seq.to_le_bytes());
        self.map[STOP_TIME_AT..STOP_TIME_AT + 8].copy_from_slice(&unix_ns.to_le_bytes());
        self.map[STOP_ERRNO_AT..STOP_ERRNO_AT + 4].copy_from_slice(&errno.to_le_bytes());
        std::sync::atomic::fence(Ordering::Release);
        self.map[STOP_SET_AT..STOP_SET_AT + 4].copy_from_slice(&1u32.to_le_bytes());
    }

    /// Notes how many events went unrecorded after the stop.
    pub fn note_lost(&mut self, events: u64) {
        self.map[STOP_LOST_AT..STOP_LOST_AT + 8].copy_from_slice(&events.to_le_bytes());
    }

    fn grow(&mut self, needed: usize) -> io::Result<()> {
        let len = needed.next_power_of_two().max(self.map.len() * 2);
        if file_size_limit().is_some_and(|limit| len as u64 > limit) {
            // Past the limit the kernel would also send SIGXFSZ.
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        allocate(&self.file, len)?;
        // SAFETY: as in `create`; the old map is dropped on assignment,
        // after the new one covers the same bytes.
        self.map = unsafe { MmapMut::map_mut(&self.file)? };
        Ok(())
    }

    /// Removes the journal (the trace was closed: it holds everything).
    pub fn remove(self) -> io::Result<()> {
        let path = self.path.clone();
        drop(self);
        std::fs::remove_file(path)
    }
}

/// The process's file size limit (`RLIMIT_FSIZE`, `ulimit -f`) in bytes,
/// if it has one. Writers check it before they write, so that going past
/// it is an error (`EFBIG`), never the `SIGXFSZ` that would kill a program
/// that did not ignore it.
pub fn file_size_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut r) } == 0;
    (ok && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
}

/// Makes `file` `len` bytes long with its blocks allocated.
pub(crate) fn allocate(file: &File, len: usize) -> io::Result<()> {
    // SAFETY: a plain system call on an open descriptor.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) } {
        0 => Ok(()),
        libc::EOPNOTSUPP | libc::EINVAL => file.set_len(len as u64),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// What a journal left behind holds, as [`read`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The chunk index its first records were to have.
    pub chunk: u64,
    /// The committed records' bytes.
    pub records: Vec<u8>,
    /// Set when the writer could no longer write the trace.
    pub stopped: Option<Stop>,
}

/// Why and when a writer stopped writing its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop {
    /// The last seq recorded.
    pub after_seq: u64,
    /// When, in nanoseconds since the Unix epoch.
    pub unix_ns: u64,
    /// Events not recorded after it.
    pub lost: u64,
    /// The error that stopped it.
    pub errno: i32,
}

impl Stop {
    /// Why, for people: "no space left on device", "file size limit
    /// reached (ulimit -f)", or the system's words for other errors.
    pub fn reason(&self) -> String {
        match self.errno {
            libc::ENOSPC => "no space left on device".into(),
            libc::EDQUOT => "disk quota exceeded".into(),
            libc::EFBIG => "file size limit reached (ulimit -f)".into(),
            libc::ENOENT | libc::ESTALE => "the trace's directory is gone".into(),
            e => io::Error::from_raw_os_error(e).to_string(),
        }
    }
}

/// Reads the journal at `path` if it belongs to the trace whose header
/// bytes hash to `header_crc`; `None` when there is none, it is another
/// trace's, or it is not a journal.
pub fn read(path: &Path, header_crc: u32) -> Option<Pending> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() < JOURNAL_HEADER_LEN || bytes[..8] != JOURNAL_MAGIC {
        return None;
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    if u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) != header_crc {
        return None;
    }
    let committed = usize::try_from(u64_at(COMMITTED_AT)).ok()?;
    let end = JOURNAL_HEADER_LEN.checked_add(committed)?;
    let records = bytes.get(JOURNAL_HEADER_LEN..end)?.to_vec();
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let stopped = (u32_at(STOP_SET_AT) == 1).then(|| Stop {
        after_seq: u64_at(STOP_SEQ_AT),
        unix_ns: u64_at(STOP_TIME_AT),
        lost: u64_at(STOP_LOST_AT),
        errno: u32_at(STOP_ERRNO_AT) as i32,
    });
    Some(Pending {
        chunk: u64_at(CHUNK_AT),
        records,
        stopped,
    })
}

/// Moves what a dead writer left in the journal of the trace at `trace`
/// into the trace itself, as its last chunk (replacing a partial chunk the
/// writer was cut off in), then removes the journal: the trace holds
/// everything on its own and can be copied alone. Returns how many records
/// moved (`None`: none; a note that recording stopped may still have moved,
/// as a `Lost` record). A journal whose records
/// already reached the trace is removed too. A closed trace is left as it
/// is.
///
/// Only for a trace whose writer is gone (`memwatch record` calls it after
/// the program ended): a live writer would go on writing after the chunk.
pub fn fold(trace: &Path) -> crate::Result<Option<u32>> {
    let reader = crate::TraceReader::open(trace)?;
    if reader.tail() == crate::Tail::Closed {
        return Ok(None);
    }
    let jpath = journal_path(trace);
    let io = |path: &Path, source| crate::Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let cpath = crate::crash::crash_path(trace);
    let header_crc = crc32fast::hash(&reader.bytes()[..reader.header().len as usize]);
    let crash_ours = crate::crash::belongs(&cpath, header_crc);
    if !reader.last_chunk_from_journal() {
        if read(&jpath, header_crc).is_some() {
            std::fs::remove_file(&jpath).map_err(|e| io(&jpath, e))?;
        }
        if crash_ours {
            std::fs::remove_file(&cpath).map_err(|e| io(&cpath, e))?;
        }
        return Ok(None);
    }
    let n = reader.recovered().map_or(0, |(n, _)| n);
    let last = *reader.chunks().last().expect("a recovered chunk");
    let chunk = &reader.bytes()[last.offset as usize..(last.offset + last.header.total_len()) as usize];
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(trace)
        .map_err(|e| io(trace, e))?;
    use std::io::{Seek, SeekFrom, Write};
    file.set_len(last.offset)
        .and_then(|()| file.seek(SeekFrom::Start(last.offset)))
        .and_then(|_| file.write_all(chunk))
        .and_then(|()| file.sync_data())
        .map_err(|e| io(trace, e))?;
    if jpath.exists() {
        std::fs::remove_file(&jpath).map_err(|e| io(&jpath, e))?;
    }
    if crash_ours {
        std::fs::remove_file(&cpath).map_err(|e| io(&cpath, e))?;
    }
    Ok((n > 0).then_some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_records_read_back_after_the_writer_is_gone() {
        let (path, mut j) = new_journal(7, 3);
        j.append(b"abc").unwrap();
        j.append(&vec![9u8; 3 << 20]).unwrap(); // grows past the first size
        std::mem::forget(j); // as a killed process leaves it
        let p = read(&path, 7).unwrap();
        assert_eq!(p.chunk, 3);
        assert_eq!(p.records.len(), 3 + (3 << 20));
        assert_eq!(&p.records[..3], b"abc");
        assert!(read(&path, 8).is_none(), "another trace's journal");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn restart_forgets_the_records_and_names_the_next_chunk() {
        let (path, mut j) = new_journal(1, 0);
        j.append(b"old").unwrap();
        j.restart(1);
        j.append(b"new!").unwrap();
        let p = read(&path, 1).unwrap();
        assert_eq!((p.chunk, &p.records[..]), (1, &b"new!"[..]));
        j.remove().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_stop_is_noted_with_its_seq_time_and_reason() {
        let (path, mut j) = new_journal(5, 2);
        j.append(b"r").unwrap();
        assert_eq!(read(&path, 5).unwrap().stopped, None);
        j.mark_stopped(41, 1_000, libc::ENOSPC);
        j.note_lost(19);
        let stop = read(&path, 5).unwrap().stopped.unwrap();
        assert_eq!((stop.after_seq, stop.unix_ns, stop.lost), (41, 1_000, 19));
        assert_eq!(stop.reason(), "no space left on device");
        let big = Stop {
            errno: libc::EFBIG,
            ..stop
        };
        assert_eq!(big.reason(), "file size limit reached (ulimit -f)");
    }

    /// A new journal in a directory of its own, and its path.
    fn new_journal(header_crc: u32, chunk: u64) -> (PathBuf, Journal) {
        let path = tempdir().join("t.mwt.journal");
        let j = Journal::create(&path, header_crc, chunk).unwrap();
        (path, j)
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mwjournal-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
