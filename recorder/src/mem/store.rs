//! `mode="store"`: one change per store instruction, through a synchronous
//! userfaultfd, a fault thread, and single-stepping (see `signals/mod.rs` for
//! the part that runs in signal context and the whole sequence).
//!
//! Threads of this module (neither runs Python nor holds the GIL):
//! - the **fault thread** reads write faults from the userfaultfd. A fault
//!   of a thread in user mode (a store instruction) gets the step signal; a
//!   fault inside a system call (the kernel writing into the buffer for
//!   `readinto`, `recv_into`, `os.readv`) is let through at once by lifting
//!   the page's protection, and the next check diffs that page. So kernel
//!   writes succeed exactly as without memwatch. This thread never
//!   allocates and takes no lock: a faulting thread may hold the
//!   allocator's lock while it waits for it.
//! - the **drain thread** moves events from the per-thread rings into a
//!   growable queue, so that a long native loop of stores keeps being
//!   caught store by store. The trap handler never waits for it: when a
//!   thread's ring is full, the page stays open and the next check reports
//!   its net change (the trace is never missing bytes, only the steps).
//!
//! Without privilege (no `CAP_SYS_PTRACE`, `vm.unprivileged_userfaultfd`
//! = 0) the userfaultfd can only be created with `UFFD_USER_MODE_ONLY`;
//! then a kernel write into a store-mode page fails with `EFAULT` and the
//! watch says so in its `tracking_note`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::mem::kernel::{
    ioctl, uffd_register, uffd_unregister, uffd_writeprotect, UffdioApi, UFFDIO_API, UFFD_API,
    UFFD_USER_MODE_ONLY,
};
use crate::mem::signals::{self, Event, PAGE, SLOTS};

const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// Pages let through for kernel writes (or for a thread that blocks the
/// step signal), waiting for the next check to diff and protect them
/// again. Lock-free: the fault thread adds, the checker takes.
const OPEN_MAX: usize = 1024;
static OPEN: [AtomicU64; OPEN_MAX] = [const { AtomicU64::new(0) }; OPEN_MAX];
/// How many entries of `OPEN` are set (so a check with none looks at none).
pub(crate) static OPEN_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Number of regions watched in store mode.
pub static REGIONS: AtomicUsize = AtomicUsize::new(0);

/// Whether any region is watched in store mode.
pub fn active() -> bool {
    REGIONS.load(Ordering::Relaxed) > 0
}

/// Store-mode tracking of the process.
pub struct StoreTracker {
    uffd: Arc<OwnedFd>,
    wake: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Events drained from the rings, waiting for the next check.
    queue: Arc<Mutex<Vec<Event>>>,
    /// Why kernel writes into store-mode pages fail, when they do.
    pub kernel_note: Option<String>,
}

impl std::fmt::Debug for StoreTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTracker").field("uffd", &self.uffd).finish()
    }
}

impl StoreTracker {
    /// Creates the userfaultfd, installs the signal handlers and starts the
    /// fault and drain threads.
    pub fn new() -> io::Result<StoreTracker> {
        if crate::mem::kernel::page_size() != PAGE as u64 {
            return Err(io::Error::other(format!(
                "store mode needs {PAGE}-byte pages, this system uses {}",
                crate::mem::kernel::page_size()
            )));
        }
        let mut kernel_note = None;
        // SAFETY: plain syscalls; results checked and owned at once.
        let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            fd = unsafe {
                libc::syscall(
                    libc::SYS_userfaultfd,
                    libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
                )
            };
            kernel_note = Some(
                "kernel writes into this buffer (readinto, recv_into, os.readv) fail with EFAULT in store mode \
                 without privilege to handle kernel faults (CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1); \
                 use mode='line' for buffers the kernel fills"
                    .to_string(),
            );
        }
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_THREAD_ID
                | UFFD_FEATURE_EXACT_ADDRESS
                | UFFD_FEATURE_WP_UNPOPULATED
                | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            ioctls: 0,
        };
        ioctl(&uffd, UFFDIO_API, &mut api)?;
        // SAFETY: plain syscall.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        // A fresh process state: no thread of this process owns a slot yet
        // (slots copied over a fork name the parent's threads).
        for s in SLOTS.iter() {
            let mut sink = Vec::new();
            s.drain(&mut sink);
            s.release();
        }
        signals::HIGH.store(0, Ordering::Release);
        for o in OPEN.iter() {
            o.store(0, Ordering::Relaxed);
        }
        OPEN_COUNT.store(0, Ordering::Relaxed);
        signals::install()?;
        let uffd = Arc::new(uffd);
        signals::UFFD.store(uffd.as_raw_fd(), Ordering::Release);
        signals::WAKE.store(wake.as_raw_fd(), Ordering::Release);
        let stop = Arc::new(AtomicBool::new(false));
        let queue = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        // Both threads must be running their loops before the caller
        // registers a page: starting a thread writes to heap memory (its
        // handle, its closure), which may share a page with the watched
        // buffer, and a fault thread that faults on a protected page waits
        // for itself forever.
        let started = Arc::new(AtomicUsize::new(0));
        {
            let (uffd, wake, stop, started) = (uffd.clone(), wake.clone(), stop.clone(), started.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("memwatch-faults".into())
                    .spawn(move || {
                        started.fetch_add(1, Ordering::Release);
                        fault_thread(&uffd, &wake, &stop)
                    })?,
            );
        }
        {
            let (wake, stop, queue, started) = (wake.clone(), stop.clone(), queue.clone(), started.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("memwatch-drain".into())
                    .spawn(move || {
                        started.fetch_add(1, Ordering::Release);
                        drain_thread(&wake, &stop, &queue)
                    })?,
            );
        }
        let t0 = std::time::Instant::now();
        while started.load(Ordering::Acquire) < 2 {
            if t0.elapsed() > std::time::Duration::from_secs(5) {
                stop.store(true, Ordering::Release);
                return Err(io::Error::other("store mode's threads did not start within 5 s"));
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        Ok(StoreTracker {
            uffd,
            wake,
            stop,
            threads,
            queue,
            kernel_note,
        })
    }

    /// Registers `[start, start + len)` (whole pages) and write-protects it.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        uffd_register(&self.uffd, start, len)
    }

    /// Lifts protection and registration from `[start, start + len)`;
    /// threads waiting on those pages go on.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        uffd_unregister(&self.uffd, start, len)
    }

    /// Write-protects one page again after it was diffed.
    pub fn protect(&self, page: u64) {
        let _ = uffd_writeprotect(&*self.uffd, page, PAGE as u64, true);
    }

    /// Every store caught since the last call, in the order they happened,
    /// and the pages left open since then (to be diffed, then
    /// [`protect`](Self::protect)ed). `all_open` is true when more pages were
    /// left open than could be named: diff every store-mode page.
    pub fn take(&self, events: &mut Vec<Event>, open: &mut Vec<u64>) -> bool {
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            drain_rings(&mut q);
            events.append(&mut q);
        }
        events.sort_unstable_by_key(|e| e.order);
        for s in signals::used_slots() {
            if s.overflow.load(Ordering::Acquire) != 0 {
                open.push(s.overflow.swap(0, Ordering::AcqRel));
            }
        }
        if OPEN_COUNT.load(Ordering::Acquire) > 0 {
            for o in OPEN.iter() {
                if o.load(Ordering::Acquire) != 0 {
                    let p = o.swap(0, Ordering::AcqRel);
                    if p != 0 {
                        OPEN_COUNT.fetch_sub(1, Ordering::AcqRel);
                        open.push(p);
                    }
                }
            }
        }
        open.retain(|&p| p != 0);
        open.sort_unstable();
        open.dedup();
        signals::OVERFLOW_ALL.swap(false, Ordering::AcqRel)
    }
}

impl Drop for StoreTracker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: write of 8 bytes to our eventfd wakes both threads.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        signals::UFFD.store(-1, Ordering::Release);
        signals::WAKE.store(-1, Ordering::Release);
    }
}

/// Moves every ring's events into `q`. Called with the queue's lock held
/// (the rings' single consumer).
fn drain_rings(q: &mut Vec<Event>) {
    for s in signals::used_slots() {
        if s.tid.load(Ordering::Acquire) != 0 {
            s.drain(q);
        }
    }
}

fn drain_thread(wake: &OwnedFd, stop: &AtomicBool, queue: &Mutex<Vec<Event>>) {
    let mut pfd = libc::pollfd {
        fd: wake.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::Acquire) {
        // SAFETY: poll on one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 20) };
        let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
        drain_rings(&mut q);
    }
}

/// Whether thread `tid` is blocked in user mode (not inside a system call),
/// read from `/proc/self/task/TID/syscall` ("-1 ..." outside a system
/// call) without allocating.
fn in_user_mode(tid: u32) -> bool {
    const PREFIX: &[u8] = b"/proc/self/task/";
    const SUFFIX: &[u8] = b"/syscall\0";
    let mut path = [0u8; 48];
    path[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 20];
    let mut at = PREFIX.len();
    for &d in crate::mem::kernel::decimal_digits(u64::from(tid), &mut digits) {
        path[at] = d;
        at += 1;
    }
    path[at..at + SUFFIX.len()].copy_from_slice(SUFFIX);
    let mut buf = [0u8; 8];
    // SAFETY: open/read/close with valid, NUL-terminated buffers.
    unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n >= 2 && buf[0] == b'-' && buf[1] == b'1'
    }
}

/// Finds or claims the slot of `tid`; frees slots of ended threads when
/// all are taken. Never allocates.
fn claim(tid: u64) -> Option<&'static signals::Slot> {
    if let Some(s) = signals::slot_of(tid) {
        return Some(s);
    }
    for pass in 0..2 {
        for (i, s) in SLOTS.iter().enumerate() {
            if s.tid
                .compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                signals::HIGH.fetch_max(i + 1, Ordering::AcqRel);
                return Some(s);
            }
        }
        if pass == 0 {
            // Free the slots of threads that are gone and have nothing left.
            for s in SLOTS.iter() {
                let t = s.tid.load(Ordering::Acquire);
                // SAFETY: tgkill with signal 0 only checks that the thread exists.
                let gone = t != 0 && unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), t, 0) } != 0;
                if gone && s.head.load(Ordering::Acquire) == s.tail.load(Ordering::Acquire) {
                    s.release();
                }
            }
        }
    }
    None
}

/// Faults sent the step signal, and faults let through (kernel writes, or
/// a thread that blocks the signal).
pub static STEPPED: AtomicU64 = AtomicU64::new(0);
pub static LET_THROUGH: AtomicU64 = AtomicU64::new(0);

fn let_through(uffd: libc::c_int, addr: u64) {
    LET_THROUGH.fetch_add(1, Ordering::Relaxed);
    let page = addr & !(PAGE as u64 - 1);
    let mut named = false;
    for o in OPEN.iter() {
        if o.compare_exchange(0, page, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            OPEN_COUNT.fetch_add(1, Ordering::AcqRel);
            named = true;
            break;
        }
    }
    if !named {
        signals::OVERFLOW_ALL.store(true, Ordering::Release);
    }
    let _ = uffd_writeprotect(&uffd, page, PAGE as u64, false);
}

/// The fault thread. Never allocates, takes no lock.
fn fault_thread(uffd: &OwnedFd, wake: &OwnedFd, stop: &AtomicBool) {
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Msg {
        event: u8,
        _r1: u8,
        _r2: u16,
        _r3: u32,
        flags: u64,
        address: u64,
        ptid: u32,
        _pad: u32,
    }
    let fd = uffd.as_raw_fd();
    let mut pfds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: 0,
            revents: 0,
        },
    ];
    let mut msgs = [Msg {
        event: 0,
        _r1: 0,
        _r2: 0,
        _r3: 0,
        flags: 0,
        address: 0,
        ptid: 0,
        _pad: 0,
    }; 16];
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let sig = signals::step_signal();
    while !stop.load(Ordering::Acquire) {
        // SAFETY: poll on valid pollfds; the timeout lets `stop` be seen.
        unsafe { libc::poll(pfds.as_mut_ptr(), 1, 50) };
        // SAFETY: read into a buffer of whole messages.
        let n = unsafe { libc::read(fd, msgs.as_mut_ptr().cast(), std::mem::size_of_val(&msgs)) };
        if n <= 0 {
            continue;
        }
        let count = n as usize / std::mem::size_of::<Msg>();
        for m in &msgs[..count] {
            if m.event != UFFD_EVENT_PAGEFAULT || m.flags & UFFD_PAGEFAULT_FLAG_WP == 0 {
                continue;
            }
            let tid = u64::from(m.ptid);
            let slot = if in_user_mode(m.ptid) { claim(tid) } else { None };
            match slot {
                // A new fault while the last signal is still pending: the
                // thread blocks the signal. Let it through instead.
                Some(s) if s.pending.load(Ordering::Acquire) == 0 => {
                    s.pending.store(m.address, Ordering::Release);
                    STEPPED.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: tgkill to a thread of this process.
                    unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
                }
                _ => let_through(fd, m.address),
            }
        }
    }
}
