//! `memwatch dump` on the golden trace, damaged traces and bad input.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn memwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memwatch"))
        .args(args)
        .output()
        .expect("run memwatch")
}

/// This crate's directory. Read at run time (cargo sets it for `cargo
/// test`), since a test binary reused from a shared target dir may have
/// been compiled in another checkout.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn golden_trace() -> PathBuf {
    manifest_dir().join("../format/tests/data/v1-sample.mwt")
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memwatch-cli-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The dump of the golden trace is exactly `data/v1-sample.dump`
/// (`MEMWATCH_BLESS=1 cargo test -p memwatch-cli` rewrites it after an
/// intended change of the output).
#[test]
fn dump_of_golden_trace_matches_expected_text() {
    let out = memwatch(&["dump", golden_trace().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
    let expected_path = manifest_dir().join("tests/data/v1-sample.dump");
    if std::env::var_os("MEMWATCH_BLESS").is_some() {
        std::fs::write(&expected_path, &out.stdout).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap();
    assert_eq!(text(&out.stdout), expected);
}

#[test]
fn dump_lines_carry_the_recorded_values() {
    let out = memwatch(&[
        "dump",
        "--records-only",
        "--max-bytes",
        "0",
        golden_trace().to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    let first_change = stdout.lines().find(|l| l.starts_with("CHANGE ")).unwrap();
    assert!(first_change.starts_with("CHANGE seq=3 t=10000 region=1 tag=layer1_weight thread=100 "));
    assert!(first_change.contains(" at=samples/train.py:52 function=step "));
    // element 1: 0.25f32 -> 0.125f32
    assert!(first_change.contains(" range=4:0000803e->0000003e "));
    assert!(!stdout.contains("HEADER"));
    let object = stdout.lines().find(|l| l.starts_with("OBJECT ")).unwrap();
    assert!(object
        .contains("tag=config kind=setattr key=lr old=0.125 new=0.0625 thread=101 thread_name=loader-1"));
}

#[test]
fn truncated_trace_dumps_whole_chunks_and_says_so() {
    let full = std::fs::read(golden_trace()).unwrap();
    let path = tmp("cut.mwt");
    std::fs::write(&path, &full[..full.len() - 100]).unwrap();
    let out = memwatch(&["dump", path.to_str().unwrap()]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout
        .lines()
        .last()
        .unwrap()
        .starts_with("TAIL status=truncated chunks=2 bytes_ignored="));
    assert!(stdout.contains("CHANGE seq=6 "));
    assert!(!stdout.contains("CHANGE seq=8 "));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("memwatch: note: "), "{stderr}");
    assert!(stderr.contains("cut.mwt: truncated: 2 chunks read, "), "{stderr}");
}

#[test]
fn corrupt_chunk_is_an_error_naming_it() {
    let mut bytes = std::fs::read(golden_trace()).unwrap();
    bytes[470] ^= 0xff; // inside chunk 1's payload
    let path = tmp("corrupt.mwt");
    std::fs::write(&path, &bytes).unwrap();
    let out = memwatch(&["dump", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "memwatch: error: {}: corrupt chunk 1 (at byte 409): ",
            path.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn not_a_trace_and_missing_file_are_clear_errors() {
    let path = tmp("notes.txt");
    std::fs::write(&path, "just some text\n").unwrap();
    let out = memwatch(&["dump", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("notes.txt: not a memwatch trace"));

    let out = memwatch(&["dump", "/no/such/run.mwt"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("memwatch: error: /no/such/run.mwt: No such file or directory"),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let out = memwatch(&["dump"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("<TRACE>"));
    let out = memwatch(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = memwatch(&["dump", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(help.contains("CHANGE      seq t region tag"), "{help}");
    assert!(help.contains("Example:"));
    let out = memwatch(&["--version"]);
    assert_eq!(
        text(&out.stdout).trim(),
        format!("memwatch {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn closed_stdout_is_not_an_error() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_memwatch"))
        .args(["dump", golden_trace().to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away at once
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
}
