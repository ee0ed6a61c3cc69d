//! The sealer: compresses chunks and writes them to the trace on a thread
//! of its own, so that a recorded program's threads only encode records.
//!
//! A [`TraceWriter`](crate::TraceWriter) hands each chunk's raw payload to
//! its sealer (`Sealer::hand`) and goes on. The sealer has two threads:
//! `memwatch-seal` compresses the chunk into a working buffer of its own
//! (kept from chunk to chunk) and lays it out with its header;
//! `memwatch-write` writes header and payload with one `write` (a large
//! chunk with direct I/O, past the page cache: see [`crate::direct`]), so
//! that one chunk's write overlaps the next one's compression, and gives
//! the raw buffer back for the writer's next chunk. Chunks are written in
//! the order they were handed, so the file is what a writer that sealed its
//! chunks itself would have written.
//!
//! Memory is bounded: at most [`MAX_QUEUED`] raw bytes (or one chunk, if a
//! single chunk is larger) wait for the sealer. A writer with more to hand
//! waits until the sealer catches up: nothing is dropped, and the time it
//! waited is counted ([`WriterStats::waited_ns`](crate::WriterStats)).
//! A sealer that falls behind compresses faster: a chunk the writer had to
//! wait to hand, or one with more than [`BEHIND`] raw bytes waiting behind
//! it, is compressed at [`FAST_LEVEL`] instead of the trace's level
//! (a compressed chunk reads the same whatever its level; the number of
//! chunks so compressed is [`WriterStats::fast_chunks`](crate::WriterStats)).
//!
//! Until a chunk is written, its records are kept in the trace's journal
//! by the writer (see [`crate::journal`]): a process that dies with chunks
//! still queued here loses none of them.
//!
//! A write that fails (a full disk, a file size limit) cuts the file back
//! to its last whole chunk and stops the sealer: later chunks are refused,
//! and the writer reports the failure on its next call.
//!
//! Locking: one mutex (`Shared::state`) guards the queue's accounting,
//! the totals and the failure; the writer and the sealer thread hold it
//! only to update those numbers, never while compressing or writing.
//! Nothing here runs in signal context.

use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::chunk::{ChunkHeader, ChunkKind, Codec, IndexEntry, CHUNK_HEADER_LEN};
use crate::direct::{AlignedBuf, Direct, ALIGN, DIRECT_MIN};
use crate::output::Output;

/// Raw bytes that may wait for the sealer before a writer waits too.
pub const MAX_QUEUED: usize = 32 << 20;

/// Raw bytes waiting behind a chunk above which the sealer compresses it
/// at [`FAST_LEVEL`]: half of [`MAX_QUEUED`], so that it speeds up well
/// before the writer would wait.
pub const BEHIND: usize = MAX_QUEUED / 2;

/// The zstd level of a chunk compressed while the sealer is behind. On
/// the 16 MB float32 SGD deltas of `bench/record_sgd.py` (2-core VM) it
/// compresses 16 MB in about 9 ms at ratio 0.75, against 19 ms at ratio
/// 0.7 at the default level (-5).
pub const FAST_LEVEL: i32 = -50;

/// Buffers of written chunks kept for the writer's next ones: at most this
/// many, of at most [`SPARE_BYTES`] in all. As many buffers as are ever in
/// flight at once (the pending chunk, the queued ones and the one being
/// sealed, at most [`MAX_QUEUED`] and two chunks) stay in circulation, so a
/// steady stream of large chunks allocates no new memory.
pub const MAX_SPARE: usize = 8;
/// See [`MAX_SPARE`].
pub const SPARE_BYTES: usize = 2 * MAX_QUEUED;

/// One chunk to seal.
pub(crate) struct Job {
    pub kind: ChunkKind,
    pub raw: Vec<u8>,
    pub record_count: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    pub contents_only: bool,
}

enum Msg {
    /// A chunk, and whether the writer had to wait to hand it.
    Seal(Job, bool),
    Stop,
}

/// Why the sealer stopped: the error, and where the trace ends.
#[derive(Clone)]
pub(crate) struct Failure {
    pub errno: Option<i32>,
    pub kind: io::ErrorKind,
    pub message: String,
    /// "writing chunk N failed: ...; the trace ends after chunk M".
    pub closed: String,
}

impl Failure {
    pub fn error(&self) -> io::Error {
        match self.errno {
            Some(e) => io::Error::from_raw_os_error(e),
            None => io::Error::new(self.kind, self.message.clone()),
        }
    }
}

/// What the writer and the sealer thread share.
#[derive(Default)]
pub(crate) struct State {
    /// Chunks handed and not yet written (or refused).
    pub queued: usize,
    pub queued_bytes: usize,
    /// Of those, raw bytes the sealer thread has not taken yet.
    pub unsealed_bytes: usize,
    /// Chunks compressed at [`FAST_LEVEL`] because the sealer was behind.
    pub fast_chunks: u64,
    /// Chunks written.
    pub chunks: u64,
    /// Of them, written with direct I/O.
    pub direct_chunks: u64,
    /// The file's length: where the next chunk goes.
    pub offset: u64,
    pub raw_bytes: u64,
    pub file_bytes: u64,
    pub index: Vec<IndexEntry>,
    pub failed: Option<Failure>,
    /// Buffers of written chunks, for the writer's next ones.
    pub spare: Vec<Vec<u8>>,
}

pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub changed: Condvar,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sealer thread's own part: how to compress, and where each chunk
/// is laid out.
struct Compress {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// At [`FAST_LEVEL`], for chunks taken while the sealer is behind;
    /// none when the trace's level is 0 (stored) or already as fast.
    fast: Option<zstd::bulk::Compressor<'static>>,
    /// Where the next chunk goes in the file.
    offset: u64,
    /// The file's bytes from the start of its last block up to `offset`
    /// (what a direct write of the next chunk writes again before it).
    tail: Vec<u8>,
    /// Large chunks are laid out for a direct write.
    direct: bool,
    /// Working buffers, two so that one chunk compresses while the one
    /// before is written; they come back from the writing thread.
    free: Receiver<AlignedBuf>,
}

/// The writing thread's part: the output.
struct Output2<W> {
    out: W,
    /// Large chunks go here, past the page cache, while the file system
    /// takes direct I/O.
    direct: Option<Direct>,
    size_limit: Option<u64>,
    free: Sender<AlignedBuf>,
}

/// A chunk compressed and laid out, for the writing thread.
struct Frame {
    /// [head | header | payload], `head` the file's bytes before the chunk
    /// in its first block (laid out for a direct write only, else empty).
    buf: AlignedBuf,
    head: usize,
    len: usize,
    /// Laid out for a direct write.
    direct: bool,
    /// Where the chunk goes.
    offset: u64,
    job: Job,
}

/// The writer's handle on its sealer thread.
pub(crate) struct Sealer<W: Output> {
    tx: Option<Sender<Msg>>,
    sealing: Option<JoinHandle<()>>,
    writing: Option<JoinHandle<W>>,
    pub shared: Arc<Shared>,
    /// Chunks handed so far: the index the next one gets.
    pub handed: u64,
}

impl<W: Output> Sealer<W> {
    /// Starts the sealer thread for `out`, whose first chunk goes at
    /// `offset`, after the bytes `written` (the trace's header).
    /// `level` is the zstd level (0: store chunks uncompressed).
    /// `direct`, where given, takes the large chunks ([`crate::direct`]).
    pub fn start(
        out: W,
        direct: Option<Direct>,
        written: &[u8],
        offset: u64,
        level: i32,
        size_limit: Option<u64>,
    ) -> io::Result<Self> {
        let compressor = if level != 0 {
            Some(zstd::bulk::Compressor::new(level)?)
        } else {
            None
        };
        let fast = if level != 0 && level > FAST_LEVEL {
            Some(zstd::bulk::Compressor::new(FAST_LEVEL)?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                offset,
                file_bytes: offset,
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let (tx, rx) = channel();
        let (free_tx, free_rx) = channel();
        for _ in 0..2 {
            let _ = free_tx.send(AlignedBuf::default());
        }
        let start = (written.len() - written.len() % ALIGN).min(written.len());
        let compress = Compress {
            compressor,
            fast,
            offset,
            tail: written[start..].to_vec(),
            direct: direct.is_some(),
            free: free_rx,
        };
        let output = Output2 {
            out,
            direct,
            size_limit,
            free: free_tx,
        };
        let (ftx, frx) = channel::<Frame>();
        let sh = shared.clone();
        let writing = std::thread::Builder::new()
            .name("memwatch-write".into())
            .spawn(move || write_all(output, frx, &sh))?;
        let sh = shared.clone();
        let sealing = std::thread::Builder::new()
            .name("memwatch-seal".into())
            .spawn(move || run(compress, rx, ftx, sh))?;
        Ok(Sealer {
            tx: Some(tx),
            sealing: Some(sealing),
            writing: Some(writing),
            shared,
            handed: 0,
        })
    }

    /// Hands a chunk to the sealer, first waiting while too much waits
    /// already; returns how long it waited, in nanoseconds. A stopped
    /// sealer refuses it: `Err` with why.
    pub fn hand(&mut self, job: Job) -> Result<u64, Failure> {
        let len = job.raw.len();
        let mut st = self.shared.lock();
        let mut waited = 0;
        if st.queued > 0 && st.queued_bytes + len > MAX_QUEUED && st.failed.is_none() {
            let t = Instant::now();
            while st.queued > 0 && st.queued_bytes + len > MAX_QUEUED && st.failed.is_none() {
                st = self.shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            waited = t.elapsed().as_nanos() as u64;
        }
        if let Some(f) = &st.failed {
            return Err(f.clone());
        }
        st.queued += 1;
        st.queued_bytes += len;
        st.unsealed_bytes += len;
        drop(st);
        self.handed += 1;
        match self.tx.as_ref().map(|tx| tx.send(Msg::Seal(job, waited > 0))) {
            Some(Ok(())) => Ok(waited),
            _ => Err(self.gone()),
        }
    }

    /// Waits until every chunk handed is written; returns how long, and the
    /// failure if the sealer stopped.
    pub fn drain(&self) -> (u64, Option<Failure>) {
        let mut st = self.shared.lock();
        let t = Instant::now();
        let mut waited = 0;
        if st.queued > 0 {
            while st.queued > 0 {
                st = self.shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            waited = t.elapsed().as_nanos() as u64;
        }
        (waited, st.failed.clone())
    }

    /// How many chunks handed are not yet written: those after the first
    /// `handed - unwritten`, which are. `None` once the sealer stopped.
    pub fn unwritten(&self) -> Option<usize> {
        let st = self.shared.lock();
        st.failed.is_none().then_some(st.queued)
    }

    /// Waits until fewer than `unwritten` chunks handed are not yet
    /// written (or the sealer stopped); returns how long, in nanoseconds.
    pub fn wait_written(&self, unwritten: usize) -> u64 {
        let mut st = self.shared.lock();
        if st.queued < unwritten || st.failed.is_some() {
            return 0;
        }
        let t = Instant::now();
        while st.queued >= unwritten && st.failed.is_none() {
            st = self.shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        t.elapsed().as_nanos() as u64
    }

    /// A buffer for the next chunk (one the sealer is done with, if any).
    pub fn spare(&self) -> Option<Vec<u8>> {
        self.shared.lock().spare.pop()
    }

    /// The failure, if the sealer stopped.
    pub fn failure(&self) -> Option<Failure> {
        self.shared.lock().failed.clone()
    }

    /// Stops the thread once it has written what was handed, and gives the
    /// output back.
    pub fn stop(&mut self) -> Option<W> {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Stop);
        }
        // The sealing thread ends first; dropping its end of the frames'
        // channel ends the writing thread once it has written them all.
        if let Some(t) = self.sealing.take() {
            let _ = t.join();
        }
        self.writing.take().and_then(|t| t.join().ok())
    }

    fn gone(&self) -> Failure {
        Failure {
            errno: None,
            kind: io::ErrorKind::BrokenPipe,
            message: "the trace's sealer thread is gone".into(),
            closed: "the trace's sealer thread is gone".into(),
        }
    }
}

impl<W: Output> Drop for Sealer<W> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The sealer thread: compresses each chunk and passes it to the writing
/// thread (`memwatch-write`), so that a chunk's write (a direct one waits
/// for the device) overlaps the next chunk's compression.
fn run(mut c: Compress, rx: Receiver<Msg>, ftx: Sender<Frame>, shared: Arc<Shared>) {
    while let Ok(Msg::Seal(job, writer_waited)) = rx.recv() {
        let behind = {
            let mut st = shared.lock();
            st.unsealed_bytes -= job.raw.len();
            if st.failed.is_some() {
                drop(st);
                done(&shared, &job, None);
                continue;
            }
            // Behind: the writer had to wait to hand this chunk (with
            // chunks as large as a 16 MB step's delta, no more than two
            // fit in the queue, and none waits behind the one taken), or
            // much waits behind it for compression.
            let behind = (writer_waited || st.unsealed_bytes > BEHIND) && c.fast.is_some();
            st.fast_chunks += u64::from(behind);
            behind
        };
        match c.lay_out(job, behind) {
            Ok(frame) => {
                if let Err(e) = ftx.send(frame) {
                    done(&shared, &e.0.job, None);
                }
            }
            Err((job, f)) => done(&shared, &job, Some(Err(f))),
        }
    }
}

/// Accounts for one handed chunk: written (`Some(Ok)`), failed
/// (`Some(Err)`), or refused after a failure (`None`).
fn done(shared: &Shared, job: &Job, result: Option<Result<(IndexEntry, u64, bool), Failure>>) {
    let mut st = shared.lock();
    st.queued -= 1;
    st.queued_bytes -= job.raw.len();
    match result {
        Some(Ok((entry, total, direct))) => {
            st.chunks += 1;
            st.direct_chunks += u64::from(direct);
            st.offset += total;
            st.file_bytes += total;
            st.raw_bytes += job.raw.len() as u64;
            if job.kind == ChunkKind::Records {
                st.index.push(entry);
            }
        }
        Some(Err(f)) => st.failed = Some(f),
        None => {}
    }
    drop(st);
    shared.changed.notify_all();
}

/// The writing thread: writes each laid-out chunk in turn.
fn write_all<W: Output>(mut o: Output2<W>, rx: Receiver<Frame>, shared: &Shared) -> W {
    while let Ok(frame) = rx.recv() {
        let result = if shared.lock().failed.is_some() {
            None
        } else {
            Some(o.write(&frame, shared))
        };
        done(shared, &frame.job, result);
        let Frame { mut buf, job, .. } = frame;
        // Kept for the writer's next chunks: a new buffer costs fresh
        // pages (faults and zeroing) on every chunk.
        {
            let mut st = shared.lock();
            let kept: usize = st.spare.iter().map(Vec::capacity).sum();
            if st.spare.len() < MAX_SPARE && kept + job.raw.capacity() <= SPARE_BYTES {
                let mut raw = job.raw;
                raw.clear();
                st.spare.push(raw);
            }
        }
        buf.trim();
        let _ = o.free.send(buf);
    }
    o.out
}

impl Compress {
    /// Compresses one chunk into a working buffer, laid out with its
    /// header (and, for a direct write, the block's bytes before it).
    fn lay_out(&mut self, job: Job, behind: bool) -> Result<Frame, (Job, Failure)> {
        let mut buf = self.free.recv().unwrap_or_default();
        let raw = &job.raw[..];
        let direct = self.direct && raw.len() >= DIRECT_MIN;
        let head = if direct { self.tail.len() } else { 0 };
        let bound = match self.compressor {
            Some(_) => zstd::zstd_safe::compress_bound(raw.len()).max(raw.len()),
            None => raw.len(),
        };
        let b = buf.get(head + CHUNK_HEADER_LEN + bound);
        b[..head].copy_from_slice(&self.tail[..head]);
        let payload = &mut b[head + CHUNK_HEADER_LEN..];
        let compressor = if behind {
            &mut self.fast
        } else {
            &mut self.compressor
        };
        let compressed = match compressor {
            Some(c) => match c.compress_to_buffer(raw, payload) {
                Ok(n) if n < raw.len() => Some(n),
                Ok(_) => None,
                Err(e) => {
                    let f = Failure {
                        errno: e.raw_os_error(),
                        kind: e.kind(),
                        message: e.to_string(),
                        closed: format!("compressing a chunk failed: {e}"),
                    };
                    return Err((job, f));
                }
            },
            None => None,
        };
        let (codec, stored_len) = match compressed {
            Some(n) => (Codec::Zstd, n),
            None => {
                payload[..raw.len()].copy_from_slice(raw);
                (Codec::Stored, raw.len())
            }
        };
        let header = ChunkHeader {
            kind: job.kind,
            codec,
            stored_len: stored_len as u32,
            raw_len: raw.len() as u32,
            record_count: job.record_count,
            first_seq: job.first_seq,
            last_seq: job.last_seq,
            payload_crc: crc32fast::hash(&payload[..stored_len]),
            contents_only: job.contents_only,
        };
        b[head..head + CHUNK_HEADER_LEN].copy_from_slice(&header.encode());
        let total = CHUNK_HEADER_LEN + stored_len;
        let offset = self.offset;
        // The new last block's bytes: from this chunk, or from the old
        // tail and all of this chunk.
        let end = offset + total as u64;
        let keep = (end % ALIGN as u64) as usize;
        let chunk = &b[head..head + total];
        if keep <= total {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[total - keep..]);
        } else {
            self.tail.drain(..self.tail.len() - (keep - total));
            self.tail.extend_from_slice(chunk);
        }
        self.offset = end;
        Ok(Frame {
            buf,
            head,
            len: head + total,
            direct,
            offset,
            job,
        })
    }
}

impl<W: Output> Output2<W> {
    /// Writes one laid-out chunk; returns its index entry, its length and
    /// whether it was written directly.
    fn write(&mut self, frame: &Frame, shared: &Shared) -> Result<(IndexEntry, u64, bool), Failure> {
        let chunks = shared.lock().chunks;
        let Frame {
            head, len, offset, ..
        } = *frame;
        let job = &frame.job;
        let bytes = frame.buf.filled(len);
        let total = (len - head) as u64;
        let past_limit = self.size_limit.is_some_and(|limit| offset + total > limit);
        let mut wrote_direct = false;
        let res = if past_limit {
            // The kernel would send SIGXFSZ, which kills a program that
            // does not ignore it.
            Err(io::Error::from_raw_os_error(libc::EFBIG))
        } else {
            let direct = match (&mut self.direct, frame.direct) {
                (Some(d), true) => d.write(bytes, offset - head as u64),
                _ => Ok(false),
            };
            match direct {
                Ok(true) => {
                    wrote_direct = true;
                    Ok(())
                }
                Ok(false) => {
                    if frame.direct {
                        // Refused by the file system: buffered from now on.
                        self.direct = None;
                    }
                    // One write per chunk: a process killed mid-way leaves
                    // at most one partial chunk, which readers skip.
                    self.out.write_all(&bytes[head..]).and_then(|()| self.out.flush())
                }
                Err(e) => Err(e),
            }
        };
        if let Err(e) = res {
            // Cut back to the last whole chunk so the trace reads cleanly up
            // to where recording stopped.
            let cut = match self.out.truncate_to(offset) {
                Ok(()) => format!("the trace ends after chunk {chunks}"),
                Err(_) => "the trace ends in a partial chunk".to_string(),
            };
            return Err(Failure {
                errno: e.raw_os_error(),
                kind: e.kind(),
                message: e.to_string(),
                closed: format!("writing chunk {chunks} failed: {e}; {cut}"),
            });
        }
        let entry = IndexEntry {
            offset,
            record_count: job.record_count,
            first_seq: job.first_seq,
            last_seq: job.last_seq,
        };
        Ok((entry, total, wrote_direct))
    }
}
