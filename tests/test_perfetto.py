"""`memwatch export --format perfetto`: a recorded two-thread program as a
timeline that ui.perfetto.dev opens (Chrome trace-event JSON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

from conftest import BIN


def mw(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run([str(BIN / "memwatch"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


PROGRAM = """\
import threading, numpy as np, memwatch
w = np.zeros(8, dtype=np.float32)
memwatch.watch(w, name="w")
counter = np.zeros(1, dtype=np.int64)
memwatch.watch(counter, name="counter")
def worker():
    for i in range(5):
        w[i] = i + 0.5
t = threading.Thread(target=worker, name="helper")
t.start(); t.join()
for i in range(3):
    counter[0] += 1
"""
WORKER_LINE = 8
MAIN_LINE = 12


def test_a_two_thread_program_becomes_two_named_tracks(tmp_path):
    # GIVEN a program whose worker thread writes w five times, then whose
    # main thread writes counter three times, recorded.
    (tmp_path / "prog.py").write_text(textwrap.dedent(PROGRAM))
    mw("record", "-o", "run.mwt", sys.executable, "prog.py", cwd=tmp_path)
    # WHEN it is exported for Perfetto and loaded
    r = mw("export", "run.mwt", "--format", "perfetto", "-o", "run.json", cwd=tmp_path)
    assert r.stdout.startswith("wrote ") and "(8 changes) to run.json" in r.stdout
    trace = json.loads((tmp_path / "run.json").read_text())
    events = trace["traceEvents"]
    rows = [json.loads(x) for x in mw("query", "run.mwt", "--format", "jsonl", cwd=tmp_path).stdout.splitlines()]
    assert len(rows) == 8

    # THEN every thread that changed something has a named track
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    by_row = {r["thread"]: r["thread_name"] for r in rows}
    assert by_row.items() <= names.items()
    assert sorted(by_row.values()) == ["MainThread", "helper"]
    meta = trace["metadata"]
    assert meta["pid"] > 0 and meta["ending"] == "closed"
    process = next(e for e in events if e["ph"] == "M" and e["name"] == "process_name")
    assert process["pid"] == meta["pid"] and "prog.py" in process["args"]["name"]

    # and one instant per change on its thread's track, named tag file:line
    changes = [e for e in events if e["ph"] == "i" and e.get("cat") == "change"]
    assert len(changes) == len(rows)
    assert [(e["args"]["seq"], e["tid"]) for e in changes] == [(r["seq"], r["thread"]) for r in rows]
    helper = [e for e in changes if names[e["tid"]] == "helper"]
    main = [e for e in changes if names[e["tid"]] == "MainThread"]
    assert [e["name"] for e in helper] == [f"w prog.py:{WORKER_LINE}"] * 5
    assert [e["name"] for e in main] == [f"counter prog.py:{MAIN_LINE}"] * 3
    assert [(e["args"]["index"], e["args"]["old"], e["args"]["new"]) for e in helper] == [
        (f"[{i}]", "0.0", f"{i + 0.5}") for i in range(5)
    ]
    assert [e["args"]["new"] for e in main] == ["1", "2", "3"]
    assert all(e["args"]["function"] == "worker" for e in helper)

    # timestamps (µs since the start) never go back on a track
    per_thread = defaultdict(list)
    for e in events:
        if e["ph"] == "i" and "tid" in e:
            per_thread[e["tid"]].append(e["ts"])
    assert set(by_row) <= set(per_thread)
    for ts in per_thread.values():
        assert ts == sorted(ts)
    assert [round(e["ts"] * 1000) for e in changes] == [r["time_ns"] for r in rows]

    # a counter per tag ends at its number of changes and bytes changed
    last = {}
    for e in events:
        if e["ph"] == "C":
            last[e["name"]] = e["args"]
    want = {tag: {"changes": 0, "bytes": 0} for tag in ("w", "counter")}
    for r in rows:
        want[r["tag"]]["changes"] += 1
        want[r["tag"]]["bytes"] += r["bytes_changed"]
    assert last == want and want["w"]["changes"] == 5

    # the watches are on the timeline, and the recording's end
    region = {e["name"] for e in events if e.get("cat") == "region"}
    assert {"watch w", "watch counter"} <= region
    assert [e["name"] for e in events if e.get("cat") == "recording"] == ["recording started", "recording closed"]
