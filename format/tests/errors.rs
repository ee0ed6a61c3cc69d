//! Each error has its own variant and a message that names the file (and the
//! chunk).

use memwatch_format::*;

use crate::common::*;

fn open_err(bytes: Vec<u8>) -> Error {
    TraceReader::from_bytes(bytes, "bad.mwt").expect_err("should not open")
}

#[test]
fn bad_magic_is_not_a_trace() {
    let err = open_err(b"PK\x03\x04 this is a zip file, not a trace".to_vec());
    assert!(matches!(err, Error::NotATrace { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("bad.mwt: not a memwatch trace"), "{msg}");
}

#[test]
fn empty_file_is_not_a_trace() {
    let err = open_err(Vec::new());
    assert!(matches!(err, Error::NotATrace { .. }), "{err:?}");
}

#[test]
fn newer_version_says_found_and_supported() {
    let (mut bytes, _) = sample_bytes(1 << 20);
    bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let err = open_err(bytes);
    match &err {
        Error::NewerVersion { found, supported, .. } => {
            assert_eq!((*found, *supported), (FORMAT_VERSION + 1, FORMAT_VERSION));
        }
        other => panic!("expected NewerVersion, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "bad.mwt: written by a newer memwatch (format version {}, this build reads up to {}); \
             upgrade memwatch to read it",
            FORMAT_VERSION + 1,
            FORMAT_VERSION
        )
    );
}

#[test]
fn header_cut_short_is_truncated() {
    let (bytes, _) = sample_bytes(1 << 20);
    for cut in [10, 23, 30] {
        let err = open_err(bytes[..cut].to_vec());
        assert!(matches!(err, Error::Truncated { .. }), "cut {cut}: {err:?}");
        assert!(err.to_string().starts_with("bad.mwt: truncated: "), "{err}");
    }
    // A prefix of the magic is still "truncated", not "not a trace" ...
    assert!(matches!(open_err(bytes[..4].to_vec()), Error::Truncated { .. }));
}

#[test]
fn damaged_metadata_is_a_corrupt_header() {
    let (mut bytes, _) = sample_bytes(1 << 20);
    bytes[30] ^= 0xff;
    let err = open_err(bytes);
    assert!(matches!(err, Error::CorruptHeader { .. }), "{err:?}");
    assert!(err.to_string().contains("metadata checksum mismatch"), "{err}");
}

#[test]
fn damaged_payload_is_corrupt_chunk_n() {
    let (bytes, _) = sample_bytes(200);
    let reader = TraceReader::from_bytes(bytes.clone(), "bad.mwt").unwrap();
    let second = reader.chunks()[1];
    let mut bytes = bytes;
    bytes[second.offset as usize + 44 + 3] ^= 0x40;
    let reader = TraceReader::from_bytes(bytes, "bad.mwt").unwrap();
    let err = read_all(&reader).unwrap_err();
    match &err {
        Error::CorruptChunk {
            index,
            offset,
            reason,
            ..
        } => {
            assert_eq!((*index, *offset), (1, second.offset));
            assert!(reason.starts_with("payload checksum mismatch"), "{reason}");
        }
        other => panic!("expected CorruptChunk, got {other:?}"),
    }
    assert!(err.to_string().starts_with(&format!(
        "bad.mwt: corrupt chunk 1 (at byte {}): payload checksum",
        second.offset
    )));
    // The first chunk still reads.
    assert!(reader.decode_chunk(&reader.chunks()[0]).is_ok());
}

#[test]
fn damaged_chunk_header_is_corrupt_chunk_at_open() {
    let (bytes, _) = sample_bytes(200);
    let reader = TraceReader::from_bytes(bytes.clone(), "bad.mwt").unwrap();
    let second = reader.chunks()[1];
    let mut bytes = bytes;
    bytes[second.offset as usize + 9] ^= 0x01; // the stored length
    let err = open_err(bytes);
    match &err {
        Error::CorruptChunk { index, reason, .. } => {
            assert_eq!(*index, 1);
            assert!(reason.contains("chunk header checksum mismatch"), "{reason}");
        }
        other => panic!("expected CorruptChunk, got {other:?}"),
    }
}

#[test]
fn garbage_after_the_footer_is_reported() {
    let (mut bytes, _) = sample_bytes(200);
    bytes.extend_from_slice(b"junk");
    let err = open_err(bytes);
    assert!(matches!(err, Error::CorruptChunk { .. }), "{err:?}");
    assert!(err.to_string().contains("are not the 16-byte footer"), "{err}");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let err = TraceReader::open("/nonexistent/dir/run.mwt").unwrap_err();
    assert!(matches!(&err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound));
    assert!(err.to_string().starts_with("/nonexistent/dir/run.mwt: "), "{err}");
}

#[test]
fn strict_reading_of_an_unclosed_trace_is_truncated() {
    let (bytes, _) = sample_bytes(200);
    let cut = bytes.len() - 30;
    let reader = TraceReader::from_bytes(bytes[..cut].to_vec(), "cut.mwt").unwrap();
    let err = reader.require_closed().unwrap_err();
    assert!(matches!(err, Error::Truncated { .. }));
    let n = reader.chunks().len();
    assert!(
        err.to_string()
            .starts_with(&format!("cut.mwt: truncated: {n} chunks read, ")),
        "{err}"
    );
}

#[test]
fn a_full_disk_leaves_a_trace_clean_up_to_its_last_whole_chunk() {
    // A Vec that refuses to grow past a limit, as a full disk would.
    struct Disk {
        data: Vec<u8>,
        limit: usize,
    }
    impl std::io::Write for Disk {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let room = self.limit.saturating_sub(self.data.len());
            if room == 0 {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = room.min(b.len());
            self.data.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Output for Disk {
        fn truncate_to(&mut self, len: u64) -> std::io::Result<()> {
            self.data.truncate(len as usize);
            Ok(())
        }
    }
    let opts = WriterOptions {
        chunk_bytes: 64,
        zstd_level: 0,
        ..WriterOptions::default()
    };
    let disk = Disk {
        data: Vec::new(),
        limit: 1000,
    };
    let mut w = TraceWriter::new(disk, "full.mwt", &Meta::default(), opts).unwrap();
    let mut failed = None;
    for i in 0..200 {
        if let Err(e) = w.intern_str(&format!("a string long enough to fill chunks quickly {i}")) {
            failed = Some((i, e));
            break;
        }
    }
    // The sealer thread writes chunks: its failure comes back on a later
    // call, at the latest on the flush that waits for it.
    let failed = failed.or_else(|| w.flush().err().map(|e| (200, e)));
    let (i, err) = failed.expect("the disk fills up");
    assert!(err.to_string().contains("No space left on device"), "{err}");
    let again = w.intern_str("more").unwrap_err();
    assert!(
        again.to_string().contains("the trace ends after chunk"),
        "{again}"
    );
    // What reached the disk reads cleanly: whole chunks, no partial one.
    let Disk { data, .. } = w.into_output();
    let r = TraceReader::from_bytes(data, "full.mwt").unwrap();
    assert_eq!(r.tail(), Tail::Unclosed);
    let got = read_all(&r).unwrap();
    assert!(!got.is_empty() && got.len() < i + 1);
}

#[test]
fn writer_refuses_use_after_an_io_error() {
    struct Full(usize);
    impl std::io::Write for Full {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.0 < b.len() {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            self.0 -= b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Output for Full {}
    let opts = WriterOptions {
        chunk_bytes: 1,
        ..WriterOptions::default()
    };
    let mut w = TraceWriter::new(Full(200), "full.mwt", &Meta::default(), opts).unwrap();
    let mut first_err = None;
    for i in 0..100 {
        if let Err(e) = w.intern_str(&format!("string number {i}")) {
            first_err = Some(e);
            break;
        }
    }
    let err = first_err.or_else(|| w.flush().err()).expect("the disk fills up");
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().starts_with("full.mwt: "), "{err}");
    let again = w.intern_str("more").unwrap_err();
    assert!(matches!(again, Error::Closed { .. }), "{again:?}");
}
