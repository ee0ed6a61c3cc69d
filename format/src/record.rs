//! The record types a chunk carries.
//!
//! Records borrow their strings and bytes (`&'a str`, `&'a [u8]`): a reader
//! decodes them straight out of a decompressed chunk without copying, and a
//! writer encodes them straight out of the recorder's buffers.
//!
//! Every record is encoded with postcard: an enum tag (varint of the variant
//! index below), then the fields in declaration order (integers as varints,
//! strings and byte strings as a varint length and the raw bytes, `Option` as a
//! `0`/`1` byte and the value). `docs/format.md` spells each one out.
//!
//! Ids of interned strings, frames and stacks start at 1; `0` means "none".
//!
//! ┌──────────────────────────────────────────────────────────────────────┐
//! │ Changing any struct or enum in this file (a field, its type, its       │
//! │ order, a new variant anywhere) means bumping `FORMAT_VERSION` and       │
//! │ keeping a reader for the old version.                                  │
//! └──────────────────────────────────────────────────────────────────────┘

use serde::{Deserialize, Serialize};

/// An interned id (string, frame or stack). `0` is "none".
pub type Id = u32;

/// The "none" value of an [`Id`].
pub const NO_ID: Id = 0;

/// One record. The variant order is part of the format.
// changing this enum means bumping FORMAT_VERSION
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// Defines string `id` (file names, function names, thread names, tags).
    #[serde(borrow)]
    String(StringDef<'a>),
    /// Defines frame `id`: a file, a function and a line.
    Frame(FrameDef),
    /// Defines stack `id`: frame ids, innermost first.
    Stack(StackDef),
    /// A region starts being watched. Its initial contents follow as
    /// [`Record::Contents`] records with `at_seq == seq`.
    #[serde(borrow)]
    RegionWatched(RegionWatched<'a>),
    /// A piece of a region's full contents (initial contents or a checkpoint).
    #[serde(borrow)]
    Contents(Contents<'a>),
    /// A region stops being watched.
    RegionUnwatched(RegionUnwatched),
    /// Bytes of a watched region changed.
    #[serde(borrow)]
    Change(Change<'a>),
    /// A watched Python object or variable changed.
    #[serde(borrow)]
    ObjectChange(ObjectChange<'a>),
    /// The full contents of a region after `at_seq` follow as
    /// [`Record::Contents`] records with the same `at_seq`.
    Checkpoint(Checkpoint),
    /// The recorder could not record some events; says how many.
    #[serde(borrow)]
    Lost(Lost<'a>),
    /// Defines the Python variable a tag's object changes came through
    /// (format version 2 on).
    #[serde(borrow)]
    ObjectVariable(ObjectVariable<'a>),
    /// Bytes of a watched region changed, stored without their old bytes
    /// (format version 3 on): a reader gets them from the state before.
    #[serde(borrow)]
    Delta(Delta<'a>),
    /// The recorded program waited for the trace's writer (format version
    /// 3 on).
    Waited(Waited),
    /// The recorded program died of a fatal signal; what came from its
    /// last look is before this (format version 3 on; see
    /// [`crate::crash`]).
    #[serde(borrow)]
    Crashed(Crashed<'a>),
    /// A fact about the event that follows it (format version 4 on): the
    /// op that made a change.
    Note(Note),
}

// changing this struct means bumping FORMAT_VERSION
/// Defines an interned string.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StringDef<'a> {
    pub id: Id,
    pub value: &'a str,
}

// changing this struct means bumping FORMAT_VERSION
/// Defines an interned frame.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameDef {
    pub id: Id,
    /// String id of the file name.
    pub file: Id,
    /// String id of the function's qualified name.
    pub function: Id,
    pub line: u32,
}

// changing this struct means bumping FORMAT_VERSION
/// Defines an interned stack.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StackDef {
    pub id: Id,
    /// Frame ids, innermost first.
    pub frames: Vec<Id>,
}

/// Who did something, and where: common to every event.
// changing this struct means bumping FORMAT_VERSION
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Context {
    /// Nanoseconds since the trace's `start_time_ns` (monotonic clock).
    pub time_ns: u64,
    /// The OS thread id (`gettid`, Python's `threading.get_native_id()`).
    pub thread: u64,
    /// String id of the thread's name, or [`NO_ID`].
    pub thread_name: Id,
    /// The frame the event is attributed to (the innermost in-scope frame),
    /// or [`NO_ID`].
    pub frame: Id,
    /// The full Python stack, or [`NO_ID`].
    pub stack: Id,
}

/// How a watched region lays out its elements, when known.
// changing this struct means bumping FORMAT_VERSION
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout<'a> {
    /// A numpy array-protocol type string (`"<f4"`, `"|u1"`, `"<i8"`) or
    /// one of memwatch's names for types numpy lacks (`"<bfloat16"`,
    /// `"|float8_e4m3fn"`, see [`crate::dtype`]), or `None` for plain bytes.
    #[serde(borrow)]
    pub dtype: Option<&'a str>,
    /// Element size in bytes (1 for plain bytes).
    pub itemsize: u32,
    /// Shape in elements; empty for a flat byte buffer.
    pub shape: Vec<u64>,
    /// Strides in bytes, one per dimension; empty means C-contiguous.
    pub strides: Vec<i64>,
    /// Byte offset of element `[0, 0, ...]` from the region's start (non-zero
    /// for a view with negative strides).
    pub origin: u64,
}

// changing this struct means bumping FORMAT_VERSION
/// A region starts being watched.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RegionWatched<'a> {
    pub seq: u64,
    pub ctx: Context,
    /// Region id, unique within the trace (never reused).
    pub region: u32,
    /// The tag the user gave, or the variable name.
    pub tag: &'a str,
    /// The variable through which the buffer was passed to `watch`.
    #[serde(borrow)]
    pub variable: Option<&'a str>,
    /// Start address in the recorded process.
    pub address: u64,
    /// Length in bytes of the span `[address, address + len)`.
    pub len: u64,
    #[serde(borrow)]
    pub layout: Layout<'a>,
}

// changing this struct means bumping FORMAT_VERSION
/// A piece of a region's full contents.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Contents<'a> {
    pub region: u32,
    /// The seq this snapshot is the state after: the region's
    /// [`RegionWatched::seq`] or a [`Checkpoint::at_seq`].
    pub at_seq: u64,
    /// Byte offset of `data` within the region.
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: &'a [u8],
}

/// Why a region stopped being watched.
// changing this enum means bumping FORMAT_VERSION
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnwatchReason {
    /// `unwatch` was called.
    Explicit,
    /// The recorder stopped or the interpreter exited.
    Shutdown,
    /// The watched object was garbage-collected.
    Collected,
}

impl UnwatchReason {
    /// The lower-case name used in dumps and exports.
    pub fn name(self) -> &'static str {
        match self {
            UnwatchReason::Explicit => "explicit",
            UnwatchReason::Shutdown => "shutdown",
            UnwatchReason::Collected => "collected",
        }
    }
}

// changing this struct means bumping FORMAT_VERSION
/// A region stops being watched.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionUnwatched {
    pub seq: u64,
    pub ctx: Context,
    pub region: u32,
    pub reason: UnwatchReason,
}

// changing this struct means bumping FORMAT_VERSION
/// One run of changed bytes. `old.len() == new.len()`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ByteRange<'a> {
    /// Byte offset within the region.
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub old: &'a [u8],
    #[serde(with = "serde_bytes")]
    pub new: &'a [u8],
}

// changing this struct means bumping FORMAT_VERSION
/// Bytes of a watched region changed.
///
/// A very large change may be split over several consecutive `Change`
/// records with the same `seq` and `region`; readers treat them as one.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Change<'a> {
    pub seq: u64,
    pub ctx: Context,
    pub region: u32,
    /// Changed runs, in increasing offset order, not overlapping.
    #[serde(borrow)]
    pub ranges: Vec<ByteRange<'a>>,
}

/// What happened to a watched Python object or variable.
// changing this enum means bumping FORMAT_VERSION
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectChangeKind {
    SetAttr,
    DelAttr,
    SetItem,
    DelItem,
    Append,
    Extend,
    Insert,
    Pop,
    Remove,
    Sort,
    Reverse,
    Clear,
    Update,
    Add,
    Discard,
    /// A watched variable was bound to another object.
    Rebind,
    /// A watched variable was deleted.
    Unbind,
    /// The object's fingerprint (id, type, hash or a user key) changed.
    Fingerprint,
    /// The watched object was garbage-collected.
    Collected,
    /// Anything else; `key` says what.
    Other,
}

impl ObjectChangeKind {
    /// Every kind, in variant order.
    pub const ALL: [ObjectChangeKind; 20] = [
        Self::SetAttr,
        Self::DelAttr,
        Self::SetItem,
        Self::DelItem,
        Self::Append,
        Self::Extend,
        Self::Insert,
        Self::Pop,
        Self::Remove,
        Self::Sort,
        Self::Reverse,
        Self::Clear,
        Self::Update,
        Self::Add,
        Self::Discard,
        Self::Rebind,
        Self::Unbind,
        Self::Fingerprint,
        Self::Collected,
        Self::Other,
    ];

    /// The lower-case name used in dumps and exports (`setattr`, `append`).
    pub fn name(self) -> &'static str {
        match self {
            Self::SetAttr => "setattr",
            Self::DelAttr => "delattr",
            Self::SetItem => "setitem",
            Self::DelItem => "delitem",
            Self::Append => "append",
            Self::Extend => "extend",
            Self::Insert => "insert",
            Self::Pop => "pop",
            Self::Remove => "remove",
            Self::Sort => "sort",
            Self::Reverse => "reverse",
            Self::Clear => "clear",
            Self::Update => "update",
            Self::Add => "add",
            Self::Discard => "discard",
            Self::Rebind => "rebind",
            Self::Unbind => "unbind",
            Self::Fingerprint => "fingerprint",
            Self::Collected => "collected",
            Self::Other => "other",
        }
    }

    /// The kind with this [`name`](Self::name), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

// changing this struct means bumping FORMAT_VERSION
/// A watched Python object or variable changed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ObjectChange<'a> {
    pub seq: u64,
    pub ctx: Context,
    /// String id of the tag.
    pub tag: Id,
    pub kind: ObjectChangeKind,
    /// Attribute name, key or index (as a bounded `repr`), when the kind has one.
    #[serde(borrow)]
    pub key: Option<&'a str>,
    /// Bounded `repr` of the old value, when there was one.
    #[serde(borrow)]
    pub old: Option<&'a str>,
    /// Bounded `repr` of the new value, when there is one.
    #[serde(borrow)]
    pub new: Option<&'a str>,
}

// changing this struct means bumping FORMAT_VERSION
/// The full contents of a region after `at_seq` follow.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub region: u32,
    /// The state is the one after every event with `seq <= at_seq`.
    pub at_seq: u64,
}

// changing this struct means bumping FORMAT_VERSION
/// The recorder could not record some events.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Lost<'a> {
    /// The last seq recorded before the loss.
    pub after_seq: u64,
    /// How many events were not recorded.
    pub events: u64,
    /// Why (for example `"trace write failed: No space left on device"`).
    pub reason: &'a str,
}

// changing this struct means bumping FORMAT_VERSION
/// The variable that the object changes of a tag (`watch_object`,
/// `watch_var`) came through, from here on: written before the first such
/// change and again whenever it differs (a tag watched again through
/// another name). A definition, like [`StringDef`]: it has no seq.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ObjectVariable<'a> {
    /// String id of the tag.
    pub tag: Id,
    /// The variable, if the watch had one.
    #[serde(borrow)]
    pub variable: Option<&'a str>,
}

// changing this struct means bumping FORMAT_VERSION
/// Bytes of a watched region changed (format version 3 on; version 2
/// wrote [`Change`], with old and new bytes).
///
/// Each range stores `new XOR old` (or, with `full`, the new bytes), byte
/// shuffled by `shuffle`: for a range of `n` whole elements of `shuffle`
/// bytes, byte `j` of element `i` is stored at `j * n + i` (the first bytes
/// of every element, then the second bytes, ...), and the bytes past the
/// last whole element follow as they are. Neighbouring elements of an array
/// differ little, so the shuffled XOR is long runs of zeros and small
/// values that compress well. The reader keeps each region's state as it
/// reads (initial contents, then every change) and turns a `Delta` back
/// into old and new bytes (see [`crate::Expander`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Delta<'a> {
    pub seq: u64,
    pub ctx: Context,
    pub region: u32,
    /// The element size the data is shuffled by; 1: not shuffled.
    pub shuffle: u32,
    /// The ranges hold the new bytes, not XOR old: such a `Delta` needs no
    /// state before it, and one right after a [`Checkpoint`] with its seq,
    /// covering the whole region, is that checkpoint's contents.
    pub full: bool,
    /// Changed runs, in increasing offset order, not overlapping.
    #[serde(borrow)]
    pub ranges: Vec<DeltaRange<'a>>,
}

// changing this struct means bumping FORMAT_VERSION
/// One run of changed bytes of a [`Delta`]: `data.len()` bytes at `offset`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeltaRange<'a> {
    /// Byte offset within the region.
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: &'a [u8],
}

// changing this struct means bumping FORMAT_VERSION
/// The recorded program waited for chunks to be compressed and written
/// (the writer had more queued than it may hold; see `memwatch_format::sealer`):
/// how long, in how many waits, since the previous `Waited` record.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waited {
    /// The last seq recorded before the waits were noted.
    pub after_seq: u64,
    /// Nanoseconds waited.
    pub waited_ns: u64,
    /// Number of waits.
    pub waits: u64,
}

// changing this struct means bumping FORMAT_VERSION
/// How a recorded program that died of a fatal signal ended: written by a
/// reader that found the trace's crash area ([`crate::crash`]), after the
/// changes the fatal-signal handler's last look found.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Crashed<'a> {
    /// The signal (`SIGSEGV` is 11).
    pub signal: i32,
    /// Its `si_code`: at most 0 when sent (`kill`, `raise`, `abort`), above
    /// 0 when the CPU raised it (a bad address, a bus error).
    pub si_code: i32,
    /// The thread that received it.
    pub thread: u64,
    /// Nanoseconds since the trace's start.
    pub time_ns: u64,
    /// The file and line that thread was running (`""`, 0: unknown).
    pub file: &'a str,
    pub line: u32,
    /// Changes the last look found.
    pub changes: u64,
    /// [`FLAG_TRUNCATED`], [`FLAG_BUSY`].
    pub flags: u32,
    /// False when the handler was cut off before it finished.
    pub finished: bool,
}

/// [`Crashed::flags`]: some changes did not fit.
pub const FLAG_TRUNCATED: u32 = 1;
/// `flags`: the recorder was updating its copies when the signal came, so
/// nothing was compared.
pub const FLAG_BUSY: u32 = 2;

/// `SIGSEGV` and the like, by number (`"signal 40"` for others).
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGABRT => "SIGABRT",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        libc::SIGINT => "SIGINT",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

impl Crashed<'_> {
    /// One line for people: "the program died of SIGSEGV in thread 123 at
    /// train.py:14; its last look recorded 2 changes". `pid` is the
    /// recorded process's: its main thread is named so.
    pub fn describe(&self, pid: u32) -> String {
        let at = if self.file.is_empty() {
            String::new()
        } else {
            let file = self.file.rsplit('/').next().unwrap_or(self.file);
            format!(" at {file}:{}", self.line)
        };
        let n = self.changes;
        let look = if self.flags & FLAG_BUSY != 0 {
            "; memwatch was updating its copies of watched memory then, so it did not look".to_string()
        } else {
            format!(
                "; its last look recorded {n} {}{}{}",
                if n == 1 { "change" } else { "changes" },
                if self.flags & FLAG_TRUNCATED != 0 {
                    " (not all of them: the crash area was full)"
                } else {
                    ""
                },
                if self.finished {
                    ""
                } else {
                    " before it was cut off"
                },
            )
        };
        let thread = if self.thread == u64::from(pid) {
            format!("the main thread ({})", self.thread)
        } else {
            format!("thread {}", self.thread)
        };
        format!(
            "the program died of {} in {thread}{at}{look}",
            signal_name(self.signal)
        )
    }
}

// changing this struct means bumping FORMAT_VERSION
/// A fact about event `seq` (format version 4 on): `key` says what the
/// fact is and `value` what it says, both interned strings. Written right
/// before the event it is about (its first record with seq `seq`, after
/// any checkpoint announcement), so a reader streaming the file has it
/// when it meets the event. Like a definition it has no seq of its own: it
/// is not an event.
///
/// Keys: [`NOTE_OP`], the operation that made a byte change (a torch aten
/// op such as `aten::add_.Tensor`, recorded by `watch(t, via="dispatch")`).
/// A reader ignores a note whose key it does not know, so new keys need no
/// new version.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Note {
    /// The seq of the event the note is about.
    pub seq: u64,
    /// String id of what the note says (`"op"`).
    pub key: Id,
    /// String id of its value (`"aten::add_.Tensor"`).
    pub value: Id,
}

/// The [`Note`] key of the operation that made a change.
pub const NOTE_OP: &str = "op";

impl Record<'_> {
    /// The seq of an event record; `None` for definitions, contents,
    /// checkpoints, loss reports and notes.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Record::RegionWatched(r) => Some(r.seq),
            Record::RegionUnwatched(r) => Some(r.seq),
            Record::Change(r) => Some(r.seq),
            Record::ObjectChange(r) => Some(r.seq),
            Record::Delta(r) => Some(r.seq),
            Record::String(_)
            | Record::Frame(_)
            | Record::Stack(_)
            | Record::Contents(_)
            | Record::Checkpoint(_)
            | Record::Lost(_)
            | Record::Waited(_)
            | Record::Crashed(_)
            | Record::Note(_)
            | Record::ObjectVariable(_) => None,
        }
    }

    /// The upper-case name `memwatch dump` prints (`CHANGE`, `STRING`).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Record::String(_) => "STRING",
            Record::Frame(_) => "FRAME",
            Record::Stack(_) => "STACK",
            Record::RegionWatched(_) => "WATCH",
            Record::Contents(_) => "CONTENTS",
            Record::RegionUnwatched(_) => "UNWATCH",
            Record::Change(_) => "CHANGE",
            Record::ObjectChange(_) => "OBJECT",
            Record::Checkpoint(_) => "CHECKPOINT",
            Record::Lost(_) => "LOST",
            Record::ObjectVariable(_) => "OBJVAR",
            Record::Delta(_) => "DELTA",
            Record::Waited(_) => "WAITED",
            Record::Crashed(_) => "CRASHED",
            Record::Note(_) => "NOTE",
        }
    }
}
