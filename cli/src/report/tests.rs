//! The unit tests of the report's parts: buckets, heatmaps, flat indices,
//! trajectories, `--element` parsing, the processes of a run, and the JSON
//! numbers and the page around the data.

use std::sync::Arc;

use memwatch_analyzer::RegionInfo;

use super::aggregate::Aggregate;
use super::args::{parse_element, ElementSpec};
use super::json::{num, short};
use super::limits::{BUCKETS, MAX_POINTS};
use super::page::page;
use super::stats::{flat_index, unflatten, Buckets, Heat, Point, Trajectory};

#[test]
fn buckets_double_their_width_and_keep_every_count() {
    let mut b = Buckets::new(10, 1);
    for x in 10..10 + BUCKETS as u64 {
        b.add(x, 2);
    }
    assert_eq!((b.width, b.changes[0], b.used()), (1, 1, BUCKETS));
    b.add(10 + BUCKETS as u64, 4);
    assert_eq!(b.width, 2);
    assert_eq!(b.changes[..3], [2, 2, 2]);
    assert_eq!(b.changes[BUCKETS / 2], 1);
    assert_eq!(b.bytes[BUCKETS / 2], 4);
    assert_eq!(b.changes.iter().sum::<u64>(), BUCKETS as u64 + 1);
    b.add(10 + 100 * BUCKETS as u64, 1);
    assert!(b.width >= 128, "{}", b.width);
    assert_eq!(b.changes.iter().sum::<u64>(), BUCKETS as u64 + 2);
    let mut c = Buckets::new(0, 1);
    c.add(5, 1);
    c.coarsen_to(b.width);
    assert_eq!((c.width, c.changes[0]), (b.width, 1));
}

#[test]
fn heat_bins_large_regions_and_counts_small_ones_exactly() {
    let mut h = Heat::new(&[4, 3], 12);
    assert_eq!((h.rows, h.cols, h.grid_rows, h.grid_cols), (4, 3, 4, 3));
    h.add(5, Some(0.5));
    h.add(5, Some(1.5));
    h.add(0, None);
    assert_eq!(h.counts[5], 2);
    assert_eq!(h.delta_sum[5] / h.delta_n[5] as f64, 1.0);
    assert_eq!((h.counts[0], h.delta_n[0]), (1, 0));
    assert_eq!(h.busiest(), Some(5));
    assert!(!h.is_binned());
    // A million elements in one row: 512 cells of 1954 elements.
    let mut big = Heat::new(&[1_000_000], 1_000_000);
    assert_eq!((big.grid_rows, big.grid_cols, big.cell_cols), (1, 512, 1954));
    assert!(big.exact.is_none() && big.is_binned());
    big.add(999_999, Some(1.0));
    big.add(1954 * 3 + 7, Some(1.0));
    big.add(1954 * 3 + 8, Some(1.0));
    assert_eq!(big.counts[511], 1);
    assert_eq!(big.counts[3], 2);
    assert_eq!(big.busiest(), Some(1954 * 3 + 8));
    // More dimensions are rows of the last one.
    let h3 = Heat::new(&[2, 500, 7], 7000);
    assert_eq!((h3.rows, h3.cols, h3.cell_rows, h3.cell_cols), (1000, 7, 11, 1));
    assert_eq!((h3.grid_rows, h3.grid_cols), (91, 7));
}

fn region(shape: Vec<u64>, strides: Vec<i64>, origin: u64) -> RegionInfo {
    RegionInfo {
        region: 1,
        tag: Arc::from("w"),
        variable: None,
        address: 0,
        len: 4 * shape.iter().product::<u64>(),
        dtype: Some(Arc::from("<f4")),
        itemsize: 4,
        shape,
        strides,
        origin,
        watched_seq: 1,
        unwatched_seq: None,
    }
}

#[test]
fn flat_indices_follow_strides() {
    let c = region(vec![3, 4], vec![], 0);
    assert_eq!(flat_index(&c, 0), Some(0));
    assert_eq!(flat_index(&c, 4 * 6), Some(6));
    assert_eq!(flat_index(&c, 4 * 12), None);
    assert_eq!(flat_index(&c, 2), None);
    // A transpose of a 4x3 array: element [i, j] at 4 * (j * 3 + i).
    let t = region(vec![3, 4], vec![4, 12], 0);
    assert_eq!(flat_index(&t, 4 * (2 * 3 + 1)), Some(4 + 2));
    // Reversed: element [i] at origin - 4 i.
    let r = region(vec![5], vec![-4], 16);
    assert_eq!(flat_index(&r, 16), Some(0));
    assert_eq!(flat_index(&r, 4), Some(3));
    assert_eq!(unflatten(6, &[3, 4]), vec![1, 2]);
    assert_eq!(unflatten(6, &[]), vec![6]);
}

#[test]
fn trajectories_decimate_and_keep_the_last_change() {
    let mut tr = Trajectory::new(0, 0, vec![0], false);
    let n = 3 * MAX_POINTS as u64 + 3;
    for i in 0..n {
        tr.push(
            i as f64 - 1.0,
            Point {
                seq: i,
                time_ns: i,
                value: i as f64,
                line: 0,
            },
        );
    }
    assert_eq!(tr.initial, Some(-1.0));
    assert_eq!(tr.changes, n);
    assert_eq!(tr.every, 4);
    let pts = tr.finished_points();
    assert!(pts.len() <= MAX_POINTS + 1, "{}", pts.len());
    assert!(pts.iter().take(pts.len() - 1).all(|p| p.seq % 4 == 0));
    assert_eq!(pts.last().unwrap().seq, n - 1);
}

#[test]
fn elements_parse_as_tag_and_index() {
    let e = |tag: &str, index: Vec<u64>| ElementSpec {
        tag: tag.into(),
        index,
    };
    assert_eq!(parse_element("w:0,1"), Ok(e("w", vec![0, 1])));
    assert_eq!(parse_element("w:[0, 1]"), Ok(e("w", vec![0, 1])));
    assert_eq!(
        parse_element("model.fc:weight:7"),
        Ok(e("model.fc:weight", vec![7]))
    );
    assert!(parse_element(":3").unwrap_err().contains("no tag"));
    assert!(parse_element("w:x").unwrap_err().contains("whole numbers"));
    assert!(parse_element("w:").unwrap_err().contains("whole numbers"));
    assert!(parse_element("w").unwrap_err().contains("TAG:INDEX"));
}

#[test]
fn each_process_of_a_run_has_its_own_tags_on_the_runs_clock() {
    let mut agg = Aggregate::new(None, 0);
    agg.several = true;
    agg.begin(10, None, 0);
    let a = agg.tag_index("w", None);
    agg.saw(7);
    agg.begin(11, Some(1), 100);
    let b = agg.tag_index("w", None);
    agg.saw(5);
    // The same tag in two processes: two tags, each labelled with its process.
    assert_ne!(a, b);
    assert_eq!(agg.tag_index("w", None), b);
    assert_eq!((agg.tags[a].proc, agg.tags[b].proc), (0, 1));
    assert_eq!(agg.tag_label(a), "w (pid 10)");
    assert_eq!(agg.tag_label(b), "w (pid 11, rank 1)");
    assert_eq!(agg.procs.iter().map(|p| p.pid).collect::<Vec<_>>(), [10, 11]);
    // Each process's last event on its own clock; the run's on the run's.
    assert_eq!(
        (agg.procs[0].last_ns, agg.procs[1].last_ns, agg.last_ns),
        (7, 5, 105)
    );
    agg.several = false;
    assert_eq!(agg.tag_label(b), "w");
}

#[test]
fn json_numbers_stay_json() {
    assert_eq!(num(f64::NAN, false), "\"nan\"");
    assert_eq!(num(f64::NEG_INFINITY, true), "\"-inf\"");
    assert_eq!(num(f64::from(0.1f32), true), "0.1");
    assert_eq!(num(0.25, false), "0.25");
    assert_eq!(short(0.0), "0");
    assert_eq!(short(1.0), "1e0");
    assert_eq!(short(0.000123456), "1.235e-4");
    let p = page("a <b>", "{\"x\":1}");
    assert!(p.contains("<title>a &lt;b&gt;</title>"));
    assert!(p.contains("{\"x\":1}"));
    assert!(!p.contains("{{DATA}}") && !p.contains("/*{{JS}}*/"));
}
