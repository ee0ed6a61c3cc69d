//! `memwatch report`: the page of a golden trace holds the numbers that
//! `memwatch summary --format json` gives (the oracle), and bad input
//! gets a message, never a panic.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn memwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memwatch"))
        .args(args)
        .output()
        .expect("run memwatch")
}

fn golden(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../format/tests/data")
        .join(name)
        .display()
        .to_string()
}

fn data_of(html: &str) -> Value {
    let start = html.find("id=\"memwatch-data\">").expect("a data blob") + "id=\"memwatch-data\">".len();
    let end = start + html[start..].find("</script>").unwrap();
    serde_json::from_str(&html[start..end]).unwrap()
}

#[test]
fn the_report_of_a_golden_trace_agrees_with_its_summary() {
    let trace = golden("v4-sample.mwt");
    let out = memwatch(&["report", &trace, "-o", "-"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let html = String::from_utf8(out.stdout).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("default-src 'none'"));
    let d = data_of(&html);
    let s: Value =
        serde_json::from_slice(&memwatch(&["summary", &trace, "--format", "json"]).stdout).unwrap();
    assert_eq!(d["run"]["changes"], s["changes"]);
    assert_eq!(d["run"]["bytes_changed"], s["bytes_changed"]);
    assert_eq!(d["run"]["ending"]["how"], s["ending"]["how"]);
    assert_eq!(d["run"]["ending"]["message"], s["ending"]["message"]);
    assert_eq!(d["run"]["duration_ns"], s["duration_ns"]);
    for t in s["tags"].as_array().unwrap() {
        let r = d["tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == t["tag"])
            .unwrap();
        assert_eq!(r["changes"], t["changes"], "{}", t["tag"]);
        assert_eq!(r["bytes"], t["bytes_changed"], "{}", t["tag"]);
        // Each of the summary's busiest lines is a row of the report's lines.
        for l in t["lines"].as_array().unwrap() {
            let row = d["lines"].as_array().unwrap().iter().find(|x| {
                d["tags"][x["tag"].as_u64().unwrap() as usize]["name"] == t["tag"] && x["line"] == l["line"]
            });
            assert_eq!(
                row.unwrap()["changes"],
                l["changes"],
                "{} line {}",
                t["tag"],
                l["line"]
            );
        }
    }
    // The lines of every change add up to the changes.
    let sum: u64 = d["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["changes"].as_u64().unwrap())
        .sum();
    assert_eq!(Some(sum), s["changes"].as_u64());
}

#[test]
fn bad_elements_and_outputs_get_messages() {
    let trace = golden("v3-sample.mwt");
    let cases: [(&[&str], &str); 3] = [
        (&["--element", "nosuch:0"], "has no changes to a tag \"nosuch\""),
        (&["--element", "layer1_weight:99,0"], "has shape"),
        (
            &["-o", "/nonexistent-dir/r.html"],
            "cannot write /nonexistent-dir/r.html",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["report", trace.as_str()];
        args.extend_from_slice(extra);
        let out = memwatch(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(
            err.contains(want) && !err.contains("panicked"),
            "{extra:?}: {err}"
        );
    }
}
