//! The crash area: the last look of a process that died of a fatal signal.
//!
//! The journal ([`crate::journal`]) keeps every change the recorder found;
//! what it cannot keep is a change the program made on the line it died
//! in, which no line boundary saw. For that, a writer made by
//! [`TraceWriter::create`](crate::TraceWriter::create) also creates
//! `<trace>.crash` beside the trace, and the recorder's fatal-signal
//! handler (`SIGSEGV`, `SIGBUS`, `SIGABRT`, `SIGFPE`, `SIGILL`, and
//! `SIGTERM` left at its default) compares every watched region with the
//! recorder's copy of it and writes the bytes that differ here, in the
//! shared mapping, before the process dies as it would have. Closing the
//! trace removes the file.
//!
//! The handler runs in signal context, so this layout is plain enough to
//! be written without allocating or encoding: a header, then entries of
//! raw bytes. A reader turns them into ordinary records
//! ([`Crash::encode_records`]): `String`, `Frame` and `Stack` definitions
//! under ids reserved for it ([`CRASH_IDS`] on), then one full `Delta` per
//! changed region, on the line the thread that died was running, then a
//! [`Crashed`] record that says how the program ended. `memwatch record`
//! folds them into the trace with the journal's records
//! ([`crate::recover::fold`]), so the trace alone tells the story.
//!
//! The file's blocks are allocated before they can be written
//! (`posix_fallocate`, grown as regions are watched to hold every watched
//! byte once and the entries' headers), and one large range of address
//! space is mapped once (`MAP_NORESERVE`), so that growing the area never
//! moves it: the handler reads the base address and the allocated length
//! from atomics and writes only what fits.
//!
//! Layout (integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `MWCRSH\0\x01` |
//! | 8 | 4 | CRC-32 of the trace's header bytes: which trace this is the area of |
//! | 12 | 4 | state: 0 nothing happened, 1 the handler is writing, 2 done |
//! | 16 | 8 | committed: bytes of whole entries after the header |
//! | 24 | 4 | signal number |
//! | 28 | 4 | `si_code` (≤ 0: sent by `kill`, `raise`, `abort`) |
//! | 32 | 8 | thread id that received it |
//! | 40 | 8 | time, nanoseconds since the trace's start (its monotonic clock) |
//! | 48 | 4 | line the thread was running (0: unknown) |
//! | 52 | 4 | string id of the thread's name in the trace (0: unknown) |
//! | 56 | 4 | file name length (at most 2048) |
//! | 60 | 4 | function name length (at most 1024) |
//! | 64 | 4 | flags: 1 the area was too small for every change; 2 the recorder was busy (nothing compared) |
//! | 128 | 2048 | file name, UTF-8 |
//! | 2176 | 1024 | function name, UTF-8 |
//! | 4096 | committed | entries |
//!
//! An entry is 32 bytes of header, `seq` (u64), `region` (u32), 0 (u32),
//! `offset` (u64), `len` (u64), then `len` bytes (the region's new bytes at
//! `offset`), padded to a multiple of 8. Consecutive entries with one seq
//! and region are the ranges of one change.
//!
//! Nothing here runs in signal context; the recorder's handler writes the
//! layout above through [`CrashArea::base`].

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::record::{Context, Crashed, Delta, DeltaRange, FrameDef, Id, Record, StackDef, StringDef, NO_ID};

/// The first 8 bytes of a crash area.
pub const CRASH_MAGIC: [u8; 8] = *b"MWCRSH\0\x01";
/// Bytes before the first entry.
pub const CRASH_HEADER_LEN: usize = 4096;
/// Bytes of an entry before its data.
pub const ENTRY_HEADER_LEN: usize = 32;
/// Address space the area is mapped over, once: it can grow to this.
pub const RESERVE: usize = 64 << 30;
/// The first of the record ids a reader gives the definitions it makes
/// from a crash area (file, function, frame, stack: 4 ids).
pub const CRASH_IDS: Id = u32::MAX - 15;

/// Field offsets, for the writer in signal context.
pub const STATE_AT: usize = 12;
pub const COMMITTED_AT: usize = 16;
pub const SIGNAL_AT: usize = 24;
pub const CODE_AT: usize = 28;
pub const TID_AT: usize = 32;
pub const TIME_AT: usize = 40;
pub const LINE_AT: usize = 48;
pub const THREAD_NAME_AT: usize = 52;
pub const FILE_LEN_AT: usize = 56;
pub const FUNCTION_LEN_AT: usize = 60;
pub const FLAGS_AT: usize = 64;
pub const FILE_AT: usize = 128;
pub const FILE_MAX: usize = 2048;
pub const FUNCTION_AT: usize = FILE_AT + FILE_MAX;
pub const FUNCTION_MAX: usize = 1024;

/// `state`: the handler started writing.
pub const STATE_WRITING: u32 = 1;
/// `state`: the handler finished.
pub const STATE_DONE: u32 = 2;
// The `flags` of a crash area are those of the `Crashed` record it becomes.
pub use crate::record::{signal_name, FLAG_BUSY, FLAG_TRUNCATED};

/// The crash area of `trace`: `<trace>.crash`.
pub fn crash_path(trace: &Path) -> PathBuf {
    let mut p = trace.as_os_str().to_owned();
    p.push(".crash");
    PathBuf::from(p)
}

/// An open crash area, owned by one [`TraceWriter`](crate::TraceWriter).
pub struct CrashArea {
    path: PathBuf,
    file: File,
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only written through
// `base` by its owner and, in signal context, by the recorder's handler
// (which the owner disarms before dropping it).
unsafe impl Send for CrashArea {}

impl CrashArea {
    /// Creates (or truncates) the crash area at `path` for the trace whose
    /// header bytes hash to `header_crc`, private to its owner (`0600`).
    pub fn create(path: &Path, header_crc: u32) -> io::Result<CrashArea> {
        let file = crate::file::create_private(path)?;
        let len = CRASH_HEADER_LEN + (64 << 10);
        crate::file::allocate(&file, len)?;
        // SAFETY: a fresh shared mapping of our own file; pages past its
        // end are never touched (the handler writes below `len`).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RESERVE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base.cast::<u8>();
        // SAFETY: inside the allocated first page.
        unsafe {
            std::ptr::copy_nonoverlapping(CRASH_MAGIC.as_ptr(), base, 8);
            std::ptr::copy_nonoverlapping(header_crc.to_le_bytes().as_ptr(), base.add(8), 4);
        }
        Ok(CrashArea {
            path: path.to_path_buf(),
            file,
            base,
            len,
        })
    }

    /// Where the area is mapped; it never moves.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// Bytes allocated, header included: the handler writes below this.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: the header is there from the start.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Grows the area so that `entries` bytes of entries fit (up to
    /// [`RESERVE`]). A full disk or a file size limit leaves it as it was:
    /// the handler then keeps what fits and says so.
    pub fn ensure(&mut self, entries: usize) -> io::Result<()> {
        let needed = CRASH_HEADER_LEN.saturating_add(entries).min(RESERVE);
        if needed <= self.len {
            return Ok(());
        }
        let len = needed.next_multiple_of(1 << 20).min(RESERVE);
        if crate::file::file_size_limit().is_some_and(|limit| len as u64 > limit) {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        crate::file::allocate(&self.file, len)?;
        self.len = len;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the area (the trace was closed).
    pub fn remove(self) -> io::Result<()> {
        let path = self.path.clone();
        drop(self);
        std::fs::remove_file(path)
    }
}

impl Drop for CrashArea {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `create`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), RESERVE) };
    }
}

/// True when the file at `path` is the crash area of the trace whose
/// header bytes hash to `header_crc` (written to or not).
pub fn belongs(path: &Path, header_crc: u32) -> bool {
    let mut head = [0u8; 12];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok_and(|()| head[..8] == CRASH_MAGIC && head[8..12] == header_crc.to_le_bytes())
}

/// What a crash area holds, as [`read`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crash {
    pub signal: i32,
    pub si_code: i32,
    pub tid: u64,
    pub time_ns: u64,
    pub line: u32,
    pub thread_name: Id,
    pub file: String,
    pub function: String,
    /// The handler did not finish (it faulted itself, or was killed).
    pub unfinished: bool,
    pub flags: u32,
    /// `(seq, region, offset, new bytes)`.
    pub entries: Vec<(u64, u32, u64, Vec<u8>)>,
}

/// Reads the crash area at `path` if it belongs to the trace whose header
/// bytes hash to `header_crc` and a fatal signal wrote to it.
pub fn read(path: &Path, header_crc: u32) -> Option<Crash> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() < CRASH_HEADER_LEN || bytes[..8] != CRASH_MAGIC {
        return None;
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    if u32_at(8) != header_crc {
        return None;
    }
    let state = u32_at(STATE_AT);
    if state != STATE_WRITING && state != STATE_DONE {
        return None;
    }
    let text = |at: usize, len_at: usize, max: usize| {
        let n = (u32_at(len_at) as usize).min(max);
        String::from_utf8_lossy(&bytes[at..at + n]).into_owned()
    };
    let committed = usize::try_from(u64_at(COMMITTED_AT)).ok()?;
    let end = CRASH_HEADER_LEN.checked_add(committed)?.min(bytes.len());
    let mut entries = Vec::new();
    let mut at = CRASH_HEADER_LEN;
    while at + ENTRY_HEADER_LEN <= end {
        let seq = u64_at(at);
        let region = u32_at(at + 8);
        let offset = u64_at(at + 16);
        let Ok(len) = usize::try_from(u64_at(at + 24)) else {
            break;
        };
        let data_at = at + ENTRY_HEADER_LEN;
        let Some(data_end) = data_at.checked_add(len).filter(|&e| e <= end) else {
            break;
        };
        entries.push((seq, region, offset, bytes[data_at..data_end].to_vec()));
        at = data_at + len.next_multiple_of(8);
    }
    Some(Crash {
        signal: u32_at(SIGNAL_AT) as i32,
        si_code: u32_at(CODE_AT) as i32,
        tid: u64_at(TID_AT),
        time_ns: u64_at(TIME_AT),
        line: u32_at(LINE_AT),
        thread_name: u32_at(THREAD_NAME_AT),
        file: text(FILE_AT, FILE_LEN_AT, FILE_MAX),
        function: text(FUNCTION_AT, FUNCTION_LEN_AT, FUNCTION_MAX),
        unfinished: state != STATE_DONE,
        flags: u32_at(FLAGS_AT),
        entries,
    })
}

impl Crash {
    /// Changes found by the last look.
    pub fn changes(&self) -> usize {
        let mut n = 0;
        let mut prev = None;
        for (seq, region, ..) in &self.entries {
            if prev != Some((*seq, *region)) {
                n += 1;
                prev = Some((*seq, *region));
            }
        }
        n
    }

    /// Appends the records the area stands for to `out` (postcard, as in a
    /// chunk's payload): the definitions of the place the thread died in,
    /// then a full [`Delta`] (`shuffle` 1) per change, then [`Crashed`].
    /// Returns how many records, and the first and last seq.
    pub fn encode_records(&self, out: &mut Vec<u8>) -> (u32, u64, u64) {
        let (file_id, function_id, frame_id, stack_id) =
            (CRASH_IDS, CRASH_IDS + 1, CRASH_IDS + 2, CRASH_IDS + 3);
        let mut count = 0u32;
        let mut push = |out: &mut Vec<u8>, rec: &Record<'_>| {
            if postcard::to_io(rec, &mut *out).is_ok() {
                count += 1;
            }
        };
        let known = !self.file.is_empty();
        if known {
            push(
                out,
                &Record::String(StringDef {
                    id: file_id,
                    value: &self.file,
                }),
            );
            push(
                out,
                &Record::String(StringDef {
                    id: function_id,
                    value: &self.function,
                }),
            );
            push(
                out,
                &Record::Frame(FrameDef {
                    id: frame_id,
                    file: file_id,
                    function: function_id,
                    line: self.line,
                }),
            );
            push(
                out,
                &Record::Stack(StackDef {
                    id: stack_id,
                    frames: vec![frame_id],
                }),
            );
        }
        let ctx = Context {
            time_ns: self.time_ns,
            thread: self.tid,
            thread_name: self.thread_name,
            frame: if known { frame_id } else { NO_ID },
            stack: if known { stack_id } else { NO_ID },
        };
        let (mut first, mut last) = (crate::NO_SEQ, crate::NO_SEQ);
        let mut i = 0;
        while i < self.entries.len() {
            let (seq, region) = (self.entries[i].0, self.entries[i].1);
            let mut j = i;
            let mut ranges = Vec::new();
            while j < self.entries.len() && (self.entries[j].0, self.entries[j].1) == (seq, region) {
                ranges.push(DeltaRange {
                    offset: self.entries[j].2,
                    data: &self.entries[j].3,
                });
                j += 1;
            }
            push(
                out,
                &Record::Delta(Delta {
                    seq,
                    ctx,
                    region,
                    shuffle: 1,
                    full: true,
                    ranges,
                }),
            );
            if first == crate::NO_SEQ {
                first = seq;
            }
            last = seq;
            i = j;
        }
        push(out, &Record::Crashed(self.record()));
        (count, first, last)
    }

    /// The [`Crashed`] record that ends what the area stands for.
    pub fn record(&self) -> Crashed<'_> {
        Crashed {
            signal: self.signal,
            si_code: self.si_code,
            thread: self.tid,
            time_ns: self.time_ns,
            file: &self.file,
            line: self.line,
            changes: self.changes() as u64,
            flags: self.flags,
            finished: !self.unfinished,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_area_reads_back_as_records() {
        let dir = std::env::temp_dir().join(format!("mw-crash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.mwt.crash");
        let mut area = CrashArea::create(&path, 0x1234).unwrap();
        area.ensure(3 << 20).unwrap();
        assert!(area.len() >= CRASH_HEADER_LEN + (3 << 20));
        assert_eq!(read(&path, 0x1234), None, "nothing happened yet");
        // What the handler writes, by hand.
        let put = |at: usize, b: &[u8]| unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), area.base().add(at), b.len())
        };
        put(STATE_AT, &STATE_WRITING.to_le_bytes());
        put(SIGNAL_AT, &libc::SIGSEGV.to_le_bytes());
        put(TID_AT, &77u64.to_le_bytes());
        put(LINE_AT, &14u32.to_le_bytes());
        put(FILE_LEN_AT, &7u32.to_le_bytes());
        put(FILE_AT, b"/a/t.py\0");
        put(FUNCTION_LEN_AT, &8u32.to_le_bytes());
        put(FUNCTION_AT, b"<module>");
        let mut at = CRASH_HEADER_LEN;
        for (seq, offset, data) in [(9u64, 4u64, &b"abc"[..]), (9, 40, b"z"), (10, 0, b"qq")] {
            put(at, &seq.to_le_bytes());
            put(at + 8, &(if seq == 9 { 1u32 } else { 2 }).to_le_bytes());
            put(at + 16, &offset.to_le_bytes());
            put(at + 24, &(data.len() as u64).to_le_bytes());
            put(at + 32, data);
            at += 32 + data.len().next_multiple_of(8);
        }
        put(COMMITTED_AT, &((at - CRASH_HEADER_LEN) as u64).to_le_bytes());
        let c = read(&path, 0x1234).expect("written");
        assert!(c.unfinished);
        assert_eq!(c.changes(), 2);
        assert_eq!(c.entries[1], (9, 1, 40, b"z".to_vec()));
        let line = c.record().describe(1);
        assert!(line.contains("SIGSEGV in thread 77 at t.py:14"), "{line}");
        assert!(
            line.contains("recorded 2 changes before it was cut off"),
            "{line}"
        );
        let mut out = Vec::new();
        assert_eq!(c.encode_records(&mut out), (7, 9, 10));
        let mut rest = &out[..];
        let mut deltas = Vec::new();
        while !rest.is_empty() {
            let (rec, tail) = postcard::take_from_bytes::<Record<'_>>(rest).unwrap();
            if let Record::Delta(d) = rec {
                deltas.push((d.seq, d.region, d.ranges.len(), d.full, d.ctx.frame, d.ctx.thread));
            }
            rest = tail;
        }
        assert_eq!(
            deltas,
            vec![
                (9, 1, 2, true, CRASH_IDS + 2, 77),
                (10, 2, 1, true, CRASH_IDS + 2, 77)
            ]
        );
        assert_eq!(read(&path, 0x9999), None, "another trace's");
        area.remove().unwrap();
        assert!(!path.exists());
    }
}
