//! The file header: fixed fields written by hand, then postcard metadata.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `89 4D 57 54 0D 0A 1A 0A` (`\x89MWT\r\n\x1a\n`) |
//! | 8 | 4 | format version, `u32` LE |
//! | 12 | 4 | flags, `u32` LE (0 in v1; readers ignore unknown bits) |
//! | 16 | 4 | metadata length `M`, `u32` LE |
//! | 20 | 4 | CRC-32 (IEEE) of the metadata bytes, `u32` LE |
//! | 24 | M | [`Meta`], postcard |
//!
//! The first chunk starts at `24 + M`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The first 8 bytes of every trace. The high first byte and the CR LF /
/// ^Z / LF tail catch 7-bit and newline-translating transfers, as PNG does.
pub const MAGIC: [u8; 8] = *b"\x89MWT\r\n\x1a\n";

/// The format version this build writes, and the newest it reads. It reads
/// every older one too: version 2 added the `ObjectVariable` record (at the
/// end of the `Record` enum), and nothing else; version 3 added the
/// `Delta` record (also at the end), which its writers use for every byte
/// change instead of `Change`; version 4 added the `Note` record (at the
/// end), a fact about the event after it (the op that made a change).
pub const FORMAT_VERSION: u32 = 4;

/// Size of the fixed part of the header.
pub const FIXED_HEADER_LEN: usize = 24;

/// Upper bound on the metadata length a reader accepts (argv can be long,
/// but not this long).
pub const MAX_META_LEN: u32 = 16 << 20;

/// Facts about the recorded process, written once at the start.
// changing this struct means bumping FORMAT_VERSION
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    pub pid: u32,
    pub argv: Vec<String>,
    /// `sys.version` of the recorded interpreter (first line), or empty.
    pub python_version: String,
    /// `sys.platform` plus machine, e.g. `linux-x86_64`.
    pub platform: String,
    pub page_size: u32,
    /// Wall-clock start, nanoseconds since the Unix epoch. Record times are
    /// relative to this.
    pub start_time_ns: u64,
    /// Version of the memwatch that wrote the trace.
    pub writer: String,
    /// Free-form facts (`backend`, `mode`, ...), in the order written.
    pub properties: Vec<(String, String)>,
}

impl Meta {
    /// The value of property `key`, if set.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A decoded file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    pub meta: Meta,
    /// Where the first chunk starts.
    pub len: u64,
}

/// Encodes the header for `meta` in the current format version.
pub fn encode_header(meta: &Meta, flags: u32) -> Vec<u8> {
    let meta_bytes = postcard::to_stdvec(meta).expect("postcard encoding into a Vec cannot fail");
    let mut out = Vec::with_capacity(FIXED_HEADER_LEN + meta_bytes.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(meta_bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&meta_bytes).to_le_bytes());
    out.extend_from_slice(&meta_bytes);
    out
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes the header at the start of `bytes`. `path` is only for messages.
pub fn decode_header(bytes: &[u8], path: &Path) -> Result<Header> {
    let path_buf = || path.to_path_buf();
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] || bytes.is_empty() {
        return Err(Error::NotATrace { path: path_buf() });
    }
    if bytes.len() < FIXED_HEADER_LEN {
        return Err(Error::Truncated {
            path: path_buf(),
            detail: format!(
                "the file is {} bytes long, shorter than the {FIXED_HEADER_LEN}-byte header",
                bytes.len()
            ),
        });
    }
    let version = le_u32(bytes, 8);
    if version > FORMAT_VERSION {
        return Err(Error::NewerVersion {
            path: path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(Error::CorruptHeader {
            path: path_buf(),
            reason: "format version 0 does not exist".into(),
        });
    }
    let flags = le_u32(bytes, 12);
    let meta_len = le_u32(bytes, 16);
    let meta_crc = le_u32(bytes, 20);
    if meta_len > MAX_META_LEN {
        return Err(Error::CorruptHeader {
            path: path_buf(),
            reason: format!("metadata length {meta_len} is over the {MAX_META_LEN}-byte limit"),
        });
    }
    let end = FIXED_HEADER_LEN + meta_len as usize;
    if bytes.len() < end {
        return Err(Error::Truncated {
            path: path_buf(),
            detail: format!(
                "the header's metadata needs {meta_len} bytes after byte {FIXED_HEADER_LEN}, \
                 the file has {}",
                bytes.len() - FIXED_HEADER_LEN
            ),
        });
    }
    let meta_bytes = &bytes[FIXED_HEADER_LEN..end];
    let crc = crc32fast::hash(meta_bytes);
    if crc != meta_crc {
        return Err(Error::CorruptHeader {
            path: path_buf(),
            reason: format!("metadata checksum mismatch (stored {meta_crc:#010x}, computed {crc:#010x})"),
        });
    }
    let meta: Meta = match postcard::from_bytes(meta_bytes) {
        Ok(m) => m,
        Err(e) => {
            return Err(Error::CorruptHeader {
                path: path_buf(),
                reason: format!("metadata does not decode: {e}"),
            })
        }
    };
    Ok(Header {
        version,
        flags,
        meta,
        len: end as u64,
    })
}
