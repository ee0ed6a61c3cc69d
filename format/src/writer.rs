//! Appending records to a trace.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::chunk::{
    encode_footer, ChunkHeader, ChunkKind, Codec, IndexEntry, Trailer, CHUNK_HEADER_LEN, NO_SEQ,
};
use crate::error::{Error, Result};
use crate::header::{encode_header, Meta};
use crate::journal::{journal_path, Journal};
use crate::record::{FrameDef, Id, Record, StackDef, StringDef};

/// Largest piece a writer puts in one [`Record::Contents`](crate::Record::Contents):
/// region contents are split so no single record dominates a chunk.
pub const CONTENTS_PIECE: usize = 1 << 20;

/// Contents at least this large go into chunks of their own, flagged
/// contents only, which scans of changes skip without decompressing them.
/// Smaller contents stay in line with the other records: a chunk of their
/// own would cost more (a header, a compression frame, a `write`) than
/// reading past them.
pub const SEPARATE_CONTENTS: usize = 64 << 10;

/// Where a trace goes. Besides writing, an output can be cut back to a
/// length: after a failed write (a full disk) the writer cuts the file back
/// to the end of its last whole chunk, so the trace stays clean up to there.
pub trait Output: Write {
    /// Cuts the output back to `len` bytes; the default cannot.
    fn truncate_to(&mut self, _len: u64) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this output cannot be truncated",
        ))
    }
}

impl Output for File {
    fn truncate_to(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)?;
        self.seek(SeekFrom::Start(len)).map(|_| ())
    }
}

impl Output for Vec<u8> {
    fn truncate_to(&mut self, len: u64) -> std::io::Result<()> {
        self.truncate(len as usize);
        Ok(())
    }
}

/// When a chunk is emitted, and how it is compressed.
#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    /// Emit a chunk once this many raw (uncompressed) bytes are pending.
    pub chunk_bytes: usize,
    /// Emit a chunk once its oldest record is this old (checked on each
    /// append and by [`TraceWriter::flush_if_older`]).
    pub max_age: Duration,
    /// zstd level (1 fastest, 19 smallest). 0 stores chunks uncompressed.
    pub zstd_level: i32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_bytes: 1 << 20,
            max_age: Duration::from_millis(500),
            zstd_level: 3,
        }
    }
}

/// Totals a writer has written so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    pub records: u64,
    pub chunks: u64,
    /// Raw (uncompressed) payload bytes.
    pub raw_bytes: u64,
    /// Bytes written to the file, headers included.
    pub file_bytes: u64,
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
/// Every chunk reaches the operating system as soon as it is emitted (one
/// `write` of header and payload), so a process that dies loses at most the
/// records still pending here. Call [`finish`](Self::finish) to write the
/// trailer; a trace without one still reads, and says it was not closed.
///
/// The writer also interns strings, frames and stacks: the `intern_*`
/// methods write a definition the first time they see a value and return its
/// id every time.
pub struct TraceWriter<W: Output = File> {
    out: Option<W>,
    path: PathBuf,
    opts: WriterOptions,
    pending: Vec<u8>,
    pending_records: u32,
    pending_first_seq: u64,
    pending_last_seq: u64,
    pending_since: Option<Instant>,
    /// The pending records are all `Contents` (set by `append_contents`).
    pending_contents_only: bool,
    offset: u64,
    index: Vec<IndexEntry>,
    last_seq: u64,
    lost_events: u64,
    stats: WriterStats,
    strings: HashMap<Box<str>, Id>,
    frames: HashMap<(Id, Id, u32), Id>,
    stacks: HashMap<Box<[Id]>, Id>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    closed: Option<String>,
    /// Where pending records also go as they are appended, so that a
    /// process that dies loses none of them (see [`crate::journal`]).
    journal: Option<Journal>,
    /// CRC-32 of the header bytes, which names this trace to its journal.
    header_crc: u32,
    /// Why a writer made by `create` has no journal.
    journal_error: Option<String>,
    /// The process's file size limit when writing a file (`create`): a
    /// chunk that would pass it fails with `EFBIG` before it is written.
    size_limit: Option<u64>,
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
        // Unbuffered: every chunk is one write of header and payload.
        let mut w = TraceWriter::new(file, path, meta, opts)?;
        w.size_limit = crate::journal::file_size_limit();
        let jpath = journal_path(path);
        match Journal::create(&jpath, w.header_crc, 0) {
            Ok(j) => w.journal = Some(j),
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

/// Creates (or truncates) `path` for reading and writing (a shared mapping
/// needs both) with mode `0600`; a file that
/// was already there is made `0600` too (the mode given at creation applies
/// only to a new file).
pub fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

impl<W: Output> TraceWriter<W> {
    /// Writes the header for `meta` to `out`. `path` names the output in
    /// error messages.
    pub fn new(mut out: W, path: impl Into<PathBuf>, meta: &Meta, opts: WriterOptions) -> Result<Self> {
        let path = path.into();
        let header = encode_header(meta, 0);
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        out.write_all(&header).map_err(io)?;
        out.flush().map_err(io)?;
        let compressor = if opts.zstd_level > 0 {
            Some(zstd::bulk::Compressor::new(opts.zstd_level).map_err(io)?)
        } else {
            None
        };
        Ok(TraceWriter {
            out: Some(out),
            opts,
            pending: Vec::with_capacity(opts.chunk_bytes + 4096),
            pending_records: 0,
            pending_first_seq: NO_SEQ,
            pending_last_seq: NO_SEQ,
            pending_since: None,
            pending_contents_only: false,
            offset: header.len() as u64,
            index: Vec::new(),
            last_seq: NO_SEQ,
            lost_events: 0,
            stats: WriterStats {
                file_bytes: header.len() as u64,
                ..WriterStats::default()
            },
            strings: HashMap::new(),
            frames: HashMap::new(),
            stacks: HashMap::new(),
            compressor,
            closed: None,
            journal: None,
            journal_error: None,
            size_limit: None,
            header_crc: crc32fast::hash(&header),
            path,
        })
    }

    /// The output's name, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Totals so far (pending records count as written records).
    pub fn stats(&self) -> WriterStats {
        self.stats
    }

    /// Appends one record; emits a chunk when a bound is reached.
    pub fn append(&mut self, record: &Record<'_>) -> Result<()> {
        self.check_open()?;
        if self.pending_records == u32::MAX {
            self.flush_chunk()?;
        }
        let before = self.pending.len();
        if let Err(e) = postcard::to_io(record, &mut self.pending) {
            self.pending.truncate(before);
            return Err(Error::Encode {
                path: self.path.clone(),
                reason: e.to_string(),
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
        let journal_full = match self.journal.as_mut() {
            Some(j) => j.append(&self.pending[before..]).is_err(),
            None => false,
        };
        self.pending_records += 1;
        self.stats.records += 1;
        if let Some(seq) = record.seq() {
            if self.pending_first_seq == NO_SEQ {
                self.pending_first_seq = seq;
            }
            self.pending_last_seq = seq;
            self.last_seq = seq;
        }
        if let Record::Lost(l) = record {
            self.lost_events = self.lost_events.saturating_add(l.events);
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
            j.note_lost(events);
        }
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

    /// Emits the pending records as a chunk now (nothing if none).
    pub fn flush(&mut self) -> Result<()> {
        self.flush_chunk()
    }

    fn check_open(&self) -> Result<()> {
        match &self.closed {
            Some(reason) => Err(Error::Closed {
                path: self.path.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn flush_chunk(&mut self) -> Result<()> {
        self.check_open()?;
        if self.pending_records == 0 {
            return Ok(());
        }
        let entry = IndexEntry {
            offset: self.offset,
            record_count: self.pending_records,
            first_seq: self.pending_first_seq,
            last_seq: self.pending_last_seq,
        };
        let raw = std::mem::take(&mut self.pending);
        let result = self.write_chunk(ChunkKind::Records, &raw, entry, self.pending_contents_only);
        self.pending = raw;
        self.pending.clear();
        self.pending_records = 0;
        self.pending_first_seq = NO_SEQ;
        self.pending_last_seq = NO_SEQ;
        self.pending_since = None;
        self.index.push(entry);
        if result.is_ok() {
            if let Some(j) = self.journal.as_mut() {
                j.restart(self.index.len() as u64);
            }
        }
        result
    }

    fn write_chunk(
        &mut self,
        kind: ChunkKind,
        raw: &[u8],
        entry: IndexEntry,
        contents_only: bool,
    ) -> Result<()> {
        let io = |path: &Path, source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let (codec, stored): (Codec, std::borrow::Cow<[u8]>) = match &mut self.compressor {
            Some(c) => match c.compress(raw) {
                Ok(z) if z.len() < raw.len() => (Codec::Zstd, z.into()),
                Ok(_) => (Codec::Stored, raw.into()),
                Err(e) => return Err(io(&self.path, e)),
            },
            None => (Codec::Stored, raw.into()),
        };
        let header = ChunkHeader {
            kind,
            codec,
            stored_len: stored.len() as u32,
            raw_len: raw.len() as u32,
            record_count: entry.record_count,
            first_seq: entry.first_seq,
            last_seq: entry.last_seq,
            payload_crc: crc32fast::hash(&stored),
            contents_only,
        };
        let out = self.out.as_mut().expect("open writer has an output");
        // One write per chunk: a process killed mid-way leaves at most one
        // partial chunk, which readers skip.
        let mut frame = Vec::with_capacity(CHUNK_HEADER_LEN + stored.len());
        frame.extend_from_slice(&header.encode());
        frame.extend_from_slice(&stored);
        let past_limit = self
            .size_limit
            .is_some_and(|limit| self.offset + frame.len() as u64 > limit);
        let res = if past_limit {
            // The kernel would send SIGXFSZ, which kills a program that
            // does not ignore it.
            Err(std::io::Error::from_raw_os_error(libc::EFBIG))
        } else {
            out.write_all(&frame).and_then(|()| out.flush())
        };
        if let Err(e) = res {
            if let Some(j) = self.journal.as_mut() {
                // The journal's blocks are allocated: noting the stop there
                // works when the trace cannot be written.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                j.mark_stopped(self.last_seq, now, e.raw_os_error().unwrap_or(libc::EIO));
            }
            // Cut back to the last whole chunk so the trace reads cleanly
            // up to where recording stopped.
            let cut = match out.truncate_to(self.offset) {
                Ok(()) => format!("the trace ends after chunk {}", self.stats.chunks),
                Err(_) => "the trace ends in a partial chunk".to_string(),
            };
            self.closed = Some(format!("writing chunk {} failed: {e}; {cut}", self.stats.chunks));
            return Err(io(&self.path, e));
        }
        self.offset += header.total_len();
        self.stats.chunks += 1;
        self.stats.raw_bytes += raw.len() as u64;
        self.stats.file_bytes += header.total_len();
        Ok(())
    }

    /// Gives the output back as it is, without emitting pending records or a
    /// trailer (what a killed process leaves behind).
    pub fn into_output(mut self) -> W {
        self.out.take().expect("open writer has an output")
    }

    /// Emits pending records, writes the trailer (index and totals) and the
    /// footer, and returns the output and the final totals.
    pub fn finish(mut self, end_time_ns: u64) -> Result<(W, WriterStats)> {
        self.flush_chunk()?;
        let trailer = Trailer {
            chunks: std::mem::take(&mut self.index),
            records: self.stats.records,
            last_seq: self.last_seq,
            lost_events: self.lost_events,
            end_time_ns,
        };
        let raw = postcard::to_stdvec(&trailer).map_err(|e| Error::Encode {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let trailer_offset = self.offset;
        let entry = IndexEntry {
            offset: trailer_offset,
            record_count: 1,
            first_seq: NO_SEQ,
            last_seq: NO_SEQ,
        };
        self.write_chunk(ChunkKind::Trailer, &raw, entry, false)?;
        let mut out = self.out.take().expect("open writer has an output");
        let footer = encode_footer(trailer_offset);
        out.write_all(&footer)
            .and_then(|()| out.flush())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?;
        self.stats.file_bytes += footer.len() as u64;
        self.closed = Some("finished".into());
        if let Some(j) = self.journal.take() {
            // The trace holds everything now. A journal that cannot be
            // removed is harmless: a closed trace never reads it.
            let _ = j.remove();
        }
        Ok((out, self.stats))
    }
}
