use std::io;
use std::path::PathBuf;

/// Everything that can go wrong reading or writing a trace.
///
/// Each variant names the file, so a message is useful on its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system refused (open, read, write, mmap).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The file does not start with the memwatch magic.
    #[error(
        "{}: not a memwatch trace (it does not start with the .mwt magic bytes; \
         was it written by `memwatch record` or `memwatch.start(trace=...)`?)",
        path.display()
    )]
    NotATrace { path: PathBuf },

    /// The file was written by a newer memwatch.
    #[error(
        "{}: written by a newer memwatch (format version {found}, this build reads up to \
         {supported}); upgrade memwatch to read it",
        path.display()
    )]
    NewerVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// The file ends before its header does, or (in strict reading) before
    /// its last chunk does.
    #[error("{}: truncated: {detail}", path.display())]
    Truncated { path: PathBuf, detail: String },

    /// The file header's metadata is damaged.
    #[error("{}: corrupt header: {reason}", path.display())]
    CorruptHeader { path: PathBuf, reason: String },

    /// A chunk is damaged (checksum, framing, compression or a record in it).
    /// `index` counts chunks from 0 in file order.
    #[error("{}: corrupt chunk {index} (at byte {offset}): {reason}", path.display())]
    CorruptChunk {
        path: PathBuf,
        index: u64,
        offset: u64,
        reason: String,
    },

    /// A record could not be encoded (a bug in the caller: for example a
    /// chunk larger than 4 GiB).
    #[error("{}: cannot encode record: {reason}", path.display())]
    Encode { path: PathBuf, reason: String },

    /// The writer was used after an I/O error or after `finish`.
    #[error("{}: the trace writer is closed ({reason})", path.display())]
    Closed { path: PathBuf, reason: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            Error::Io { path, .. }
            | Error::NotATrace { path }
            | Error::NewerVersion { path, .. }
            | Error::Truncated { path, .. }
            | Error::CorruptHeader { path, .. }
            | Error::CorruptChunk { path, .. }
            | Error::Encode { path, .. }
            | Error::Closed { path, .. } => path,
        }
    }
}
