//! The only code of memwatch that runs in signal context: here, the two
//! handlers of `mode="store"` and the lock-free per-thread state they share
//! with the rest of the recorder; in [`crash`], the fatal-signal handler
//! that takes the last look of a recorded process (its rules are its own,
//! written at its top).
//!
//! How one store is caught (see `store.rs` for the thread side):
//! 1. A store-mode page is write-protected through a synchronous
//!    userfaultfd. A user-mode store to it blocks the thread in the kernel
//!    and wakes memwatch's fault thread, which puts the fault address in the
//!    thread's [`Slot`] and sends the thread [`step_signal`].
//! 2. `on_step` (signal context) copies the page, lifts the protection of
//!    that page without waking other threads blocked on it, and sets the
//!    trap flag; the handler returns, the store runs.
//! 3. The CPU traps after that one instruction: `on_trap` (signal context)
//!    protects the page again, compares it with the copy, pushes an
//!    [`Event`] with the old and new bytes of the store to the thread's
//!    ring and clears the trap flag.
//!
//! While the page is open, another thread's store to it does not fault. A
//! change `on_trap` finds outside the bytes the stepped store can have
//! written (from the fault address, as many as [`store_width`] reads from
//! the instruction's encoding, at most [`STORE_MAX`]) is such a store: it is
//! left out of the event and the page is diffed at the next check, so it is
//! reported without a thread rather than under the wrong one. A step
//! signal that arrives after its fault was resolved another way (a kernel
//! write opened the page) and finds the thread at a system call is dropped,
//! so the page is never left open while the thread blocks.
//!
//! Rules for everything reachable from `on_step` and `on_trap`: no
//! allocation, no locks, no thread-locals (a `dlopen`ed library's TLS can
//! allocate on first use), no Python. They may use atomics, plain memory
//! copies and compares of the static buffers below and of the page being
//! stepped, plain reads of the stepped instruction's bytes (mapped code:
//! the CPU just ran them), and these system calls:
//! `gettid`, `ioctl(UFFDIO_WRITEPROTECT)`, `clock_gettime`, `write` (to an
//! eventfd), `sigaction` and `tgkill` (to hand a trap that is not ours to
//! the handler that was there before). Every function in this module that
//! runs in signal context says so in its doc comment.

pub mod crash;

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use crate::mem::kernel::{
    gettid, UffdioRange, UffdioWriteprotect, UFFDIO_WRITEPROTECT, UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
    UFFDIO_WRITEPROTECT_MODE_WP,
};

/// The page size this module is built for (x86_64 Linux).
pub const PAGE: usize = 4096;
/// Threads that can be caught storing at once (slots are reused when their
/// thread has ended).
pub const MAX_THREADS: usize = 256;
/// Bytes of old and new contents kept per store: wide enough for any
/// single store instruction (at most 64 bytes) wherever it starts.
pub const WINDOW: usize = 128;
/// Events a thread can have waiting before its stores are caught per page
/// instead of per store (see [`Slot::overflow`]).
pub const RING: usize = 64;

const TF: i64 = 0x100;
/// The most bytes one store instruction writes (an AVX-512 store): a
/// stepped store changes only `[fault, fault + STORE_MAX)`.
pub const STORE_MAX: usize = 64;
const TRAP_TRACE: i32 = 2;

/// One caught store: the changed window of one page, before and after.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Event {
    /// Global order of the event among all events of the process.
    pub order: u64,
    /// CLOCK_REALTIME, nanoseconds.
    pub time_ns: u64,
    pub tid: u64,
    /// Address of the first byte of the window.
    pub addr: u64,
    pub len: u32,
    pub old: [u8; WINDOW],
    pub new: [u8; WINDOW],
}

impl Event {
    const EMPTY: Event = Event {
        order: 0,
        time_ns: 0,
        tid: 0,
        addr: 0,
        len: 0,
        old: [0; WINDOW],
        new: [0; WINDOW],
    };
}

/// Per-thread state of store capture. A slot belongs to one thread (`tid`)
/// from the moment the fault thread claims it for that thread.
pub struct Slot {
    /// The owning thread, 0 when free.
    pub tid: AtomicU64,
    /// Fault address the fault thread wants stepped, 0 when none.
    pub pending: AtomicU64,
    /// The open page and the fault address in it, 0 when none.
    open_page: AtomicU64,
    open_fault: AtomicU64,
    /// The address of the stepped instruction.
    open_rip: AtomicU64,
    /// The open page as it was before the store.
    copy: UnsafeCell<[u8; PAGE]>,
    /// A page to diff at the next check (the ring was full, another thread
    /// stored to the page during a step, a store spanned two pages). 0 when
    /// none.
    pub overflow: AtomicU64,
    /// Ring of events: the thread's trap handler produces at `head`, one
    /// consumer (holding the store tracker's lock) takes at `tail`.
    pub head: AtomicU64,
    pub tail: AtomicU64,
    ring: UnsafeCell<[Event; RING]>,
}

// SAFETY: `copy` is only touched by the owning thread's handlers; `ring`
// entries are written by the owning thread before `head` is published
// (Release) and read by the single consumer after it observed `head`
// (Acquire), and only written again after the consumer advanced `tail`.
unsafe impl Sync for Slot {}

impl Slot {
    const fn new() -> Slot {
        Slot {
            tid: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            open_page: AtomicU64::new(0),
            open_fault: AtomicU64::new(0),
            open_rip: AtomicU64::new(0),
            copy: UnsafeCell::new([0; PAGE]),
            overflow: AtomicU64::new(0),
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            ring: UnsafeCell::new([Event::EMPTY; RING]),
        }
    }

    /// Takes every waiting event, oldest first. Must only be called by one
    /// consumer at a time (the store tracker holds its lock).
    pub fn drain(&self, out: &mut Vec<Event>) {
        let head = self.head.load(Ordering::Acquire);
        let mut tail = self.tail.load(Ordering::Relaxed);
        while tail < head {
            // SAFETY: entries in [tail, head) were published by the producer
            // and are not rewritten until `tail` moves past them.
            out.push(unsafe { (*self.ring.get())[(tail % RING as u64) as usize] });
            tail += 1;
        }
        self.tail.store(tail, Ordering::Release);
    }

    /// Forgets the slot's thread (the consumer calls this once the thread
    /// has ended and its events were drained).
    pub fn release(&self) {
        self.pending.store(0, Ordering::Relaxed);
        self.overflow.store(0, Ordering::Relaxed);
        self.tid.store(0, Ordering::Release);
    }
}

#[allow(clippy::declare_interior_mutable_const)]
const SLOT: Slot = Slot::new();
/// One slot per thread that stores to store-mode pages.
pub static SLOTS: [Slot; MAX_THREADS] = [SLOT; MAX_THREADS];
/// The synchronous userfaultfd of store mode, -1 when none.
pub static UFFD: AtomicI32 = AtomicI32::new(-1);
/// An eventfd the trap handler writes when a ring fills up, -1 when none.
pub static WAKE: AtomicI32 = AtomicI32::new(-1);
/// Next event order.
static ORDER: AtomicU64 = AtomicU64::new(1);
/// Stores recorded as events, and pages left open for the next check
/// (a full ring, a second page, more changed than one store writes).
pub static EVENTS: AtomicU64 = AtomicU64::new(0);
pub static OVERFLOWS: AtomicU64 = AtomicU64::new(0);
/// Traps that were not ours (handed on).
pub static FOREIGN_TRAPS: AtomicU64 = AtomicU64::new(0);

struct PrevAction(UnsafeCell<libc::sigaction>);
// SAFETY: written once by `install` before the handler is installed, read
// only afterwards.
unsafe impl Sync for PrevAction {}
// SAFETY: an all-zero sigaction is SIG_DFL with no flags.
static PREV_TRAP: PrevAction = PrevAction(UnsafeCell::new(unsafe { std::mem::zeroed() }));
static STEP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The real-time signal the fault thread sends to a thread that must step
/// over a store (0 before [`install`]).
pub fn step_signal() -> i32 {
    STEP_SIGNAL.load(Ordering::Relaxed)
}

/// Installs the handlers (once per process). Picks the highest real-time
/// signal nobody handles. Not signal context.
pub fn install() -> std::io::Result<i32> {
    let sig = STEP_SIGNAL.load(Ordering::Acquire);
    if sig != 0 {
        return Ok(sig);
    }
    // SAFETY: querying and setting signal actions with valid pointers.
    unsafe {
        let mut sig = 0;
        for s in (libc::SIGRTMIN() + 4..=libc::SIGRTMAX()).rev() {
            let mut cur: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(s, std::ptr::null(), &mut cur) == 0 && cur.sa_sigaction == libc::SIG_DFL {
                sig = s;
                break;
            }
        }
        if sig == 0 {
            return Err(std::io::Error::other(
                "every real-time signal already has a handler",
            ));
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // Neither handler may interrupt the other: both use the slot's copy
        // of the page.
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaddset(&mut sa.sa_mask, sig);
        libc::sigaddset(&mut sa.sa_mask, libc::SIGTRAP);
        sa.sa_sigaction = on_step as *const () as usize;
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        sa.sa_sigaction = on_trap as *const () as usize;
        if libc::sigaction(libc::SIGTRAP, &sa, PREV_TRAP.0.get()) != 0 {
            let err = std::io::Error::last_os_error();
            libc::signal(sig, libc::SIG_DFL);
            return Err(err);
        }
        STEP_SIGNAL.store(sig, Ordering::Release);
        Ok(sig)
    }
}

/// One past the highest slot ever claimed: slots above it are free.
pub static HIGH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The slots that may be in use. Signal context.
pub fn used_slots() -> &'static [Slot] {
    &SLOTS[..HIGH.load(Ordering::Acquire).min(MAX_THREADS)]
}

/// The slot of thread `tid`, if it has one. Signal context.
pub fn slot_of(tid: u64) -> Option<&'static Slot> {
    used_slots().iter().find(|s| s.tid.load(Ordering::Acquire) == tid)
}

/// Store-mode regions as `[start, end)` byte ranges, for the trap handler
/// to tell a store to watched bytes from a store to their neighbours on
/// the same page (reference counts, the allocator, memwatch itself): only
/// the first become events. A free entry has `start == 0`.
const MAX_SPANS: usize = 256;
#[allow(clippy::declare_interior_mutable_const)]
const SPAN: (AtomicU64, AtomicU64) = (AtomicU64::new(0), AtomicU64::new(0));
static SPANS: [(AtomicU64, AtomicU64); MAX_SPANS] = [SPAN; MAX_SPANS];
/// Set when more regions were watched than `SPANS` holds: every change on a
/// store-mode page then counts as touching one.
static SPANS_FULL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Notes a store-mode region (not signal context).
pub fn add_span(start: u64, end: u64) {
    for (s, e) in SPANS.iter() {
        if s.load(Ordering::Acquire) == 0 {
            e.store(end, Ordering::Release);
            if s.compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }
    SPANS_FULL.store(true, Ordering::Release);
}

/// Forgets a store-mode region (not signal context).
pub fn remove_span(start: u64, end: u64) {
    for (s, e) in SPANS.iter() {
        if s.load(Ordering::Acquire) == start && e.load(Ordering::Acquire) == end {
            s.store(0, Ordering::Release);
            return;
        }
    }
}

/// Forgets every region (a fork child, which has no store mode).
pub fn clear_spans() {
    for (s, _) in SPANS.iter() {
        s.store(0, Ordering::Release);
    }
    SPANS_FULL.store(false, Ordering::Release);
}

/// Signal context: whether `[a, b)` overlaps a store-mode region.
fn touches_region(a: u64, b: u64) -> bool {
    SPANS_FULL.load(Ordering::Acquire)
        || SPANS.iter().any(|(s, e)| {
            let s = s.load(Ordering::Acquire);
            s != 0 && s < b && a < e.load(Ordering::Acquire)
        })
}

/// How many slots have a page open for a step, a step signal pending and a
/// page left open for the next check (diagnostics; not signal context).
pub fn slot_states() -> (u64, u64, u64) {
    let mut n = (0, 0, 0);
    for s in used_slots() {
        n.0 += u64::from(s.open_page.load(Ordering::Relaxed) != 0);
        n.1 += u64::from(s.pending.load(Ordering::Relaxed) != 0);
        n.2 += u64::from(s.overflow.load(Ordering::Relaxed) != 0);
    }
    n
}

/// First and last index where `a` and `b` differ (same length, a multiple
/// of 64). Signal context: plain compares only.
fn differing(a: &[u8], b: &[u8]) -> Option<(usize, usize)> {
    let first_block = (0..a.len()).step_by(64).find(|&i| a[i..i + 64] != b[i..i + 64])?;
    let last_block = (first_block..a.len())
        .step_by(64)
        .rev()
        .find(|&i| a[i..i + 64] != b[i..i + 64])
        .unwrap_or(first_block);
    let first = (first_block..first_block + 64).find(|&i| a[i] != b[i])?;
    let last = (last_block..last_block + 64).rev().find(|&i| a[i] != b[i])?;
    Some((first, last))
}

/// Write-protects (`on`) or opens one page. Opening does not wake other
/// threads blocked on the page: each waits for its own step signal, so
/// none runs its store unobserved. Signal context.
fn protect(page: u64, on: bool) -> bool {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange {
            start: page,
            len: PAGE as u64,
        },
        mode: if on {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        },
    };
    let fd = UFFD.load(Ordering::Relaxed);
    // SAFETY: a plain ioctl with a valid argument struct; a closed fd fails.
    fd >= 0 && unsafe { libc::ioctl(fd, UFFDIO_WRITEPROTECT, &mut wp as *mut UffdioWriteprotect) } == 0
}

/// Signal context: the instruction pointer of the interrupted context.
fn rip_of(uc: *mut libc::c_void) -> u64 {
    // SAFETY: `uc` is the ucontext the kernel passed to an SA_SIGINFO handler.
    unsafe { (*(uc as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RIP as usize] as u64 }
}

/// Signal context: the handler of [`step_signal`]. Opens the page the
/// fault thread named and arms the trap flag.
extern "C" fn on_step(_sig: libc::c_int, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    let Some(slot) = slot_of(gettid()) else { return };
    let addr = slot.pending.swap(0, Ordering::AcqRel);
    if addr == 0 {
        return;
    }
    let rip = rip_of(uc);
    // SAFETY: the bytes at the interrupted instruction pointer are mapped
    // code (that instruction is about to run again).
    let at_syscall = unsafe {
        let ins = rip as *const u8;
        *ins == 0x0f && *ins.add(1) == 0x05
    };
    if at_syscall {
        // A stale signal: the fault was resolved another way and the thread
        // went on into a system call, where it may block. A store never
        // starts with `syscall`; if the store is still to come it faults
        // again and gets a fresh signal.
        return;
    }
    let page = addr & !(PAGE as u64 - 1);
    if slot.open_page.load(Ordering::Relaxed) != 0 {
        // A store spanning two pages faulted on its second page while the
        // first is open: open this one too and let the next check diff it.
        set_overflow(slot, page);
        protect(page, false);
        return;
    }
    // SAFETY: the page is mapped (the thread just faulted writing it) and
    // `copy` belongs to this thread.
    unsafe { std::ptr::copy_nonoverlapping(page as *const u8, (*slot.copy.get()).as_mut_ptr(), PAGE) };
    slot.open_page.store(page, Ordering::Relaxed);
    slot.open_fault.store(addr, Ordering::Relaxed);
    slot.open_rip.store(rip, Ordering::Relaxed);
    if !protect(page, false) {
        slot.open_page.store(0, Ordering::Relaxed);
        return;
    }
    // SAFETY: `uc` is the ucontext the kernel passed to this SA_SIGINFO handler.
    unsafe { (*(uc as *mut libc::ucontext_t)).uc_mcontext.gregs[libc::REG_EFL as usize] |= TF };
}

/// Signal context: marks `page` to be diffed at the next check.
fn set_overflow(slot: &Slot, page: u64) {
    OVERFLOWS.fetch_add(1, Ordering::Relaxed);
    if slot
        .overflow
        .compare_exchange(0, page, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
        && slot.overflow.load(Ordering::Relaxed) != page
    {
        OVERFLOW_ALL.store(true, Ordering::Release);
    }
}

/// Set when more pages were left open than the slots can name: the next
/// check diffs every store-mode page.
pub static OVERFLOW_ALL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Signal context: `SIGTRAP`. If this thread is stepping over a store,
/// records it and closes the page; otherwise hands the trap on.
extern "C" fn on_trap(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    let tid = gettid();
    // SAFETY: the kernel passes a valid siginfo to SA_SIGINFO handlers.
    let code = unsafe { (*info).si_code };
    let slot = match slot_of(tid) {
        Some(s) if code == TRAP_TRACE && s.open_page.load(Ordering::Relaxed) != 0 => s,
        _ => return hand_on(sig, info, uc),
    };
    let page = slot.open_page.load(Ordering::Relaxed);
    let fault = slot.open_fault.load(Ordering::Relaxed);
    // Close the page before reading it: from here on a store to it by any
    // thread faults again, so the page cannot change under the compare.
    protect(page, true);
    // SAFETY: `copy` belongs to this thread; the page is mapped.
    let (before, now) = unsafe {
        (
            &*slot.copy.get(),
            std::slice::from_raw_parts(page as *const u8, PAGE),
        )
    };
    if let Some((first, last)) = differing(before, now) {
        // The bytes this store can have written: from the fault address,
        // as many as its encoding says (STORE_MAX when that is not known).
        let lo = (fault - page) as usize;
        let hi = (lo + stepped_width(slot, uc)).min(PAGE);
        let at = page;
        if (first < lo || last >= hi) && touches_region(at + first as u64, at + last as u64 + 1) {
            // Another thread stored to the page while it was open: the next
            // check diffs the page and reports that without a thread.
            set_overflow(slot, page);
        }
        // A store to a neighbour of the watched bytes is no event (nor is
        // memwatch's own bookkeeping on the page).
        if touches_region(at + lo as u64, at + hi as u64) && (lo..hi).any(|i| before[i] != now[i]) {
            // The window starts at the 64-byte line of the fault address
            // and stays inside the page; it holds all of [lo, hi).
            let start = (lo & !63).min(PAGE - WINDOW);
            if !push(
                slot,
                tid,
                page + start as u64,
                &before[start..start + WINDOW],
                &now[start..start + WINDOW],
                (lo - start, hi - start),
            ) {
                set_overflow(slot, page);
            }
        }
    }
    slot.open_page.store(0, Ordering::Relaxed);
    // SAFETY: as in on_step.
    unsafe { (*(uc as *mut libc::ucontext_t)).uc_mcontext.gregs[libc::REG_EFL as usize] &= !TF };
}

/// Signal context: the most bytes the instruction just stepped over can
/// have written: its length is where the trap stopped minus where it
/// started (a store does not jump), and its bytes are mapped code.
fn stepped_width(slot: &Slot, uc: *mut libc::c_void) -> usize {
    let start = slot.open_rip.load(Ordering::Relaxed);
    let end = rip_of(uc);
    let len = end.wrapping_sub(start);
    if start == 0 || !(1..=15).contains(&len) {
        return STORE_MAX; // a string instruction stopped mid-way, or unknown
    }
    // SAFETY: [start, end) is the instruction the CPU just executed.
    let ins = unsafe { std::slice::from_raw_parts(start as *const u8, len as usize) };
    store_width(ins).map_or(STORE_MAX, |w| w.min(STORE_MAX))
}

/// The most bytes the x86-64 instruction `ins` stores, from its encoding:
/// the common stores, read-modify-write and vector forms; `None` for
/// anything else (string instructions with `rep`, x87, `xsave`, scatters).
/// Plain byte arithmetic: usable in signal context.
pub fn store_width(ins: &[u8]) -> Option<usize> {
    let mut i = 0;
    let (mut opsize16, mut rep, mut pfx) = (false, false, 0u8);
    while let Some(&b) = ins.get(i) {
        match b {
            0x66 => {
                opsize16 = true;
                pfx = b;
            }
            0xf2 | 0xf3 => {
                rep = true;
                pfx = b;
            }
            0xf0 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0x67 => {}
            _ => break,
        }
        i += 1;
    }
    let mut rexw = false;
    if let Some(&b) = ins.get(i) {
        if b & 0xf0 == 0x40 {
            rexw = b & 8 != 0;
            i += 1;
        }
    }
    let op = *ins.get(i)?;
    let v = if rexw {
        8
    } else if opsize16 {
        2
    } else {
        4
    };
    let at = |k: usize| ins.get(i + k).copied();
    match op {
        // VEX, two bytes: C5 [R vvvv L pp] opcode (map 0F).
        0xc5 => {
            let b1 = at(1)?;
            vex_store(1, at(2)?, (b1 >> 2) & 1, b1 & 3, false)
        }
        // VEX, three bytes: C4 [RXB mmmmm] [W vvvv L pp] opcode.
        0xc4 => {
            let (b1, b2) = (at(1)?, at(2)?);
            vex_store(b1 & 0x1f, at(3)?, (b2 >> 2) & 1, b2 & 3, b2 & 0x80 != 0)
        }
        // EVEX: 62 [RXBR' 0 mmm] [W vvvv 1 pp] [z L'L b V' aaa] opcode.
        0x62 => {
            let (p0, p1, p2) = (at(1)?, at(2)?, at(3)?);
            let ll = (p2 >> 5) & 3;
            if ll == 3 {
                return None;
            }
            let vec = 16usize << ll;
            let w = p1 & 0x80 != 0;
            match (p0 & 7, at(4)?, p1 & 3) {
                (1, 0x11, 2) => Some(4),
                (1, 0x11, 3) => Some(8),
                (1, 0x11 | 0x29 | 0x2b | 0x7f | 0xe7, _) => Some(vec),
                (1, 0x13 | 0x17 | 0xd6, _) => Some(8),
                (1, 0x7e, 1) => Some(if w { 8 } else { 4 }),
                (2, 0x8a | 0x8b | 0x63 | 0x30..=0x35, _) => Some(vec),
                (3, 0x14, _) => Some(1),
                (3, 0x15, _) => Some(2),
                (3, 0x16, _) => Some(if w { 8 } else { 4 }),
                (3, 0x17, _) => Some(4),
                (3, 0x19 | 0x39 | 0x1b | 0x3b | 0x1d, _) => Some(vec),
                _ => None,
            }
        }
        0x0f => {
            let op2 = at(1)?;
            match op2 {
                0x11 => Some(match pfx {
                    0xf3 => 4,
                    0xf2 => 8,
                    _ => 16,
                }),
                0x13 | 0x17 | 0xd6 => Some(8),
                0x29 | 0x2b => Some(16),
                0x7f => Some(if pfx == 0x66 || pfx == 0xf3 { 16 } else { 8 }),
                0xe7 => Some(if pfx == 0x66 { 16 } else { 8 }),
                0x7e if pfx != 0xf3 => Some(if rexw { 8 } else { 4 }),
                0xc3 => Some(if rexw { 8 } else { 4 }),
                0x90..=0x9f | 0xb0 | 0xc0 => Some(1),
                0xb1 | 0xc1 | 0xab | 0xb3 | 0xbb | 0xba | 0xa4 | 0xa5 | 0xac | 0xad => Some(v),
                0xc7 => Some(if rexw { 16 } else { 8 }),
                0x3a => match at(2)? {
                    0x14 => Some(1),
                    0x15 => Some(2),
                    0x16 => Some(if rexw { 8 } else { 4 }),
                    0x17 => Some(4),
                    _ => None,
                },
                0x38 if at(2)? == 0xf1 => Some(v),
                _ => None,
            }
        }
        0xa4 | 0xaa if !rep => Some(1),
        0xa5 | 0xab if !rep => Some(v),
        0x88 | 0xc6 | 0x80 | 0xc0 | 0xd0 | 0xd2 | 0xf6 | 0xfe | 0x86 | 0xa2 => Some(1),
        0x89 | 0xc7 | 0x81 | 0x83 | 0xc1 | 0xd1 | 0xd3 | 0xf7 | 0x87 | 0xa3 => Some(v),
        // inc/dec of up to 8 bytes; push, pop and call to memory write 8.
        0xff | 0x8f => Some(8),
        0x8c => Some(2),
        // add, or, adc, sbb, and, sub, xor to memory.
        op if op < 0x40 && op & 7 <= 1 => Some(if op & 1 == 0 { 1 } else { v }),
        _ => None,
    }
}

/// [`store_width`] of a VEX-encoded instruction.
fn vex_store(map: u8, op: u8, l: u8, pp: u8, w: bool) -> Option<usize> {
    let vec = if l == 1 { 32 } else { 16 };
    match (map, op, pp) {
        (1, 0x11, 2) => Some(4),
        (1, 0x11, 3) => Some(8),
        (1, 0x11 | 0x29 | 0x2b | 0x7f | 0xe7, _) => Some(vec),
        (1, 0x13 | 0x17 | 0xd6, _) => Some(8),
        (1, 0x7e, 1) => Some(if w { 8 } else { 4 }),
        (2, 0x8e | 0x2e | 0x2f, _) => Some(vec),
        (3, 0x14, _) => Some(1),
        (3, 0x15, _) => Some(2),
        (3, 0x16, _) => Some(if w { 8 } else { 4 }),
        (3, 0x17, _) => Some(4),
        (3, 0x19 | 0x39 | 0x1d, _) => Some(16),
        _ => None,
    }
}

/// Signal context: appends one event to the thread's ring; false when full.
/// Bytes of the window outside `own` (the bytes the store can have written)
/// are recorded unchanged.
fn push(slot: &Slot, tid: u64, addr: u64, old: &[u8], new: &[u8], own: (usize, usize)) -> bool {
    let head = slot.head.load(Ordering::Relaxed);
    let tail = slot.tail.load(Ordering::Acquire);
    if head - tail >= RING as u64 {
        wake();
        return false;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid pointer (vDSO, no locks).
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    // SAFETY: entry `head` is not visible to the consumer until `head` is
    // published below, and the consumer is done with it (checked above).
    let e = unsafe { &mut (*slot.ring.get())[(head % RING as u64) as usize] };
    e.order = ORDER.fetch_add(1, Ordering::Relaxed);
    e.time_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    e.tid = tid;
    e.addr = addr;
    e.len = WINDOW as u32;
    e.old.copy_from_slice(old);
    e.new.copy_from_slice(old);
    e.new[own.0..own.1].copy_from_slice(&new[own.0..own.1]);
    slot.head.store(head + 1, Ordering::Release);
    EVENTS.fetch_add(1, Ordering::Relaxed);
    if head + 1 - tail >= RING as u64 / 2 {
        wake();
    }
    true
}

/// Signal context: pokes the drain thread.
fn wake() {
    let fd = WAKE.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) of 8 bytes to an eventfd.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// Signal context: gives a trap that is not ours to the previous handler,
/// or, if that was the default action, restores it and raises the signal
/// again so that it takes effect when this handler returns.
fn hand_on(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    FOREIGN_TRAPS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: PREV_TRAP is immutable after install; calling the previous
    // handler with the arguments we got is what it was installed to expect.
    unsafe {
        let prev = &*PREV_TRAP.0.get();
        match prev.sa_sigaction {
            libc::SIG_IGN => {}
            libc::SIG_DFL => {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
                libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), sig);
            }
            h if prev.sa_flags & libc::SA_SIGINFO != 0 => {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(h);
                f(sig, info, uc);
            }
            h => {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(h);
                f(sig);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::store_width;

    #[test]
    fn store_widths_of_common_encodings() {
        let cases: &[(&[u8], Option<usize>)] = &[
            (&[0x48, 0x89, 0x18], Some(8)),                    // mov [rax], rbx
            (&[0x89, 0x07], Some(4)),                          // mov [rdi], eax
            (&[0x66, 0x89, 0x07], Some(2)),                    // mov [rdi], ax
            (&[0x88, 0x07], Some(1)),                          // mov [rdi], al
            (&[0xc6, 0x07, 0x01], Some(1)),                    // mov byte [rdi], 1
            (&[0x48, 0xc7, 0x07, 1, 0, 0, 0], Some(8)),        // mov qword [rdi], 1
            (&[0x48, 0x83, 0x07, 0x01], Some(8)),              // add qword [rdi], 1
            (&[0x48, 0xff, 0x07], Some(8)),                    // inc qword [rdi]
            (&[0xf0, 0x48, 0x0f, 0xb1, 0x0f], Some(8)),        // lock cmpxchg [rdi], rcx
            (&[0x0f, 0x11, 0x07], Some(16)),                   // movups [rdi], xmm0
            (&[0xf2, 0x0f, 0x11, 0x07], Some(8)),              // movsd [rdi], xmm0
            (&[0xf3, 0x0f, 0x11, 0x07], Some(4)),              // movss [rdi], xmm0
            (&[0x66, 0x0f, 0xd6, 0x07], Some(8)),              // movq [rdi], xmm0
            (&[0xf3, 0x0f, 0x7f, 0x07], Some(16)),             // movdqu [rdi], xmm0
            (&[0xc5, 0xfc, 0x11, 0x07], Some(32)),             // vmovups [rdi], ymm0
            (&[0xc5, 0xfa, 0x7f, 0x07], Some(16)),             // vmovdqu [rdi], xmm0
            (&[0xc5, 0xfe, 0x7f, 0x07], Some(32)),             // vmovdqu [rdi], ymm0
            (&[0x62, 0xf1, 0xfe, 0x48, 0x7f, 0x07], Some(64)), // vmovdqu64 [rdi], zmm0
            (&[0x62, 0xf1, 0x7c, 0x28, 0x11, 0x07], Some(32)), // vmovups [rdi], ymm0 (EVEX)
            (&[0xaa], Some(1)),                                // stosb
            (&[0x48, 0xab], Some(8)),                          // stosq
            (&[0xf3, 0xaa], None),                             // rep stosb
            (&[0x0f, 0xae, 0x07], None),                       // fxsave [rdi]
            (&[], None),
        ];
        for (ins, want) in cases {
            assert_eq!(store_width(ins), *want, "{ins:02x?}");
        }
    }
}
