//! Write tracking through userfaultfd `WP_ASYNC` and the `PAGEMAP_SCAN` ioctl.
//!
//! Pages of watched memory are registered with a userfaultfd in
//! write-protect mode with the `WP_ASYNC` feature: the first write to a
//! protected page (from any thread, from native code, or from the kernel
//! itself as in `readinto`) is resolved inside the kernel with no signal and
//! no handler, and the page is marked written. `PAGEMAP_SCAN` with
//! `PM_SCAN_WP_MATCHING` then reports which pages were written and
//! write-protects them again, atomically. The caller diffs those pages
//! against a shadow copy to get exact bytes.
//!
//! This needs Linux 6.7 or newer. It works unprivileged: the userfaultfd is
//! created with `UFFD_USER_MODE_ONLY`, which only limits *sync* faults in
//! kernel mode, and `WP_ASYNC` faults never reach a handler.
//!
//! No signal handler is installed here, and nothing here needs one. The
//! store-mode handlers (`signals`) call `gettid` and use the
//! `UFFDIO_WRITEPROTECT` structures below: a plain system call and plain
//! data, fit for signal context.
//!
//! The structures and ioctl numbers are transcribed from
//! `include/uapi/linux/userfaultfd.h` and `include/uapi/linux/fs.h` (Linux
//! 6.7); Debian 12's headers predate `PAGEMAP_SCAN`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub(crate) const UFFD_API: u64 = 0xAA;
pub(crate) const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub(crate) const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

// _IOWR(0xAA, 0x3F, struct uffdio_api) and friends.
pub(crate) const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
pub(crate) const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;
// _IOWR('f', 16, struct pm_scan_arg)
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;

const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
pub(crate) struct UffdioApi {
    pub(crate) api: u64,
    pub(crate) features: u64,
    pub(crate) ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UffdioRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
pub(crate) struct UffdioWriteprotect {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// One run of pages, `[start, end)` addresses, as `PAGEMAP_SCAN` reports it.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    pub start: u64,
    pub end: u64,
    categories: u64,
}

/// A userfaultfd in async write-protect mode, and `/proc/self/pagemap` to
/// scan with.
#[derive(Debug)]
pub struct WriteTracker {
    uffd: OwnedFd,
    pagemap: OwnedFd,
    runs: Vec<PageRun>,
}

pub(crate) fn ioctl<T>(fd: &impl AsRawFd, req: libc::c_ulong, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: `arg` is the repr(C) struct the request expects, valid for
    // the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl WriteTracker {
    /// Opens the userfaultfd and pagemap. Fails (with the kernel's reason)
    /// on kernels without `WP_ASYNC` or `PAGEMAP_SCAN`.
    pub fn new() -> io::Result<WriteTracker> {
        // SAFETY: plain syscall; the result is checked and owned at once.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        ioctl(&uffd, UFFDIO_API, &mut api)?;
        let pagemap = std::fs::File::open("/proc/self/pagemap")?;
        let tracker = WriteTracker {
            uffd,
            pagemap: pagemap.into(),
            runs: vec![PageRun::default(); 64],
        };
        Ok(tracker)
    }

    /// Registers `[start, start + len)` (page-aligned) and write-protects it.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        uffd_register(&self.uffd, start, len)
    }

    /// Removes protection and registration from `[start, start + len)`.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        uffd_unregister(&self.uffd, start, len)
    }

    /// Calls `f(start, end)` for every run of pages in `[start, end)` written
    /// since the last scan, and write-protects them again.
    pub fn scan_written(&mut self, start: u64, end: u64, mut f: impl FnMut(u64, u64)) -> io::Result<()> {
        let mut at = start;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: at,
                end,
                vec: self.runs.as_mut_ptr() as u64,
                vec_len: self.runs.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            let n = ioctl(&self.pagemap, PAGEMAP_SCAN, &mut arg)? as usize;
            for run in &self.runs[..n] {
                f(run.start, run.end);
            }
            if arg.walk_end <= at || arg.walk_end >= end {
                break;
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}

/// Page faults of the whole process so far (every thread, live or
/// exited; minor and major), or `None` if `getrusage` fails. Counts
/// userfaultfd `WP_ASYNC` faults too, kernel-mode ones (`read` into a
/// buffer) and those of `get_user_pages` (`/proc/self/mem`, `O_DIRECT`)
/// included: the kernel accounts a fault to the thread that took it before
/// the faulting access is retried.
pub fn process_faults() -> Option<u64> {
    // SAFETY: a zeroed rusage is valid; getrusage only writes it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall into our own struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return None;
    }
    Some(ru.ru_minflt as u64 + ru.ru_majflt as u64)
}

/// Registers `[start, start + len)` (whole pages) with userfaultfd `uffd`
/// in write-protect mode and write-protects it.
pub(crate) fn uffd_register(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    ioctl(uffd, UFFDIO_REGISTER, &mut reg)?;
    if let Err(e) = uffd_writeprotect(uffd, start, len, true) {
        let _ = uffd_unregister(uffd, start, len);
        return Err(e);
    }
    Ok(())
}

/// Lifts protection (waking threads waiting on it) and registration from
/// `[start, start + len)`.
pub(crate) fn uffd_unregister(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    // Unprotecting first leaves no stale uffd-wp marker on the ptes.
    let unprotect = uffd_writeprotect(uffd, start, len, false);
    let mut range = UffdioRange { start, len };
    ioctl(uffd, UFFDIO_UNREGISTER, &mut range)?;
    unprotect
}

/// Write-protects (`on`) or opens `[start, start + len)`.
pub(crate) fn uffd_writeprotect(uffd: &impl AsRawFd, start: u64, len: u64, on: bool) -> io::Result<()> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
    };
    ioctl(uffd, UFFDIO_WRITEPROTECT, &mut wp).map(|_| ())
}

/// The system page size.
/// The decimal digits of `n`, written into `buf` without allocating (the
/// store-mode fault thread names `/proc` files with it).
pub(crate) fn decimal_digits(n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let (mut n, mut k) = (n, buf.len());
    loop {
        k -= 1;
        buf[k] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[k..]
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// The OS thread id of the caller.
pub fn gettid() -> u64 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u64 }
}

/// True if every byte of `[start, start + len)` is mapped writable in this
/// process, per `/proc/self/maps`.
pub fn is_mapped_writable(start: u64, len: u64) -> io::Result<bool> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let end = start.saturating_add(len);
    let mut at = start;
    let mut ranges: Vec<(u64, u64, bool)> = maps
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (range, perms) = (it.next()?, it.next()?);
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                perms.as_bytes().get(1) == Some(&b'w'),
            ))
        })
        .collect();
    ranges.sort();
    for (a, b, w) in ranges {
        if b <= at {
            continue;
        }
        if a > at || !w {
            return Ok(false);
        }
        at = b;
        if at >= end {
            return Ok(true);
        }
    }
    Ok(at >= end)
}
