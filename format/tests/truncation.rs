//! A trace cut at any byte reads back every whole chunk and says how many
//! bytes it ignored.

use memwatch_format::*;

use crate::common::*;

/// Records in the first `n` chunks of the full trace.
fn records_in_chunks(full: &[u8], n: usize) -> usize {
    let r = TraceReader::from_bytes(full.to_vec(), "full.mwt").unwrap();
    r.chunks()[..n]
        .iter()
        .map(|c| c.header.record_count as usize)
        .sum()
}

#[test]
fn cut_at_every_offset_of_one_chunk() {
    let (full, all) = sample_bytes(160);
    let reader = TraceReader::from_bytes(full.clone(), "full.mwt").unwrap();
    assert!(
        reader.chunks().len() >= 4,
        "want several chunks, got {}",
        reader.chunks().len()
    );
    let c = reader.chunks()[2];
    let (start, end) = (c.offset as usize, (c.offset + c.header.total_len()) as usize);
    for cut in start..=end {
        let r = TraceReader::from_bytes(full[..cut].to_vec(), "cut.mwt")
            .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let whole = if cut == end { 3 } else { 2 };
        assert_eq!(r.chunks().len(), whole, "cut at {cut}");
        let expect_tail = if cut == start || cut == end {
            Tail::Unclosed
        } else {
            Tail::Truncated {
                bytes_ignored: (cut - start) as u64,
            }
        };
        assert_eq!(r.tail(), expect_tail, "cut at {cut}");
        let got = read_all(&r).unwrap();
        assert_eq!(got.len(), records_in_chunks(&full, whole), "cut at {cut}");
        assert_eq!(got[..], all[..got.len()], "cut at {cut}");
        if let Tail::Truncated { bytes_ignored } = r.tail() {
            assert_eq!(
                r.tail_message().unwrap(),
                format!("truncated: {whole} chunks read, {bytes_ignored} bytes ignored")
            );
        }
    }
}

#[test]
fn cut_at_every_offset_of_the_file_never_fails_after_the_header() {
    // The sample with every version's records, deltas and notes included.
    let (full, all) = sample_bytes_of(160, 4);
    let header_len = TraceReader::from_bytes(full.clone(), "f").unwrap().header().len as usize;
    for cut in 0..=full.len() {
        match TraceReader::from_bytes(full[..cut].to_vec(), "cut.mwt") {
            Ok(r) => {
                assert!(cut >= header_len, "cut {cut} opened without a whole header");
                let got = read_all(&r).unwrap();
                assert_eq!(got[..], all[..got.len()], "cut at {cut}");
                assert_eq!(r.tail() == Tail::Closed, cut == full.len(), "cut at {cut}");
                // Every whole chunk's deltas expand.
                let mut ex = Expander::default();
                for info in r.chunks() {
                    let chunk = r.decode_chunk(info).unwrap();
                    ex.expand(&chunk).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
                }
            }
            Err(e) => {
                assert!(cut < header_len, "cut {cut}: {e}");
                assert!(
                    matches!(e, Error::Truncated { .. } | Error::NotATrace { .. }),
                    "cut {cut}: {e:?}"
                );
            }
        }
    }
}

#[test]
fn zero_filled_tail_counts_as_truncated() {
    // What a file system may leave after a machine crash: the size grew but
    // the data never landed.
    let (full, all) = sample_bytes(160);
    let reader = TraceReader::from_bytes(full.clone(), "f").unwrap();
    let keep = reader.chunks()[2].offset as usize;
    let mut bytes = full[..keep].to_vec();
    bytes.resize(keep + 500, 0);
    let r = TraceReader::from_bytes(bytes, "zeros.mwt").unwrap();
    assert_eq!(r.chunks().len(), 2);
    assert_eq!(r.tail(), Tail::Truncated { bytes_ignored: 500 });
    assert_eq!(read_all(&r).unwrap()[..], all[..records_in_chunks(&full, 2)]);
}

#[test]
fn a_trace_without_trailer_is_unclosed_and_complete() {
    let recs: Vec<Owned> = (1..=50)
        .map(|i| Owned::Change {
            seq: i,
            ctx: Context::default(),
            region: 1,
            ranges: vec![(i * 4, vec![0; 4], vec![1; 4])],
        })
        .collect();
    let opts = WriterOptions {
        chunk_bytes: 64,
        ..WriterOptions::default()
    };
    let bytes = write_trace(&Meta::default(), &recs, opts, false);
    let r = TraceReader::from_bytes(bytes, "killed.mwt").unwrap();
    assert_eq!(r.tail(), Tail::Unclosed);
    assert!(r.trailer().is_none());
    assert_eq!(read_all(&r).unwrap(), debug_all(&recs));
    assert!(r.tail_message().unwrap().starts_with("not closed cleanly: "));
}
