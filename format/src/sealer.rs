//! The sealer: compresses chunks and writes them to the trace on a thread
//! of its own, so that a recorded program's threads only encode records.
//!
//! A [`TraceWriter`](crate::TraceWriter) hands each chunk's raw payload to
//! its sealer (`Sealer::hand`) and goes on. The sealer thread compresses
//! it, writes header and payload with one `write`, and gives the buffer
//! back for the writer's next chunk. Chunks are written in the order they
//! were handed, so the file is what a writer that sealed its chunks itself
//! would have written.
//!
//! Memory is bounded: at most [`MAX_QUEUED`] raw bytes (or one chunk, if a
//! single chunk is larger) wait for the sealer. A writer with more to hand
//! waits until the sealer catches up: nothing is dropped, and the time it
//! waited is counted ([`WriterStats::waited_ns`](crate::WriterStats)).
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
use crate::writer::Output;

/// Raw bytes that may wait for the sealer before a writer waits too.
pub const MAX_QUEUED: usize = 32 << 20;

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
    Seal(Job),
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
    /// Chunks written.
    pub chunks: u64,
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

/// The sealer thread's own part: the output and how to compress.
struct Core<W> {
    out: W,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    size_limit: Option<u64>,
    frame: Vec<u8>,
}

/// The writer's handle on its sealer thread.
pub(crate) struct Sealer<W: Output> {
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<W>>,
    pub shared: Arc<Shared>,
    /// Chunks handed so far: the index the next one gets.
    pub handed: u64,
}

impl<W: Output> Sealer<W> {
    /// Starts the sealer thread for `out`, whose first chunk goes at
    /// `offset`. `level` is the zstd level (0: store chunks uncompressed).
    pub fn start(out: W, offset: u64, level: i32, size_limit: Option<u64>) -> io::Result<Self> {
        let compressor = if level != 0 {
            Some(zstd::bulk::Compressor::new(level)?)
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
        let core = Core {
            out,
            compressor,
            size_limit,
            frame: Vec::new(),
        };
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("memwatch-seal".into())
            .spawn(move || run(core, rx, &sh))?;
        Ok(Sealer {
            tx: Some(tx),
            thread: Some(thread),
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
        drop(st);
        self.handed += 1;
        match self.tx.as_ref().map(|tx| tx.send(Msg::Seal(job))) {
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

    /// True when every chunk handed is written (and so none was refused).
    pub fn idle(&self) -> bool {
        let st = self.shared.lock();
        st.queued == 0 && st.failed.is_none()
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
        self.thread.take().and_then(|t| t.join().ok())
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

fn run<W: Output>(mut core: Core<W>, rx: Receiver<Msg>, shared: &Shared) -> W {
    while let Ok(Msg::Seal(job)) = rx.recv() {
        let len = job.raw.len();
        let failed = shared.lock().failed.is_some();
        let done = if failed {
            None
        } else {
            Some(core.seal(&job, shared))
        };
        let mut st = shared.lock();
        st.queued -= 1;
        st.queued_bytes -= len;
        match done {
            Some(Ok((entry, total))) => {
                st.chunks += 1;
                st.offset += total;
                st.file_bytes += total;
                st.raw_bytes += len as u64;
                if job.kind == ChunkKind::Records {
                    st.index.push(entry);
                }
                if st.spare.len() < 4 {
                    let mut raw = job.raw;
                    raw.clear();
                    st.spare.push(raw);
                }
            }
            Some(Err(f)) => st.failed = Some(f),
            None => {}
        }
        drop(st);
        shared.changed.notify_all();
    }
    core.out
}

impl<W: Output> Core<W> {
    /// Compresses and writes one chunk; returns its index entry and length.
    fn seal(&mut self, job: &Job, shared: &Shared) -> Result<(IndexEntry, u64), Failure> {
        let (offset, chunks) = {
            let st = shared.lock();
            (st.offset, st.chunks)
        };
        let raw = &job.raw[..];
        let fail = |e: io::Error, closed: String| Failure {
            errno: e.raw_os_error(),
            kind: e.kind(),
            message: e.to_string(),
            closed,
        };
        let (codec, stored): (Codec, std::borrow::Cow<[u8]>) = match &mut self.compressor {
            Some(c) => match c.compress(raw) {
                Ok(z) if z.len() < raw.len() => (Codec::Zstd, z.into()),
                Ok(_) => (Codec::Stored, raw.into()),
                Err(e) => {
                    let closed = format!("compressing chunk {chunks} failed: {e}");
                    return Err(fail(e, closed));
                }
            },
            None => (Codec::Stored, raw.into()),
        };
        let header = ChunkHeader {
            kind: job.kind,
            codec,
            stored_len: stored.len() as u32,
            raw_len: raw.len() as u32,
            record_count: job.record_count,
            first_seq: job.first_seq,
            last_seq: job.last_seq,
            payload_crc: crc32fast::hash(&stored),
            contents_only: job.contents_only,
        };
        // One write per chunk: a process killed mid-way leaves at most one
        // partial chunk, which readers skip.
        self.frame.clear();
        self.frame.reserve(CHUNK_HEADER_LEN + stored.len());
        self.frame.extend_from_slice(&header.encode());
        self.frame.extend_from_slice(&stored);
        let total = self.frame.len() as u64;
        let past_limit = self.size_limit.is_some_and(|limit| offset + total > limit);
        let res = if past_limit {
            // The kernel would send SIGXFSZ, which kills a program that
            // does not ignore it.
            Err(io::Error::from_raw_os_error(libc::EFBIG))
        } else {
            self.out.write_all(&self.frame).and_then(|()| self.out.flush())
        };
        if self.frame.capacity() > 8 << 20 {
            self.frame = Vec::new();
        }
        if let Err(e) = res {
            // Cut back to the last whole chunk so the trace reads cleanly up
            // to where recording stopped.
            let cut = match self.out.truncate_to(offset) {
                Ok(()) => format!("the trace ends after chunk {chunks}"),
                Err(_) => "the trace ends in a partial chunk".to_string(),
            };
            let closed = format!("writing chunk {chunks} failed: {e}; {cut}");
            return Err(fail(e, closed));
        }
        let entry = IndexEntry {
            offset,
            record_count: job.record_count,
            first_seq: job.first_seq,
            last_seq: job.last_seq,
        };
        Ok((entry, total))
    }
}
