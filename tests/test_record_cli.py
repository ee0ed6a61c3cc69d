"""`memwatch record` and the analyzer, end to end: the rebuilt state equals
what the program really held, byte for byte."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import memwatch
from conftest import BIN, ROOT

TRAIN = ROOT / "samples" / "train.py"
STEPS = 8


def mw(*args: str, cwd: Path, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run([str(BIN / "memwatch"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """samples/train.py recorded once for the module's tests."""
    d = tmp_path_factory.mktemp("train")
    r = mw("record", sys.executable, str(TRAIN), str(STEPS), cwd=d)
    return d, r


def test_record_writes_the_default_trace_and_a_summary(recorded):
    d, r = recorded
    assert (d / "train.mwt").exists()
    assert "final loss" in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"memwatch: recorded {2 * STEPS} changes to 2 tags (")
    assert last.endswith(f"in {d / 'train.mwt'} ({(d / 'train.mwt').stat().st_size} bytes)")
    assert memwatch.trace_info(d / "train.mwt")["tail"] == "closed"


def test_state_at_the_end_equals_the_real_final_array(recorded):
    d, _ = recorded
    mw("state", "train.mwt", "--tag", "layer1_weight", "--format", "npy", "-o", "w1.npy", cwd=d)
    final = np.load(d / "train_w1_final.npy")
    got = np.load(d / "w1.npy")
    assert got.dtype == final.dtype and got.shape == final.shape
    assert got.tobytes() == final.tobytes()


def test_state_at_an_earlier_seq_equals_the_copy_saved_then(recorded):
    d, _ = recorded
    rows = [json.loads(x) for x in mw("query", "train.mwt", "--tag", "layer1_weight", "--format", "jsonl", cwd=d).stdout.splitlines()]
    assert len(rows) == STEPS
    mid_seq = rows[STEPS // 2]["seq"]  # the program saved w1 after update number STEPS // 2 + 1
    mw("state", "train.mwt", "--tag", "layer1_weight", "--at", str(mid_seq), "--format", "npy", "-o", "mid.npy", cwd=d)
    assert np.load(d / "mid.npy").tobytes() == np.load(d / "train_w1_mid.npy").tobytes()
    # The same through the Python reader.
    t = memwatch.open_trace(d / "train.mwt")
    assert t.state("layer1_weight", at=mid_seq).tobytes() == np.load(d / "train_w1_mid.npy").tobytes()
    assert t.state("step").tolist() == [STEPS]


def test_state_and_blame_at_a_time(recorded):
    d, _ = recorded
    t = memwatch.open_trace(d / "train.mwt")
    w = t.changes(tag="layer1_weight")
    mid = w[STEPS // 2]
    saved = np.load(d / "train_w1_mid.npy").tobytes()
    # Times are since the trace started (a Change's time_ns is wall-clock).
    start = t.meta["start_time_ns"]
    at = mid.time_ns - start
    # A time names the last event at or before it: here the change itself.
    assert t.state("layer1_weight", at=f"{at}ns").tobytes() == saved
    assert t.state("layer1_weight", at=str(mid.seq)).tobytes() == saved
    # Between this change and the next update of w1, only `step` changes.
    nxt = w[STEPS // 2 + 1]
    just_before = datetime.timedelta(microseconds=(nxt.time_ns - start - 1) // 1000)
    if just_before // datetime.timedelta(microseconds=1) * 1000 >= at:
        assert t.state("layer1_weight", at=just_before).tobytes() == saved
    before = t.state("layer1_weight", at=f"{at - 1}ns").tobytes()
    assert before != saved and before == t.state("layer1_weight", at=w[STEPS // 2 - 1].seq).tobytes()
    blamed = t.blame("layer1_weight", index=(0, 0), at=f"{at}ns")
    assert blamed.seq == mid.seq and blamed.line == mid.line
    with pytest.raises(ValueError, match="neither a seq"):
        t.state("layer1_weight", at="soon")
    with pytest.raises(TypeError, match=r"at= takes a seq \(int\), a time since the trace started"):
        t.state("layer1_weight", at=1.5)
    with pytest.raises(ValueError, match="not a seq"):
        t.state("layer1_weight", at=-1)
    with pytest.raises(ValueError, match="before the trace started"):
        t.state("layer1_weight", at=datetime.timedelta(seconds=-1))


def test_query_filters_and_formats(recorded):
    d, _ = recorded
    src = TRAIN.read_text().splitlines()
    w_line = next(i for i, s in enumerate(src, 1) if s.strip() == "w1 -= lr * grad_w1")
    table = mw("query", "train.mwt", "--tag", "layer1_weight", cwd=d).stdout.splitlines()
    assert table[0].split()[:4] == ["seq", "time_ms", "tag", "variable"]
    assert len(table) == 1 + STEPS
    assert all(f"train.py:{w_line}" in row and " w1 " in row and "128 elements" in row for row in table[1:])
    by_line = mw("query", "train.mwt", "--file", "train.py", "--line", str(w_line), "--format", "jsonl", cwd=d).stdout
    rows = [json.loads(x) for x in by_line.splitlines()]
    assert {r["tag"] for r in rows} == {"layer1_weight"}
    assert rows[0]["function"] == "<module>" and rows[0]["thread_name"] == "MainThread"
    assert rows[0]["bytes_changed"] == 512
    csv = mw("query", "train.mwt", "--tag", "step", "--format", "csv", "--limit", "2", cwd=d).stdout.splitlines()
    assert csv[0].startswith("seq,time_ns,tag,")
    pid = str(memwatch.trace_info(d / "train.mwt")["pid"])
    assert len(csv) == 3 and csv[1].split(",")[-3:] == ["0 -> 1", "", pid]  # sample, op (none here), pid
    seqs = [r["seq"] for r in rows]
    some = mw("query", "train.mwt", "--seq", f"{seqs[1]}..{seqs[2]}", "--format", "jsonl", cwd=d).stdout.splitlines()
    assert [json.loads(x)["seq"] for x in some][0] == seqs[1]


def test_blame_and_summary(recorded):
    d, _ = recorded
    rows = [json.loads(x) for x in mw("query", "train.mwt", "--tag", "layer1_weight", "--format", "jsonl", cwd=d).stdout.splitlines()]
    out = mw("blame", "train.mwt", "--tag", "layer1_weight", "--index", "0,0", cwd=d).stdout.strip()
    assert out.startswith(f"element [0, 0] of layer1_weight: seq {rows[-1]['seq']} at ")
    final = np.load(d / "train_w1_final.npy")
    assert out.endswith(f" -> {final[0, 0]!r}".replace("np.float32(", "").rstrip(")"))
    every = mw("blame", "train.mwt", "--tag", "step", "--offset", "0", "--all", cwd=d).stdout.splitlines()
    assert len(every) == STEPS and every[-1].endswith(f"{STEPS - 1:02x} -> {STEPS:02x}")
    summary = mw("summary", "train.mwt", cwd=d).stdout
    assert f"layer1_weight: {STEPS} changes, {STEPS * 512} bytes changed, {STEPS * 128} elements changed\n" in summary
    assert f"step: {STEPS} changes, {STEPS * 8} bytes changed, {STEPS} elements changed\n" in summary
    # The run: program, process, how it ended, the trace's size per change.
    lines = summary.splitlines()
    assert lines[0] == f"program: {TRAIN} {STEPS}"  # the program's sys.argv
    assert lines[1].startswith("process: pid ") and f"python {sys.version.split()[0]}" in lines[1]
    assert re.fullmatch(r"ran: from \d{4}-\d\d-\d\dT[\d:.]+Z for [\d.]+(s|ms|us)", lines[2]), lines[2]
    assert lines[3] == "ended: closed normally"
    size = (d / "train.mwt").stat().st_size
    assert lines[4] == (
        f"trace: train.mwt, {size} bytes ({size / (2 * STEPS):.1f} bytes per change), {2 * STEPS} changes, "
        "2 regions watched, 0 checkpoints"
    )
    w1 = [r for r in rows if r["tag"] == "layer1_weight"]
    at = lines.index(f"layer1_weight: {STEPS} changes, {STEPS * 512} bytes changed, {STEPS * 128} elements changed")
    assert lines[at + 1].startswith(f"  first: seq {w1[0]['seq']} at ") and f"; last: seq {w1[-1]['seq']} at " in lines[at + 1]
    assert lines[at + 2].split() == [str(STEPS), "changes", str(STEPS * 512), "bytes", f"{TRAIN}:{w1[0]['line']}", "(<module>)"]
    assert lines[at + 3] == f"  threads: MainThread ({STEPS})"
    js = json.loads(mw("summary", "train.mwt", "--format", "json", cwd=d).stdout)
    assert js["ending"] == {"how": "closed", "message": "closed normally", "time_ns": js["duration_ns"]}
    assert js["trace_bytes"] == size and js["changes"] == 2 * STEPS and js["argv"] == [str(TRAIN), str(STEPS)]
    tag = {t["tag"]: t for t in js["tags"]}
    assert tag["layer1_weight"]["elements_changed"] == STEPS * 128 and tag["layer1_weight"]["first_seq"] == w1[0]["seq"]
    assert tag["step"]["lines"][0]["changes"] == STEPS and tag["step"]["threads"][0]["thread_name"] == "MainThread"
    t = memwatch.open_trace(d / "train.mwt")
    assert t.blame("layer1_weight", index=(0, 0)).seq == rows[-1]["seq"]
    assert t.tags == ["layer1_weight", "step"]


def test_blame_needs_one_index_per_dimension(recorded):
    d, _ = recorded
    r = mw("blame", "train.mwt", "--tag", "layer1_weight", "--index", "17", cwd=d, check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        'memwatch: error: "layer1_weight" has shape (8, 16) and needs 2 indices (--index 0,0); '
        "for an element by its flat index, use --flat-index N"
    )
    flat = mw("blame", "train.mwt", "--tag", "layer1_weight", "--flat-index", "17", cwd=d).stdout.strip()
    by_index = mw("blame", "train.mwt", "--tag", "layer1_weight", "--index", "1,1", cwd=d).stdout.strip()
    assert flat.startswith("element 17 (flat) of layer1_weight: seq ")
    assert flat.split(": ", 1)[1] == by_index.split(": ", 1)[1]
    final = np.load(d / "train_w1_final.npy")
    assert flat.endswith(f" -> {final[1, 1]!r}".replace("np.float32(", "").rstrip(")"))
    r = mw("blame", "train.mwt", "--tag", "layer1_weight", "--flat-index", "128", cwd=d, check=False)
    assert r.returncode == 1 and "flat index 128 is outside shape" in r.stderr
    r = mw("blame", "train.mwt", "--tag", "layer1_weight", "--flat-index", "1", "--index", "0,1", cwd=d, check=False)
    assert r.returncode == 2 and "cannot be used with" in r.stderr


def test_errors_name_what_is_wrong(recorded, tmp_path):
    d, _ = recorded
    r = mw("query", "train.mwt", "--tag", "nope", cwd=d, check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == 'memwatch: error: the trace has no tag "nope"; its tags are: layer1_weight, step'
    r = mw("state", "train.mwt", "--tag", "step", "--at", "999999", cwd=d, check=False)
    assert r.returncode == 1 and "seq 999999 is out of range" in r.stderr
    r = mw("blame", "train.mwt", "--tag", "layer1_weight", "--index", "9,9", cwd=d, check=False)
    assert r.returncode == 1 and "outside shape [8, 16]" in r.stderr
    r = mw("query", "missing.mwt", cwd=d, check=False)
    assert r.returncode == 1 and "missing.mwt: No such file or directory" in r.stderr
    (tmp_path / "x.txt").write_text("hi")
    r = mw("summary", "x.txt", cwd=tmp_path, check=False)
    assert r.returncode == 1 and "not a memwatch trace" in r.stderr
    for sub in ("record", "query", "state", "blame", "summary"):
        h = mw(sub, "--help", cwd=d)
        assert "Example" in h.stdout, sub
    with pytest.raises(KeyError, match="no tag"):
        memwatch.open_trace(d / "train.mwt").state("nope")


def script(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "prog.py"
    p.write_text(textwrap.dedent(body))
    return p


def test_exit_code_and_signals_are_passed_through(tmp_path):
    p = script(tmp_path, "import sys\nsys.exit(3)\n")
    r = mw("record", sys.executable, str(p), cwd=tmp_path, check=False)
    assert r.returncode == 3
    assert "nothing recorded: the program never called memwatch.watch()" in r.stderr
    assert not (tmp_path / "prog.mwt").exists()
    p = script(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n")
    r = mw("record", sys.executable, str(p), cwd=tmp_path, check=False)
    assert r.returncode == 128 + 15
    assert "killed by signal 15 (SIGTERM)" in r.stderr


def test_unwritable_output_fails_before_the_program_runs(tmp_path):
    marker = tmp_path / "ran"
    p = script(tmp_path, f"open({str(marker)!r}, 'w').close()\n")
    r = mw("record", "-o", "/nonexistent/dir/t.mwt", sys.executable, str(p), cwd=tmp_path, check=False)
    assert r.returncode == 1
    assert "cannot write the trace to /nonexistent/dir/t.mwt" in r.stderr
    assert not marker.exists()


ENDINGS = {
    "exit": ("pass", "closed"),
    "exception": ("raise RuntimeError('boom')", "closed"),
    "os._exit": ("os._exit(0)", "unclosed"),
    "abort": ("os.abort()", "unclosed"),
    "segfault": ("import ctypes; ctypes.string_at(0)", "unclosed"),
    "sigbus": ("m = bus_map(); m[0]", "unclosed"),
    "sigkill": ("os.kill(os.getpid(), signal.SIGKILL)", "unclosed"),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
@pytest.mark.parametrize("via", ["record", "start"])
def test_no_ending_loses_a_change(tmp_path, ending, via):
    # 37 changes, then at once the ending: no sleep anywhere, so a change
    # still waiting in the recorder's memory would be lost. Under `memwatch
    # record` the journal is folded into the trace after the program ends;
    # with memwatch.start alone, readers find it beside the trace.
    code, tail = ENDINGS[ending]
    p = script(
        tmp_path,
        f"""
        import mmap, os, signal, tempfile, memwatch
        def bus_map():
            f = tempfile.TemporaryFile()
            f.truncate(4096)
            m = mmap.mmap(f.fileno(), 4096)
            f.truncate(0)
            return m
        if {via == "start"!r}:
            memwatch.start(trace="prog.mwt")
        buf = bytearray(64)
        memwatch.watch(buf, name="buf")
        for i in range(37):
            buf[i] = i + 1
        {code}
        """,
    )
    if via == "record":
        r = mw("record", sys.executable, str(p), cwd=tmp_path, check=False)
    else:
        r = subprocess.run([sys.executable, str(p)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (r.returncode == 0) == (ending in ("exit", "os._exit")), r.stderr
    trace = tmp_path / "prog.mwt"
    assert memwatch.trace_info(trace)["tail"] == tail
    journal = tmp_path / "prog.mwt.journal"
    assert journal.exists() == (via == "start" and tail != "closed")
    rows = [json.loads(x) for x in mw("query", str(trace), "--format", "jsonl", cwd=tmp_path).stdout.splitlines()]
    assert [int(r["ranges"][0]["new"], 16) for r in rows] == list(range(1, 38))
    assert {r["line"] for r in rows} == {14}
    state = mw("state", str(trace), "--tag", "buf", "--format", "raw", "-o", str(tmp_path / "buf.raw"), cwd=tmp_path)
    assert state.returncode == 0 and (tmp_path / "buf.raw").read_bytes() == bytes(range(1, 38)) + bytes(27)
    if tail != "closed" and via == "record":
        assert "not closed cleanly" in r.stderr and "recovered from its journal" in r.stderr


def test_summary_flags_nan_and_other_threads(tmp_path):
    p = script(
        tmp_path,
        """
        import threading, numpy as np, memwatch
        a = np.ones(4, dtype=np.float32)
        memwatch.watch(a, name="a")
        a[2] = np.nan
        def w():
            a[0] = 2.0
        t = threading.Thread(target=w, name="helper"); t.start(); t.join()
        """,
    )
    mw("record", "-o", "t.mwt", sys.executable, str(p), cwd=tmp_path)
    s = mw("summary", "t.mwt", cwd=tmp_path).stdout
    assert "suspicious:" in s
    assert "NaN or Inf written into a at seq" in s
    assert "a was written by thread helper (1 change)" in s


def test_export_parquet_loads_in_pandas_with_the_recorded_values(recorded):
    pd = pytest.importorskip("pandas")
    d, _ = recorded
    out = mw("export", "train.mwt", "-o", "changes.parquet", cwd=d).stdout.strip()
    assert out == f"wrote {2 * STEPS} rows to changes.parquet"
    df = pd.read_parquet(d / "changes.parquet")
    assert list(df.columns) == [
        "seq", "time_ns", "wall_time_ns", "tag", "variable", "kind", "file", "line", "function", "thread",
        "thread_name", "address", "offset", "bytes_changed", "ranges", "index", "old", "new", "old_value",
        "new_value", "key", "old_repr", "new_repr", "op", "pid", "rank",
    ]
    # One process, no rank: its pid on every row.
    assert set(df.pid) == {memwatch.trace_info(d / "train.mwt")["pid"]} and df["rank"].isna().all()
    assert (df.groupby("tag").size() == STEPS).all()
    step_rows = df[df.tag == "step"].sort_values("seq")
    assert [int.from_bytes(b, "little") for b in step_rows.new] == list(range(1, STEPS + 1))
    assert set(df.kind) == {"bytes"} and set(df.thread_name) == {"MainThread"}
    assert (df[df.tag == "layer1_weight"].bytes_changed == 512).all()
    # One row per changed element: the last step's values are the final array.
    mw("export", "train.mwt", "-o", "el.parquet", "--elements", "--tag", "layer1_weight", cwd=d)
    el = pd.read_parquet(d / "el.parquet")
    last = el[el.seq == el.seq.max()]
    final = np.load(d / "train_w1_final.npy")
    got = {tuple(int(i) for i in ix.split(",")): v for ix, v in zip(last["index"], last.new_value)}
    assert len(got) == final.size
    assert all(np.float32(v) == final[ix] for ix, v in got.items())
    # CSV and JSON lines carry the same columns.
    mw("export", "train.mwt", "-o", "changes.csv", cwd=d)
    assert (d / "changes.csv").read_text().splitlines()[0].startswith("seq,time_ns,wall_time_ns,tag,")
    mw("export", "train.mwt", "-o", "changes.jsonl", "--tag", "step", cwd=d)
    first = json.loads((d / "changes.jsonl").read_text().splitlines()[0])
    assert (first["tag"], first["new"], first["line"]) == ("step", "0100000000000000", rows_line("step += 1"))
    # And from Python.
    t = memwatch.open_trace(d / "train.mwt")
    assert len(t.to_pandas()) == 2 * STEPS
    assert len(t.to_pandas(elements=True, tag="step")) == STEPS


def test_a_long_export_spans_row_groups_and_a_failed_one_leaves_no_file(tmp_path):
    # More rows than one batch (a Parquet row group, 262,144 rows): every
    # row comes back, in seq order, with its value.
    pd = pytest.importorskip("pandas")
    n = 300_000
    p = script(
        tmp_path,
        f"""
        import memwatch
        memwatch.configure(live=False)
        memwatch.start("long.mwt")
        buf = bytearray(4)
        memwatch.watch(buf, name="buf")
        for i in range(1, {n} + 1):
            buf[0:3] = i.to_bytes(3, "little")
        memwatch.stop()
        """,
    )
    subprocess.run([sys.executable, str(p)], cwd=tmp_path, check=True)
    out = mw("export", "long.mwt", "-o", "long.parquet", cwd=tmp_path).stdout.strip()
    assert out == f"wrote {n} rows to long.parquet"
    df = pd.read_parquet(tmp_path / "long.parquet", columns=["seq", "new"])
    assert len(df) == n and df.seq.is_monotonic_increasing
    # Each change's new bytes are the run that changed: the low byte and
    # those a carry reached.
    def run(i):
        old, new = (i - 1).to_bytes(3, "little"), i.to_bytes(3, "little")
        k = max(j for j in range(3) if old[j] != new[j]) + 1
        return new[:k]

    assert list(df.new) == [run(i) for i in range(1, n + 1)]
    mw("export", "long.mwt", "-o", "long.csv", cwd=tmp_path)
    assert len((tmp_path / "long.csv").read_text().splitlines()) == n + 1
    # A pipe is written as it is (no temporary file beside /dev/stdout).
    piped = mw("export", "long.mwt", "-o", "/dev/stdout", "--format", "csv", cwd=tmp_path).stdout.splitlines()
    assert piped[0].startswith("seq,") and len([x for x in piped if x[:1].isdigit()]) == n
    # A failed export (a tag the trace lacks) leaves no file, and an
    # earlier file under that name as it was.
    r = mw("export", "long.mwt", "-o", "none.parquet", "--tag", "nope", cwd=tmp_path, check=False)
    assert r.returncode == 1 and "no tag" in r.stderr
    assert not (tmp_path / "none.parquet").exists()
    before = (tmp_path / "long.csv").read_bytes()
    r = mw("export", "long.mwt", "-o", "long.csv", "--tag", "nope", cwd=tmp_path, check=False)
    assert r.returncode == 1 and (tmp_path / "long.csv").read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir() if "partial" in x.name) == []


def rows_line(text: str) -> int:
    return next(i for i, s in enumerate(TRAIN.read_text().splitlines(), 1) if s.strip() == text)


FULL_DISK_PROGRAM = """
import os, resource, signal, sys, numpy as np, memwatch
snaps = sys.argv[1]
if sys.argv[2] == "ulimit":
    # Default SIGXFSZ (CPython ignores it at start-up): memwatch must never
    # make the kernel send it.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))
a = np.zeros(64 * 1024, dtype=np.uint8)
memwatch.watch(a, name="a")
for i in range(60):
    a[:] = np.random.default_rng(i).integers(0, 255, a.size, dtype=np.uint8)
    np.save(os.path.join(snaps, f"step{i}.npy"), a)
print("program finished")
sys.exit(7)
"""


def check_stopped_recording(r, trace: Path, snaps: Path, why: str):
    # The program ran to its end with its own exit status; one warning.
    assert r.returncode == 7, r.stderr
    assert r.stdout.strip() == "program finished"
    assert r.stderr.count("memwatch: warning: recording stopped: ") == 1, r.stderr
    assert "Traceback" not in r.stderr
    d = trace.parent
    for cmd in ("summary", "query"):
        out = mw(cmd, str(trace), cwd=d)
        m = re.search(rf"recording stopped at (\d+\.\d+) s: {re.escape(why)}, after seq (\d+); (\d+) later events were not recorded", out.stderr)
        assert m, (cmd, out.stderr)
    stop_seq, lost = int(m.group(2)), int(m.group(3))
    summary = mw("summary", str(trace), cwd=d).stdout
    assert f"\nended: recording stopped at {m.group(1)} s: {why}, after seq {stop_seq}; {lost} later events were not recorded\n" in summary, summary
    js = json.loads(mw("summary", str(trace), "--format", "json", cwd=d).stdout)
    assert (js["ending"]["how"], js["ending"]["after_seq"], js["ending"]["lost"]) == ("stopped", stop_seq, lost)
    rows = [json.loads(x) for x in mw("query", str(trace), "--format", "jsonl", cwd=d).stdout.splitlines()]
    seqs = [row["seq"] for row in rows]
    # Everything that fitted is there, in order, up to the stop.
    assert 0 < len(seqs) < 60 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # Lost events: the changes not recorded, and the watch's end at exit
    # (and its last checkpoint).
    assert seqs[-1] == stop_seq and 60 - len(seqs) <= lost <= 60 - len(seqs) + 2
    t = memwatch.open_trace(trace)
    for k in (0, len(seqs) - 1):
        assert np.array_equal(t.state("a", at=seqs[k]), np.load(snaps / f"step{k}.npy")), k


def test_a_file_size_limit_stops_recording_but_not_the_program(tmp_path):
    p = script(tmp_path, FULL_DISK_PROGRAM)
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    r = mw("record", "-o", "t.mwt", sys.executable, str(p), str(snaps), "ulimit", cwd=tmp_path, check=False)
    check_stopped_recording(r, tmp_path / "t.mwt", snaps, "file size limit reached (ulimit -f)")


def test_a_full_disk_stops_recording_but_not_the_program(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs to fill (running as uid %d)" % os.geteuid())
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        p = script(tmp_path, FULL_DISK_PROGRAM)
        snaps = tmp_path / "snaps"
        snaps.mkdir()
        r = mw("record", "-o", str(disk / "t.mwt"), sys.executable, str(p), str(snaps), "disk", cwd=tmp_path, check=False)
        check_stopped_recording(r, disk / "t.mwt", snaps, "no space left on device")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_missing_program_or_script_says_so_and_leaves_no_file(tmp_path):
    r = mw("record", "-o", "x.mwt", "--", "nosuchprogram-memwatch", cwd=tmp_path, check=False)
    assert r.returncode == 1
    assert "cannot start nosuchprogram-memwatch: no such program on PATH" in r.stderr
    r = mw("record", "-o", "y.mwt", sys.executable, "missing_script.py", cwd=tmp_path, check=False)
    assert r.returncode == 1
    assert "no such script: missing_script.py" in r.stderr
    assert "never called" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_trace_is_private_to_its_owner(recorded, tmp_path):
    d, _ = recorded
    assert (d / "train.mwt").stat().st_mode & 0o777 == 0o600
    # Also when the file was there before with wider permissions.
    old = tmp_path / "old.mwt"
    old.write_text("")
    old.chmod(0o644)
    p = script(tmp_path, "import numpy as np, memwatch\na = np.zeros(4)\nmemwatch.watch(a, name='a')\na[1] = 2\n")
    mw("record", "-o", str(old), sys.executable, str(p), cwd=tmp_path)
    assert old.stat().st_mode & 0o777 == 0o600


def test_query_of_a_directory_says_it_is_one(tmp_path):
    r = mw("query", str(tmp_path), cwd=tmp_path, check=False)
    assert r.returncode == 1
    assert f"{tmp_path}: is a directory, not a trace" in r.stderr
    assert "os error" not in r.stderr


def test_export_takes_its_format_from_the_extension_and_refuses_others(recorded, tmp_path):
    d, _ = recorded
    r = mw("export", "train.mwt", "-o", str(tmp_path / "out.txt"), cwd=d, check=False)
    assert r.returncode == 1
    assert 'unknown table format ".txt"' in r.stderr and "parquet (.parquet), csv (.csv)" in r.stderr
    assert not (tmp_path / "out.txt").exists()
    r = mw("export", "train.mwt", "-o", str(tmp_path / "out"), cwd=d, check=False)
    assert r.returncode == 1 and "no extension to tell the format from" in r.stderr
    mw("export", "train.mwt", "-o", str(tmp_path / "out.csv"), cwd=d)
    assert (tmp_path / "out.csv").read_text().startswith("seq,")
    mw("export", "train.mwt", "-o", str(tmp_path / "out.txt"), "--format", "jsonl", cwd=d)
    assert (tmp_path / "out.txt").read_text().startswith("{")


def test_summary_words_agree_with_their_numbers(tmp_path):
    p = script(tmp_path, "import numpy as np, memwatch\na = np.zeros(4, dtype=np.uint8)\nmemwatch.watch(a, name='a')\na[1] = 2\n")
    mw("record", "-o", "one.mwt", sys.executable, str(p), cwd=tmp_path)
    out = mw("summary", "one.mwt", cwd=tmp_path).stdout
    assert "a: 1 change, 1 byte changed, 1 element changed\n" in out
    assert not re.search(r"(?<![\d.])1 (changes|bytes|elements|regions|checkpoints)\b", out), out


def test_record_live_prints_each_change_and_records_it_too(tmp_path):
    p = script(
        tmp_path,
        "import numpy as np, memwatch\n"
        "a = np.zeros(4, dtype=np.int32)\n"
        "memwatch.watch(a, name='a')\n"
        "a[1] = 7\n"
        "a[2] = 9\n",
    )
    quiet = mw("record", "-o", "quiet.mwt", sys.executable, str(p), cwd=tmp_path)
    assert "[MEMWATCH]" not in quiet.stderr
    r = mw("record", "--live", "-o", "live.mwt", sys.executable, str(p), cwd=tmp_path)
    reports = r.stderr.split("[MEMWATCH] ")[1:]
    assert len(reports) == 2, r.stderr
    assert reports[0].startswith("Tag: a\n") and f"Line: {p}:4 in <module>" in reports[0]
    assert "Elements: [1] 0 -> 7\n" in reports[0]
    assert f"Line: {p}:5 in <module>" in reports[1] and "Elements: [2] 0 -> 9\n" in reports[1]
    rows = [json.loads(x) for x in mw("query", "live.mwt", "--format", "jsonl", cwd=tmp_path).stdout.splitlines()]
    assert [row["line"] for row in rows] == [4, 5]


LIVE_PROGRAM = """\
import threading, types, numpy as np, memwatch
a = np.zeros(4, dtype=np.int32)
memwatch.watch(a, name="a")
a[1] = 7
a[2:4] = 9
f = np.ones((2, 3), dtype=np.float32)
memwatch.watch(f, name="f")
f[1, 2] = 0.25
b = bytearray(16)
memwatch.watch(b, name="b")
b[3:5] = b"hi"
cfg = types.SimpleNamespace(lr=0.5); memwatch.watch_object(cfg, name="cfg")
cfg.lr = 0.25
def work():
    a[0] = -1
t = threading.Thread(target=work, name="helper"); t.start(); t.join()
"""


def test_record_live_short_prints_one_exact_line_per_change(tmp_path):
    # GIVEN a program that changes an int array, a 2-D float array, a
    # bytearray, an object's attribute, and an array from another thread
    p = script(tmp_path, LIVE_PROGRAM)
    # WHEN it is recorded with --live=short
    r = mw("record", "--live=short", "-o", "short.mwt", sys.executable, str(p), cwd=tmp_path)
    # THEN stderr has one line per recorded change, in seq order, then
    # memwatch's own summary line
    rows = [json.loads(x) for x in mw("query", "short.mwt", "--format", "jsonl", cwd=tmp_path).stdout.splitlines()]
    seq = [row["seq"] for row in rows]
    assert r.stderr.splitlines()[: len(rows)] == [
        f"memwatch: #{seq[0]} a [1] 0 -> 7 prog.py:4 in <module>",
        f"memwatch: #{seq[1]} a [2] 0 -> 9 (+1 more) prog.py:5 in <module>",
        f"memwatch: #{seq[2]} f [1, 2] 1.0 -> 0.25 prog.py:8 in <module>",
        f"memwatch: #{seq[3]} b 2 bytes at offset 3 0000 -> 6869 prog.py:11 in <module>",
        f"memwatch: #{seq[4]} cfg.lr 0.5 -> 0.25 prog.py:13 in <module>",
        f"memwatch: #{seq[5]} a [0] 0 -> -1 prog.py:15 in work [helper]",
    ], r.stderr
    assert r.stderr.splitlines()[len(rows)].startswith(f"memwatch: recorded {len(rows)} changes")
    assert "[MEMWATCH]" not in r.stderr


def test_record_live_full_prints_the_reports_of_the_same_program(tmp_path):
    p = script(tmp_path, LIVE_PROGRAM)
    r = mw("record", "--live", "-o", "full.mwt", sys.executable, str(p), cwd=tmp_path)
    reports = r.stderr.split("[MEMWATCH] ")[1:]
    assert len(reports) == 6, r.stderr
    assert reports[0] == (
        f"Tag: a\nAddress: {reports[0].split()[3]}\nOld Value (sample): b'\\x00\\x00\\x00\\x00'\n"
        f"New Value (sample): b'\\x07\\x00\\x00\\x00'\nElements: [1] 0 -> 7\nPython Variable: a\nLine: {p}:4 in <module>\n"
    )
    assert "Elements: [1, 2] 1.0 -> 0.25\n" in reports[2] and f"Line: {p}:8 in <module>\n" in reports[2]
    assert reports[4].startswith("Tag: cfg\nChange: setattr cfg.lr\nOld Value: 0.5\nNew Value: 0.25\n")
    assert f"Python Variable: a\nLine: {p}:15 in work\nmemwatch: recorded 6 changes" in reports[5]
    assert "Elements: [0] 0 -> -1\n" in reports[5]
    assert "memwatch: #" not in r.stderr


def test_configure_live_takes_short_and_refuses_other_words(tmp_path):
    p = script(
        tmp_path,
        """
        import numpy as np, memwatch
        assert memwatch.configure()["live"] is True
        assert memwatch.configure(live="short")["live"] == "short"
        a = np.zeros(3, dtype=np.int16)
        memwatch.watch(a, name="a")
        a[2] = 5
        try:
            memwatch.configure(live="loud")
        except ValueError as e:
            print(e)
        assert memwatch.configure()["live"] == "short"
        assert memwatch.configure(live=False)["live"] is False
        a[0] = 1
        """,
    )
    r = subprocess.run([sys.executable, str(p)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["memwatch: #2 a [2] 0 -> 5 prog.py:7 in <module>"], r.stderr
    assert r.stdout.strip() == "live='loud' is not an option: pass True (a [MEMWATCH] report per change), \"short\" (one line per change) or False (none)"


def test_a_bad_option_fails_before_the_trace_is_touched(tmp_path):
    # An earlier run's trace at the output path stays when an option is
    # wrong: the options are checked before the (empty) new trace is made.
    out = tmp_path / "t.mwt"
    out.write_bytes(b"an earlier run's trace")
    r = mw("record", "-o", str(out), "--vars", "a,b", sys.executable, "-c", "pass", cwd=tmp_path, check=False)
    assert r.returncode != 0
    assert '--vars "a,b": give one name or glob per --vars' in r.stderr
    assert out.read_bytes() == b"an earlier run's trace"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.mwt"]
