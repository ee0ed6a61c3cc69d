//! The analyzer on the synthetic sample trace: state from checkpoints,
//! blame, filters and export.

use std::ops::ControlFlow;

use memwatch_analyzer::*;
use memwatch_format::{sample, TraceReader, TraceWriter, WriterOptions};

fn sample_trace() -> TraceReader {
    let opts = WriterOptions {
        chunk_bytes: 160,
        ..WriterOptions::default()
    };
    let mut w = TraceWriter::new(Vec::new(), "sample.mwt", &sample::sample_meta(), opts).unwrap();
    sample::write_sample(&mut w).unwrap();
    let (bytes, _) = w.finish(50_000).unwrap();
    TraceReader::from_bytes(bytes, "sample.mwt").unwrap()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The sample's weights after `steps` updates (see `format/src/sample.rs`).
fn weights_after(steps: u64) -> Vec<f32> {
    let mut w: Vec<f32> = (0..16).map(|i| i as f32 * 0.25).collect();
    for step in 1..=steps {
        for (i, x) in w.iter_mut().enumerate() {
            if i % 3 == (step as usize) % 3 {
                *x -= 0.125 * step as f32;
            }
        }
    }
    w
}

#[test]
fn state_at_each_point_matches_the_sample() {
    let r = sample_trace();
    assert_eq!(seq_bounds(&r), Some((1, 11)));
    // Seqs 3, 5 and 8 are the three weight updates.
    for (at, steps) in [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (7, 2), (8, 3), (11, 3)] {
        let st = state(&r, "layer1_weight", Some(at)).unwrap();
        assert_eq!(f32s(&st.data), weights_after(steps), "at seq {at}");
    }
    // After the checkpoint at seq 6, the rebuild starts there.
    let st = state(&r, "layer1_weight", Some(8)).unwrap();
    assert_eq!((st.from_snapshot, st.replayed), (6, 1));
    let st = state(&r, "layer1_weight", Some(4)).unwrap();
    assert_eq!((st.from_snapshot, st.replayed), (1, 1));
    let step = state(&r, "step", None).unwrap();
    assert_eq!(u64::from_le_bytes(step.data.try_into().unwrap()), 3);
}

#[test]
fn state_errors_name_the_problem() {
    let r = sample_trace();
    let e = state(&r, "nope", None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the trace has no tag \"nope\"; its tags are: config, layer1_weight, step"
    );
    let e = state(&r, "step", Some(99)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "seq 99 is out of range: the trace's events run from seq 1 to 11"
    );
    let e = state(&r, "step", Some(1)).unwrap_err();
    assert!(e.to_string().contains("was first watched at seq 2"), "{e}");
}

#[test]
fn blame_finds_the_last_writer_of_an_element() {
    let r = sample_trace();
    let region = state(&r, "layer1_weight", None).unwrap().region;
    // Element [0, 1] (flat 1) changes at step 1 only (1 % 3 == 1).
    let (a, b) = element_bytes(&region, &[0, 1]).unwrap();
    assert_eq!((a, b), (4, 8));
    let writes = writes_to(&r, "layer1_weight", a, b, None).unwrap();
    assert_eq!(writes.iter().map(|w| w.seq).collect::<Vec<_>>(), vec![3]);
    assert_eq!(writes[0].frame.as_ref().unwrap().line, 52);
    // Flat indices work too, and out-of-shape ones are refused.
    assert_eq!(element_bytes(&region, &[5]).unwrap(), (20, 24));
    assert!(element_bytes(&region, &[4, 0]).is_err());
}

#[test]
fn filters_select_by_line_thread_and_seq() {
    let r = sample_trace();
    let collect = |f: Filter| {
        let mut seqs = Vec::new();
        for_each_change(&r, &f, |row| {
            seqs.push(row.seq);
            ControlFlow::Continue(())
        })
        .unwrap();
        seqs
    };
    assert_eq!(collect(Filter::default()), vec![3, 4, 5, 6, 7, 8, 9]);
    let by_line = Filter {
        file: Some("train.py".into()),
        line: Some(55),
        ..Filter::default()
    };
    assert_eq!(collect(by_line), vec![4, 6, 9]);
    let by_thread = Filter {
        thread: Some("loader-1".into()),
        ..Filter::default()
    };
    assert_eq!(collect(by_thread), vec![7]);
    let by_seq = Filter {
        seq: Some((5, 7)),
        tag: Some("layer1_weight".into()),
        ..Filter::default()
    };
    assert_eq!(collect(by_seq), vec![5]);
}

#[test]
fn export_writes_one_row_per_change_or_element() {
    let r = sample_trace();
    let dir = std::env::temp_dir().join(format!("memwatch-analyzer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("c.csv");
    let n = export(
        &r,
        &csv,
        ExportFormat::Csv,
        Granularity::Change,
        &Filter::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(n, 7);
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().next().unwrap(), COLUMNS.join(","));
    let obj = text.lines().find(|l| l.contains(",setattr,")).unwrap();
    assert!(obj.ends_with(",lr,0.125,0.0625"), "{obj}");
    let el = dir.join("e.jsonl");
    let filter = Filter {
        tag: Some("layer1_weight".into()),
        ..Filter::default()
    };
    let n = export(
        &r,
        &el,
        ExportFormat::Jsonl,
        Granularity::Element,
        &filter,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(n, 5 + 5 + 6);
    let first = std::fs::read_to_string(&el)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(first.contains("\"index\":\"0,1\""), "{first}");
    assert!(
        first.contains("\"old_value\":0.25,\"new_value\":0.125"),
        "{first}"
    );
    let pq = dir.join("c.parquet");
    let n = export(
        &r,
        &pq,
        ExportFormat::Parquet,
        Granularity::Change,
        &Filter::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(n, 7);
    assert_eq!(&std::fs::read(&pq).unwrap()[..4], b"PAR1");
    std::fs::remove_dir_all(&dir).unwrap();
}
