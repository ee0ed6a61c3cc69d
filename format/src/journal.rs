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
//! trace's chunks from `chunk` on hold.
//!
//! The journal is a ring. Once the sealer has written a chunk, the writer
//! forgets that chunk's records: the live records start at the next
//! chunk's first one, and new records go after the last, wrapping to the
//! start of the ring when the end has no room. So the journal never waits
//! for the sealer to catch up as a whole, and its pages, once in the page
//! cache, are used again and again (a new page is dear: see
//! docs/development.md, "Measuring on these VMs"). It grows (doubling)
//! only when what is not yet written does not fit; when the sealer is
//! behind and the ring is as large as the sealer's queue allows, the
//! writer waits for the sealer's next chunk instead ([`crate::TraceWriter`]).
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
//! | 0 | 8 | magic `MWJRNL\0\x02` |
//! | 8 | 4 | CRC-32 of the trace's header bytes: which trace this is the journal of |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 8 | the active slot: 0 or 1 |
//! | 24 | 32 | slot 0 |
//! | 56 | 32 | slot 1 |
//! | 88 | 8 | stop: the last seq recorded before recording stopped |
//! | 96 | 8 | stop: when, nanoseconds since the Unix epoch |
//! | 104 | 8 | stop: events not recorded after it (as counted when the writer closed) |
//! | 112 | 4 | stop: the error (`errno`) that stopped it |
//! | 116 | 4 | stop: 1 once the fields above are set, else 0 |
//! | 120 | 8 | reserved, 0 |
//! | 128 | | the ring of records, postcard-encoded one after another, as in a chunk's raw payload |
//!
//! A slot is four `u64`: `chunk` (the index the first live record's chunk
//! has among the trace's records chunks), `a_start`, `a_len`, `b_len`. The
//! live records are the `a_len` bytes at `a_start` followed by the `b_len`
//! bytes at 128 (the part that wrapped), read as one run of bytes; a record
//! may not be cut between the two only because the writer never cuts one.
//!
//! Commit order, so that a process that dies between any two stores
//! leaves a journal that reads right: a record's bytes are copied first
//! and then the active slot's `a_len` (or `b_len`, once wrapped) grows over
//! them, one aligned store. Every other change (forgetting written chunks,
//! wrapping, growing) fills the inactive slot and then flips the active
//! word, so a reader sees the old slot or the new one, never a mix; bytes
//! the old slot still covers are written only after the flip.
//!
//! The file's blocks are allocated (`posix_fallocate`) before they are
//! mapped, so a full disk is an error when the journal grows, never a
//! `SIGBUS` when a record is copied in. For the same reason the journal is
//! where a writer that can no longer write the trace (a full disk, a file
//! size limit) notes that recording stopped, after which seq, when and why:
//! readers turn that into a `Lost` record at the end of what they read.
//!
//! Journals of version 1 (magic `MWJRNL\0\x01`: no ring, the records from
//! offset 64, their length at 24, the stop fields at 32) still read.
//!
//! Nothing here runs in signal context; the writer's owner serialises all
//! calls.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

use crate::file::{allocate, create_private, file_size_limit};

/// The first 8 bytes of a journal.
pub const JOURNAL_MAGIC: [u8; 8] = *b"MWJRNL\0\x02";
/// The magic of version 1, read still.
const JOURNAL_MAGIC_V1: [u8; 8] = *b"MWJRNL\0\x01";
/// Bytes before the ring.
pub const JOURNAL_HEADER_LEN: usize = 128;
/// The journal's first size; it doubles when what is not yet written does
/// not fit (a chunk's worth of records is 1 MiB by default).
const INITIAL_LEN: usize = 256 << 10;

const ACTIVE_AT: usize = 16;
const SLOTS_AT: usize = 24;
const SLOT_LEN: usize = 32;
const STOP_SEQ_AT: usize = 88;
const STOP_TIME_AT: usize = 96;
const STOP_LOST_AT: usize = 104;
const STOP_ERRNO_AT: usize = 112;
const STOP_SET_AT: usize = 116;

/// Where the live records are: see the module's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    chunk: u64,
    a_start: usize,
    a_len: usize,
    b_len: usize,
}

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
    /// The active slot, as published.
    slot: Slot,
    active: u64,
    /// Bytes appended since the journal was made: where the next record
    /// starts in the run of all records, forgotten or not.
    head: u64,
}

impl Journal {
    /// Creates (or truncates) the journal at `path` for the trace whose
    /// header bytes hash to `header_crc`, private to its owner (`0600`);
    /// its first records will be chunk `chunk`'s.
    pub fn create(path: &Path, header_crc: u32, chunk: u64) -> io::Result<Journal> {
        let file = create_private(path)?;
        allocate(&file, INITIAL_LEN)?;
        // SAFETY: the file is ours (just created, 0600) and only this
        // writer maps it for writing; its length only grows while mapped.
        let mut map = unsafe { MmapMut::map_mut(&file)? };
        map[..8].copy_from_slice(&JOURNAL_MAGIC);
        map[8..12].copy_from_slice(&header_crc.to_le_bytes());
        let slot = Slot {
            chunk,
            a_start: JOURNAL_HEADER_LEN,
            a_len: 0,
            b_len: 0,
        };
        let mut j = Journal {
            path: path.to_path_buf(),
            file,
            map,
            slot,
            active: 0,
            head: 0,
        };
        j.write_slot(0, slot);
        j.word(ACTIVE_AT).store(0, Ordering::Release);
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

    fn write_slot(&mut self, which: u64, s: Slot) {
        let at = SLOTS_AT + which as usize * SLOT_LEN;
        let words = [s.chunk, s.a_start as u64, s.a_len as u64, s.b_len as u64];
        for (i, w) in words.into_iter().enumerate() {
            self.word(at + 8 * i).store(w, Ordering::Release);
        }
    }

    /// Makes `s` the active slot: fills the inactive one, then flips.
    fn publish(&mut self, s: Slot) {
        let next = 1 - self.active;
        self.write_slot(next, s);
        self.word(ACTIVE_AT).store(next, Ordering::Release);
        self.active = next;
        self.slot = s;
    }

    /// Commits `len` more bytes of the segment being appended to: one
    /// store into the active slot.
    fn commit(&mut self, field: usize, len: usize) {
        let at = SLOTS_AT + self.active as usize * SLOT_LEN + 8 * field;
        self.word(at).store(len as u64, Ordering::Release);
    }

    /// Copies `record` (whole records, encoded) after the live ones, then
    /// commits it; `false` (and nothing written) when the ring has no room
    /// for it: [`forget`](Journal::forget) or [`grow`](Journal::grow) first.
    pub fn try_append(&mut self, record: &[u8]) -> bool {
        let n = record.len();
        let s = self.slot;
        if s.b_len == 0 {
            let end = s.a_start + s.a_len;
            if end + n <= self.map.len() {
                self.map[end..end + n].copy_from_slice(record);
                self.slot.a_len += n;
                self.commit(2, self.slot.a_len);
            } else if JOURNAL_HEADER_LEN + n <= s.a_start {
                // Wraps: the bytes first, outside the live ones, then the
                // slot that covers them.
                self.map[JOURNAL_HEADER_LEN..JOURNAL_HEADER_LEN + n].copy_from_slice(record);
                self.publish(Slot { b_len: n, ..s });
            } else {
                return false;
            }
        } else {
            let end = JOURNAL_HEADER_LEN + s.b_len;
            if end + n > s.a_start {
                return false;
            }
            self.map[end..end + n].copy_from_slice(record);
            self.slot.b_len += n;
            self.commit(3, self.slot.b_len);
        }
        self.head += n as u64;
        true
    }

    /// Copies `record` after the live ones, growing the ring if it has no
    /// room (an error when it cannot grow: a full disk, a file size limit).
    pub fn append(&mut self, record: &[u8]) -> io::Result<()> {
        if !self.try_append(record) {
            self.grow(record.len())?;
            let appended = self.try_append(record);
            debug_assert!(appended, "a grown ring has room at its end");
        }
        Ok(())
    }

    /// Where the next record starts, in bytes appended since the journal
    /// was made.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Bytes of live records.
    pub fn live(&self) -> usize {
        self.slot.a_len + self.slot.b_len
    }

    /// The ring's size in bytes, header included.
    pub fn capacity(&self) -> usize {
        self.map.len()
    }

    /// Forgets the records before `upto` (a [`head`](Journal::head) taken
    /// before the first record of chunk `chunk`): the chunks before it
    /// reached the trace.
    pub fn forget(&mut self, chunk: u64, upto: u64) {
        let tail = self.head - self.live() as u64;
        let d = usize::try_from(upto.saturating_sub(tail))
            .unwrap_or(usize::MAX)
            .min(self.live());
        let s = self.slot;
        let mut next = if d <= s.a_len {
            Slot {
                chunk,
                a_start: s.a_start + d,
                a_len: s.a_len - d,
                b_len: s.b_len,
            }
        } else {
            let d = d - s.a_len;
            Slot {
                chunk,
                a_start: JOURNAL_HEADER_LEN + d,
                a_len: s.b_len - d,
                b_len: 0,
            }
        };
        if next.a_len == 0 {
            // What wrapped is now the whole run; an empty ring starts over
            // at its start.
            next = Slot {
                chunk,
                a_start: JOURNAL_HEADER_LEN,
                a_len: next.b_len,
                b_len: 0,
            };
        }
        if next != s {
            self.publish(next);
        }
    }

    /// Forgets every record: they all reached the trace, and the next ones
    /// will be chunk `chunk`'s.
    pub fn restart(&mut self, chunk: u64) {
        self.forget(chunk, self.head);
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

    /// Grows the ring (at least doubling it) so that `more` bytes fit
    /// after the live ones. A ring that wrapped stays wrapped: its first
    /// part moves to the end of the grown ring, so that the room opens
    /// after the part that wrapped, and the ring needs no more than the
    /// live records and `more` (moving the wrapped part after the first
    /// would need the first part's offset on top, which can double the
    /// ring once more: new pages are dear).
    pub fn grow(&mut self, more: usize) -> io::Result<()> {
        let old = self.map.len();
        let s = self.slot;
        let needed = if s.b_len > 0 {
            JOURNAL_HEADER_LEN + self.live() + more
        } else {
            s.a_start + s.a_len + more
        };
        let len = (old * 2).max(needed.next_power_of_two());
        if file_size_limit().is_some_and(|limit| len as u64 > limit) {
            // Past the limit the kernel would also send SIGXFSZ.
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        allocate(&self.file, len)?;
        // SAFETY: as in `create`; the old map is dropped on assignment,
        // after the new one covers the same bytes.
        self.map = unsafe { MmapMut::map_mut(&self.file)? };
        if s.b_len > 0 {
            // The new place is past the old ring's end (`len - a_len >=
            // old`, as `len >= 2 * old`): the old slot does not cover it,
            // so the copy comes first and the flip after.
            let to = len - s.a_len;
            self.map.copy_within(s.a_start..s.a_start + s.a_len, to);
            self.publish(Slot { a_start: to, ..s });
        }
        Ok(())
    }

    /// Removes the journal (the trace was closed: it holds everything).
    pub fn remove(self) -> io::Result<()> {
        let path = self.path.clone();
        drop(self);
        std::fs::remove_file(path)
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
/// trace's, or it is not a journal (or names bytes it does not have).
pub fn read(path: &Path, header_crc: u32) -> Option<Pending> {
    let bytes = std::fs::read(path).ok()?;
    let u64_at =
        |at: usize| -> Option<u64> { Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?)) };
    let u32_at =
        |at: usize| -> Option<u32> { Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?)) };
    if u32_at(8)? != header_crc {
        return None;
    }
    let magic = bytes.get(..8)?;
    // Where the stop fields are, by version: (seq, time, lost, errno, set).
    let (chunk, records, stop_at) = if magic == JOURNAL_MAGIC {
        let active = u64_at(ACTIVE_AT)?;
        if active > 1 {
            return None;
        }
        let at = SLOTS_AT + active as usize * SLOT_LEN;
        let field = |i: usize| u64_at(at + 8 * i).and_then(|v| usize::try_from(v).ok());
        let (a_start, a_len, b_len) = (field(1)?, field(2)?, field(3)?);
        let a = bytes.get(a_start..a_start.checked_add(a_len)?)?;
        let b = bytes.get(JOURNAL_HEADER_LEN..JOURNAL_HEADER_LEN.checked_add(b_len)?)?;
        if a_start < JOURNAL_HEADER_LEN || (b_len > 0 && JOURNAL_HEADER_LEN + b_len > a_start) {
            return None;
        }
        (
            u64_at(at)?,
            [a, b].concat(),
            [
                STOP_SEQ_AT,
                STOP_TIME_AT,
                STOP_LOST_AT,
                STOP_ERRNO_AT,
                STOP_SET_AT,
            ],
        )
    } else if magic == JOURNAL_MAGIC_V1 {
        let committed = usize::try_from(u64_at(24)?).ok()?;
        let records = bytes.get(64..64usize.checked_add(committed)?)?.to_vec();
        (u64_at(16)?, records, [32, 40, 48, 56, 60])
    } else {
        return None;
    };
    let [seq_at, time_at, lost_at, errno_at, set_at] = stop_at;
    let stopped = if u32_at(set_at)? == 1 {
        Some(Stop {
            after_seq: u64_at(seq_at)?,
            unix_ns: u64_at(time_at)?,
            lost: u64_at(lost_at)?,
            errno: u32_at(errno_at)? as i32,
        })
    } else {
        None
    };
    Some(Pending {
        chunk,
        records,
        stopped,
    })
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

    #[test]
    fn a_ring_forgets_written_chunks_wraps_and_grows_and_always_reads_right() {
        // A model of the live records beside the ring: after every step,
        // a reader of the file (as a killed writer leaves it) finds
        // exactly the model's bytes, and the chunk it names.
        let (path, mut j) = new_journal(9, 0);
        let mut model: std::collections::VecDeque<(u64, Vec<u8>)> = Default::default();
        let mut marks: std::collections::VecDeque<(u64, u64)> = Default::default();
        let mut chunk = 0u64;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut grew = 0;
        let mut wrapped = false;
        for step in 0..1500u64 {
            match next() % 10 {
                0..=6 => {
                    // One record of up to 40 KiB (some near the ring's size).
                    let len = 1 + (next() % (40 << 10)) as usize;
                    let rec = vec![(step * 31) as u8; len];
                    if !j.try_append(&rec) {
                        let cap = j.capacity();
                        j.append(&rec).unwrap();
                        assert!(j.capacity() > cap, "append grows a full ring");
                        grew += 1;
                    }
                    model.push_back((j.head(), rec));
                }
                7 | 8 => {
                    // A new chunk starts at the head.
                    chunk += 1;
                    marks.push_back((chunk, j.head()));
                }
                _ => {
                    // The chunks before a mark were written: forget them.
                    // The sealer keeps a few chunks in flight; some steps
                    // forget one, some all but the newest.
                    let keep = if next() % 2 == 0 {
                        marks.len().saturating_sub(1)
                    } else {
                        1
                    };
                    while marks.len() > keep {
                        let (c, at) = marks.pop_front().unwrap();
                        j.forget(c, at);
                        while model.front().is_some_and(|(end, _)| *end <= at) {
                            model.pop_front();
                        }
                    }
                }
            }
            wrapped |= j.slot.b_len > 0;
            let p = read(&path, 9).unwrap();
            let want: Vec<u8> = model.iter().flat_map(|(_, r)| r.iter().copied()).collect();
            assert_eq!(p.records.len(), want.len(), "step {step}");
            assert!(p.records == want, "step {step}: the live records read back");
        }
        assert!(wrapped, "the test wraps the ring");
        assert!(grew > 0, "and grows it");
        assert!(
            j.capacity() <= 4 << 20,
            "forgetting keeps it small: {}",
            j.capacity()
        );
    }

    #[test]
    fn a_grown_ring_that_had_wrapped_keeps_its_records_in_order_and_room_after_them() {
        let (path, mut j) = new_journal(3, 0);
        let big = vec![1u8; INITIAL_LEN / 2];
        j.append(&big).unwrap();
        j.append(&[2u8; 1000]).unwrap();
        j.forget(1, big.len() as u64); // the first record was written
        j.append(&vec![3u8; INITIAL_LEN / 2]).unwrap(); // wraps
        assert!(j.slot.b_len > 0);
        let cap = j.capacity();
        j.grow(1).unwrap();
        assert_eq!(j.capacity(), 2 * cap, "no more than doubled");
        assert!(j.slot.b_len > 0, "still wrapped");
        assert_eq!(
            j.slot.a_start + j.slot.a_len,
            j.capacity(),
            "the first part moved to the end"
        );
        assert!(read(&path, 3).unwrap().records.len() == 1000 + INITIAL_LEN / 2);
        // The room is after the part that wrapped.
        assert!(j.try_append(&[4u8; 10]));
        let p = read(&path, 3).unwrap();
        assert_eq!(p.chunk, 1);
        let mut want = vec![2u8; 1000];
        want.extend(vec![3u8; INITIAL_LEN / 2]);
        want.extend([4u8; 10]);
        assert!(p.records == want);
    }

    #[test]
    fn a_version_1_journal_still_reads() {
        let path = tempdir().join("v1.mwt.journal");
        let mut b = vec![0u8; 64];
        b[..8].copy_from_slice(b"MWJRNL\0\x01");
        b[8..12].copy_from_slice(&77u32.to_le_bytes());
        b[16..24].copy_from_slice(&5u64.to_le_bytes());
        b[24..32].copy_from_slice(&3u64.to_le_bytes());
        b[32..40].copy_from_slice(&12u64.to_le_bytes());
        b[56..60].copy_from_slice(&(libc::EFBIG).to_le_bytes());
        b[60..64].copy_from_slice(&1u32.to_le_bytes());
        b.extend(b"xyz-not-committed");
        std::fs::write(&path, &b).unwrap();
        let p = read(&path, 77).unwrap();
        assert_eq!((p.chunk, &p.records[..]), (5, &b"xyz"[..]));
        let stop = p.stopped.unwrap();
        assert_eq!((stop.after_seq, stop.errno), (12, libc::EFBIG));
        // A slot that names bytes the file does not have: not a journal.
        let (path, mut j) = new_journal(4, 0);
        j.append(b"abc").unwrap();
        drop(j);
        let mut b = std::fs::read(&path).unwrap();
        b[SLOTS_AT + 16..SLOTS_AT + 24].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        assert!(read(&path, 4).is_none());
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
