//! Reading a trace: the header, a scan of the chunk framing, then records
//! chunk by chunk.

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::chunk::{
    ChunkHeader, ChunkKind, Codec, Trailer, CHUNK_HEADER_LEN, FOOTER_LEN, FOOTER_MAGIC, NO_SEQ,
};
use crate::error::{Error, Result};
use crate::header::{decode_header, le_u64, Header};
use crate::record::Record;
use crate::view::{take_view, RecordView};

/// How the file ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// A trailer and footer: the writer closed the trace.
    Closed,
    /// Whole chunks up to the end, but no trailer: the recording process
    /// ended without closing the trace (killed, crashed, `os._exit`).
    Unclosed,
    /// The last `bytes_ignored` bytes are part of a chunk (or footer) that
    /// was never fully written.
    Truncated { bytes_ignored: u64 },
}

/// How the recording ended, as far as the trace tells
/// ([`TraceReader::ending`]): the one thing a reader needs to know before
/// it trusts the end of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ending<'r> {
    /// The writer closed the trace (the program ended or called
    /// `memwatch.stop()`), `end_time_ns` after the trace's start.
    Closed { end_time_ns: u64 },
    /// The program died of fatal signal `signal` in thread `thread`,
    /// `time_ns` after the trace's start; `description` is the
    /// [`crate::Crashed`] record's line for people.
    Crashed {
        signal: i32,
        thread: u64,
        time_ns: u64,
        description: &'r str,
    },
    /// The writer stopped early (a full disk, a file size limit) after
    /// seq `after_seq` ([`NO_SEQ`] if before any), with `lost` later
    /// events unrecorded (0: not counted); `reason` says when and why.
    Stopped {
        after_seq: u64,
        lost: u64,
        reason: &'r str,
    },
    /// Whole chunks but no trailer: the process was killed (`SIGKILL`),
    /// left by `os._exit`, or is still recording.
    Unclosed,
    /// The last `bytes_ignored` bytes are an unfinished chunk: the
    /// process ended while writing it.
    Truncated { bytes_ignored: u64 },
}

impl Ending<'_> {
    /// One word for scripts: `closed`, `crashed`, `stopped`, `unclosed`
    /// or `truncated`.
    pub fn name(&self) -> &'static str {
        match self {
            Ending::Closed { .. } => "closed",
            Ending::Crashed { .. } => "crashed",
            Ending::Stopped { .. } => "stopped",
            Ending::Unclosed => "unclosed",
            Ending::Truncated { .. } => "truncated",
        }
    }
}

/// Where one records chunk is, with its decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Position among the file's chunks, from 0.
    pub index: u64,
    /// Byte offset of the chunk header in the file.
    pub offset: u64,
    pub header: ChunkHeader,
}

enum Source {
    Map(Mmap),
    Bytes(Vec<u8>),
}

impl Source {
    fn bytes(&self) -> &[u8] {
        match self {
            Source::Map(m) => m,
            Source::Bytes(b) => b,
        }
    }
}

/// A trace opened for reading.
///
/// [`open`](Self::open) reads the header and walks the chunk framing (chunk
/// headers only), so it is cheap and tells at once whether the trace was
/// closed cleanly ([`tail`](Self::tail)). Records are decoded chunk by chunk
/// when asked for; a chunk's checksum is checked when it is decoded.
pub struct TraceReader {
    path: PathBuf,
    src: Source,
    header: Header,
    chunks: Vec<ChunkInfo>,
    trailer: Option<Trailer>,
    tail: Tail,
    /// Records read from the journal of an unclosed trace, and its path.
    recovered: Option<(u32, PathBuf)>,
    /// Recording stopped early: after which seq, how many events were lost
    /// and why (the last chunk's `Lost` record).
    stopped: Option<(u64, u64, String)>,
    /// The last chunk was made from the journal (records, or the note that
    /// recording stopped).
    journal_chunk: bool,
    /// The process died of a fatal signal: which, in which thread, and
    /// the [`crate::Crashed`] record's description.
    crash: Option<(i32, u64, String)>,
    /// When it died, since the trace's start.
    crash_time_ns: u64,
}

impl std::fmt::Debug for TraceReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceReader")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("chunks", &self.chunks.len())
            .field("tail", &self.tail)
            .finish()
    }
}

impl TraceReader {
    /// Opens the trace at `path` by memory-mapping it.
    ///
    /// The map is read-only. If another process truncates the file while it
    /// is open, reading it can fault (`SIGBUS`): that is the usual caveat of
    /// `mmap`, and why this goes through `unsafe` below. A trace still being
    /// appended to is fine: the reader sees the chunks present at `open`.
    pub fn open(path: impl AsRef<Path>) -> Result<TraceReader> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let md = file.metadata().map_err(io)?;
        if md.is_dir() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory, not a trace; give the path of a .mwt file \
                 (`memwatch record` writes one, by default named after the program)",
            )));
        }
        let len = md.len();
        let src = if len == 0 {
            Source::Bytes(Vec::new())
        } else {
            // SAFETY: the map is read-only and private to this reader; the
            // one hazard, another process truncating the file under us, is
            // documented above.
            Source::Map(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        let mut reader = TraceReader::from_source(path.to_path_buf(), src)?;
        if reader.tail != Tail::Closed {
            reader.add_journal(&crate::journal::journal_path(path));
            reader.find_stop();
        }
        Ok(reader)
    }

    /// Reads the records that the journal at `journal` kept for this
    /// unclosed trace as one more chunk after its whole ones (see
    /// [`crate::journal`]). A journal of another trace, or one whose
    /// records already reached the trace, changes nothing; so does a
    /// missing one.
    fn add_journal(&mut self, journal: &Path) {
        let bytes = self.src.bytes();
        let header_crc = crc32fast::hash(&bytes[..self.header.len as usize]);
        let pending = crate::journal::read(journal, header_crc);
        let crash = crate::crash::read(&crate::crash::crash_path(&self.path), header_crc);
        if pending.is_none() && crash.is_none() {
            return;
        }
        let pending = pending.unwrap_or(crate::journal::Pending {
            chunk: u64::MAX,
            records: Vec::new(),
            stopped: None,
        });
        // Records that already reached the trace are not read again: the
        // journal holds the records of chunks `pending.chunk` on, and the
        // trace has some of those chunks (the sealer wrote them) or none.
        let skip: Option<u64> = usize::try_from(pending.chunk)
            .ok()
            .and_then(|first| self.chunks.get(first..))
            .map(|written| written.iter().map(|c| u64::from(c.header.record_count)).sum());
        let mut usable = &pending.records[..];
        match skip {
            Some(mut n) => {
                while n > 0 && !usable.is_empty() {
                    match postcard::take_from_bytes::<Record<'_>>(usable) {
                        Ok((_, tail)) => usable = tail,
                        Err(_) => usable = &[],
                    }
                    n -= 1;
                }
            }
            None => usable = &[],
        }
        // Whole records only (the journal commits whole ones; this is
        // belt and braces), counted and their seqs found.
        let (mut rest, mut count, mut first, mut last) = (usable, 0u32, NO_SEQ, NO_SEQ);
        while !rest.is_empty() && count < u32::MAX {
            let Ok((rec, tail)) = postcard::take_from_bytes::<Record<'_>>(rest) else {
                break;
            };
            if let Some(seq) = rec.seq() {
                if first == NO_SEQ {
                    first = seq;
                }
                last = seq;
            }
            count += 1;
            rest = tail;
        }
        let end = self
            .chunks
            .last()
            .map(|c| c.offset + c.header.total_len())
            .unwrap_or(self.header.len) as usize;
        // The trace's whole chunks, a header for the new chunk (filled in
        // below) and its payload: the journal's whole records, then a
        // `Lost` record if the writer stopped.
        let start = end + CHUNK_HEADER_LEN;
        let mut joined = Vec::with_capacity(start + usable.len());
        joined.extend_from_slice(&bytes[..end]);
        joined.resize(start, 0);
        joined.extend_from_slice(&usable[..usable.len() - rest.len()]);
        let recovered = count;
        if let Some(c) = &crash {
            // The last look of the fatal-signal handler: after everything
            // the journal kept (its changes were found after them).
            let (n, cfirst, clast) = c.encode_records(&mut joined);
            count += n;
            if first == NO_SEQ {
                first = cfirst;
            }
            if clast != NO_SEQ {
                last = clast;
            }
        }
        if let Some(stop) = pending.stopped {
            // The writer could not write the trace any more: say so where
            // every reader looks, as the last record.
            let at = stop.unix_ns.saturating_sub(self.header.meta.start_time_ns) as f64 / 1e9;
            let reason = format!("recording stopped at {at:.3} s: {}", stop.reason());
            let lost = Record::Lost(crate::record::Lost {
                after_seq: stop.after_seq,
                events: stop.lost,
                reason: &reason,
            });
            if postcard::to_io(&lost, &mut joined).is_ok() {
                count += 1;
            }
        }
        let payload = &joined[start..];
        if count == 0 || payload.len() > u32::MAX as usize {
            return;
        }
        let header = ChunkHeader {
            kind: ChunkKind::Records,
            codec: Codec::Stored,
            stored_len: payload.len() as u32,
            raw_len: payload.len() as u32,
            record_count: count,
            first_seq: first,
            last_seq: last,
            payload_crc: crc32fast::hash(payload),
            contents_only: false,
        };
        joined[end..start].copy_from_slice(&header.encode());
        let end = end as u64;
        self.chunks.push(ChunkInfo {
            index: self.chunks.len() as u64,
            offset: end,
            header,
        });
        self.src = Source::Bytes(joined);
        self.journal_chunk = true;
        if recovered > 0 {
            self.recovered = Some((recovered, journal.to_path_buf()));
        }
    }

    /// Looks in the last chunk of an unclosed trace for the `Lost` record
    /// of a writer that stopped early and the `Crashed` record of a
    /// program that died of a fatal signal.
    fn find_stop(&mut self) {
        let Some(last) = self.chunks.last().copied() else {
            return;
        };
        let Ok(chunk) = self.decode_chunk(&last) else {
            return;
        };
        let mut found = None;
        let mut crash = None;
        let mut crash_time = 0;
        for rec in chunk.records() {
            match rec {
                Ok(Record::Lost(l)) => found = Some((l.after_seq, l.events, l.reason.to_string())),
                Ok(Record::Crashed(c)) => {
                    crash_time = c.time_ns;
                    crash = Some((c.signal, c.thread, c.describe(self.header.meta.pid)))
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        drop(chunk);
        self.stopped = found;
        self.crash = crash;
        self.crash_time_ns = crash_time;
    }

    /// When the writer stopped early (a full disk, a file size limit):
    /// the last seq it recorded, how many events went unrecorded after it
    /// (0 when not counted) and why, e.g. "recording stopped at 2.310 s:
    /// no space left on device".
    pub fn stopped(&self) -> Option<(u64, u64, &str)> {
        self.stopped.as_ref().map(|(s, n, r)| (*s, *n, r.as_str()))
    }

    /// How many records came from the trace's journal (see
    /// [`crate::journal`]) because the process ended before they reached
    /// the trace, and the journal's path; `None` when none did.
    pub fn recovered(&self) -> Option<(u32, &Path)> {
        self.recovered.as_ref().map(|(n, p)| (*n, p.as_path()))
    }

    /// When the recorded process died of a fatal signal: which, in which
    /// thread and on which line, and what the handler's last look found
    /// (see [`crate::crash`]).
    pub fn crashed(&self) -> Option<(i32, u64, &str)> {
        self.crash.as_ref().map(|(s, t, d)| (*s, *t, d.as_str()))
    }

    /// How the recording ended: a crash first (a crashed program's writer
    /// may also have stopped), then a writer that stopped early, then how
    /// the file ends ([`tail`](Self::tail)).
    pub fn ending(&self) -> Ending<'_> {
        if let Some((signal, thread, description)) = &self.crash {
            return Ending::Crashed {
                signal: *signal,
                thread: *thread,
                time_ns: self.crash_time_ns,
                description,
            };
        }
        if let Some((after_seq, lost, reason)) = &self.stopped {
            return Ending::Stopped {
                after_seq: *after_seq,
                lost: *lost,
                reason,
            };
        }
        match self.tail {
            Tail::Closed => Ending::Closed {
                end_time_ns: self.trailer.as_ref().map_or(0, |t| t.end_time_ns),
            },
            Tail::Unclosed => Ending::Unclosed,
            Tail::Truncated { bytes_ignored } => Ending::Truncated { bytes_ignored },
        }
    }

    /// True when the last chunk was read from the trace's journal: records
    /// that had not reached the trace, or the note that recording stopped.
    pub fn last_chunk_from_journal(&self) -> bool {
        self.journal_chunk
    }

    /// Reads a trace held in memory; `name` is used in messages.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<PathBuf>) -> Result<TraceReader> {
        TraceReader::from_source(name.into(), Source::Bytes(bytes))
    }

    fn from_source(path: PathBuf, src: Source) -> Result<TraceReader> {
        let bytes = src.bytes();
        let header = decode_header(bytes, &path)?;
        let (chunks, trailer, tail) = scan(bytes, header.len, &path)?;
        Ok(TraceReader {
            path,
            src,
            header,
            chunks,
            trailer,
            tail,
            recovered: None,
            stopped: None,
            journal_chunk: false,
            crash: None,
            crash_time_ns: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The records chunks, in file order.
    pub fn chunks(&self) -> &[ChunkInfo] {
        &self.chunks
    }

    /// The trailer, when the trace was closed cleanly.
    pub fn trailer(&self) -> Option<&Trailer> {
        self.trailer.as_ref()
    }

    pub fn tail(&self) -> Tail {
        self.tail
    }

    /// The trace's bytes as read (with a journal's chunk, when one was
    /// added).
    pub(crate) fn bytes(&self) -> &[u8] {
        self.src.bytes()
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.src.bytes().len() as u64
    }

    /// One line about how the file ends, for people: `None` when it was
    /// closed cleanly; otherwise "not closed cleanly: ..." or
    /// "truncated: N chunks read, M bytes ignored".
    pub fn tail_message(&self) -> Option<String> {
        let stop = match &self.stopped {
            Some((seq, lost, reason)) => {
                let after = if *seq == NO_SEQ {
                    "before the first event".to_string()
                } else {
                    format!("after seq {seq}")
                };
                let lost = match lost {
                    0 => String::new(),
                    1 => "; 1 later event was not recorded".to_string(),
                    n => format!("; {n} later events were not recorded"),
                };
                format!("; {reason}, {after}{lost}")
            }
            None => String::new(),
        };
        let from_journal = match &self.recovered {
            Some((n, p)) => format!(
                "; the last {n} {} read from the journal {}",
                if *n == 1 { "record was" } else { "records were" },
                p.display()
            ),
            None => String::new(),
        };
        let stop = match &self.crash {
            Some((_, _, d)) => format!("; {d}{stop}"),
            None => stop,
        };
        let chunks = match self.chunks.len() {
            1 => "1 chunk".to_string(),
            n => format!("{n} chunks"),
        };
        match self.tail {
            Tail::Closed => None,
            Tail::Unclosed if self.stopped.is_some() => {
                Some(format!("not closed cleanly: {chunks} read{from_journal}{stop}"))
            }
            Tail::Unclosed => Some(format!(
                "not closed cleanly: {chunks} read, the recording ended without a trailer \
                 (the process was killed or crashed){from_journal}{stop}"
            )),
            Tail::Truncated { bytes_ignored } => Some(format!(
                "truncated: {chunks} read, {bytes_ignored} bytes ignored{from_journal}{stop}"
            )),
        }
    }

    /// `Ok` only for a cleanly closed trace; otherwise [`Error::Truncated`].
    pub fn require_closed(&self) -> Result<()> {
        match self.tail_message() {
            None => Ok(()),
            Some(msg) => Err(Error::Truncated {
                path: self.path.clone(),
                detail: msg.strip_prefix("truncated: ").unwrap_or(&msg).to_string(),
            }),
        }
    }

    fn corrupt(&self, info: &ChunkInfo, reason: String) -> Error {
        Error::CorruptChunk {
            path: self.path.clone(),
            index: info.index,
            offset: info.offset,
            reason,
        }
    }

    /// Checks a chunk's checksum and decompresses it.
    pub fn decode_chunk(&self, info: &ChunkInfo) -> Result<DecodedChunk<'_>> {
        self.decode_chunk_with(info, Vec::new())
    }

    /// [`decode_chunk`](Self::decode_chunk), decompressing into `buf` (its
    /// contents are dropped, its allocation reused): a scan that hands each
    /// chunk's buffer back ([`DecodedChunk::into_buffer`]) allocates and
    /// faults in fresh memory only once.
    pub fn decode_chunk_with(&self, info: &ChunkInfo, buf: Vec<u8>) -> Result<DecodedChunk<'_>> {
        let start = info.offset as usize + CHUNK_HEADER_LEN;
        let stored = &self.src.bytes()[start..start + info.header.stored_len as usize];
        let data = payload(stored, &info.header, buf).map_err(|reason| self.corrupt(info, reason))?;
        Ok(DecodedChunk {
            reader: self,
            info: *info,
            data,
        })
    }

    /// Calls `f` on every record in file order. Stops at the first error
    /// (a corrupt chunk, or one that `f` returns).
    pub fn for_each_record<E, F>(&self, mut f: F) -> std::result::Result<(), E>
    where
        E: From<Error>,
        F: FnMut(&Record<'_>) -> std::result::Result<(), E>,
    {
        for info in &self.chunks {
            let chunk = self.decode_chunk(info)?;
            for rec in chunk.records() {
                f(&rec?)?;
            }
        }
        Ok(())
    }
}

fn payload<'a>(
    stored: &'a [u8],
    h: &ChunkHeader,
    mut buf: Vec<u8>,
) -> std::result::Result<Cow<'a, [u8]>, String> {
    let crc = crc32fast::hash(stored);
    if crc != h.payload_crc {
        return Err(format!(
            "payload checksum mismatch (stored {:#010x}, computed {crc:#010x})",
            h.payload_crc
        ));
    }
    match h.codec {
        Codec::Stored => {
            if stored.len() != h.raw_len as usize {
                return Err(format!(
                    "stored chunk is {} bytes but its header says {}",
                    stored.len(),
                    h.raw_len
                ));
            }
            Ok(Cow::Borrowed(stored))
        }
        Codec::Zstd => {
            // Check the frame's own size claim before allocating for it, so
            // a damaged length cannot make us reserve gigabytes.
            match zstd::zstd_safe::get_frame_content_size(stored) {
                Ok(Some(n)) if n == u64::from(h.raw_len) => {}
                Ok(Some(n)) => {
                    return Err(format!(
                        "zstd frame holds {n} bytes but the header says {}",
                        h.raw_len
                    ))
                }
                Ok(None) => return Err("zstd frame does not state its size".into()),
                Err(_) => return Err("payload is not a zstd frame".into()),
            }
            buf.clear();
            buf.reserve(h.raw_len as usize);
            zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(stored, &mut buf))
                .map_err(|e| format!("zstd decompression failed: {e}"))?;
            let raw = buf;
            if raw.len() != h.raw_len as usize {
                return Err(format!(
                    "decompressed to {} bytes but the header says {}",
                    raw.len(),
                    h.raw_len
                ));
            }
            Ok(Cow::Owned(raw))
        }
    }
}

/// True if every byte is zero: the shape of space a file system allocated
/// but a crash never filled.
fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

type Scan = (Vec<ChunkInfo>, Option<Trailer>, Tail);

/// Walks the chunk framing from `start`.
fn scan(bytes: &[u8], start: u64, path: &Path) -> Result<Scan> {
    let len = bytes.len() as u64;
    let mut pos = start;
    let mut chunks = Vec::new();
    loop {
        let index = chunks.len() as u64;
        let rest = &bytes[pos as usize..];
        if rest.is_empty() {
            return Ok((chunks, None, Tail::Unclosed));
        }
        let truncated = Tail::Truncated {
            bytes_ignored: rest.len() as u64,
        };
        if rest.len() < CHUNK_HEADER_LEN {
            return Ok((chunks, None, truncated));
        }
        let at = pos;
        let corrupt = |reason: String| Error::CorruptChunk {
            path: path.to_path_buf(),
            index,
            offset: at,
            reason,
        };
        let header = match ChunkHeader::decode(rest[..CHUNK_HEADER_LEN].try_into().expect("44 bytes")) {
            Ok(h) => h,
            Err(_) if all_zero(rest) => return Ok((chunks, None, truncated)),
            Err(reason) => return Err(corrupt(reason)),
        };
        if pos + header.total_len() > len {
            return Ok((chunks, None, truncated));
        }
        let info = ChunkInfo {
            index,
            offset: pos,
            header,
        };
        pos += header.total_len();
        match header.kind {
            ChunkKind::Records => chunks.push(info),
            ChunkKind::Trailer => {
                let stored = &rest[CHUNK_HEADER_LEN..header.total_len() as usize];
                let raw = payload(stored, &header, Vec::new()).map_err(corrupt)?;
                let trailer: Trailer = postcard::from_bytes(&raw)
                    .map_err(|e| corrupt(format!("trailer does not decode: {e}")))?;
                let after = &bytes[pos as usize..];
                if after.len() < FOOTER_LEN {
                    let tail = Tail::Truncated {
                        bytes_ignored: after.len() as u64,
                    };
                    return Ok((chunks, Some(trailer), tail));
                }
                if after.len() > FOOTER_LEN || after[8..16] != FOOTER_MAGIC || le_u64(after, 0) != info.offset
                {
                    return Err(corrupt(format!(
                        "{} bytes after the trailer are not the {FOOTER_LEN}-byte footer",
                        after.len()
                    )));
                }
                return Ok((chunks, Some(trailer), Tail::Closed));
            }
        }
    }
}

/// A decompressed records chunk.
pub struct DecodedChunk<'r> {
    reader: &'r TraceReader,
    info: ChunkInfo,
    data: Cow<'r, [u8]>,
}

impl<'r> DecodedChunk<'r> {
    pub fn info(&self) -> &ChunkInfo {
        &self.info
    }

    /// The error for this chunk, corrupt for `reason`.
    pub(crate) fn corrupt(&self, reason: String) -> Error {
        self.reader.corrupt(&self.info, reason)
    }

    /// This chunk with `payload` as its records instead (as many records).
    pub(crate) fn with_payload(&self, payload: Vec<u8>) -> DecodedChunk<'r> {
        DecodedChunk {
            reader: self.reader,
            info: self.info,
            data: Cow::Owned(payload),
        }
    }

    /// The raw (decompressed) payload.
    pub fn raw(&self) -> &[u8] {
        &self.data
    }

    /// The chunk's records, borrowing from it. Yields an error (and then
    /// stops) if a record does not decode or the count is off.
    pub fn records(&self) -> Records<'_> {
        Records {
            chunk: self,
            rest: &self.data,
            seen: 0,
            done: false,
        }
    }

    /// [`records`](Self::records) as [`RecordView`]s: the same records and
    /// errors, with byte changes decoded without allocating (for scans).
    pub fn views(&self) -> Views<'_> {
        Views(self.records())
    }

    /// Gives back the buffer the chunk was decompressed into, for
    /// [`TraceReader::decode_chunk_with`] to reuse (empty for a stored chunk,
    /// which borrows the file).
    pub fn into_buffer(self) -> Vec<u8> {
        match self.data {
            Cow::Owned(v) => v,
            Cow::Borrowed(_) => Vec::new(),
        }
    }
}

/// Iterator over one chunk's records.
pub struct Records<'c> {
    chunk: &'c DecodedChunk<'c>,
    rest: &'c [u8],
    seen: u32,
    done: bool,
}

impl<'c> Records<'c> {
    /// The next record, decoded by `take`; checks the chunk's record count.
    fn next_with<T>(
        &mut self,
        take: impl FnOnce(&'c [u8]) -> postcard::Result<(T, &'c [u8])>,
    ) -> Option<Result<T>> {
        if self.done {
            return None;
        }
        let expected = self.chunk.info.header.record_count;
        let fail = |this: &mut Self, reason: String| {
            this.done = true;
            Some(Err(this.chunk.reader.corrupt(&this.chunk.info, reason)))
        };
        if self.rest.is_empty() {
            self.done = true;
            if self.seen != expected {
                return fail(
                    self,
                    format!("holds {} records but its header says {expected}", self.seen),
                );
            }
            return None;
        }
        if self.seen == expected {
            return fail(
                self,
                format!(
                    "{} bytes follow its last record ({expected} records)",
                    self.rest.len()
                ),
            );
        }
        match take(self.rest) {
            Ok((rec, rest)) => {
                self.rest = rest;
                self.seen += 1;
                Some(Ok(rec))
            }
            Err(e) => {
                let n = self.seen;
                fail(self, format!("record {n} does not decode: {e}"))
            }
        }
    }
}

impl<'c> Iterator for Records<'c> {
    type Item = Result<Record<'c>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_with(postcard::take_from_bytes::<Record<'c>>)
    }
}

/// Iterator over one chunk's records as [`RecordView`]s.
pub struct Views<'c>(Records<'c>);

impl<'c> Iterator for Views<'c> {
    type Item = Result<RecordView<'c>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next_with(take_view)
    }
}
