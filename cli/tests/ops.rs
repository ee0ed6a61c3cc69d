//! The op a change was made by (format version 4's `Note`), as `query`,
//! `dump` and `blame` show it, on the golden v4 trace.

use std::path::PathBuf;
use std::process::{Command, Output};

fn memwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memwatch"))
        .args(args)
        .output()
        .expect("run memwatch")
}

fn v4_trace() -> String {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.join("../format/tests/data/v4-sample.mwt")
        .to_string_lossy()
        .into_owned()
}

fn stdout(args: &[&str]) -> String {
    let out = memwatch(args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn query_has_an_op_column_only_where_a_change_has_an_op() {
    let trace = v4_trace();
    let table = stdout(&["query", &trace, "--tag", "layer2_weight"]);
    let mut lines = table.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        head,
        [
            "seq", "time_ms", "tag", "variable", "at", "function", "thread", "changed", "op", "old", "->",
            "new"
        ]
    );
    let ops: Vec<&str> = lines.map(|l| l.split_whitespace().nth(9).unwrap()).collect();
    // Version 3's two changes, then version 4's: add_, mul_, and one without.
    assert_eq!(
        ops,
        ["-", "-", "aten::add_.Tensor", "aten::mul_.Tensor", "-"],
        "{table}"
    );
    let plain = stdout(&["query", &trace, "--tag", "layer1_weight"]);
    assert!(!plain.lines().next().unwrap().contains(" op "), "{plain}");

    let jsonl = stdout(&["query", &trace, "--tag", "layer2_weight", "--format", "jsonl"]);
    let ops: Vec<&str> = jsonl
        .lines()
        .map(|l| {
            l.split("\"op\":")
                .nth(1)
                .unwrap()
                .split(",\"stack\"")
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(
        ops,
        [
            "null",
            "null",
            "\"aten::add_.Tensor\"",
            "\"aten::mul_.Tensor\"",
            "null"
        ]
    );
    let csv = stdout(&["query", &trace, "--tag", "layer2_weight", "--format", "csv"]);
    assert!(csv.lines().next().unwrap().ends_with(",sample,op,pid"), "{csv}");
    assert!(
        csv.lines().nth(3).unwrap().contains(",aten::add_.Tensor,"),
        "{csv}"
    );
}

#[test]
fn dump_shows_each_note_before_its_change_and_blame_the_op() {
    let trace = v4_trace();
    let dump = stdout(&["dump", "--records-only", &trace]);
    let lines: Vec<&str> = dump.lines().collect();
    let notes: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("NOTE "))
        .collect();
    assert_eq!(notes.len(), 2, "{dump}");
    assert!(
        lines[notes[0]].ends_with(" key=op value=aten::add_.Tensor"),
        "{dump}"
    );
    assert!(
        lines[notes[1]].ends_with(" key=op value=aten::mul_.Tensor"),
        "{dump}"
    );
    for &i in &notes {
        let seq = lines[i].split_whitespace().nth(1).unwrap();
        assert!(lines[i + 1].starts_with(&format!("CHANGE {seq} ")), "{dump}");
    }
    let blame = stdout(&["blame", &trace, "--tag", "layer2_weight", "--index", "0", "--all"]);
    let ends: Vec<&str> = blame.lines().map(|l| l.rsplit(": ").next().unwrap()).collect();
    assert_eq!(
        ends,
        [
            "0.0 -> 2.0",
            "2.0 -> 3.0 by aten::add_.Tensor",
            "3.0 -> 6.0 by aten::mul_.Tensor"
        ],
        "{blame}"
    );
}
