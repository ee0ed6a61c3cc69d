"""The line that crashed: when a fatal signal ends a recorded program in the
middle of a line that already wrote watched memory, the trace holds those
writes too, on that line, and says how the program died.

No test sleeps before the ending: each program writes, then dies on the
same line, so what the fatal-signal handler does not write is lost."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import memwatch
from test_record_cli import mw

# How each program dies, on the line that also writes (line CRASH_LINE).
ENDINGS = {
    "abort": ("os.abort()", signal.SIGABRT),
    "kill-segv": ("os.kill(os.getpid(), signal.SIGSEGV)", signal.SIGSEGV),
    "kill-bus": ("os.kill(os.getpid(), signal.SIGBUS)", signal.SIGBUS),
    "segfault": ("ctypes.string_at(0)", signal.SIGSEGV),
    "sigbus": ("bus_map()[0]", signal.SIGBUS),
    "sigterm": ("os.kill(os.getpid(), signal.SIGTERM)", signal.SIGTERM),
    "faulthandler": ("faulthandler.enable(); ctypes.string_at(0)", signal.SIGSEGV),
}

PROGRAM = """\
import ctypes, faulthandler, mmap, os, signal, tempfile, sys
import numpy as np, memwatch
def bus_map():
    f = tempfile.TemporaryFile()
    f.truncate(4096)
    m = mmap.mmap(f.fileno(), 4096)
    f.truncate(0)
    return m
if sys.argv[1] == "start":
    memwatch.start(trace="prog.mwt")
w = np.zeros((256, 1024), dtype=np.float32)
memwatch.watch(w, name="w")
flags = bytearray(16)
memwatch.watch(flags, name="flags")
w[0, 0] = 1.0
w[3, 5:8] = 2.5; w[200, 1000] = -4.0; flags[2] = 9; {ending}
"""
CRASH_LINE = 16


def run(tmp_path, ending: str, via: str) -> subprocess.CompletedProcess[str]:
    p = tmp_path / "prog.py"
    p.write_text(PROGRAM.format(ending=ENDINGS[ending][0]))
    if via == "record":
        return mw("record", sys.executable, str(p), via, cwd=tmp_path, check=False)
    return subprocess.run([sys.executable, str(p), via], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def changed(row: dict, dtype: str) -> dict[int, object]:
    """Flat element index -> new value, for the elements a change changed."""
    size = np.dtype(dtype).itemsize
    out = {}
    for rg in row["ranges"]:
        assert rg["offset"] % size == 0, row
        old = np.frombuffer(bytes.fromhex(rg["old"]), dtype)
        new = np.frombuffer(bytes.fromhex(rg["new"]), dtype)
        for k, (o, n) in enumerate(zip(old, new)):
            if o != n:
                out[rg["offset"] // size + k] = n.item()
    return out


def rows(tmp_path) -> list[dict]:
    q = mw("query", "prog.mwt", "--format", "jsonl", cwd=tmp_path)
    return [json.loads(x) for x in q.stdout.splitlines()]


@pytest.mark.parametrize("ending", list(ENDINGS))
@pytest.mark.parametrize("via", ["record", "start"])
def test_the_line_that_crashed_is_in_the_trace(tmp_path, ending, via):
    r = run(tmp_path, ending, via)
    sig = ENDINGS[ending][1]
    # The program died of its signal, as it would have without memwatch.
    assert r.returncode == (128 + sig if via == "record" else -sig), r.stderr
    if ending == "faulthandler":
        assert "Fatal Python error: Segmentation fault" in r.stderr
    assert memwatch.trace_info(tmp_path / "prog.mwt")["tail"] == "unclosed"
    got = rows(tmp_path)
    before = [x for x in got if x["line"] == CRASH_LINE - 1]
    assert [(x["tag"], changed(x, "<f4")) for x in before] == [("w", {0: 1.0})]
    crashed = [x for x in got if x["line"] == CRASH_LINE]
    # One change per region, with every write of the line in it.
    assert sorted(x["tag"] for x in crashed) == ["flags", "w"], got
    wc = next(x for x in crashed if x["tag"] == "w")
    assert wc["file"].endswith("prog.py") and wc["function"] == "<module>"
    assert wc["thread_name"] == "MainThread"
    assert changed(wc, "<f4") == {3 * 1024 + 5: 2.5, 3 * 1024 + 6: 2.5, 3 * 1024 + 7: 2.5, 200 * 1024 + 1000: -4.0}
    fc = next(x for x in crashed if x["tag"] == "flags")
    assert changed(fc, "u1") == {2: 9}
    state = mw("state", "prog.mwt", "--tag", "w", "--format", "npy", "-o", "w.npy", cwd=tmp_path)
    assert state.returncode == 0
    want = np.zeros((256, 1024), dtype=np.float32)
    want[0, 0] = 1.0
    want[3, 5:8] = 2.5
    want[200, 1000] = -4.0
    assert np.array_equal(np.load(tmp_path / "w.npy"), want)
    blame = mw("blame", "prog.mwt", "--tag", "w", "--index", "200,1000", cwd=tmp_path).stdout
    assert f"prog.py:{CRASH_LINE}" in blame and "-4.0" in blame, blame
    flags = mw("state", "prog.mwt", "--tag", "flags", "--format", "raw", "-o", "f.raw", cwd=tmp_path)
    assert flags.returncode == 0 and (tmp_path / "f.raw").read_bytes() == bytes([0, 0, 9]) + bytes(13)
    summary = mw("summary", "prog.mwt", cwd=tmp_path)
    name = signal.Signals(sig).name
    told = f"the program died of {name} in the main thread"
    assert told in summary.stderr and f"at prog.py:{CRASH_LINE}" in summary.stderr, summary.stderr
    # bus_map() is in-scope Python: its return is a boundary, which found
    # the line's writes before the fault, so the last look finds none.
    looked = 0 if ending == "sigbus" else 2
    assert f"its last look recorded {looked} changes" in summary.stderr
    # The summary's run part says it too, and so does its JSON.
    assert f"\nended: {told}" in summary.stdout and f"at prog.py:{CRASH_LINE}" in summary.stdout, summary.stdout
    js = json.loads(mw("summary", "prog.mwt", "--format", "json", cwd=tmp_path).stdout)
    assert js["ending"]["how"] == "crashed" and js["ending"]["signal_name"] == name
    assert js["ending"]["signal"] == sig and js["ending"]["thread"] == js["pid"]
    if via == "record":
        # Folded into the trace: nothing is left beside it.
        assert told in r.stderr
        assert not (tmp_path / "prog.mwt.crash").exists()
        assert not (tmp_path / "prog.mwt.journal").exists()


def test_a_crash_in_a_thread_is_on_that_threads_line(tmp_path):
    p = tmp_path / "prog.py"
    p.write_text(
        textwrap.dedent(
            """\
            import os, threading, numpy as np, memwatch
            a = np.zeros(64, dtype=np.int64)
            memwatch.watch(a, name="a")
            a[0] = 1
            def worker():
                a[1] = 2
                a[2] = 3; os.abort()
            t = threading.Thread(target=worker, name="worker")
            t.start()
            t.join()
            """
        )
    )
    r = mw("record", sys.executable, str(p), cwd=tmp_path, check=False)
    assert r.returncode == 128 + signal.SIGABRT, r.stderr
    got = rows(tmp_path)
    assert [(x["line"], x["thread_name"], changed(x, "<i8")) for x in got] == [
        (4, "MainThread", {0: 1}),
        (6, "worker", {1: 2}),
        (7, "worker", {2: 3}),
    ]
    assert got[2]["function"] == "worker"
    assert "the program died of SIGABRT in thread" in r.stderr and "at prog.py:7" in r.stderr


def test_a_strided_views_last_look_keeps_to_the_view(tmp_path):
    p = tmp_path / "prog.py"
    p.write_text(
        textwrap.dedent(
            """\
            import os, numpy as np, memwatch
            base = np.zeros(32, dtype=np.int32)
            v = base[::2]
            memwatch.watch(v, name="v")
            base[1] = 5; base[4] = 6; os.abort()
            """
        )
    )
    r = mw("record", sys.executable, str(p), cwd=tmp_path, check=False)
    assert r.returncode == 128 + signal.SIGABRT, r.stderr
    got = rows(tmp_path)
    # base[1] is not in the view; base[4] is v[2].
    # Offsets are into the view's span: v[2] is bytes 16..20.
    assert [(x["line"], changed(x, "<i4")) for x in got] == [(5, {4: 6})]
    assert "its last look recorded 1 change" in r.stderr


def test_a_program_that_ends_normally_leaves_no_crash_area(tmp_path):
    p = tmp_path / "prog.py"
    p.write_text("import numpy as np, memwatch\na = np.zeros(4)\nmemwatch.watch(a)\na[0] = 1\n")
    mw("record", sys.executable, str(p), cwd=tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["prog.mwt", "prog.py"]
    s = mw("summary", "prog.mwt", cwd=tmp_path)
    assert "died" not in s.stdout + s.stderr
    assert "\nended: closed normally\n" in s.stdout
