//! `memwatch export --format perfetto`: the JSON loads, and its events
//! agree with the trace's changes (`memwatch query` is the oracle).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use memwatch_format::{
    ByteRange, Change, Context, Layout, Meta, ObjectChange, ObjectChangeKind, Record, RegionUnwatched,
    RegionWatched, TraceWriter, UnwatchReason, WriterOptions,
};
use serde_json::Value;

fn memwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memwatch"))
        .args(args)
        .output()
        .expect("run memwatch")
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memwatch-perfetto-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn golden_v3() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.join("../format/tests/data/v3-sample.mwt")
}

/// Exports `trace` (with `extra` arguments) and loads the JSON.
fn export(trace: &Path, extra: &[&str]) -> Value {
    let out_path = tmp(&format!(
        "{}{}.json",
        trace.file_stem().unwrap().to_string_lossy(),
        extra.join("_").replace(['-', '.'], "")
    ));
    let mut args = vec!["export", trace.to_str().unwrap(), "--format", "perfetto", "-o"];
    args.push(out_path.to_str().unwrap());
    args.extend_from_slice(extra);
    let out = memwatch(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("wrote "), "{}", text(&out.stdout));
    let json = std::fs::read_to_string(&out_path).unwrap();
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}\n{json}"))
}

/// The changes `memwatch query` lists: (seq, tag, thread, line).
fn query(trace: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["query", trace.to_str().unwrap(), "--format", "jsonl"];
    args.extend_from_slice(extra);
    let out = memwatch(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn events(v: &Value) -> &Vec<Value> {
    v["traceEvents"].as_array().expect("traceEvents is an array")
}

fn of<'a>(v: &'a Value, ph: &str, cat: Option<&str>) -> Vec<&'a Value> {
    events(v)
        .iter()
        .filter(|e| e["ph"] == ph && cat.is_none_or(|c| e["cat"] == c))
        .collect()
}

fn ts_ns(e: &Value) -> u64 {
    // Microseconds with three decimals: the nanoseconds, exactly.
    (e["ts"].as_f64().unwrap() * 1000.0).round() as u64
}

#[test]
fn the_golden_trace_exports_an_event_per_change_on_its_threads_track() {
    let trace = golden_v3();
    let v = export(&trace, &[]);
    assert_eq!(v["displayTimeUnit"], "ns");
    assert_eq!(v["metadata"]["pid"], 4242);
    assert_eq!(v["metadata"]["ending"], "closed");
    let rows = query(&trace, &[]);
    let changes = of(&v, "i", Some("change"));
    assert_eq!(changes.len(), rows.len());
    assert_eq!(v["metadata"]["changes"], rows.len());
    assert_eq!(v["metadata"]["events"], events(&v).len());
    for (e, row) in changes.iter().zip(&rows) {
        assert_eq!(e["s"], "t");
        assert_eq!(e["pid"], 4242);
        assert_eq!(e["tid"], row["thread"]);
        assert_eq!(e["args"]["seq"], row["seq"]);
        assert_eq!(e["args"]["kind"], row["kind"]);
        assert_eq!(ts_ns(e), row["time_ns"].as_u64().unwrap());
        let file = row["file"].as_str().unwrap().rsplit('/').next().unwrap();
        assert_eq!(
            e["name"],
            format!("{} {file}:{}", row["tag"].as_str().unwrap(), row["line"])
        );
    }
    // The first change of layer1_weight: 4 of its 16 float32 elements,
    // the first [0, 1] 0.25 -> 0.125.
    let first = &changes[0]["args"];
    assert_eq!(first["tag"], "layer1_weight");
    assert_eq!(
        (&first["elements_changed"], &first["bytes_changed"]),
        (&Value::from(5), &Value::from(20))
    );
    assert_eq!(
        (&first["index"], &first["old"], &first["new"]),
        (&"[0, 1]".into(), &"0.25".into(), &"0.125".into())
    );
    assert_eq!(first["function"], "step");
    // The object change: its key and reprs.
    let obj = changes.iter().find(|e| e["args"]["kind"] == "setattr").unwrap();
    assert_eq!(
        (&obj["args"]["key"], &obj["args"]["old"]),
        (&"lr".into(), &"0.125".into())
    );
    assert_eq!(obj["tid"], 101);

    // A track per thread, named.
    let names: BTreeMap<u64, &str> = of(&v, "M", None)
        .iter()
        .filter(|e| e["name"] == "thread_name")
        .map(|e| (e["tid"].as_u64().unwrap(), e["args"]["name"].as_str().unwrap()))
        .collect();
    assert_eq!(names, BTreeMap::from([(100, "MainThread"), (101, "loader-1")]));
    let process = of(&v, "M", None)
        .into_iter()
        .find(|e| e["name"] == "process_name")
        .unwrap();
    assert_eq!(process["args"]["name"], "python samples/train.py");

    // A counter per tag, ending at its number of changes and bytes.
    let mut last: HashMap<&str, &Value> = HashMap::new();
    for c in of(&v, "C", None) {
        last.insert(c["name"].as_str().unwrap(), &c["args"]);
    }
    let mut want: HashMap<&str, (u64, u64)> = HashMap::new();
    for row in &rows {
        let w = want.entry(row["tag"].as_str().unwrap()).or_default();
        w.0 += 1;
        w.1 += row["bytes_changed"].as_u64().unwrap_or(0);
    }
    assert_eq!(last.len(), want.len());
    for (tag, (n, b)) in want {
        assert_eq!(
            (&last[tag]["changes"], &last[tag]["bytes"]),
            (&n.into(), &b.into()),
            "{tag}"
        );
    }

    // Regions watched and unwatched, and the end.
    let regions: Vec<String> = of(&v, "i", Some("region"))
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        regions,
        [
            "watch layer1_weight",
            "watch step",
            "unwatch step",
            "unwatch layer1_weight",
            "watch layer2_weight"
        ]
    );
    let ends: Vec<&str> = of(&v, "i", Some("recording"))
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(ends, ["recording started", "recording closed"]);
}

#[test]
fn tag_and_seq_filters_choose_the_events() {
    let trace = golden_v3();
    let v = export(&trace, &["--tag", "step"]);
    let rows = query(&trace, &["--tag", "step"]);
    let changes = of(&v, "i", Some("change"));
    assert!(!rows.is_empty());
    assert_eq!(changes.len(), rows.len());
    assert!(changes.iter().all(|e| e["args"]["tag"] == "step"));
    assert!(of(&v, "C", None).iter().all(|e| e["name"] == "step"));
    let regions: Vec<&str> = of(&v, "i", Some("region"))
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(regions, ["watch step", "unwatch step"]);
    assert_eq!(v["metadata"]["tag"], "step");

    let v = export(&trace, &["--seq", "4..6"]);
    let seqs: Vec<u64> = of(&v, "i", Some("change"))
        .iter()
        .map(|e| e["args"]["seq"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = query(&trace, &["--seq", "4..6"])
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, want);
}

/// A trace of two threads taking turns, with names that need escaping.
fn two_threads(path: &Path) -> u64 {
    let meta = Meta {
        pid: 777,
        argv: vec!["python".into(), "two \"threads\".py".into()],
        ..Meta::default()
    };
    let opts = WriterOptions {
        chunk_bytes: 4000,
        ..WriterOptions::default()
    };
    let mut w = TraceWriter::new(Vec::new(), path, &meta, opts).unwrap();
    let tag = "we\"ird\\tag\n";
    let main = w.intern_str("MainThread").unwrap();
    let worker = w.intern_str("wörker\t1").unwrap();
    let ctx = |time_ns, thread, thread_name, frame| Context {
        time_ns,
        thread,
        thread_name,
        frame,
        stack: 0,
    };
    let f0 = w.intern_frame("/src/two.py", "<module>", 3).unwrap();
    w.append(&Record::RegionWatched(RegionWatched {
        seq: 1,
        ctx: ctx(100, 777, main, f0),
        region: 1,
        tag,
        variable: Some("buf"),
        address: 0x1000,
        len: 64,
        layout: Layout::default(),
    }))
    .unwrap();
    w.append_contents(1, 1, &[0; 64]).unwrap();
    let obj = w.intern_str("cfg").unwrap();
    let mut seq = 1;
    let mut changes = 0;
    let mut bytes = [0u8; 64];
    for i in 0..600u64 {
        seq += 1;
        let (thread, name, line) = if i % 3 == 0 {
            (778, worker, 20)
        } else {
            (777, main, 10)
        };
        let frame = w.intern_frame("/src/two.py", "work", line).unwrap();
        let at = (i % 64) as usize;
        let old = [bytes[at]];
        bytes[at] = bytes[at].wrapping_add(1);
        let new = [bytes[at]];
        if i % 50 == 49 {
            w.append(&Record::ObjectChange(ObjectChange {
                seq,
                ctx: ctx(1000 + i * 1001, thread, name, frame),
                tag: obj,
                kind: ObjectChangeKind::SetItem,
                key: Some("['k']"),
                old: Some("'a\"b'"),
                new: Some("'c\\\\d'"),
            }))
            .unwrap();
            bytes[at] = old[0];
        } else {
            w.append(&Record::Change(Change {
                seq,
                ctx: ctx(1000 + i * 1001, thread, name, frame),
                region: 1,
                ranges: vec![ByteRange {
                    offset: at as u64,
                    old: &old,
                    new: &new,
                }],
            }))
            .unwrap();
        }
        changes += 1;
    }
    seq += 1;
    w.append(&Record::RegionUnwatched(RegionUnwatched {
        seq,
        ctx: ctx(2_000_000, 777, main, f0),
        region: 1,
        reason: UnwatchReason::Collected,
    }))
    .unwrap();
    let (bytes, _) = w.finish(2_000_500).unwrap();
    std::fs::write(path, bytes).unwrap();
    changes
}

#[test]
fn two_threads_get_two_tracks_in_time_order_and_strings_survive_escaping() {
    let path = tmp("two.mwt");
    let n = two_threads(&path);
    let v = export(&path, &[]);
    let changes = of(&v, "i", Some("change"));
    assert_eq!(changes.len() as u64, n);
    let mut per_thread: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for e in &changes {
        per_thread
            .entry(e["tid"].as_u64().unwrap())
            .or_default()
            .push(ts_ns(e));
    }
    assert_eq!(per_thread.keys().copied().collect::<Vec<_>>(), [777, 778]);
    assert_eq!(per_thread[&778].len(), 200);
    for ts in per_thread.values() {
        assert!(ts.windows(2).all(|w| w[0] < w[1]));
    }
    // Nanosecond times survive as fractional microseconds.
    assert_eq!(ts_ns(changes[1]), 1000 + 1001);
    let tag = "we\"ird\\tag\n";
    assert_eq!(changes[0]["args"]["tag"], tag);
    assert_eq!(changes[0]["name"], format!("{tag} two.py:20"));
    let names: Vec<&str> = of(&v, "M", None)
        .iter()
        .filter(|e| e["name"] == "thread_name")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["MainThread", "wörker\t1"]);
    let obj = changes.iter().find(|e| e["args"]["tag"] == "cfg").unwrap();
    assert_eq!(
        (&obj["args"]["old"], &obj["args"]["new"]),
        (&"'a\"b'".into(), &"'c\\\\d'".into())
    );
    let unwatch = of(&v, "i", Some("region"))
        .into_iter()
        .find(|e| e["name"] != format!("watch {tag}"))
        .unwrap();
    assert_eq!(unwatch["args"]["reason"], "collected");
    assert_eq!(v["metadata"]["argv"][1], "two \"threads\".py");
    let end = of(&v, "i", Some("recording")).pop().unwrap();
    assert_eq!(
        (&end["name"], ts_ns(end)),
        (&"recording closed".into(), 2_000_500)
    );
}

#[test]
fn a_cut_trace_ends_not_closed_and_bad_requests_are_refused() {
    let whole = tmp("whole.mwt");
    two_threads(&whole);
    let full = std::fs::read(&whole).unwrap();
    let cut = tmp("cut.mwt");
    std::fs::write(&cut, &full[..full.len() - 100]).unwrap();
    let v = export(&cut, &[]);
    assert_eq!(v["metadata"]["ending"], "truncated");
    let end = of(&v, "i", Some("recording")).pop().unwrap();
    assert_eq!(end["name"], "recording not closed");
    assert!(end["args"]["message"]
        .as_str()
        .unwrap()
        .starts_with("truncated: "));
    assert_eq!(of(&v, "i", Some("change")).len(), query(&cut, &[]).len());

    let out_path = tmp("refused.json");
    let trace = golden_v3();
    let (trace, out_s) = (trace.to_str().unwrap(), out_path.to_str().unwrap());
    let out = memwatch(&["export", trace, "--format", "perfetto", "-o", out_s, "--elements"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--elements has no meaning for --format perfetto"));
    let out = memwatch(&[
        "export", trace, "--format", "perfetto", "-o", out_s, "--tag", "nope",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("the trace has no tag \"nope\""),
        "{}",
        text(&out.stderr)
    );
    assert!(!out_path.exists(), "a failed export leaves no file");
}

#[test]
fn a_change_made_by_a_torch_op_names_the_op() {
    // The golden v4 trace has changes recorded through `via="dispatch"`:
    // each event carries the op `query` shows for its change, and the
    // others carry none.
    let trace = golden_v3().with_file_name("v4-sample.mwt");
    let v = export(&trace, &[]);
    let rows = query(&trace, &[]);
    let changes = of(&v, "i", Some("change"));
    assert_eq!(changes.len(), rows.len());
    let mut with_op = 0;
    for (e, row) in changes.iter().zip(&rows) {
        assert_eq!(e["args"]["seq"], row["seq"]);
        match row["op"].as_str() {
            Some(op) => {
                assert_eq!(e["args"]["op"], op);
                with_op += 1;
            }
            None => assert!(e["args"].get("op").is_none(), "{e}"),
        }
    }
    assert!(with_op >= 2, "the v4 sample has changes made by ops");
}
