//! Golden traces written by earlier builds must keep reading. See
//! `format/tests/data/README.md` for how each was made.

use std::path::PathBuf;

use memwatch_format::*;

use crate::common::*;

/// This crate's directory. Read at run time (cargo sets it for `cargo
/// test`), since a test binary reused from a shared target dir may have
/// been compiled in another checkout.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn data(name: &str) -> PathBuf {
    manifest_dir().join("tests/data").join(name)
}

#[test]
fn v1_sample_reads_back_exactly() {
    let reader = TraceReader::open(data("v1-sample.mwt")).unwrap();
    assert_eq!(reader.header().version, 1);
    assert_eq!(reader.header().meta, sample::sample_meta());
    assert_eq!(reader.tail(), Tail::Closed);
    assert_eq!(reader.chunks().len(), 3);
    let (_, expected) = sample_bytes(256);
    assert_eq!(read_all(&reader).unwrap(), expected);
    let trailer = reader.trailer().unwrap();
    assert_eq!(trailer.records, expected.len() as u64);
    assert_eq!(trailer.last_seq, 11);
    assert_eq!(trailer.end_time_ns, 50_000);
}

#[test]
fn v2_sample_reads_back_exactly() {
    let reader = TraceReader::open(data("v2-sample.mwt")).unwrap();
    assert_eq!(reader.header().version, 2);
    assert_eq!(reader.tail(), Tail::Closed);
    let (_, expected) = sample_bytes_of(256, 2);
    let got = read_all(&reader).unwrap();
    assert_eq!(got, expected);
    assert!(
        got.contains(&r#"ObjectVariable(ObjectVariable { tag: 5, variable: Some("cfg") })"#.to_string()),
        "{got:#?}"
    );
}

#[test]
fn v3_sample_reads_back_exactly_and_its_deltas_expand_to_the_changes_they_stand_for() {
    let reader = TraceReader::open(data("v3-sample.mwt")).unwrap();
    assert_eq!(reader.header().version, 3);
    assert_eq!(reader.tail(), Tail::Closed);
    let (_, expected) = sample_bytes_of(256, 3);
    assert_eq!(read_all(&reader).unwrap(), expected);
    // Expanded in file order, the deltas are changes with old and new bytes.
    let mut ex = Expander::default();
    let mut changes = Vec::new();
    for info in reader.chunks() {
        let chunk = reader.decode_chunk(info).unwrap();
        let expanded = ex.expand(&chunk).unwrap();
        for rec in expanded.as_ref().unwrap_or(&chunk).records() {
            if let Record::Change(c) = rec.unwrap() {
                if c.region == 3 {
                    changes.push((
                        c.seq,
                        c.ranges
                            .iter()
                            .map(|r| (r.offset, f32s(r.old), f32s(r.new)))
                            .collect::<Vec<_>>(),
                    ));
                }
            }
        }
    }
    let (seq, ranges) = &changes[changes.len() - 2];
    let (offset, old, new) = &ranges[0];
    assert_eq!(
        (*offset, old.as_slice(), new.as_slice()),
        (8, &[0.5, 0.75][..], &[0.25, 1.5][..]),
        "seq {seq}"
    );
    let (_, last) = changes.last().unwrap();
    assert_eq!(last[0].0, 0);
    assert_eq!(last[0].2, vec![2.0; 16]);
    let mut before: Vec<f32> = (0..16).map(|i| i as f32 * 0.25).collect();
    before[2..4].copy_from_slice(&[0.25, 1.5]);
    assert_eq!(last[0].1, before);
    assert!(expected.iter().any(|r| r.starts_with("Waited(")), "{expected:#?}");
}

#[test]
fn v4_sample_reads_back_exactly_and_its_notes_name_the_op_of_the_change_after_them() {
    let reader = TraceReader::open(data("v4-sample.mwt")).unwrap();
    assert_eq!(reader.header().version, 4);
    assert_eq!(reader.tail(), Tail::Closed);
    let (_, expected) = sample_bytes_of(256, 4);
    assert_eq!(read_all(&reader).unwrap(), expected);
    // Each note is about the change right after it.
    let mut strings = std::collections::HashMap::new();
    let mut note: Option<Note> = None;
    let mut ops = Vec::new();
    let mut ex = Expander::default();
    for info in reader.chunks() {
        let chunk = reader.decode_chunk(info).unwrap();
        let expanded = ex.expand(&chunk).unwrap();
        for rec in expanded.as_ref().unwrap_or(&chunk).records() {
            match rec.unwrap() {
                Record::String(s) => {
                    strings.insert(s.id, s.value.to_string());
                }
                Record::Note(n) => note = Some(n),
                Record::Change(c) if c.region == 3 => {
                    let op = note
                        .take()
                        .filter(|n| n.seq == c.seq && strings[&n.key] == NOTE_OP)
                        .map(|n| strings[&n.value].clone());
                    ops.push((f32s(c.ranges[0].new), op));
                }
                _ => {}
            }
        }
    }
    let last: Vec<_> = ops[ops.len() - 3..].to_vec();
    assert_eq!(
        last,
        vec![
            (vec![3.0, 3.0], Some("aten::add_.Tensor".to_string())),
            (vec![6.0], Some("aten::mul_.Tensor".to_string())),
            (vec![0.5], None),
        ]
    );
    // The changes before version 4's have no note.
    assert!(ops[..ops.len() - 3].iter().all(|(_, op)| op.is_none()), "{ops:?}");
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn v1_sample_first_change_has_the_recorded_values() {
    let reader = TraceReader::open(data("v1-sample.mwt")).unwrap();
    let mut first = None;
    let mut strings = std::collections::HashMap::new();
    reader
        .for_each_record(|r| {
            match r {
                Record::String(s) => {
                    strings.insert(s.id, s.value.to_string());
                }
                Record::Change(c) if first.is_none() => {
                    let r0 = &c.ranges[0];
                    first = Some((c.seq, c.region, r0.offset, r0.old.to_vec(), r0.new.to_vec()));
                }
                _ => {}
            }
            Ok::<_, Error>(())
        })
        .unwrap();
    // Step 1 changes element 1 (1 * 0.25) by -0.125.
    let (seq, region, offset, old, new) = first.unwrap();
    assert_eq!((seq, region, offset), (3, 1, 4));
    assert_eq!(f32::from_le_bytes(old.try_into().unwrap()), 0.25);
    assert_eq!(f32::from_le_bytes(new.try_into().unwrap()), 0.125);
    assert_eq!(strings[&1], "MainThread");
}
