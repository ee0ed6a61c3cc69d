//! The allocation-free decoder of scans reads exactly what postcard reads.

use memwatch_format::*;
use proptest::prelude::*;

use crate::common::*;

fn postcard_take(b: &[u8]) -> Option<(Record<'_>, usize)> {
    postcard::take_from_bytes::<Record<'_>>(b)
        .ok()
        .map(|(r, rest)| (r, rest.len()))
}

fn view_take(b: &[u8]) -> Option<(Record<'_>, usize)> {
    take_view(b).ok().map(|(v, rest)| (v.to_record(), rest.len()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    // Every record, encoded and then damaged anywhere (or cut short), decodes
    // the same way through both decoders, or fails through both.
    #[test]
    fn view_decoding_agrees_with_postcard(
        rec in owned_record(),
        flip in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
        cut in any::<prop::sample::Index>(),
        tail in prop::collection::vec(any::<u8>(), 0..4),
    ) {
        let mut b = postcard::to_stdvec(&rec.as_record()).unwrap();
        b.extend_from_slice(&tail);
        if let Some((at, x)) = flip {
            let i = at.index(b.len());
            b[i] ^= x;
        }
        let b = &b[..cut.index(b.len() + 1)];
        prop_assert_eq!(view_take(b), postcard_take(b));
    }

    // Arbitrary bytes that start like a change record.
    #[test]
    fn view_decoding_agrees_on_garbage(body in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut b = vec![6u8];
        b.extend_from_slice(&body);
        prop_assert_eq!(view_take(&b), postcard_take(&b));
    }

    // A change record made of varints of every length from 1 to 11 bytes
    // (continuation bits set on all but the last, which may overflow the
    // field's width), with or without padding after: the 8-bytes-at-once
    // decoding agrees with postcard's byte-by-byte one.
    #[test]
    fn view_decoding_agrees_on_varints_of_every_length(
        fields in prop::collection::vec((1usize..=11, any::<u64>(), any::<u8>()), 0..12),
        pad in 0usize..12,
    ) {
        let mut b = vec![6u8];
        for (len, bits, last) in fields {
            for i in 0..len - 1 {
                b.push(0x80 | (bits >> (7 * (i % 9))) as u8);
            }
            b.push(last & 0x7f);
        }
        b.resize(b.len() + pad, 0);
        prop_assert_eq!(view_take(&b), postcard_take(&b));
    }
}

#[test]
fn views_of_the_sample_are_its_records() {
    let (bytes, _) = sample_bytes(200);
    let reader = TraceReader::from_bytes(bytes, "sample.mwt").unwrap();
    let mut changes = 0;
    let mut buf = Vec::new();
    for info in reader.chunks() {
        let chunk = reader.decode_chunk_with(info, buf).unwrap();
        let records: Vec<Record<'_>> = chunk.records().map(Result::unwrap).collect();
        let views: Vec<RecordView<'_>> = chunk.views().map(Result::unwrap).collect();
        assert_eq!(
            views.iter().map(RecordView::to_record).collect::<Vec<_>>(),
            records
        );
        for v in &views {
            if let RecordView::Change(c) = v {
                changes += 1;
                assert_eq!(c.ranges.len(), c.ranges.iter().count());
                assert_eq!(
                    c.ranges.bytes_changed(),
                    c.ranges.iter().map(|r| r.new.len() as u64).sum::<u64>()
                );
            }
        }
        buf = chunk.into_buffer();
    }
    assert_eq!(changes, 6);
}

#[test]
fn a_change_cut_short_is_the_same_error_as_through_postcard() {
    let rec = Record::Change(Change {
        seq: 300,
        ctx: Context::default(),
        region: 1,
        ranges: vec![ByteRange {
            offset: 4,
            old: &[1, 2, 3, 4],
            new: &[5, 6, 7, 8],
        }],
    });
    let b = postcard::to_stdvec(&rec).unwrap();
    let cut = &b[..b.len() - 2];
    assert_eq!(
        take_view(cut).unwrap_err(),
        postcard::take_from_bytes::<Record<'_>>(cut).unwrap_err()
    );
}
