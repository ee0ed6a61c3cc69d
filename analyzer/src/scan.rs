//! Reading a run of chunks in order, with worker threads checking and
//! decompressing them ahead of the consumer.
//!
//! Decompression is the larger half of a scan's work, and chunks are
//! compressed independently, so `workers` threads each take every
//! `workers`-th chunk and hand them over through a small bounded channel;
//! the consumer takes them round-robin, which keeps file order. Each
//! worker gets its buffers back once the consumer is done with a chunk, so
//! a scan allocates (and faults in) a few buffers, not one per chunk. When
//! the consumer stops early or fails, the channels close and the workers
//! stop.

use std::ops::ControlFlow;
use std::sync::mpsc;
use std::thread;

use memwatch_format::{ChunkInfo, DecodedChunk, TraceReader};

use crate::error::{Error, Result};

/// Chunks a worker may have decompressed ahead of the consumer.
const AHEAD: usize = 2;

/// The number of decompressing threads a scan uses: one per core, at most
/// 8; none on a single core.
pub(crate) fn default_workers() -> usize {
    match thread::available_parallelism().map_or(1, |n| n.get()) {
        1 => 0,
        n => n.min(8),
    }
}

/// Calls `f` on each of `chunks`, decoded, in order, until it breaks or
/// fails. With `workers == 0` (or fewer than two chunks) they are read
/// on this thread.
pub(crate) fn for_each_chunk<'r>(
    reader: &'r TraceReader,
    chunks: &[ChunkInfo],
    workers: usize,
    mut f: impl FnMut(&ChunkInfo, &DecodedChunk<'r>) -> Result<ControlFlow<()>>,
) -> Result<()> {
    let workers = workers.min(chunks.len());
    if workers == 0 || chunks.len() < 2 {
        let mut buf = Vec::new();
        for info in chunks {
            let chunk = reader.decode_chunk_with(info, buf)?;
            if f(info, &chunk)?.is_break() {
                break;
            }
            buf = chunk.into_buffer();
        }
        return Ok(());
    }
    thread::scope(|s| {
        let mut decoded = Vec::with_capacity(workers);
        let mut spare = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = mpsc::sync_channel::<Result<DecodedChunk<'r>>>(AHEAD);
            let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
            s.spawn(move || {
                for info in chunks.iter().skip(w).step_by(workers) {
                    let buf = back_rx.try_recv().unwrap_or_default();
                    let chunk = reader.decode_chunk_with(info, buf).map_err(Error::from);
                    let failed = chunk.is_err();
                    if tx.send(chunk).is_err() || failed {
                        break;
                    }
                }
            });
            decoded.push(rx);
            spare.push(back_tx);
        }
        for (i, info) in chunks.iter().enumerate() {
            let w = i % workers;
            // Every worker sends each of its chunks or an error, so this
            // fails only if it panicked; the scope then raises that panic.
            let Ok(chunk) = decoded[w].recv() else {
                break;
            };
            let chunk = chunk?;
            if f(info, &chunk)?.is_break() {
                break;
            }
            // The worker may have finished: then the buffer is just freed.
            let _ = spare[w].send(chunk.into_buffer());
        }
        Ok(())
    })
}
