//! Appending records to a trace.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::chunk::{encode_footer, ChunkKind, Trailer, NO_SEQ};
use crate::crash::{crash_path, CrashArea};
use crate::error::{Error, Result};
use crate::file::create_private;
use crate::file::file_size_limit;
use crate::header::{encode_header, Meta};
use crate::journal::{journal_path, Journal};
use crate::output::Output;
use crate::record::{ByteRange, Context, FrameDef, Id, Note, Record, StackDef, StringDef, Waited};
use crate::sealer::{Failure, Job, Sealer, MAX_QUEUED};

/// The journal's ring grows past this only when a record does not fit in
/// it with the sealer's whole queue ([`MAX_QUEUED`]) beside it; until then,
/// a record that finds no room waits for the sealer's next chunk instead.
pub const JOURNAL_RING: usize = 64 << 20;

/// Largest piece a writer puts in one [`Record::Contents`](crate::Record::Contents):
/// region contents are split so no single record dominates a chunk.
pub const CONTENTS_PIECE: usize = 1 << 20;

/// Contents at least this large go into chunks of their own, flagged
/// contents only, which scans of changes skip without decompressing them.
/// Smaller contents stay in line with the other records: a chunk of their
/// own would cost more (a header, a compression frame, a `write`) than
/// reading past them.
pub const SEPARATE_CONTENTS: usize = 64 << 10;

/// When a chunk is emitted, and how it is compressed.
#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    /// Emit a chunk once this many raw (uncompressed) bytes are pending.
    pub chunk_bytes: usize,
    /// Emit a chunk once its oldest record is this old (checked on each
    /// append and by [`TraceWriter::flush_if_older`]).
    pub max_age: Duration,
    /// zstd level: negative levels are faster still, 19 is the smallest;
    /// 0 stores chunks uncompressed.
    pub zstd_level: i32,
    /// Write large chunks with direct I/O (`O_DIRECT`) where the output and
    /// its file system allow it ([`crate::direct`]).
    pub direct_io: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_bytes: 1 << 20,
            max_age: Duration::from_millis(500),
            zstd_level: DEFAULT_LEVEL,
            direct_io: true,
        }
    }
}

/// The zstd level chunks get by default. Chunks are compressed off the
/// recorded program's threads (see [`crate::sealer`]), but a dense program
/// makes changes faster than a slow level compresses them, and then it
/// waits: `bench/record_sgd.py` weighs the levels.
pub const DEFAULT_LEVEL: i32 = -5;

/// Totals a writer has written so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    pub records: u64,
    pub chunks: u64,
    /// Raw (uncompressed) payload bytes.
    pub raw_bytes: u64,
    /// Bytes written to the file, headers included.
    pub file_bytes: u64,
    /// Nanoseconds the writer's callers waited for chunks to be compressed
    /// and written (see [`crate::sealer`]).
    pub waited_ns: u64,
    /// Chunks written with direct I/O, past the page cache (see
    /// [`crate::direct`]).
    pub direct_chunks: u64,
    /// Chunks compressed at the sealer's fast level because it was behind
    /// (see [`crate::sealer::FAST_LEVEL`]).
    pub fast_chunks: u64,
}

/// Appends records to a trace, a chunk at a time.
///
/// A writer made by [`create`](TraceWriter::create) also copies every record,
/// as it is appended, into the trace's journal (`<trace>.journal`, see
/// [`crate::journal`]), so a process that dies loses none of them: a reader
/// of the unclosed trace finds them there. Without a journal
/// ([`new`](TraceWriter::new) on any other output), a process that dies loses
/// the pending records.
///
/// Chunks are compressed and written by a thread of the writer's own (see
/// [`crate::sealer`]), each with one `write` of header and payload, in the
/// order they were emitted (large ones past the page cache, see
/// [`crate::direct`]); [`flush`](Self::flush) waits until they are all
/// written. Without a journal a process that dies loses the records still
/// pending or queued. Call [`finish`](Self::finish) to write the trailer; a
/// trace without one still reads, and says it was not closed. A write that
/// fails is reported by the next call after it.
///
/// The writer also interns strings, frames and stacks: the `intern_*`
/// methods write a definition the first time they see a value and return its
/// id every time.
pub struct TraceWriter<W: Output = File> {
    sealer: Sealer<W>,
    path: PathBuf,
    opts: WriterOptions,
    pending: Vec<u8>,
    pending_records: u32,
    pending_first_seq: u64,
    pending_last_seq: u64,
    pending_since: Option<Instant>,
    /// The pending records are all `Contents` (set by `append_contents`).
    pending_contents_only: bool,
    last_seq: u64,
    lost_events: u64,
    stats: WriterStats,
    strings: HashMap<Box<str>, Id>,
    frames: HashMap<(Id, Id, u32), Id>,
    stacks: HashMap<Box<[Id]>, Id>,
    closed: Option<String>,
    /// Where pending records also go as they are appended, so that a
    /// process that dies loses none of them (see [`crate::journal`]).
    journal: Option<Journal>,
    /// CRC-32 of the header bytes, which names this trace to its journal.
    header_crc: u32,
    /// Why a writer made by `create` has no journal.
    journal_error: Option<String>,
    /// Nanoseconds callers waited for the sealer.
    waited_ns: u64,
    /// Waits (nanoseconds, count) not yet noted in the trace.
    unnoted: (u64, u64),
    /// The last seq copied into the journal.
    journal_seq: u64,
    /// Seqs of events the journal had no room for, since it last restarted.
    unjournaled: Vec<u64>,
    /// For each chunk handed or pending whose records the journal may
    /// still hold: its index, and the journal's head before its first
    /// record (where the journal can forget up to once the chunks before
    /// it are written).
    marks: VecDeque<(u64, u64)>,
    /// Events appended but lost when the sealer stopped.
    dropped: u64,
    /// Where the recorder's fatal-signal handler writes its last look
    /// (see [`crate::crash`]); made with the journal.
    crash: Option<CrashArea>,
}

impl TraceWriter<File> {
    /// Creates (or truncates) the file at `path` and writes the header.
    ///
    /// The file is private to its owner (mode `0600`, also when it existed
    /// before with wider permissions): a trace holds the contents of the
    /// recorded program's memory, like a core dump.
    pub fn create(path: impl AsRef<Path>, meta: &Meta, opts: WriterOptions) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = create_private(path).map_err(io)?;
        // Unbuffered: every chunk is one write of header and payload. The
        // process's file size limit is checked before each write: a chunk
        // that would pass it fails with `EFBIG` instead of `SIGXFSZ`.
        let mut w = TraceWriter::with_limit(file, path, meta, opts, file_size_limit())?;
        let jpath = journal_path(path);
        match Journal::create(&jpath, w.header_crc, 0) {
            Ok(j) => {
                w.journal = Some(j);
                // Without one, a crash loses only the line it happened on.
                w.crash = CrashArea::create(&crash_path(path), w.header_crc).ok();
                if w.crash.is_none() {
                    let _ = std::fs::remove_file(crash_path(path));
                }
            }
            Err(e) => {
                // Recording goes on without one: a process that dies then
                // loses its pending records, which `journal_error` says.
                let _ = std::fs::remove_file(&jpath);
                w.journal_error = Some(format!("{}: {e}", jpath.display()));
            }
        }
        Ok(w)
    }
}

impl<W: Output> TraceWriter<W> {
    /// Writes the header for `meta` to `out`. `path` names the output in
    /// error messages.
    pub fn new(out: W, path: impl Into<PathBuf>, meta: &Meta, opts: WriterOptions) -> Result<Self> {
        TraceWriter::with_limit(out, path, meta, opts, None)
    }

    fn with_limit(
        mut out: W,
        path: impl Into<PathBuf>,
        meta: &Meta,
        opts: WriterOptions,
        size_limit: Option<u64>,
    ) -> Result<Self> {
        let path = path.into();
        let header = encode_header(meta, 0);
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        out.write_all(&header).map_err(io)?;
        out.flush().map_err(io)?;
        let direct = if opts.direct_io { out.direct() } else { None };
        let sealer = Sealer::start(
            out,
            direct,
            &header,
            header.len() as u64,
            opts.zstd_level,
            size_limit,
        )
        .map_err(io)?;
        Ok(TraceWriter {
            sealer,
            opts,
            pending: Vec::with_capacity(opts.chunk_bytes + 4096),
            pending_records: 0,
            pending_first_seq: NO_SEQ,
            pending_last_seq: NO_SEQ,
            pending_since: None,
            pending_contents_only: false,
            last_seq: NO_SEQ,
            lost_events: 0,
            stats: WriterStats {
                file_bytes: header.len() as u64,
                ..WriterStats::default()
            },
            strings: HashMap::new(),
            frames: HashMap::new(),
            stacks: HashMap::new(),
            closed: None,
            journal: None,
            journal_error: None,
            waited_ns: 0,
            unnoted: (0, 0),
            journal_seq: NO_SEQ,
            unjournaled: Vec::new(),
            marks: VecDeque::new(),
            dropped: 0,
            crash: None,
            header_crc: crc32fast::hash(&header),
            path,
        })
    }

    /// The output's name, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Totals so far (pending records count as written records, chunks
    /// count once emitted, bytes once the sealer wrote them).
    pub fn stats(&self) -> WriterStats {
        let st = self.sealer.shared.lock();
        WriterStats {
            records: self.stats.records,
            chunks: self.sealer.handed,
            raw_bytes: st.raw_bytes,
            file_bytes: st.file_bytes,
            waited_ns: self.waited_ns,
            direct_chunks: st.direct_chunks,
            fast_chunks: st.fast_chunks,
        }
    }

    /// Appends one record; emits a chunk when a bound is reached.
    pub fn append(&mut self, record: &Record<'_>) -> Result<()> {
        self.append_with(record.seq(), record, |rec, out| {
            postcard::to_io(rec, out).map(|_| ()).map_err(|e| e.to_string())
        })?;
        if let Record::Lost(l) = record {
            self.lost_events = self.lost_events.saturating_add(l.events);
        }
        Ok(())
    }

    /// Appends the [`Record::Delta`] of a change (format version 3): each
    /// of `ranges` (offset, old and new bytes) is stored as its new bytes
    /// XOR its old ones (with `full`, as its new bytes), shuffled by
    /// `shuffle` (the element size; see [`crate::delta`]), encoded straight
    /// from the given bytes.
    pub fn append_delta(
        &mut self,
        seq: u64,
        ctx: &Context,
        region: u32,
        shuffle: u32,
        full: bool,
        ranges: &[ByteRange<'_>],
    ) -> Result<()> {
        self.append_with(Some(seq), ranges, |ranges, out| {
            crate::delta::encode_delta(out, seq, ctx, region, shuffle, full, ranges);
            Ok(())
        })
    }

    /// Appends a [`Record::Note`] about event `seq` (format version 4),
    /// defining `key` and `value` as strings the first time: appended
    /// right before the event's own record, as readers expect it.
    pub fn append_note(&mut self, seq: u64, key: &str, value: &str) -> Result<()> {
        let key = self.intern_str(key)?;
        let value = self.intern_str(value)?;
        self.append(&Record::Note(Note { seq, key, value }))
    }

    /// Encodes one record with `encode` after the pending ones, copies it
    /// into the journal, and emits a chunk when a bound is reached.
    fn append_with<T: ?Sized>(
        &mut self,
        seq: Option<u64>,
        what: &T,
        encode: impl FnOnce(&T, &mut Vec<u8>) -> std::result::Result<(), String>,
    ) -> Result<()> {
        self.check_open()?;
        if self.pending_records == u32::MAX {
            self.flush_chunk()?;
        }
        if self.pending_records == 0 {
            self.start_chunk();
        }
        self.note_waits();
        let before = self.pending.len();
        if let Err(reason) = encode(what, &mut self.pending) {
            self.pending.truncate(before);
            return Err(Error::Encode {
                path: self.path.clone(),
                reason,
            });
        }
        if self.pending.len() > u32::MAX as usize {
            self.pending.truncate(before);
            return Err(Error::Encode {
                path: self.path.clone(),
                reason: "a record would make a chunk larger than 4 GiB; split it".into(),
            });
        }
        // A journal that cannot grow (a full disk, a file size limit) sends
        // the pending records, this one included, to the trace now: the
        // journal then starts over, empty.
        let journal_full = self.journal_append(before);
        match (journal_full, seq) {
            (false, Some(seq)) => self.journal_seq = seq,
            // Only in the pending chunk: lost if that chunk is not written.
            (true, Some(seq)) if self.unjournaled.len() < 1 << 20 => self.unjournaled.push(seq),
            _ => {}
        }
        self.pending_records += 1;
        self.stats.records += 1;
        if let Some(seq) = seq {
            if self.pending_first_seq == NO_SEQ {
                self.pending_first_seq = seq;
            }
            self.pending_last_seq = seq;
            self.last_seq = seq;
        }
        let now = Instant::now();
        let since = *self.pending_since.get_or_insert(now);
        if journal_full
            || self.pending.len() >= self.opts.chunk_bytes
            || now.duration_since(since) >= self.opts.max_age
        {
            self.flush_chunk()?;
        }
        Ok(())
    }

    /// After a failed write: notes in the journal how many events went
    /// unrecorded since, for readers (see [`crate::journal`]).
    pub fn note_lost(&mut self, events: u64) {
        if let Some(j) = self.journal.as_mut() {
            j.note_lost(events.saturating_add(self.dropped));
        }
    }

    /// The crash area: where it is mapped and how many bytes of it are
    /// allocated (see [`crate::crash`]); `None` without one.
    pub fn crash_area(&self) -> Option<(*mut u8, usize)> {
        self.crash.as_ref().map(|c| (c.base(), c.len()))
    }

    /// Grows the crash area so that `entries` bytes of entries fit; returns
    /// its allocated length (unchanged when it cannot grow: the handler
    /// keeps what fits).
    pub fn ensure_crash_area(&mut self, entries: usize) -> Option<usize> {
        let c = self.crash.as_mut()?;
        let _ = c.ensure(entries);
        Some(c.len())
    }

    /// Why this writer, made by [`create`](TraceWriter::create), has no
    /// journal (so a process that dies loses its pending records); `None`
    /// when it has one, or was made by [`new`](TraceWriter::new).
    pub fn journal_error(&self) -> Option<&str> {
        self.journal_error.as_deref()
    }

    /// Returns the id of string `s`, writing its definition the first time.
    pub fn intern_str(&mut self, s: &str) -> Result<Id> {
        if let Some(&id) = self.strings.get(s) {
            return Ok(id);
        }
        let id = self.strings.len() as Id + 1;
        self.append(&Record::String(StringDef { id, value: s }))?;
        self.strings.insert(s.into(), id);
        Ok(id)
    }

    /// Returns the id of frame (`file`, `function`, `line`), writing its
    /// definition (and its strings') the first time.
    pub fn intern_frame(&mut self, file: &str, function: &str, line: u32) -> Result<Id> {
        let file = self.intern_str(file)?;
        let function = self.intern_str(function)?;
        let key = (file, function, line);
        if let Some(&id) = self.frames.get(&key) {
            return Ok(id);
        }
        let id = self.frames.len() as Id + 1;
        self.append(&Record::Frame(FrameDef {
            id,
            file,
            function,
            line,
        }))?;
        self.frames.insert(key, id);
        Ok(id)
    }

    /// Returns the id of the stack of frame ids `frames` (innermost first),
    /// writing its definition the first time.
    pub fn intern_stack(&mut self, frames: &[Id]) -> Result<Id> {
        if let Some(&id) = self.stacks.get(frames) {
            return Ok(id);
        }
        let id = self.stacks.len() as Id + 1;
        self.append(&Record::Stack(StackDef {
            id,
            frames: frames.to_vec(),
        }))?;
        self.stacks.insert(frames.into(), id);
        Ok(id)
    }

    /// Appends `data` as [`Record::Contents`] pieces of at most
    /// [`CONTENTS_PIECE`] bytes (at least one record, even for empty data).
    /// Data of [`SEPARATE_CONTENTS`] bytes or more goes into chunks of its
    /// own, flagged contents only.
    pub fn append_contents(&mut self, region: u32, at_seq: u64, data: &[u8]) -> Result<()> {
        if data.len() < SEPARATE_CONTENTS {
            return self.append_pieces(region, at_seq, data);
        }
        self.flush_chunk()?;
        self.pending_contents_only = true;
        let appended = self.append_pieces(region, at_seq, data);
        // Flushed even after a failure, so no later record joins a chunk
        // flagged contents only.
        let flushed = self.flush_chunk();
        self.pending_contents_only = false;
        appended.and(flushed)
    }

    fn append_pieces(&mut self, region: u32, at_seq: u64, data: &[u8]) -> Result<()> {
        let mut offset = 0usize;
        loop {
            let end = (offset + CONTENTS_PIECE).min(data.len());
            self.append(&Record::Contents(crate::record::Contents {
                region,
                at_seq,
                offset: offset as u64,
                data: &data[offset..end],
            }))?;
            offset = end;
            if offset >= data.len() {
                return Ok(());
            }
        }
    }

    /// Emits the pending records as a chunk if the oldest is older than
    /// `age`. A recorder calls this from a timer so that a quiet program's
    /// last records still reach the file.
    pub fn flush_if_older(&mut self, age: Duration) -> Result<()> {
        match self.pending_since {
            Some(since) if since.elapsed() >= age => self.flush_chunk(),
            _ => Ok(()),
        }
    }

    /// Emits the pending records as a chunk now (nothing if none), and
    /// waits until every chunk emitted is written.
    pub fn flush(&mut self) -> Result<()> {
        self.flush_chunk()?;
        // Asked for: not a wait the pace of the program caused.
        let (_, failed) = self.sealer.drain();
        match failed {
            Some(f) => Err(self.stop_on(f)),
            None => Ok(()),
        }
    }

    fn check_open(&mut self) -> Result<()> {
        if self.closed.is_none() {
            if let Some(f) = self.sealer.failure() {
                return Err(self.stop_on(f));
            }
        }
        match &self.closed {
            Some(reason) => Err(Error::Closed {
                path: self.path.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The sealer stopped on `f`: closes the writer, and notes in the
    /// journal (whose blocks are allocated, so this works when the trace
    /// cannot be written) after which seq, when and why recording stopped.
    fn stop_on(&mut self, f: Failure) -> Error {
        if let Some(j) = self.journal.as_mut() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            // The last seq kept: in the journal, or in a chunk written.
            let written = self
                .sealer
                .shared
                .lock()
                .index
                .iter()
                .rev()
                .find(|e| e.last_seq != NO_SEQ)
                .map(|e| e.last_seq);
            let kept = match (written, self.journal_seq) {
                (Some(w), NO_SEQ) => w,
                (Some(w), j) => w.max(j),
                (None, j) => j,
            };
            j.mark_stopped(kept, now, f.errno.unwrap_or(libc::EIO));
            // Events neither in the journal nor in a chunk written: lost,
            // and counted as such (a later event may be in the journal).
            self.dropped = self
                .unjournaled
                .iter()
                .filter(|&&s| written.is_none_or(|w| s > w))
                .count() as u64;
            j.note_lost(self.dropped);
        }
        self.closed = Some(f.closed.clone());
        Error::Io {
            path: self.path.clone(),
            source: f.error(),
        }
    }

    /// Counts a wait for the sealer of `ns` nanoseconds (none if 0).
    fn waited(&mut self, ns: u64) {
        if ns > 0 {
            self.waited_ns += ns;
            self.unnoted.0 += ns;
            self.unnoted.1 += 1;
        }
    }

    /// Puts the waits counted since the last note in the trace, as a
    /// [`Record::Waited`] before the next record.
    fn note_waits(&mut self) {
        let (ns, waits) = std::mem::take(&mut self.unnoted);
        if waits == 0 {
            return;
        }
        let rec = Record::Waited(Waited {
            after_seq: self.last_seq,
            waited_ns: ns,
            waits,
        });
        let before = self.pending.len();
        if postcard::to_io(&rec, &mut self.pending).is_err() {
            self.pending.truncate(before);
            return;
        }
        if let Some(j) = self.journal.as_mut() {
            // A journal that cannot grow loses only this note.
            let _ = j.append(&self.pending[before..]);
        }
        self.pending_records += 1;
        self.stats.records += 1;
        self.pending_since.get_or_insert_with(Instant::now);
    }

    /// Before the first record of a chunk: the journal forgets the chunks
    /// written since, and marks where this one starts.
    fn start_chunk(&mut self) {
        if let Some(mut j) = self.journal.take() {
            self.forget_written(&mut j);
            self.marks.push_back((self.sealer.handed, j.head()));
            self.journal = Some(j);
        }
        if self.pending.capacity() == 0 {
            if let Some(buf) = self.sealer.spare() {
                self.pending = buf;
            }
        }
    }

    /// Copies the pending bytes from `before` on (one record) into the
    /// journal; `true` when the journal has no room for them and cannot
    /// grow (a full disk, a file size limit).
    ///
    /// Where the ring has no room, it first forgets the chunks the sealer
    /// has written. Still no room: while the ring is smaller than the
    /// sealer's queue and two such records need, it grows; past that, the
    /// record waits (counted as a wait) for the sealer's next chunk, whose
    /// records it can then forget. Nothing unwritten is ever forgotten.
    fn journal_append(&mut self, before: usize) -> bool {
        let Some(mut j) = self.journal.take() else {
            return false;
        };
        let len = self.pending.len() - before;
        let want = MAX_QUEUED.saturating_add(len.saturating_mul(2)).max(JOURNAL_RING);
        let full = loop {
            if j.try_append(&self.pending[before..]) {
                break false;
            }
            self.forget_written(&mut j);
            if j.try_append(&self.pending[before..]) {
                break false;
            }
            let unwritten = self.sealer.unwritten().unwrap_or(0);
            if unwritten == 0 || j.capacity() < want {
                if j.grow(len).is_ok() {
                    continue;
                }
                if unwritten == 0 {
                    break true;
                }
            }
            let waited = self.sealer.wait_written(unwritten);
            self.waited(waited);
            if self.sealer.unwritten().is_none() {
                // The sealer stopped: what it had is not written, and the
                // writer closes on the next call.
                break true;
            }
        };
        self.journal = Some(j);
        full
    }

    /// Forgets the journal's records of the chunks the sealer has written.
    fn forget_written(&mut self, j: &mut Journal) {
        let Some(unwritten) = self.sealer.unwritten() else {
            return;
        };
        let written = self.sealer.handed - unwritten as u64;
        while self.marks.front().is_some_and(|&(chunk, _)| chunk < written) {
            self.marks.pop_front();
        }
        match self.marks.front() {
            Some(&(chunk, at)) => j.forget(chunk, at),
            None => {
                j.restart(written);
                self.unjournaled.clear();
            }
        }
    }

    fn flush_chunk(&mut self) -> Result<()> {
        self.check_open()?;
        if self.pending_records == 0 {
            return Ok(());
        }
        let job = Job {
            kind: ChunkKind::Records,
            raw: std::mem::take(&mut self.pending),
            record_count: self.pending_records,
            first_seq: self.pending_first_seq,
            last_seq: self.pending_last_seq,
            contents_only: self.pending_contents_only,
        };
        self.pending_records = 0;
        self.pending_first_seq = NO_SEQ;
        self.pending_last_seq = NO_SEQ;
        self.pending_since = None;
        match self.sealer.hand(job) {
            Ok(waited) => self.waited(waited),
            Err(f) => return Err(self.stop_on(f)),
        }
        if let Some(buf) = self.sealer.spare() {
            self.pending = buf;
        }
        Ok(())
    }

    /// Gives the output back as it is, without emitting pending records or a
    /// trailer (what a killed process leaves behind). Chunks already
    /// emitted are written first.
    pub fn into_output(mut self) -> W {
        self.sealer
            .stop()
            .expect("the sealer thread gives its output back")
    }

    /// Emits pending records, writes the trailer (index and totals) and the
    /// footer, and returns the output and the final totals.
    pub fn finish(mut self, end_time_ns: u64) -> Result<(W, WriterStats)> {
        self.check_open()?;
        if self.unnoted.1 > 0 {
            if self.pending_records == 0 {
                self.start_chunk();
            }
            self.note_waits();
        }
        self.flush()?;
        let (index, offset) = {
            let mut st = self.sealer.shared.lock();
            (std::mem::take(&mut st.index), st.offset)
        };
        let trailer = Trailer {
            chunks: index,
            records: self.stats.records,
            last_seq: self.last_seq,
            lost_events: self.lost_events,
            end_time_ns,
        };
        let raw = postcard::to_stdvec(&trailer).map_err(|e| Error::Encode {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let job = Job {
            kind: ChunkKind::Trailer,
            raw,
            record_count: 1,
            first_seq: NO_SEQ,
            last_seq: NO_SEQ,
            contents_only: false,
        };
        if let Err(f) = self.sealer.hand(job) {
            return Err(self.stop_on(f));
        }
        self.flush()?;
        let mut stats = self.stats();
        let mut out = self
            .sealer
            .stop()
            .expect("the sealer thread gives its output back");
        let footer = encode_footer(offset);
        out.write_all(&footer)
            .and_then(|()| out.flush())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?;
        stats.file_bytes += footer.len() as u64;
        self.closed = Some("finished".into());
        if let Some(j) = self.journal.take() {
            // The trace holds everything now. A journal that cannot be
            // removed is harmless: a closed trace never reads it.
            let _ = j.remove();
        }
        if let Some(c) = self.crash.take() {
            let _ = c.remove();
        }
        Ok((out, stats))
    }
}
