//! Unit tests of the engine: the diffs on made-up regions and store events,
//! whole checks through [`Engine`] (compare and page tracking; a test of
//! page tracking returns early where the kernel lacks userfaultfd
//! write-protect), layouts and view masks.
//!
//! Single-threaded, no locks; nothing here runs in signal context (the
//! store events are built by hand).

use std::sync::Arc;

use super::diff::{bulk_diff, element_runs, store_diff};
use super::*;
use crate::mem::signals::Event;

fn region(buf: &mut [u8], itemsize: u32) -> Region {
    Region {
        id: 1,
        tag: "t".into(),
        variable: None,
        start: buf.as_ptr() as u64,
        len: buf.len() as u64,
        layout: Layout {
            dtype: None,
            itemsize,
            shape: vec![],
            strides: vec![],
            origin: 0,
        },
        mask: None,
        shadow: Arc::new(vec![]),
        spare: None,
        tracking: Tracking::Compare,
        tracking_note: None,
    }
}

fn event(addr: u64, old: &[u8], new: &[u8]) -> Event {
    let mut e = Event {
        order: 1,
        time_ns: 0,
        tid: 1,
        addr,
        len: crate::mem::signals::WINDOW as u32,
        old: [0; crate::mem::signals::WINDOW],
        new: [0; crate::mem::signals::WINDOW],
    };
    e.old.copy_from_slice(old);
    e.new.copy_from_slice(new);
    e
}

#[test]
fn a_store_window_straddling_the_region_reports_exactly_its_bytes() {
    // The window starts 0x30 bytes before the region and ends past it.
    let mut buf = vec![0u8; 64];
    let mut r = region(&mut buf, 1);
    r.shadow = Arc::new(vec![0; 64]);
    let base = r.start;
    let (old, mut new) = (vec![0u8; 128], vec![0u8; 128]);
    new[0x30..0x33].copy_from_slice(&[0xab; 3]);
    new[0x10] = 9; // outside the region: ignored
    let got = store_diff(&mut r, &event(base - 0x30, &old, &new)).expect("consistent");
    assert_eq!(plain(&got), vec![(0, vec![0; 3], vec![0xab; 3])]);
    assert_eq!(&r.shadow[..4], &[0xab, 0xab, 0xab, 0]);
    // An element straddling the window's end takes its other bytes
    // from the shadow.
    let mut big = vec![0u8; 256];
    let mut r4 = region(&mut big, 4);
    let mut shadow = vec![0u8; 256];
    shadow[130] = 7;
    r4.shadow = Arc::new(shadow);
    let (old, mut new) = (vec![0u8; 128], vec![0u8; 128]);
    new[127] = 1; // region byte 129, in element 128..132
    let ev = event(r4.start + 2, &old, &new);
    let got = store_diff(&mut r4, &ev).expect("consistent");
    assert_eq!(plain(&got), vec![(128, vec![0, 0, 7, 0], vec![0, 1, 7, 0])]);
}

#[test]
fn a_store_whose_old_bytes_are_not_the_shadow_changes_nothing() {
    // The store says 5 -> 6, but 4 was reported last: the page is
    // diffed instead, so that the chain of values stays whole.
    let mut buf = vec![0u8; 64];
    let mut r = region(&mut buf, 1);
    let mut shadow = vec![0u8; 64];
    shadow[0] = 4;
    r.shadow = Arc::new(shadow);
    let (mut old, mut new) = (vec![0u8; 128], vec![0u8; 128]);
    (old[0], new[0]) = (5, 6);
    let ev = event(r.start, &old, &new);
    assert!(store_diff(&mut r, &ev).is_none());
    assert_eq!(r.shadow[0], 4);
}

fn plain(r: &[ChangedRange]) -> Vec<(u64, Vec<u8>, Vec<u8>)> {
    r.iter().map(|(o, a, b)| (*o, a.to_vec(), b.to_vec())).collect()
}

#[test]
fn byte_changes_are_exact() {
    let mut buf = vec![0u8; 100];
    let mut e = Engine::default();
    e.add(region(&mut buf, 1));
    buf[3] = 1;
    buf[4] = 2;
    buf[50] = 9;
    let mut out = Vec::new();
    e.check(&mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(
        plain(&out[0].ranges),
        vec![(3, vec![0, 0], vec![1, 2]), (50, vec![0], vec![9])]
    );
    out.clear();
    e.check(&mut out).unwrap();
    assert!(out.is_empty(), "a second check sees nothing new");
}

#[test]
fn changes_align_to_elements() {
    let mut buf = vec![0u8; 16];
    let mut e = Engine::default();
    e.add(region(&mut buf, 4));
    buf[5] = 0xff; // inside element 1
    let mut out = Vec::new();
    e.check(&mut out).unwrap();
    assert_eq!(plain(&out[0].ranges), vec![(4, vec![0; 4], vec![0, 0xff, 0, 0])]);
}

#[test]
fn runs_are_exact_elements_even_inside_a_changed_block() {
    let mut buf = vec![0u8; 4096];
    let mut e = Engine::default();
    e.add(region(&mut buf, 4));
    // Every element changes but element 2 and the last one.
    for (i, x) in buf.chunks_exact_mut(4).enumerate() {
        if i != 2 && i != 1023 {
            x.copy_from_slice(&(i as u32 + 1).to_le_bytes());
        }
    }
    let mut out = Vec::new();
    e.check(&mut out).unwrap();
    let spans: Vec<(u64, usize)> = out[0].ranges.iter().map(|r| (r.0, r.1.len())).collect();
    assert_eq!(spans, vec![(0, 8), (12, 4092 - 12)]);
    assert_eq!(&out[0].ranges[1].2[..4], &4u32.to_le_bytes());
}

#[test]
fn large_rewrites_go_through_snapshots_and_small_writes_after_them_still_count() {
    let mut buf = vec![1u8; 4 << 20];
    let mut e = Engine::default();
    let tracking = e.add(region(&mut buf, 4)).tracking;
    if e.backend().is_err() {
        return; // no userfaultfd write-protect here: covered by the compare path
    }
    assert_eq!(tracking, Tracking::Pages);
    for (i, x) in buf.iter_mut().enumerate() {
        if i % 4096 != 0 {
            *x = 2;
        }
    }
    let mut out = Vec::new();
    e.check(&mut out).unwrap();
    let r = &out[0].ranges;
    assert!(
        matches!(r[0].1, Bytes::Shared(..)),
        "a bulk diff shares the snapshots"
    );
    assert_eq!(
        (r[0].0, r[0].1[0], r[0].2[0]),
        (0, 1, 1),
        "element 0 keeps byte 0 but changes"
    );
    assert_eq!(&r[0].2[1..4], &[2, 2, 2]);
    let changed: usize = r.iter().map(|x| x.1.len()).sum();
    assert_eq!(changed, 4 << 20);
    // While the change is alive, a small write copies the shared shadow.
    buf[8] = 9;
    let mut out2 = Vec::new();
    e.check(&mut out2).unwrap();
    assert_eq!(
        plain(&out2[0].ranges),
        vec![(8, vec![2, 2, 2, 2], vec![9, 2, 2, 2])]
    );
    assert_eq!(
        out[0].ranges[0].2[8], 2,
        "the earlier change still shows its own new bytes"
    );
    drop(out);
    for x in buf.iter_mut() {
        *x = 3;
    }
    let mut out3 = Vec::new();
    e.check(&mut out3).unwrap();
    let changed: usize = out3[0].ranges.iter().map(|x| x.1.len()).sum();
    assert_eq!(changed, 4 << 20);
    assert!(out3[0]
        .ranges
        .iter()
        .all(|(_, a, b)| a.iter().all(|&v| v != 3) && b.iter().all(|&v| v == 3)));
    e.remove(1);
}

#[test]
fn strided_regions_ignore_their_gaps() {
    let mut buf = vec![0u8; 40];
    let mut r = region(&mut buf, 4);
    r.layout.shape = vec![5];
    r.layout.strides = vec![8];
    r.mask = view_mask(&r.layout, 36);
    r.len = 36;
    let mut e = Engine::default();
    e.add(r);
    buf[4] = 1; // gap
    buf[9] = 2; // element 1
    let mut out = Vec::new();
    e.check(&mut out).unwrap();
    assert_eq!(plain(&out[0].ranges), vec![(8, vec![0; 4], vec![0, 2, 0, 0])]);
    out.clear();
    e.check(&mut out).unwrap();
    assert!(out.is_empty());
}

#[test]
fn index_of_handles_c_order_and_strides() {
    let l = Layout {
        dtype: Some("<f4".into()),
        itemsize: 4,
        shape: vec![2, 3],
        strides: vec![],
        origin: 0,
    };
    assert_eq!(l.index_of(4 * 4), Some(vec![1, 1]));
    // A view a[::2] of 10 float32: shape [5], stride 8.
    let v = Layout {
        strides: vec![8],
        shape: vec![5],
        ..l.clone()
    };
    assert_eq!(v.index_of(16), Some(vec![2]));
    assert_eq!(v.index_of(20), None, "byte 20 belongs to no element of the view");
    // Reversed: a[::-1] of 4 float32: origin 12, stride -4.
    let r = Layout {
        strides: vec![-4],
        shape: vec![4],
        origin: 12,
        ..l
    };
    assert_eq!(r.index_of(0), Some(vec![3]));
    assert_eq!(r.index_of(12), Some(vec![0]));
}

#[test]
fn masks_leave_out_gaps_of_a_strided_view() {
    let l = Layout {
        dtype: Some("<i2".into()),
        itemsize: 2,
        shape: vec![3],
        strides: vec![4],
        origin: 0,
    };
    let mask = view_mask(&l, 10).unwrap();
    let bits: Vec<bool> = (0..10).map(|b| mask[0] >> b & 1 == 1).collect();
    assert_eq!(
        bits,
        [true, true, false, false, true, true, false, false, true, true]
    );
}

/// The tests' oracle: maximal runs of `n`-byte elements that differ,
/// found one element at a time (deliberately not `element_runs`).
fn plain_runs(x: &[u8], y: &[u8], n: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut a = 0;
    while a < x.len() {
        let b = (a + n).min(x.len());
        if x[a..b] != y[a..b] {
            match out.last_mut() {
                Some((_, e)) if *e == a => *e = b,
                _ => out.push((a, b)),
            }
        }
        a = b;
    }
    out
}

/// `bulk_diff` reports the region's maximal runs of changed elements,
/// for any itemsize, with the old and new bytes of each, and leaves the
/// current contents as the shadow.
#[test]
fn bulk_diff_reports_maximal_runs_of_changed_elements() {
    const BULK_BLOCK: usize = 256 << 10;
    for itemsize in [1usize, 4, 12] {
        let len = (3 * BULK_BLOCK + 1000) / itemsize * itemsize;
        let old: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut buf = old.clone();
        let block = (BULK_BLOCK / itemsize).max(1) * itemsize;
        // Runs of a few elements at and around 256 KiB boundaries, and
        // scattered single elements.
        let mut touch = |a: usize, b: usize| {
            for x in &mut buf[a * itemsize..b * itemsize] {
                *x = x.wrapping_add(1);
            }
        };
        let e = |bytes: usize| bytes / itemsize;
        touch(e(block) - 5, e(block) + 7);
        touch(e(2 * block) - 3, e(2 * block));
        touch(e(3 * block), e(3 * block) + 2);
        for k in (0..e(len)).step_by(9973) {
            touch(k, k + 1);
        }
        let expected = plain_runs(&buf, &old, itemsize);
        let mut r = region(&mut buf, itemsize as u32);
        r.shadow = Arc::new(old.clone());
        let mut ranges = Vec::new();
        bulk_diff(&mut r, &[(0, len)], &mut ranges);
        let got: Vec<(usize, usize)> = ranges
            .iter()
            .map(|(off, o, n)| {
                assert_eq!(o.len(), n.len());
                (*off as usize, *off as usize + n.len())
            })
            .collect();
        assert_eq!(got, expected, "itemsize {itemsize}");
        for (off, o, n) in &ranges {
            let a = *off as usize;
            assert_eq!(&o[..], &old[a..a + o.len()]);
            assert_eq!(&n[..], &buf[a..a + n.len()]);
        }
        assert_eq!(r.shadow.as_slice(), buf.as_slice());
    }
}

/// The block-skipping `element_runs` against element-by-element
/// comparing, on arrays with every density of change (none, sparse,
/// long runs, all) and lengths that end mid-block and mid-element.
#[test]
fn element_runs_match_a_plain_element_by_element_compare() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for itemsize in [1usize, 2, 3, 4, 8, 16] {
        for len in [0usize, 1, 7, 31, 32, 33, 64, 200, 1000, 4099] {
            for density in [0u64, 1, 20, 60, 95, 100] {
                let x: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
                let mut y = x.clone();
                let mut k = 0;
                while k < len {
                    // Runs of changed elements of random length.
                    let run = 1 + (rand() % 40) as usize;
                    let change = rand() % 100 < density;
                    for i in k..(k + run * itemsize).min(len) {
                        if change {
                            // Sometimes only one byte of an element.
                            if rand() % 3 != 0 || i % itemsize == 0 {
                                y[i] = x[i].wrapping_add(1 + (rand() % 255) as u8);
                            }
                        }
                    }
                    k += run * itemsize;
                }
                assert_eq!(
                    element_runs(&x, &y, itemsize),
                    plain_runs(&x, &y, itemsize),
                    "itemsize {itemsize} len {len} density {density}"
                );
            }
        }
    }
}
