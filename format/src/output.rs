//! [`Output`]: where a trace's bytes go (a file, or memory in tests).
//!
//! A leaf below the writer and the sealer, which both write through it.
//! No locks, no signal-context code.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};

use crate::direct::Direct;

/// Where a trace goes. Besides writing, an output can be cut back to a
/// length: after a failed write (a full disk) the writer cuts the file back
/// to the end of its last whole chunk, so the trace stays clean up to there.
pub trait Output: Write + Send + 'static {
    /// A second handle on the output for writing large chunks with direct
    /// I/O, past the page cache ([`crate::direct`]); the default has none.
    fn direct(&self) -> Option<Direct> {
        None
    }

    /// Cuts the output back to `len` bytes; the default cannot.
    fn truncate_to(&mut self, _len: u64) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this output cannot be truncated",
        ))
    }
}

impl Output for File {
    fn direct(&self) -> Option<Direct> {
        Direct::open(self)
    }

    fn truncate_to(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)?;
        self.seek(SeekFrom::Start(len)).map(|_| ())
    }
}

impl Output for Vec<u8> {
    fn truncate_to(&mut self, len: u64) -> std::io::Result<()> {
        self.truncate(len as usize);
        Ok(())
    }
}
