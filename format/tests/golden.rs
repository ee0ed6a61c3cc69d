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
    let (_, expected) = sample_bytes_of(256, true);
    let got = read_all(&reader).unwrap();
    assert_eq!(got, expected);
    assert!(
        got.contains(&r#"ObjectVariable(ObjectVariable { tag: 5, variable: Some("cfg") })"#.to_string()),
        "{got:#?}"
    );
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
