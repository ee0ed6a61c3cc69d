//! Chunk framing, the trailer and the footer.
//!
//! Every chunk is a 44-byte header followed by its payload:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | chunk magic `MWCK` |
//! | 4 | 1 | kind: 1 = records, 2 = trailer |
//! | 5 | 1 | codec: 0 = stored, 1 = zstd |
//! | 6 | 1 | flags: bit 0 = contents only ([`FLAG_CONTENTS_ONLY`]); other bits 0 |
//! | 7 | 1 | reserved, 0 |
//! | 8 | 4 | stored length `S` (payload bytes in the file), `u32` LE |
//! | 12 | 4 | raw length (payload bytes after decompression), `u32` LE |
//! | 16 | 4 | record count, `u32` LE |
//! | 20 | 8 | first seq, `u64` LE ([`NO_SEQ`] if the chunk has no event) |
//! | 28 | 8 | last seq, `u64` LE ([`NO_SEQ`] if the chunk has no event) |
//! | 36 | 4 | CRC-32 (IEEE) of the `S` stored payload bytes, `u32` LE |
//! | 40 | 4 | CRC-32 (IEEE) of header bytes 0..40, `u32` LE |
//! | 44 | S | payload |
//!
//! A records chunk's raw payload is its records, postcard-encoded one after
//! another. A records chunk flagged *contents only* holds nothing but
//! `Contents` records (a region's initial contents or a checkpoint), so a
//! scan for changes skips it without decompressing it. Traces written
//! before the flag existed have 0 there and read exactly as before; a
//! reader that ignores the flag reads flagged chunks correctly too.
//!
//! A trailer chunk's raw payload is one postcard [`Trailer`]. A
//! cleanly closed trace ends with a trailer chunk and then the 16-byte
//! footer: the trailer chunk's offset (`u64` LE) and [`FOOTER_MAGIC`].

use serde::{Deserialize, Serialize};

use crate::header::{le_u32, le_u64};

/// The first 4 bytes of every chunk.
pub const CHUNK_MAGIC: [u8; 4] = *b"MWCK";
/// Size of a chunk header.
pub const CHUNK_HEADER_LEN: usize = 44;
/// The last 8 bytes of a cleanly closed trace.
pub const FOOTER_MAGIC: [u8; 8] = *b"MWTEND\0\0";
/// Size of the footer.
pub const FOOTER_LEN: usize = 16;
/// first/last seq of a chunk that holds no event record.
pub const NO_SEQ: u64 = u64::MAX;
/// Header flag (byte 6, bit 0): the chunk holds only `Contents` records.
pub const FLAG_CONTENTS_ONLY: u8 = 1;

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkKind {
    Records,
    Trailer,
}

impl ChunkKind {
    pub fn code(self) -> u8 {
        match self {
            ChunkKind::Records => 1,
            ChunkKind::Trailer => 2,
        }
    }
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(ChunkKind::Records),
            2 => Some(ChunkKind::Trailer),
            _ => None,
        }
    }
}

/// How a chunk's payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Stored,
    Zstd,
}

impl Codec {
    pub fn code(self) -> u8 {
        match self {
            Codec::Stored => 0,
            Codec::Zstd => 1,
        }
    }
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Codec::Stored),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// A decoded chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub kind: ChunkKind,
    pub codec: Codec,
    pub stored_len: u32,
    pub raw_len: u32,
    pub record_count: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    pub payload_crc: u32,
    /// Holds only `Contents` records: scans of changes skip it.
    pub contents_only: bool,
}

impl ChunkHeader {
    /// The 44 header bytes.
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(&CHUNK_MAGIC);
        b[4] = self.kind.code();
        b[5] = self.codec.code();
        b[6] = if self.contents_only { FLAG_CONTENTS_ONLY } else { 0 };
        b[8..12].copy_from_slice(&self.stored_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.raw_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.record_count.to_le_bytes());
        b[20..28].copy_from_slice(&self.first_seq.to_le_bytes());
        b[28..36].copy_from_slice(&self.last_seq.to_le_bytes());
        b[36..40].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[0..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes 44 header bytes, or says what is wrong with them.
    pub fn decode(b: &[u8; CHUNK_HEADER_LEN]) -> Result<ChunkHeader, String> {
        if b[0..4] != CHUNK_MAGIC {
            return Err(format!(
                "no chunk magic (found {:02x?}, expected {:02x?})",
                &b[0..4],
                CHUNK_MAGIC
            ));
        }
        let stored = le_u32(b, 40);
        let computed = crc32fast::hash(&b[0..40]);
        if stored != computed {
            return Err(format!(
                "chunk header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let kind = ChunkKind::from_code(b[4]).ok_or_else(|| format!("unknown chunk kind {}", b[4]))?;
        let codec = Codec::from_code(b[5]).ok_or_else(|| format!("unknown codec {}", b[5]))?;
        if b[6] & !FLAG_CONTENTS_ONLY != 0 {
            return Err(format!(
                "unknown chunk flags {:#04x} (this memwatch knows only {FLAG_CONTENTS_ONLY:#04x}: a newer memwatch wrote it?)",
                b[6]
            ));
        }
        Ok(ChunkHeader {
            kind,
            codec,
            stored_len: le_u32(b, 8),
            raw_len: le_u32(b, 12),
            record_count: le_u32(b, 16),
            first_seq: le_u64(b, 20),
            last_seq: le_u64(b, 28),
            payload_crc: le_u32(b, 36),
            contents_only: b[6] & FLAG_CONTENTS_ONLY != 0,
        })
    }

    /// Header plus payload length.
    pub fn total_len(&self) -> u64 {
        CHUNK_HEADER_LEN as u64 + self.stored_len as u64
    }
}

/// One entry of the trailer's index: where a records chunk is.
// changing this struct means bumping FORMAT_VERSION
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub offset: u64,
    pub record_count: u32,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// The payload of the trailer chunk: written once, at a clean close.
// changing this struct means bumping FORMAT_VERSION
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Trailer {
    /// Every records chunk, in file order.
    pub chunks: Vec<IndexEntry>,
    /// Records written in all.
    pub records: u64,
    /// The last seq written ([`NO_SEQ`] if none).
    pub last_seq: u64,
    /// Events the recorder reported lost (the sum of `Lost` records).
    pub lost_events: u64,
    /// When the trace was closed, nanoseconds since the header's start time.
    pub end_time_ns: u64,
}

/// The 16-byte footer after the trailer chunk.
pub fn encode_footer(trailer_offset: u64) -> [u8; FOOTER_LEN] {
    let mut b = [0u8; FOOTER_LEN];
    b[0..8].copy_from_slice(&trailer_offset.to_le_bytes());
    b[8..16].copy_from_slice(&FOOTER_MAGIC);
    b
}
