//! The last look of a recorded process that dies of a fatal signal.
//!
//! Every change the recorder found is in the trace's journal the moment it
//! is found; what a fatal signal can still take is what the program wrote
//! on the line it died in, which no line boundary saw. While a trace is
//! recording, `on_fatal` handles `SIGSEGV`, `SIGBUS`, `SIGABRT`,
//! `SIGFPE`, `SIGILL` (and `SIGTERM` when nothing else handles it): it
//! compares every watched region with the recorder's copy of it (its
//! shadow) and writes the bytes that differ to the trace's crash area
//! (`memwatch_format::crash`, a preallocated shared mapping of
//! `<trace>.crash`), on the line the dying thread was running. Then it puts
//! the previous action back and lets the process die as it would have: a
//! signal that was sent (`kill`, `raise`, `abort`) is raised again, a fault
//! happens again when the handler returns.
//!
//! What the handler reads, all of it in statics of this module, and who
//! keeps it up to date (none of that runs in signal context):
//! - the crash area's address and allocated length: [`arm`] when the trace
//!   opens, [`set_area_len`] as it grows, [`disarm`] before it closes;
//! - a table of the watched regions (span, shadow, element size, view
//!   mask): [`publish`], each time the buffers' state lock (`watch::buffers::state`) is released;
//! - per thread: the code object and line it runs ([`note_line`], at each
//!   line boundary), its name's string id in the trace ([`note_name`]) and
//!   whether it is inside the recorder ([`Busy`]);
//! - the file and function of every code object seen ([`learn_code`]),
//!   leaked once, so the names can be copied without a lock.
//!
//! Consistency without locks: the region table and the shadows are only
//! changed by a thread that holds a [`Busy`] token (taken before the state
//! lock and, at a check, kept until its changes are in the journal). The
//! handler sets `CRASHING`, then waits (at most [`WAIT_IDLE_NS`]) for no
//! token to be held; a thread that takes a token while `CRASHING` is set
//! gives it back and waits until the look is over. Both sides write their
//! flag and then read the other's, sequentially consistent, so at least one
//! sees the other. The dying thread's own token means it died inside the
//! recorder: nothing is compared (the area says so).
//!
//! Signal context: `on_fatal` and what it calls (`look`, `compare`,
//! `put_entry`, `put_u32`, `put_u64`, `in_mask`, `wait_idle`, `find_code`,
//! `slot_of_tid`, `pass_on`, `monotonic_ns`, `next_seq`,
//! `regions_left_out`). Their rules: no allocation, no locks, no
//! thread-locals, no Python; atomics, plain loads, compares and copies of
//! watched memory, shadows and the crash area; and the system calls
//! `gettid`, `getpid`, `clock_gettime`, `sched_yield`, `sigaction`,
//! `tgkill`.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use memwatch_format::crash::{
    CODE_AT, COMMITTED_AT, CRASH_HEADER_LEN, ENTRY_HEADER_LEN, FILE_AT, FILE_LEN_AT, FILE_MAX, FLAGS_AT,
    FLAG_BUSY, FLAG_TRUNCATED, FUNCTION_AT, FUNCTION_LEN_AT, FUNCTION_MAX, LINE_AT, SIGNAL_AT, STATE_AT,
    STATE_DONE, STATE_WRITING, THREAD_NAME_AT, TID_AT, TIME_AT,
};

/// Regions the handler can compare; more are left out of the last look
/// (and [`regions_left_out`] says so).
pub const MAX_REGIONS: usize = 4096;
/// Threads whose line the handler can know.
pub const MAX_THREADS: usize = 1024;
/// Code objects whose names the handler can know.
pub const MAX_CODES: usize = 1 << 14;
/// How long the handler waits for other threads to leave the recorder.
pub const WAIT_IDLE_NS: u64 = 200_000_000;
/// How long a second dying thread waits for the first one's look.
const WAIT_OTHER_NS: u64 = 2_000_000_000;
/// Equal bytes that end a changed range (fewer are taken into it: one
/// entry costs 32 bytes of header).
const GAP: usize = 64;

/// The signals handled.
const FATAL: [libc::c_int; 6] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGABRT,
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGTERM,
];

static AREA: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static AREA_LEN: AtomicUsize = AtomicUsize::new(0);
/// CLOCK_MONOTONIC at the trace's start, nanoseconds.
static START_NS: AtomicU64 = AtomicU64::new(0);
/// A thread started the look; the look is over.
static FIRED: AtomicBool = AtomicBool::new(false);
static DONE: AtomicBool = AtomicBool::new(false);
/// The handler is comparing: nobody may change a shadow.
static CRASHING: AtomicBool = AtomicBool::new(false);
/// [`Busy`] tokens held, all threads.
static BUSY: AtomicUsize = AtomicUsize::new(0);
/// The process's change sequence: every change, watch and unwatch takes
/// the next number, and so does each region the last look finds changed.
static SEQ: AtomicU64 = AtomicU64::new(0);

// --- the sequence -------------------------------------------------------------

/// The next sequence number (the first is 1).
pub fn next_seq() -> u64 {
    SEQ.fetch_add(1, Ordering::SeqCst) + 1
}

/// Starts the sequence again at 1 (a fork child's fresh state).
pub fn reset_seq() {
    SEQ.store(0, Ordering::SeqCst);
}

// --- regions ------------------------------------------------------------------

struct RegionSlot {
    id: AtomicU32,
    itemsize: AtomicU32,
    start: AtomicU64,
    len: AtomicU64,
    origin: AtomicU64,
    shadow: AtomicPtr<u8>,
    mask: AtomicPtr<u64>,
}

#[allow(clippy::declare_interior_mutable_const)]
const REGION_SLOT: RegionSlot = RegionSlot {
    id: AtomicU32::new(0),
    itemsize: AtomicU32::new(0),
    start: AtomicU64::new(0),
    len: AtomicU64::new(0),
    origin: AtomicU64::new(0),
    shadow: AtomicPtr::new(std::ptr::null_mut()),
    mask: AtomicPtr::new(std::ptr::null_mut()),
};
static REGIONS: [RegionSlot; MAX_REGIONS] = [REGION_SLOT; MAX_REGIONS];
static NREGIONS: AtomicUsize = AtomicUsize::new(0);
static LEFT_OUT: AtomicBool = AtomicBool::new(false);

/// One watched region as the handler sees it. The pointers must stay valid
/// until the next [`publish`] (the caller holds a [`Busy`] token).
pub struct Published {
    pub id: u32,
    pub start: u64,
    pub len: u64,
    /// `len` bytes: the contents as of the last check.
    pub shadow: *const u8,
    pub itemsize: u32,
    /// Offset of element `[0, ...]` from `start`.
    pub origin: u64,
    /// Bit per byte of the span (set where the byte is in the view), or
    /// null when every byte is.
    pub mask: *const u64,
}

/// Makes `regions` the ones the handler compares. Called with a [`Busy`]
/// token held, while nothing else changes them; does nothing while no
/// trace is recording.
pub fn publish(regions: impl Iterator<Item = Published>) {
    if AREA.load(Ordering::Acquire).is_null() {
        return;
    }
    let mut n = 0;
    for r in regions {
        if n == MAX_REGIONS {
            LEFT_OUT.store(true, Ordering::Relaxed);
            break;
        }
        let s = &REGIONS[n];
        s.id.store(r.id, Ordering::Relaxed);
        s.itemsize.store(r.itemsize.max(1), Ordering::Relaxed);
        s.start.store(r.start, Ordering::Relaxed);
        s.len.store(r.len, Ordering::Relaxed);
        s.origin.store(r.origin, Ordering::Relaxed);
        s.shadow.store(r.shadow.cast_mut(), Ordering::Relaxed);
        s.mask.store(r.mask.cast_mut(), Ordering::Relaxed);
        n += 1;
    }
    NREGIONS.store(n, Ordering::Release);
}

/// True when more regions were watched than the last look can compare.
pub fn regions_left_out() -> bool {
    LEFT_OUT.load(Ordering::Relaxed)
}

// --- threads ------------------------------------------------------------------

struct ThreadSlot {
    tid: AtomicU64,
    code: AtomicUsize,
    line: AtomicU32,
    name: AtomicU32,
    busy: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)]
const THREAD_SLOT: ThreadSlot = ThreadSlot {
    tid: AtomicU64::new(0),
    code: AtomicUsize::new(0),
    line: AtomicU32::new(0),
    name: AtomicU32::new(0),
    busy: AtomicU32::new(0),
};
static THREADS: [ThreadSlot; MAX_THREADS] = [THREAD_SLOT; MAX_THREADS];

/// This thread's index in [`THREADS`]; freed when the thread ends.
struct Mine(Cell<usize>);

const NO_SLOT: usize = usize::MAX;
const FULL: usize = usize::MAX - 1;

impl Drop for Mine {
    fn drop(&mut self) {
        let i = self.0.get();
        if i < MAX_THREADS {
            let s = &THREADS[i];
            s.code.store(0, Ordering::Relaxed);
            s.line.store(0, Ordering::Relaxed);
            s.name.store(0, Ordering::Relaxed);
            s.busy.store(0, Ordering::Relaxed);
            s.tid.store(0, Ordering::Release);
        }
    }
}

thread_local! {
    static MINE: Mine = const { Mine(Cell::new(NO_SLOT)) };
}

/// The calling thread's slot, taken on first use (`None` when every slot
/// is taken, or while the thread is ending).
fn mine() -> Option<&'static ThreadSlot> {
    MINE.try_with(|m| {
        let i = m.0.get();
        if i < MAX_THREADS {
            return Some(&THREADS[i]);
        }
        if i == FULL {
            return None;
        }
        let tid = crate::mem::kernel::gettid();
        for (k, s) in THREADS.iter().enumerate() {
            if s.tid.load(Ordering::Relaxed) == 0
                && s.tid
                    .compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                m.0.set(k);
                return Some(s);
            }
        }
        m.0.set(FULL);
        None
    })
    .ok()
    .flatten()
}

/// The calling thread now runs `line` of the code object at `code`.
#[inline]
pub fn note_line(code: usize, line: u32) {
    if AREA.load(Ordering::Relaxed).is_null() {
        return;
    }
    if let Some(s) = mine() {
        s.code.store(code, Ordering::Relaxed);
        s.line.store(line, Ordering::Relaxed);
    }
}

/// The calling thread's name is string `id` of the trace.
pub fn note_name(id: u32) {
    if let Some(s) = mine() {
        s.name.store(id, Ordering::Relaxed);
    }
}

/// Held while a thread may change the recorder's regions or shadows, or
/// has found changes that are not in the journal yet. Taking one waits
/// while the last look is being taken.
pub struct Busy {
    slot: Option<&'static ThreadSlot>,
}

impl Busy {
    pub fn new() -> Busy {
        let slot = mine();
        // The thread's own count first: a signal between the two finds the
        // thread busy rather than waiting for it.
        if let Some(s) = slot {
            s.busy.fetch_add(1, Ordering::SeqCst);
        }
        loop {
            BUSY.fetch_add(1, Ordering::SeqCst);
            if !CRASHING.load(Ordering::SeqCst) {
                return Busy { slot };
            }
            BUSY.fetch_sub(1, Ordering::SeqCst);
            while CRASHING.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

impl Default for Busy {
    fn default() -> Busy {
        Busy::new()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.fetch_sub(1, Ordering::SeqCst);
        if let Some(s) = self.slot {
            s.busy.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// In a fork child: only the calling thread exists; the others' slots and
/// tokens are gone with them.
pub fn after_fork() {
    let me = crate::mem::kernel::gettid();
    let mut own = 0;
    for s in &THREADS {
        let tid = s.tid.load(Ordering::Relaxed);
        if tid == me {
            own = s.busy.load(Ordering::Relaxed) as usize;
        } else if tid != 0 {
            s.busy.store(0, Ordering::Relaxed);
            s.tid.store(0, Ordering::Release);
        }
    }
    BUSY.store(own, Ordering::SeqCst);
}

// --- code objects -------------------------------------------------------------

struct CodeSlot {
    key: AtomicUsize,
    names: AtomicPtr<u8>,
    file_len: AtomicU32,
    function_len: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)]
const CODE_SLOT: CodeSlot = CodeSlot {
    key: AtomicUsize::new(0),
    names: AtomicPtr::new(std::ptr::null_mut()),
    file_len: AtomicU32::new(0),
    function_len: AtomicU32::new(0),
};
static CODES: [CodeSlot; MAX_CODES] = [CODE_SLOT; MAX_CODES];

fn code_hash(key: usize) -> usize {
    ((key >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 20 & (MAX_CODES - 1)
}

/// Remembers the names of the code object at `key` (which the recorder
/// keeps alive, so the address is never another code object's).
pub fn learn_code(key: usize, file: &str, function: &str) {
    let file = &file.as_bytes()[..file.len().min(FILE_MAX)];
    let function = &function.as_bytes()[..function.len().min(FUNCTION_MAX)];
    let mut i = code_hash(key);
    for _ in 0..MAX_CODES {
        let s = &CODES[i];
        match s
            .key
            .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                let names: &'static mut [u8] = Box::leak([file, function].concat().into_boxed_slice());
                s.file_len.store(file.len() as u32, Ordering::Relaxed);
                s.function_len.store(function.len() as u32, Ordering::Relaxed);
                s.names.store(names.as_mut_ptr(), Ordering::Release);
                return;
            }
            Err(k) if k == key => return,
            Err(_) => i = (i + 1) & (MAX_CODES - 1),
        }
    }
}

/// Signal context: the file and function of the code object at `key`.
fn find_code(key: usize) -> Option<(&'static [u8], &'static [u8])> {
    if key == 0 {
        return None;
    }
    let mut i = code_hash(key);
    for _ in 0..MAX_CODES {
        let s = &CODES[i];
        match s.key.load(Ordering::Acquire) {
            0 => return None,
            k if k == key => {
                let names = s.names.load(Ordering::Acquire);
                if names.is_null() {
                    return None;
                }
                let f = s.file_len.load(Ordering::Relaxed) as usize;
                let g = s.function_len.load(Ordering::Relaxed) as usize;
                // SAFETY: a leaked allocation of f + g bytes, never freed.
                let all = unsafe { std::slice::from_raw_parts(names, f + g) };
                return Some((&all[..f], &all[f..]));
            }
            _ => i = (i + 1) & (MAX_CODES - 1),
        }
    }
    None
}

// --- arming -------------------------------------------------------------------

struct Prev(UnsafeCell<[libc::sigaction; FATAL.len()]>);
// SAFETY: written by `arm`/`disarm` (one trace at a time, under the sink's
// lock), read by the handler after `INSTALLED` says it was written.
unsafe impl Sync for Prev {}
// SAFETY: an all-zero sigaction is SIG_DFL with no flags.
static PREV: Prev = Prev(UnsafeCell::new(unsafe { std::mem::zeroed() }));
/// Bit per entry of [`FATAL`]: our handler is installed for it.
static INSTALLED: AtomicU32 = AtomicU32::new(0);

/// Signal context: CLOCK_MONOTONIC, nanoseconds.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A trace opened with its crash area at `base` (`len` bytes allocated),
/// its clock starting now: installs the handler. `SIGTERM` is only taken
/// when its action is the default one (a program's own handler decides
/// what `SIGTERM` means).
pub fn arm(base: *mut u8, len: usize) {
    START_NS.store(monotonic_ns(), Ordering::Relaxed);
    NREGIONS.store(0, Ordering::Relaxed);
    LEFT_OUT.store(false, Ordering::Relaxed);
    FIRED.store(false, Ordering::SeqCst);
    DONE.store(false, Ordering::SeqCst);
    AREA_LEN.store(len, Ordering::Relaxed);
    AREA.store(base, Ordering::Release);
    // SAFETY: sigaction with valid structures; PREV is only written here
    // for signals our handler is not installed for.
    unsafe {
        let prev = &mut *PREV.0.get();
        for (k, &sig) in FATAL.iter().enumerate() {
            if INSTALLED.load(Ordering::Acquire) & (1 << k) != 0 {
                continue;
            }
            let mut cur: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut cur) != 0 {
                continue;
            }
            if sig == libc::SIGTERM && cur.sa_sigaction != libc::SIG_DFL {
                continue;
            }
            prev[k] = cur;
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fatal as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) == 0 {
                INSTALLED.fetch_or(1 << k, Ordering::Release);
            }
        }
    }
}

/// The crash area now has `len` bytes allocated.
pub fn set_area_len(len: usize) {
    AREA_LEN.store(len, Ordering::Release);
}

/// True while a trace is recording with a crash area.
pub fn armed() -> bool {
    !AREA.load(Ordering::Acquire).is_null()
}

/// The trace is closing (or forgotten in a fork child): no more looks, the
/// previous actions back. Waits for a look in progress to end, so the area
/// can be unmapped after this.
pub fn disarm() {
    AREA.store(std::ptr::null_mut(), Ordering::SeqCst);
    NREGIONS.store(0, Ordering::SeqCst);
    if FIRED.load(Ordering::SeqCst) {
        let until = monotonic_ns() + WAIT_OTHER_NS;
        while !DONE.load(Ordering::SeqCst) && monotonic_ns() < until {
            std::thread::yield_now();
        }
    }
    // SAFETY: as in `arm`; only our own handler is replaced.
    unsafe {
        let prev = &*PREV.0.get();
        for (k, &sig) in FATAL.iter().enumerate() {
            if INSTALLED.load(Ordering::Acquire) & (1 << k) == 0 {
                continue;
            }
            let mut cur: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut cur) == 0
                && cur.sa_sigaction == on_fatal as *const () as usize
            {
                libc::sigaction(sig, &prev[k], std::ptr::null_mut());
            }
            INSTALLED.fetch_and(!(1 << k), Ordering::Release);
        }
    }
}

// --- signal context -----------------------------------------------------------

/// Signal context: the handler of the fatal signals.
extern "C" fn on_fatal(sig: libc::c_int, info: *mut libc::siginfo_t, _uc: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo with SA_SIGINFO.
    let code = if info.is_null() {
        0
    } else {
        unsafe { (*info).si_code }
    };
    let area = AREA.load(Ordering::Acquire);
    if !area.is_null() {
        if !FIRED.swap(true, Ordering::SeqCst) {
            look(area, sig, code);
            DONE.store(true, Ordering::SeqCst);
        } else {
            // Another thread is taking the look: die after it is written.
            let until = monotonic_ns() + WAIT_OTHER_NS;
            while !DONE.load(Ordering::SeqCst) && monotonic_ns() < until {
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
            }
        }
    }
    pass_on(sig, code);
}

/// Signal context: puts the previous action of `sig` back; a signal that
/// was sent is sent again (it arrives when this handler returns), a fault
/// happens again when the faulting instruction runs again.
fn pass_on(sig: libc::c_int, code: libc::c_int) {
    let Some(k) = FATAL.iter().position(|&s| s == sig) else {
        return;
    };
    // SAFETY: PREV[k] was written before our handler was installed for it.
    unsafe {
        let prev = &(*PREV.0.get())[k];
        libc::sigaction(sig, prev, std::ptr::null_mut());
        if code <= 0 || sig == libc::SIGABRT || sig == libc::SIGTERM {
            libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), sig);
        }
    }
}

/// Signal context: the slot of thread `tid`.
fn slot_of_tid(tid: u64) -> Option<&'static ThreadSlot> {
    THREADS.iter().find(|s| s.tid.load(Ordering::Acquire) == tid)
}

/// Signal context: waits until no thread holds a [`Busy`] token.
fn wait_idle() -> bool {
    let until = monotonic_ns() + WAIT_IDLE_NS;
    loop {
        if BUSY.load(Ordering::SeqCst) == 0 {
            return true;
        }
        if monotonic_ns() >= until {
            return false;
        }
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

/// Signal context: writes `v` at byte `at` of the area.
fn put_u32(area: *mut u8, at: usize, v: u32) {
    // SAFETY: `at` is a header field, inside the first allocated page.
    unsafe { std::ptr::write_unaligned(area.add(at).cast::<u32>(), v.to_le()) };
}

fn put_u64(area: *mut u8, at: usize, v: u64) {
    // SAFETY: as in `put_u32`.
    unsafe { std::ptr::write_unaligned(area.add(at).cast::<u64>(), v.to_le()) };
}

/// Signal context: the look itself.
fn look(area: *mut u8, sig: libc::c_int, code: libc::c_int) {
    // SAFETY: gettid/getpid have no preconditions.
    let (tid, pid) = unsafe { (libc::gettid() as u64, libc::getpid() as u64) };
    put_u32(area, STATE_AT, STATE_WRITING);
    put_u64(area, COMMITTED_AT, 0);
    put_u32(area, SIGNAL_AT, sig as u32);
    put_u32(area, CODE_AT, code as u32);
    put_u64(area, TID_AT, tid);
    put_u64(
        area,
        TIME_AT,
        monotonic_ns().saturating_sub(START_NS.load(Ordering::Relaxed)),
    );
    // A signal sent to the process lands on any thread (one of memwatch's
    // own, say): then the main thread's line is the one it interrupted.
    let mine = slot_of_tid(tid);
    let place = match mine {
        Some(s) if s.code.load(Ordering::Relaxed) != 0 => Some(s),
        _ if code <= 0 => slot_of_tid(pid),
        _ => None,
    };
    let (mut line, mut name, mut file_len, mut function_len) = (0, 0, 0, 0);
    if let Some(s) = place {
        line = s.line.load(Ordering::Relaxed);
        name = s.name.load(Ordering::Relaxed);
        if let Some((file, function)) = find_code(s.code.load(Ordering::Relaxed)) {
            // SAFETY: both fit their fields (learn_code cut them).
            unsafe {
                std::ptr::copy_nonoverlapping(file.as_ptr(), area.add(FILE_AT), file.len());
                std::ptr::copy_nonoverlapping(function.as_ptr(), area.add(FUNCTION_AT), function.len());
            }
            file_len = file.len() as u32;
            function_len = function.len() as u32;
        }
    }
    put_u32(area, LINE_AT, line);
    put_u32(area, THREAD_NAME_AT, name);
    put_u32(area, FILE_LEN_AT, file_len);
    put_u32(area, FUNCTION_LEN_AT, function_len);
    let mut flags = 0;
    CRASHING.store(true, Ordering::SeqCst);
    let own_busy = mine.is_some_and(|s| s.busy.load(Ordering::SeqCst) > 0);
    if own_busy || !wait_idle() {
        flags |= FLAG_BUSY;
    } else {
        let len = AREA_LEN.load(Ordering::Acquire);
        let mut at = CRASH_HEADER_LEN;
        let n = NREGIONS.load(Ordering::Acquire);
        for r in &REGIONS[..n] {
            if !compare(r, area, len, &mut at) {
                flags |= FLAG_TRUNCATED;
                break;
            }
        }
    }
    if regions_left_out() {
        flags |= FLAG_TRUNCATED;
    }
    CRASHING.store(false, Ordering::SeqCst);
    put_u32(area, FLAGS_AT, flags);
    put_u32(area, STATE_AT, STATE_DONE);
}

/// Signal context: the byte at `off` is in the region's view.
fn in_mask(mask: *const u64, off: usize) -> bool {
    // SAFETY: the mask has a bit per byte of the region.
    mask.is_null() || unsafe { *mask.add(off / 64) } >> (off % 64) & 1 == 1
}

/// Signal context: compares one region with its shadow and writes an entry
/// per changed range (whole elements; equal runs of [`GAP`] bytes or more
/// split ranges). False when the area is full.
fn compare(r: &RegionSlot, area: *mut u8, area_len: usize, at: &mut usize) -> bool {
    let shadow = r.shadow.load(Ordering::Relaxed) as *const u8;
    let len = r.len.load(Ordering::Relaxed) as usize;
    if shadow.is_null() || len == 0 {
        return true;
    }
    let cur = r.start.load(Ordering::Relaxed) as *const u8;
    let mask = r.mask.load(Ordering::Relaxed) as *const u64;
    let item = r.itemsize.load(Ordering::Relaxed).max(1) as usize;
    let phase = r.origin.load(Ordering::Relaxed) as usize % item;
    let id = r.id.load(Ordering::Relaxed);
    // SAFETY: the region's span is pinned while it is watched and its
    // shadow has `len` bytes (both published under a Busy token, and no
    // token is held now).
    let (now, was) = unsafe {
        (
            std::slice::from_raw_parts(cur, len),
            std::slice::from_raw_parts(shadow, len),
        )
    };
    let differs = |i: usize| now[i] != was[i] && in_mask(mask, i);
    let mut seq = 0;
    let mut i = 0;
    while i < len {
        // Equal blocks at memcmp speed, then the first differing byte.
        let block = (len - i).min(4096);
        if now[i..i + block] == was[i..i + block] {
            i += block;
            continue;
        }
        let Some(first) = (i..i + block).find(|&k| differs(k)) else {
            i += block;
            continue;
        };
        let mut last = first;
        let mut k = first + 1;
        while k < len && k - last <= GAP {
            if differs(k) {
                last = k;
            }
            k += 1;
        }
        // Whole elements, counted from the view's first one.
        let s = if first >= phase {
            first - (first - phase) % item
        } else {
            0
        };
        let end = last + 1;
        let e = if end > phase {
            (end + (item - (end - phase) % item) % item).min(len)
        } else {
            end
        };
        if seq == 0 {
            seq = next_seq();
        }
        if !put_entry(area, area_len, at, seq, id, s, &now[s..e], item) {
            return false;
        }
        i = e;
    }
    true
}

/// Signal context: appends one entry (as much of `data` as fits, in whole
/// elements) and commits it. False when not all of it fitted.
#[allow(clippy::too_many_arguments)]
fn put_entry(
    area: *mut u8,
    area_len: usize,
    at: &mut usize,
    seq: u64,
    region: u32,
    offset: usize,
    data: &[u8],
    item: usize,
) -> bool {
    let room = area_len.saturating_sub(*at + ENTRY_HEADER_LEN);
    let n = if data.len() <= room {
        data.len()
    } else {
        room - room % item
    };
    if n > 0 {
        put_u64(area, *at, seq);
        put_u32(area, *at + 8, region);
        put_u32(area, *at + 12, 0);
        put_u64(area, *at + 16, offset as u64);
        put_u64(area, *at + 24, n as u64);
        let padded = n.next_multiple_of(8);
        // SAFETY: `at + 32 + padded <= area_len` (room is a multiple of 8
        // less than what is allocated).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), area.add(*at + ENTRY_HEADER_LEN), n);
            std::ptr::write_bytes(area.add(*at + ENTRY_HEADER_LEN + n), 0, padded - n);
        }
        *at += ENTRY_HEADER_LEN + padded;
        // SAFETY: COMMITTED_AT is 8-aligned in a page-aligned mapping.
        let committed = unsafe { &*area.add(COMMITTED_AT).cast::<AtomicU64>() };
        committed.store((*at - CRASH_HEADER_LEN) as u64, Ordering::Release);
    }
    n == data.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_found_by_address() {
        learn_code(0x7000_1230, "/a/train.py", "step");
        learn_code(0x7000_1230, "/other.py", "other");
        assert_eq!(find_code(0x7000_1230), Some((&b"/a/train.py"[..], &b"step"[..])));
        assert_eq!(find_code(0x7000_1240), None);
    }

    #[test]
    fn changed_ranges_are_whole_elements_split_at_long_equal_runs() {
        let mut area = vec![0u8; 1 << 16];
        let was = vec![0u8; 1024];
        let mut now = was.clone();
        now[5] = 1; // element 1 of f4 (bytes 4..8)
        now[9] = 2; // close by: same range
        now[600] = 3; // far: a range of its own
        let r = RegionSlot {
            id: AtomicU32::new(7),
            itemsize: AtomicU32::new(4),
            start: AtomicU64::new(now.as_ptr() as u64),
            len: AtomicU64::new(1024),
            origin: AtomicU64::new(0),
            shadow: AtomicPtr::new(was.as_ptr().cast_mut()),
            mask: AtomicPtr::new(std::ptr::null_mut()),
        };
        let mut at = CRASH_HEADER_LEN;
        assert!(compare(&r, area.as_mut_ptr(), area.len(), &mut at));
        let u64_at = |a: usize| u64::from_le_bytes(area[a..a + 8].try_into().unwrap());
        let first = CRASH_HEADER_LEN;
        assert_eq!((u64_at(first + 16), u64_at(first + 24)), (4, 8));
        assert_eq!(&area[first + 32..first + 40], &now[4..12]);
        let second = first + 40;
        assert_eq!((u64_at(second + 16), u64_at(second + 24)), (600, 4));
        assert_eq!(u64_at(first), u64_at(second), "one change: one seq");
        assert_eq!(u64_at(COMMITTED_AT), (second + 32 + 8 - CRASH_HEADER_LEN) as u64);
        // Too small an area: what fits, and false.
        let mut at = CRASH_HEADER_LEN;
        assert!(!compare(&r, area.as_mut_ptr(), CRASH_HEADER_LEN + 48, &mut at));
    }
}
