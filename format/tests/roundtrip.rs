use memwatch_format::*;
use proptest::prelude::*;

use crate::common::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    // decode(encode(records)) == records, whatever the chunking and codec.
    #[test]
    fn records_round_trip(
        recs in prop::collection::vec(owned_record(), 0..60),
        chunk_bytes in 1usize..4096,
        zstd in prop::bool::ANY,
    ) {
        let opts = WriterOptions { chunk_bytes, zstd_level: if zstd { 3 } else { 0 }, ..WriterOptions::default() };
        let bytes = write_trace(&Meta::default(), &recs, opts, true);
        let reader = TraceReader::from_bytes(bytes, "rt.mwt").unwrap();
        prop_assert_eq!(reader.tail(), Tail::Closed);
        prop_assert_eq!(read_all(&reader).unwrap(), debug_all(&recs));
        let trailer = reader.trailer().unwrap();
        prop_assert_eq!(trailer.records, recs.len() as u64);
        prop_assert_eq!(trailer.chunks.len(), reader.chunks().len());
        // Each chunk's seq range covers exactly the seqs of its events.
        for info in reader.chunks() {
            let chunk = reader.decode_chunk(info).unwrap();
            let seqs: Vec<u64> = chunk.records().filter_map(|r| r.unwrap().seq()).collect();
            prop_assert_eq!(info.header.first_seq, seqs.first().copied().unwrap_or(NO_SEQ));
            prop_assert_eq!(info.header.last_seq, seqs.last().copied().unwrap_or(NO_SEQ));
        }
    }

    #[test]
    fn meta_round_trips(
        pid in any::<u32>(),
        argv in prop::collection::vec(".{0,12}", 0..5),
        props in prop::collection::vec((".{0,8}", ".{0,8}"), 0..4),
        start in any::<u64>(),
    ) {
        let meta = Meta {
            pid,
            argv,
            python_version: "3.12.1".into(),
            platform: "linux-x86_64".into(),
            page_size: 4096,
            start_time_ns: start,
            writer: "test".into(),
            properties: props,
        };
        let bytes = write_trace(&meta, &[], WriterOptions::default(), true);
        let reader = TraceReader::from_bytes(bytes, "meta.mwt").unwrap();
        prop_assert_eq!(&reader.header().meta, &meta);
        prop_assert_eq!(reader.header().version, FORMAT_VERSION);
    }

    // Any damage to a trace gives an error or fewer records, never a panic.
    #[test]
    fn damaged_traces_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let (mut bytes, _) = sample_bytes(200);
        for (at, x) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x | 1;
        }
        let cut = cut.index(bytes.len() + 1);
        bytes.truncate(cut);
        if let Ok(reader) = TraceReader::from_bytes(bytes, "damaged.mwt") {
            let _ = read_all(&reader);
            let _ = reader.tail_message();
        }
    }
}

#[test]
fn object_change_kind_names_round_trip() {
    for k in ObjectChangeKind::ALL {
        assert_eq!(ObjectChangeKind::from_name(k.name()), Some(k));
    }
    assert_eq!(ObjectChangeKind::from_name("nope"), None);
}
