"""Changes reach the live report and the trace file."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np

import memwatch
from conftest import BIN, ROOT, here


def dump(path, *extra: str) -> list[str]:
    r = subprocess.run(
        [str(BIN / "memwatch"), "dump", "--records-only", "--max-bytes", "0", *extra, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def kinds(lines, kind):
    return [ln for ln in lines if ln.startswith(kind + " ")]


def test_start_stop_records_regions_changes_and_lines(changes, tmp_path):
    trace = tmp_path / "run.mwt"
    w = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    memwatch.watch(w, name="layer1_weight")
    memwatch.start(trace=trace)
    w[1] = 5.0; line = here()  # noqa: E702
    counter = bytearray(8)
    memwatch.watch(counter, name="step")
    counter[0] = 1; line2 = here()  # noqa: E702
    summary = memwatch.stop()
    assert summary["path"] == str(trace) and summary["changes"] == 2
    assert summary["bytes"] == trace.stat().st_size
    info = memwatch.trace_info(trace)
    assert info["tail"] == "closed"
    assert info["pid"] == os.getpid()
    assert info["properties"]["backend"] == memwatch.backend()
    lines = dump(trace)
    watch = kinds(lines, "WATCH")
    assert len(watch) == 2
    assert " tag=layer1_weight variable=w " in watch[0] and " dtype=<f4 itemsize=4 shape=[3] " in watch[0]
    contents = kinds(lines, "CONTENTS")
    assert contents[0].endswith("len=12 data=" + np.array([1, 2, 3], np.float32).tobytes().hex())
    change = kinds(lines, "CHANGE")
    assert len(change) == 2
    assert f" at={os.path.realpath(__file__)}:{line} " in change[0] or f":{line} function=" in change[0]
    assert change[0].endswith(f"range=4:{np.float32(2).tobytes().hex()}->{np.float32(5).tobytes().hex()}")
    assert " tag=step " in change[1] and f":{line2} " in change[1]
    assert " thread_name=MainThread " in change[0]


def test_checkpoints_let_state_be_rebuilt(changes, tmp_path):
    trace = tmp_path / "ckpt.mwt"
    memwatch.configure(max_history=0)
    try:
        a = np.zeros(16 * 1024, dtype=np.uint8)  # 16 KiB: compare tracking
        memwatch.watch(a, name="a")
        memwatch.start(trace=trace)
        for i in range(130):
            # 16 KiB changed per line; a checkpoint once 16 times 64 KiB
            # (CHECKPOINT_FACTOR times CHECKPOINT_MIN) changed since the last.
            a[:] = i + 1
        memwatch.stop()
    finally:
        memwatch.configure(max_history=100_000)
    lines = dump(trace)
    ckpts = kinds(lines, "CHECKPOINT")
    assert len(ckpts) == 2, ckpts  # after 1 MiB and 2 MiB of changes
    seqs = [int(re.search(r"at_seq=(\d+)", c).group(1)) for c in ckpts]
    change_seqs = [int(re.search(r"seq=(\d+)", c).group(1)) for c in kinds(lines, "CHANGE")]
    assert [change_seqs.index(s) for s in seqs] == [63, 127]
    # Each rewrote the whole region: the change is the checkpoint's
    # contents, stored once, as its new bytes (a `full` delta).
    assert kinds(lines, "CONTENTS") == [ln for ln in kinds(lines, "CONTENTS") if "at_seq=%d " % seqs[0] not in ln and "at_seq=%d " % seqs[1] not in ln]
    full = [int(ln.split(" seq=")[1].split()[0]) for ln in kinds(dump(trace, "--raw"), "DELTA") if " full " in ln + " "]
    assert full == seqs
    t = memwatch.open_trace(trace)
    for s, k in zip(seqs, (63, 127)):
        assert np.array_equal(t.state("a", at=s), np.full(16 * 1024, k + 1, np.uint8))
        assert np.array_equal(t.state("a", at=s + 1), np.full(16 * 1024, k + 2, np.uint8))


def run_script(code: str, env: dict) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, **env),
        cwd=ROOT,
    )


def test_memwatch_trace_env_records_from_the_first_watch(tmp_path):
    trace = tmp_path / "env.mwt"
    r = run_script(
        """
        import memwatch
        buf = bytearray(4)
        memwatch.watch(buf, name="b")
        buf[2] = 9
        """,
        {"MEMWATCH_TRACE": str(trace)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # a trace takes the changes: no live report
    assert memwatch.trace_info(trace)["tail"] == "closed"  # closed at exit
    change = kinds(dump(trace), "CHANGE")
    assert len(change) == 1 and change[0].endswith("range=2:00->09")
    assert " at=<string>:5 " in change[0]


def test_live_report_in_the_seed_format():
    r = run_script(
        """
        import numpy as np, memwatch
        my_tensor = np.zeros(4, dtype=np.float32)
        memwatch.watch(buffer=my_tensor.ctypes.data, size=my_tensor.nbytes, name="layer1_weight", dtype="float32")
        my_tensor[1] = 0.5
        """,
        {"MEMWATCH_LIVE": "1"},
    )
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "[MEMWATCH] Tag: layer1_weight"
    assert re.fullmatch(r"Address: 0x[0-9a-f]+", lines[1])
    assert lines[2] == "Old Value (sample): b'\\x00\\x00\\x00\\x00'"
    assert lines[3] == f"New Value (sample): {struct.pack('<f', 0.5)!r}"
    assert lines[4] == "Elements: [1] 0.0 -> 0.5"
    assert lines[5] == "Python Variable: my_tensor"
    assert lines[6] == "Line: <string>:5 in <module>"


def test_live_report_can_be_silenced():
    code = """
        import memwatch
        buf = bytearray(4)
        memwatch.watch(buf, name="b")
        buf[0] = 1
        memwatch.configure(live=False)
        buf[1] = 1
    """
    r = run_script(code, {"MEMWATCH_LIVE": "0"})
    assert r.returncode == 0 and r.stderr == ""
    r = run_script(code, {"MEMWATCH_LIVE": "1"})
    assert r.stderr.count("[MEMWATCH]") == 1


def test_a_watch_ends_when_only_memwatch_refers_to_its_object(tmp_path):
    trace = tmp_path / "collected.mwt"
    r = run_script(
        """
        import numpy as np, memwatch
        def regions():
            return sorted(t for _, t, *_ in memwatch._memwatch._regions())
        def step(v):
            local = np.zeros(4, dtype=np.int32)
            memwatch.watch(local)
            local[1] = v
        for v in (5, 7):
            step(v)
        print(regions())
        base = np.zeros(4, dtype=np.int32)
        memwatch.watch(base, name="base")
        view = base[1:]
        del base
        print(regions())
        view[0] = 3
        del view
        print(regions())
        buf = bytearray(8)
        memwatch.watch(buf)
        del buf
        print(regions())
        """,
        {"MEMWATCH_TRACE": str(trace)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    # Calling step() again works: the first call's array ended its watch
    # when nothing referred to it; a view keeps its base's watch alive.
    assert r.stdout.splitlines() == ["[]", "['base']", "[]", "[]"]
    lines = dump(trace)
    watched = [ln.split(" tag=")[1].split()[0] for ln in kinds(lines, "WATCH")]
    assert watched == ["local", "local", "base", "buf"]
    ended = [(ln.split(" tag=")[1].split()[0], ln.split(" reason=")[1].split()[0]) for ln in kinds(lines, "UNWATCH")]
    assert ended == [("local", "collected"), ("local", "collected"), ("base", "collected"), ("buf", "collected")]
    change = kinds(lines, "CHANGE")
    assert len(change) == 3
    assert " at=<string>:8 " in change[0] and change[0].endswith("range=4:00000000->05000000")
    assert " at=<string>:8 " in change[1] and change[1].endswith("range=4:00000000->07000000")
    assert " at=<string>:17 " in change[2] and change[2].endswith("range=4:00000000->03000000")
