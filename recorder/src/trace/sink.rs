//! Recording changes to a trace file.
//!
//! One [`TraceSink`] per process at a time, behind [`SINK`]. Records are
//! appended by the thread that found the change, and each is in the
//! trace's journal (a shared file mapping) as soon as it is appended, so a
//! program that dies loses none of them (`memwatch_format::journal`); a
//! background thread emits pending records as a chunk at least every
//! [`FLUSH_EVERY`]. Checkpoints keep rebuilding any state
//! cheap: a region gets one when the bytes changed since its last checkpoint
//! reach [`CHECKPOINT_FACTOR`] times its size (at least [`CHECKPOINT_MIN`]),
//! or after [`CHECKPOINT_EVERY`] changes, so replaying to any point costs at
//! most that many region's worth of change bytes and that many changes.
//!
//! Changes are stored as `Delta` records (format version 3): new XOR old,
//! shuffled by element size, with no copy of the old bytes; readers get
//! those from the state before (`memwatch_format::delta`). A change whose
//! op is known (`watch(t, via="dispatch")`) has a `Note` naming it right
//! before its `Delta` (format version 4).
//!
//! Locking: [`SINK`] (through [`lock`]) is taken alone or while holding the
//! buffers' state lock (`watch::buffers::state`), never the other way
//! round, and never while Python code runs; the flusher thread takes it
//! for each flush. Nothing here runs in signal context: the journal the
//! records go to is what the fatal-signal handler (`mem::signals::crash`)
//! finishes, through the area [`TraceSink::create`] arms.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use memwatch_format::{
    ByteRange, Checkpoint, Context, Layout as FmtLayout, Lost, Meta, ObjectChange, ObjectVariable, Record,
    RegionUnwatched, RegionWatched, TraceWriter, UnwatchReason, WriterOptions,
};

use crate::mem::engine::Region;
use crate::model::change::FrameRef;

/// How often the flusher thread pushes pending records to the file.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// A region gets a checkpoint once the bytes changed since its last one
/// reach this many times its size: a change costs no more than its XOR
/// (compressed, a few bits per changed byte) and replaying one is a pass
/// over it, so checkpoints can be rare; each costs a full copy.
pub const CHECKPOINT_FACTOR: u64 = 16;
/// Smallest region size the checkpoint volume is reckoned from.
pub const CHECKPOINT_MIN: u64 = 64 * 1024;
/// Most changes of a region between two of its checkpoints (replaying this
/// many takes a fraction of a second).
pub const CHECKPOINT_EVERY: u64 = 1_000_000;

/// The active trace, if any.
pub static SINK: Mutex<Option<TraceSink>> = Mutex::new(None);

/// The trace, locked. Taken alone, or while holding the buffers' state
/// lock (`watch::buffers`), never the other way round.
pub fn lock() -> std::sync::MutexGuard<'static, Option<TraceSink>> {
    SINK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Who and where, for one event, before interning.
pub struct EventContext<'a> {
    pub thread: u64,
    pub thread_name: &'a str,
    /// Innermost first; the first frame is the one the event is attributed to.
    pub stack: &'a [FrameRef],
}

impl<'a> EventContext<'a> {
    /// The context of an event on the calling thread.
    pub fn here(thread_name: &'a str, stack: &'a [FrameRef]) -> EventContext<'a> {
        EventContext {
            thread: crate::mem::kernel::gettid(),
            thread_name,
            stack,
        }
    }
}

/// An open trace and what the recorder needs to keep writing it.
pub struct TraceSink {
    writer: TraceWriter,
    path: PathBuf,
    start: Instant,
    pub start_unix_ns: u64,
    /// Bytes of each watched region: the crash area holds them all.
    watched: HashMap<u32, u64>,
    /// Per region: bytes changed and changes since its last snapshot.
    since_checkpoint: HashMap<u32, (u64, u64)>,
    /// Set after a write error: recording stopped there.
    pub failed: Option<String>,
    lost: u64,
    last_seq: u64,
    pub changes: u64,
    /// By tag string id: the variable last written for its object changes.
    object_variables: HashMap<u32, Option<String>>,
    /// The ids of the last event context's thread name and stack, by their
    /// content: a loop that changes something reports the same place again
    /// and again, and looking each frame up costs more than the record.
    last_ctx: Option<CtxMemo>,
    /// The last object-change tag and its string id.
    last_tag: Option<(String, u32)>,
}

/// See `TraceSink::last_ctx`.
struct CtxMemo {
    thread_name: String,
    stack: Vec<FrameRef>,
    thread_name_id: u32,
    frame: u32,
    stack_id: u32,
}

/// The zstd level `memwatch record --compression` asked for
/// (`MEMWATCH_COMPRESSION`), else the format's default.
fn compression_level() -> i32 {
    std::env::var("MEMWATCH_COMPRESSION")
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|l| (-7..=19).contains(l))
        .unwrap_or(memwatch_format::DEFAULT_LEVEL)
}

/// Whether large chunks go to the trace with direct I/O, past the page
/// cache (`MEMWATCH_DIRECT_IO=0` turns it off; see `memwatch_format::direct`).
fn direct_io() -> bool {
    !matches!(
        std::env::var("MEMWATCH_DIRECT_IO").as_deref().map(str::trim),
        Ok("0") | Ok("off") | Ok("no") | Ok("false")
    )
}

/// Nanoseconds since the Unix epoch.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl TraceSink {
    /// Creates the trace file and writes its header. The header's
    /// `start_time_ns` is set here, at the instant a record's time counts
    /// from: a record at `time_ns` happened at `start_time_ns + time_ns`
    /// wall-clock, which is what lines up the processes of a run (their
    /// traces are created at different times, and creating one takes
    /// milliseconds: a start taken before it made every record of the
    /// trace look that much earlier).
    pub fn create(path: &Path, mut meta: Meta) -> memwatch_format::Result<TraceSink> {
        let start = Instant::now();
        meta.start_time_ns = unix_ns();
        let start_unix_ns = meta.start_time_ns;
        let opts = WriterOptions {
            zstd_level: compression_level(),
            direct_io: direct_io(),
            ..WriterOptions::default()
        };
        let writer = TraceWriter::create(path, &meta, opts)?;
        if let Some((base, len)) = writer.crash_area() {
            crate::mem::signals::crash::arm(base, len);
        }
        Ok(TraceSink {
            writer,
            path: path.to_path_buf(),
            start,
            watched: HashMap::new(),
            start_unix_ns,
            since_checkpoint: HashMap::new(),
            failed: None,
            lost: 0,
            last_seq: 0,
            changes: 0,
            object_variables: HashMap::new(),
            last_ctx: None,
            last_tag: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why the trace has no journal, so that a process that dies loses
    /// the records not yet in a chunk (see `memwatch_format::journal`).
    pub fn journal_error(&self) -> Option<&str> {
        self.writer.journal_error()
    }

    fn ctx(&mut self, ev: &EventContext<'_>) -> memwatch_format::Result<Context> {
        if let Some(m) = &self.last_ctx {
            if m.thread_name == ev.thread_name && m.stack == ev.stack {
                return Ok(Context {
                    time_ns: self.start.elapsed().as_nanos() as u64,
                    thread: ev.thread,
                    thread_name: m.thread_name_id,
                    frame: m.frame,
                    stack: m.stack_id,
                });
            }
        }
        let thread_name = self.writer.intern_str(ev.thread_name)?;
        if ev.thread == crate::mem::kernel::gettid() {
            crate::mem::signals::crash::note_name(thread_name);
        }
        let mut frames = Vec::with_capacity(ev.stack.len());
        for f in ev.stack {
            frames.push(self.writer.intern_frame(&f.file, &f.function, f.line)?);
        }
        let stack = if frames.is_empty() {
            0
        } else {
            self.writer.intern_stack(&frames)?
        };
        // Ids are the trace's for good: definitions are never repeated.
        self.last_ctx = Some(CtxMemo {
            thread_name: ev.thread_name.to_string(),
            stack: ev.stack.to_vec(),
            thread_name_id: thread_name,
            frame: frames.first().copied().unwrap_or(0),
            stack_id: stack,
        });
        Ok(Context {
            time_ns: self.start.elapsed().as_nanos() as u64,
            thread: ev.thread,
            thread_name,
            frame: frames.first().copied().unwrap_or(0),
            stack,
        })
    }

    /// Runs `f`; after a write error, counts the event as lost instead.
    fn guarded(&mut self, seq: u64, f: impl FnOnce(&mut Self) -> memwatch_format::Result<()>) {
        if self.failed.is_some() {
            self.lost += 1;
            return;
        }
        match f(self) {
            Ok(()) => self.last_seq = seq,
            Err(e) => {
                self.stopped(e.to_string());
                self.lost += 1;
            }
        }
    }

    /// Recording stops here (the trace cannot be written): says so once,
    /// now, on stderr; the program goes on. Readers learn after which seq,
    /// when and why from the trace's journal.
    fn stopped(&mut self, why: String) {
        eprintln!(
            "memwatch: warning: recording stopped: {why}; the program goes on, \
             and its changes from here on are not recorded (the trace keeps \
             everything up to here)"
        );
        self.failed = Some(why);
    }

    /// A region starts being watched: its description and initial contents.
    pub fn region_watched(&mut self, seq: u64, region: &Region, ev: &EventContext<'_>) {
        self.guarded(seq, |s| {
            let ctx = s.ctx(ev)?;
            s.writer.append(&Record::RegionWatched(RegionWatched {
                seq,
                ctx,
                region: region.id,
                tag: &region.tag,
                variable: region.variable.as_deref(),
                address: region.start,
                len: region.len,
                layout: FmtLayout {
                    dtype: region.layout.dtype.as_deref(),
                    itemsize: region.layout.itemsize,
                    shape: region.layout.shape.clone(),
                    strides: region.layout.strides.clone(),
                    origin: region.layout.origin,
                },
            }))?;
            s.writer.append_contents(region.id, seq, &region.shadow)?;
            s.since_checkpoint.insert(region.id, (0, 0));
            s.watched.insert(region.id, region.len);
            s.size_crash_area();
            Ok(())
        });
    }

    /// A change of `region`, stored as a `Delta` (its new bytes XOR its old
    /// ones, shuffled by the element size). `after` is the region's contents
    /// right after it, when known (for checkpoints).
    ///
    /// A checkpoint is due when the bytes changed since the region's last
    /// one reach [`CHECKPOINT_FACTOR`] times its size (or after
    /// [`CHECKPOINT_EVERY`] changes). A due change that rewrites the whole
    /// region is stored as its new bytes and is the checkpoint itself;
    /// otherwise the checkpoint's contents follow the change.
    ///
    /// A change made by a known op (`op`, from `watch(t, via="dispatch")`)
    /// has an `op` note right before it (format version 4).
    pub fn change(
        &mut self,
        seq: u64,
        region: &Region,
        ranges: &[crate::mem::engine::ChangedRange],
        after: Option<&[u8]>,
        ev: &EventContext<'_>,
        op: Option<&str>,
    ) {
        self.guarded(seq, |s| {
            let ctx = s.ctx(ev)?;
            if let Some(op) = op {
                s.writer.append_note(seq, memwatch_format::NOTE_OP, op)?;
            }
            let id = region.id;
            let ranges: Vec<ByteRange<'_>> = ranges
                .iter()
                .map(|(offset, old, new)| ByteRange {
                    offset: *offset,
                    old,
                    new,
                })
                .collect();
            let changed: u64 = ranges.iter().map(|r| r.new.len() as u64).sum();
            let acc = s.since_checkpoint.entry(id).or_insert((0, 0));
            acc.0 += changed;
            acc.1 += 1;
            let due = after.is_some()
                && (acc.0 >= region.len.max(CHECKPOINT_MIN).saturating_mul(CHECKPOINT_FACTOR)
                    || acc.1 >= CHECKPOINT_EVERY);
            if due {
                *acc = (0, 0);
            }
            let whole = matches!(&ranges[..], [r] if r.offset == 0 && r.new.len() as u64 == region.len);
            let shuffle = region.layout.itemsize.max(1);
            if due && whole {
                s.writer.append(&Record::Checkpoint(Checkpoint {
                    region: id,
                    at_seq: seq,
                }))?;
                s.writer.append_delta(seq, &ctx, id, shuffle, true, &ranges)?;
            } else {
                s.writer.append_delta(seq, &ctx, id, shuffle, false, &ranges)?;
                if let (true, Some(after)) = (due, after) {
                    s.writer.append(&Record::Checkpoint(Checkpoint {
                        region: id,
                        at_seq: seq,
                    }))?;
                    s.writer.append_contents(id, seq, after)?;
                }
            }
            s.changes += 1;
            Ok(())
        });
    }

    /// A change of a watched Python object.
    /// Records an object change of `tag`, which came through `variable`.
    pub fn object_change(
        &mut self,
        seq: u64,
        tag: &str,
        variable: Option<&str>,
        info: &crate::model::change::ObjectInfo,
        ev: &EventContext<'_>,
    ) {
        self.guarded(seq, |s| {
            let ctx = s.ctx(ev)?;
            let tag = match &s.last_tag {
                Some((t, id)) if t == tag => *id,
                _ => {
                    let id = s.writer.intern_str(tag)?;
                    s.last_tag = Some((tag.to_string(), id));
                    id
                }
            };
            // The tag's variable, defined before its first change and again
            // when it differs.
            if s.object_variables.get(&tag).map(|v| v.as_deref()) != Some(variable) {
                s.writer
                    .append(&Record::ObjectVariable(ObjectVariable { tag, variable }))?;
                s.object_variables.insert(tag, variable.map(String::from));
            }
            s.writer.append(&Record::ObjectChange(ObjectChange {
                seq,
                ctx,
                tag,
                kind: info.kind,
                key: info.key.as_deref(),
                old: info.old.as_deref(),
                new: info.new.as_deref(),
            }))?;
            s.changes += 1;
            Ok(())
        });
    }

    /// Grows the crash area to hold every watched byte once, half again
    /// for the entries' headers of scattered changes, and a header per
    /// region (a full disk leaves it smaller: the last look keeps what
    /// fits and says so).
    fn size_crash_area(&mut self) {
        let bytes: u64 = self.watched.values().sum();
        let entries = bytes
            .saturating_add(bytes / 2)
            .saturating_add(64 * self.watched.len() as u64);
        if let Some(len) = self
            .writer
            .ensure_crash_area(usize::try_from(entries).unwrap_or(usize::MAX))
        {
            crate::mem::signals::crash::set_area_len(len);
        }
    }

    pub fn region_unwatched(&mut self, seq: u64, region: u32, reason: UnwatchReason, ev: &EventContext<'_>) {
        self.watched.remove(&region);
        self.guarded(seq, |s| {
            let ctx = s.ctx(ev)?;
            s.writer.append(&Record::RegionUnwatched(RegionUnwatched {
                seq,
                ctx,
                region,
                reason,
            }))
        });
    }

    /// Pushes pending records to the file if they are older than `age`.
    pub fn flush_if_older(&mut self, age: Duration) {
        if self.failed.is_none() {
            if let Err(e) = self.writer.flush_if_older(age) {
                self.stopped(e.to_string());
            }
        }
    }

    /// Writes any loss report and the trailer. Returns the file size.
    pub fn finish(mut self) -> Result<u64, String> {
        // The crash area goes with the trace's trailer.
        crate::mem::signals::crash::disarm();
        if self.lost > 0 && self.failed.is_none() {
            let reason = "events after the trace writer stopped";
            let _ = self.writer.append(&Record::Lost(Lost {
                after_seq: self.last_seq,
                events: self.lost,
                reason,
            }));
        }
        if let Some(f) = self.failed {
            self.writer.note_lost(self.lost);
            return Err(format!(
                "recording stopped early: {f}; {} events were not recorded",
                self.lost
            ));
        }
        let end = self.start.elapsed().as_nanos() as u64;
        self.writer
            .finish(end)
            .map(|(_, stats)| stats.file_bytes)
            .map_err(|e| e.to_string())
    }
}

/// Starts the thread that flushes the active trace periodically; it ends
/// when no trace is active.
pub fn spawn_flusher() {
    let _ = std::thread::Builder::new()
        .name("memwatch-flush".into())
        .spawn(|| loop {
            std::thread::sleep(FLUSH_EVERY);
            let mut guard = match SINK.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            match guard.as_mut() {
                Some(s) => s.flush_if_older(FLUSH_EVERY),
                None => return,
            }
        });
}
