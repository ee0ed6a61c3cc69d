//! The files a trace is made of: created private (`0600`, like a core dump:
//! a trace holds memory contents), allocated before they are mapped, and
//! the process's file size limit, checked before writing.
//!
//! A leaf: the writer, the journal and the crash file use it; it uses
//! nothing of this crate. No locks, no signal-context code.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Creates (or truncates) `path` for reading and writing (a shared mapping
/// needs both) with mode `0600`; a file that
/// was already there is made `0600` too (the mode given at creation applies
/// only to a new file).
pub fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// The process's file size limit (`RLIMIT_FSIZE`, `ulimit -f`) in bytes,
/// if it has one. Writers check it before they write, so that going past
/// it is an error (`EFBIG`), never the `SIGXFSZ` that would kill a program
/// that did not ignore it.
pub fn file_size_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut r) } == 0;
    (ok && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
}

/// Makes `file` `len` bytes long with its blocks allocated.
pub fn allocate(file: &File, len: usize) -> io::Result<()> {
    // SAFETY: a plain system call on an open descriptor.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) } {
        0 => Ok(()),
        libc::EOPNOTSUPP | libc::EINVAL => file.set_len(len as u64),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}
