//! Direct writes: the sealer writes large chunks to the trace file with
//! `O_DIRECT`, past the kernel's page cache.
//!
//! Why: a trace is written once, while the program runs, and read later.
//! Through the page cache every new byte of it first takes a new page of
//! memory. That evicts the recorded program's own data, and where new
//! pages are dear it is the sealer's largest cost: on the Firecracker VMs
//! we measure on, a buffered `write` of 12 MB to a new file takes about
//! 33 ms (a new page costs about 2.7 ms per MB there), an `O_DIRECT` write
//! of the same bytes about 6 ms (docs/development.md, "Measuring on
//! these VMs").
//!
//! `O_DIRECT` wants the buffer, the file offset and the length aligned to
//! the device's blocks ([`ALIGN`]). A chunk rarely starts or ends on a
//! block, so a direct write covers the chunk's whole blocks only, starting
//! at the block that holds the chunk's start: the bytes of that block
//! before the chunk (the end of the previous one, which the sealer keeps)
//! are written again unchanged. The chunk's last partial block goes through the
//! page cache with an ordinary `pwrite`, so the file's length is always the
//! end of its last chunk and a trace never ends in padding. A process
//! killed between the two writes leaves one partial chunk, as with a single
//! buffered write; readers skip it and the journal still holds its
//! records.
//!
//! Where the file system refuses direct I/O (`EINVAL`: tmpfs on older
//! kernels, some FUSE file systems) the first refusal switches the output
//! back to buffered writes for good, at no cost to the trace.
//!
//! Owned by the sealer thread; no locks; nothing here runs in signal
//! context.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

/// The alignment direct writes keep: buffer address, file offset, length.
/// 4 KiB is a multiple of every logical block size Linux devices report.
pub const ALIGN: usize = 4096;

/// Chunks whose stored payload is at least this large are written
/// directly; smaller ones cost less as one buffered `write`.
pub const DIRECT_MIN: usize = 256 << 10;

/// A trace file opened twice: once for direct writes, once (sharing the
/// writer's file offset) for the partial blocks at either end of a chunk.
pub struct Direct {
    direct: File,
    plain: File,
}

impl Direct {
    /// Opens `file` again for direct writes; `None` where that is refused.
    pub fn open(file: &File) -> Option<Direct> {
        let plain = file.try_clone().ok()?;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .ok()?;
        Some(Direct { direct, plain })
    }

    /// Writes `buf` at `at` (`at` and `buf`'s address aligned to [`ALIGN`]):
    /// its whole blocks directly, the rest through the page cache; then
    /// moves the file offset to the end of what it wrote. `Ok(false)`: the
    /// file system refused direct I/O and nothing was written.
    pub fn write(&mut self, buf: &[u8], at: u64) -> io::Result<bool> {
        debug_assert_eq!(at as usize % ALIGN, 0);
        debug_assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
        let whole = buf.len() / ALIGN * ALIGN;
        if whole > 0 {
            match self.direct.write_all_at(&buf[..whole], at) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.plain.write_all_at(&buf[whole..], at + whole as u64)?;
        self.plain.seek(SeekFrom::Start(at + buf.len() as u64))?;
        Ok(true)
    }
}

/// A reusable working buffer whose usable part starts on an [`ALIGN`]
/// boundary.
#[derive(Default)]
pub struct AlignedBuf {
    bytes: Vec<u8>,
}

/// A buffer larger than this after a chunk is given back to the allocator.
const KEEP: usize = 64 << 20;

impl AlignedBuf {
    /// At least `len` bytes, the first of them aligned; their contents are
    /// whatever the last chunk left.
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        if self.bytes.len() < len + ALIGN {
            // Grows in steps so that chunks of slowly growing size do not
            // each reallocate.
            let want = (len + ALIGN).next_power_of_two().max(1 << 20);
            self.bytes = vec![0u8; want];
        }
        let pad = self.bytes.as_ptr().align_offset(ALIGN);
        &mut self.bytes[pad..pad + len]
    }

    /// The first `len` bytes of what [`get`](Self::get) gave last.
    pub fn filled(&self, len: usize) -> &[u8] {
        let pad = self.bytes.as_ptr().align_offset(ALIGN);
        &self.bytes[pad..pad + len]
    }

    /// Gives a buffer grown past the bound back.
    pub fn trim(&mut self) {
        if self.bytes.len() > KEEP {
            self.bytes = Vec::new();
        }
    }
}
