"""`memwatch.open_trace` reads a run of several processes as one: the
processes, their changes merged by time with each change's pid (and
rank), and `state`/`blame` in the process that watched the tag."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap

import pytest

import memwatch
from memwatch._display import text_table
from test_multiprocess import FORK, line_of, members, mw, record




@pytest.fixture
def fork_run(tmp_path):
    """A recorded fork: w watched in both processes (the child keeps it), c
    only in the child; the parent waits for the child before its last write."""
    record(tmp_path, FORK)
    child = int((tmp_path / "child").read_text())
    root = memwatch.trace_info(tmp_path / "run.mwt")["pid"]
    return tmp_path, root, child


def test_processes_lists_the_run_root_first(fork_run):
    tmp_path, root, child = fork_run
    t = memwatch.open_trace(tmp_path / "run.mwt")
    procs = t.processes
    assert [(p.pid, p.parent, p.rank) for p in procs] == [(root, None, None), (child, root, None)]
    assert [p.path.name for p in procs] == ["run.mwt", f"run.{child}.mwt"]
    assert procs[0].tail == "closed" and procs[1].tail in ("closed", "unclosed")
    assert procs[0].argv[-1] == "prog.py" and procs[1].argv == procs[0].argv
    # The child started after the root: its offset is from the run's start.
    assert procs[0].start_offset_ns == 0 and procs[1].start_offset_ns > 0
    assert procs[1].start_time_ns - procs[0].start_time_ns == procs[1].start_offset_ns
    assert f"pid={child}" in repr(procs[1]) and f"parent={root}" in repr(procs[1])
    assert "a run of 2 processes" in repr(t)
    assert t.meta["pid"] == root and t.tags == ["c", "w"]


def test_changes_of_every_process_merged_by_time_with_their_pid(fork_run):
    tmp_path, root, child = fork_run
    t = memwatch.open_trace(tmp_path / "run.mwt")
    got = [(c.pid, c.rank, c.seq, c.tag, c.indices, c.new_values, c.line) for c in t.changes()]
    # THEN the parent's write, the child's two, the parent's after it waited
    assert got == [
        (root, None, 3, "w", [0], [1], line_of(tmp_path, "before the fork")),
        (child, None, 3, "w", [1], [2], line_of(tmp_path, "in the child")),
        (child, None, 4, "c", [1], [0.25], line_of(tmp_path, "the child's own array")),
        (root, None, 4, "w", [2], [3], line_of(tmp_path, "in the parent, after")),
    ]
    times = [c.time_ns for c in t.changes()]
    assert times == sorted(times)
    # AND the filters apply in every process; limit= counts what is returned
    assert [(c.pid, c.new_values) for c in t.changes(tag="w")] == [(root, [1]), (child, [2]), (root, [3])]
    assert [c.pid for c in t.changes(limit=2)] == [root, child]
    assert [c.seq for c in t.changes(seq=(4, 4))] == [4, 4]


def test_pid_keeps_some_processes(fork_run):
    tmp_path, root, child = fork_run
    t = memwatch.open_trace(tmp_path / "run.mwt")
    assert [(c.tag, c.new_values) for c in t.changes(pid=child)] == [("w", [2]), ("c", [0.25])]
    assert len(t.changes(pid=[root, child])) == 4 and len(t.changes(pid=(root,))) == 2
    with pytest.raises(ValueError, match=rf"pid=1: no process of this run has that pid \(its processes: {root}, {child}\)"):
        t.changes(pid=1)
    with pytest.raises(TypeError, match="pid= takes a process id"):
        t.changes(pid="1")
    # open_trace(pid=...) reads only those
    only = memwatch.open_trace(tmp_path / "run.mwt", pid=child)
    assert [p.pid for p in only.processes] == [child] and len(only.changes()) == 2
    with pytest.raises(ValueError, match="pid=7: no process of this run"):
        memwatch.open_trace(tmp_path / "run.mwt", pid=7)
    # A member's own trace reads as one process
    own = memwatch.open_trace(tmp_path / f"run.{child}.mwt")
    assert [p.pid for p in own.processes] == [child] and own.processes[0].parent == root
    assert [c.new_values for c in own.changes()] == [[2], [0.25]] and "a run of" not in repr(own)


def test_state_and_blame_read_the_process_that_watched_the_tag(fork_run):
    tmp_path, root, child = fork_run
    t = memwatch.open_trace(tmp_path / "run.mwt")
    # c: only the child watched it
    assert t.state("c").tolist() == [0.0, 0.25]
    b = t.blame("c", index=1)
    assert (b.pid, b.new_values, b.line) == (child, [0.25], line_of(tmp_path, "the child's own array"))
    # w: both did, so pid= picks one
    with pytest.raises(ValueError, match=rf'"w" was watched in 2 processes of this run \({root}, {child}\): name one with pid='):
        t.state("w")
    with pytest.raises(ValueError, match="name one with pid="):
        t.blame("w", index=1)
    assert t.state("w", pid=root).tolist() == [1, 0, 3, 0]
    assert t.state("w", pid=child).tolist() == [1, 2, 0, 0]
    assert t.state("w", pid=child, at=1).tolist() == [1, 0, 0, 0]  # as the fork left it
    b = t.blame("w", index=1, pid=child)
    assert (b.pid, b.seq, b.line) == (child, 3, line_of(tmp_path, "in the child"))
    assert t.blame("w", index=1, pid=root) is None
    with pytest.raises(KeyError, match='no process of this run watched a region tagged "nope"'):
        t.state("nope")
    with pytest.raises(ValueError, match="pid=5: no process of this run"):
        t.state("w", pid=5)


def test_at_a_time_counts_from_the_runs_start(fork_run):
    tmp_path, root, child = fork_run
    t = memwatch.open_trace(tmp_path / "run.mwt")
    base = min(p.start_time_ns for p in t.processes)
    last = t.changes(pid=root)[-1]  # w[2] = 3, after the child ended
    at = last.time_ns - base
    assert t.state("w", pid=root, at=f"{at}ns").tolist() == [1, 0, 3, 0]
    assert t.state("w", pid=root, at=f"{at - 1}ns").tolist() == [1, 0, 0, 0]
    mine = t.changes(pid=child)[0]  # w[1] = 2
    at = mine.time_ns - base
    assert t.state("w", pid=child, at=datetime.timedelta(microseconds=at / 1000 + 1)).tolist() == [1, 2, 0, 0]
    assert t.blame("w", index=1, pid=child, at=f"{at}ns").seq == mine.seq
    with pytest.raises(ValueError, match="started .* after the run did"):
        t.state("w", pid=child, at="1ns")


def test_to_pandas_has_pid_and_rank_merged_by_time(fork_run):
    pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    tmp_path, root, child = fork_run
    t = memwatch.open_trace(tmp_path / "run.mwt")
    df = t.to_pandas()
    assert list(df["pid"]) == [c.pid for c in t.changes()] == [root, child, child, root]
    assert list(df["seq"]) == [3, 3, 4, 4] and df["rank"].isna().all()
    assert list(df["time_ns"]) == sorted(df["time_ns"])
    base = min(p.start_time_ns for p in t.processes)
    assert list(df["time_ns"]) == [c.time_ns - base for c in t.changes()]
    assert list(t.to_pandas(pid=child)["tag"]) == ["w", "c"]
    els = t.to_pandas(elements=True, tag="w")
    assert list(els["pid"]) == [root, child, root]


def test_a_merged_list_shows_the_process(fork_run):
    tmp_path, root, child = fork_run
    t = memwatch.open_trace(tmp_path / "run.mwt")
    table = text_table(t.changes()).splitlines()
    assert table[0].split()[:2] == ["pid", "seq"]
    assert table[2].split()[0] == str(root) and table[3].split()[0] == str(child)
    # One process: the table it always had
    assert text_table(t.changes(pid=child)).splitlines()[0].split()[0] == "seq"


def test_ranks_are_read_from_each_process(tmp_path):
    # GIVEN a parent that runs two Python programs with $RANK 0 and 1
    (tmp_path / "rank.py").write_text(
        "import numpy as np, memwatch, os\nr = np.zeros(1)\nmemwatch.watch(r, name='r')\n"
        "r[0] = 10 + int(os.environ['RANK'])  # the rank's write\n"
    )
    record(
        tmp_path,
        """
        import os, subprocess, sys
        for rank in ("0", "1"):
            subprocess.run([sys.executable, "rank.py"], env=dict(os.environ, RANK=rank), check=True)
        """,
    )
    t = memwatch.open_trace(tmp_path / "run.mwt")
    pids = sorted(members(tmp_path))
    assert [(p.pid, p.rank) for p in t.processes][1:] == list(zip(pids, [0, 1]))
    assert t.processes[0].rank is None
    got = [(c.pid, c.rank, c.new_values, c.line) for c in t.changes()]
    assert got == [(pids[0], 0, [10.0], 4), (pids[1], 1, [11.0], 4)]
    with pytest.raises(ValueError, match=rf"watched in 2 processes of this run \({pids[0]} \(rank 0\), {pids[1]} \(rank 1\)\)"):
        t.state("r")
    assert t.state("r", pid=pids[1]).tolist() == [11.0]
    assert list(t.to_pandas()["rank"]) == [0, 1]
    # AND a tag filter skips the root, which watched nothing
    assert [c.rank for c in t.changes(tag="r")] == [0, 1]
    assert list(t.to_pandas(tag="r")["pid"]) == pids
    with pytest.raises(KeyError, match='no process of this run has a tag "nope"; their tags are: r'):
        t.changes(tag="nope")
    with pytest.raises(KeyError, match='no process of this run has a tag "nope"'):
        t.to_pandas(tag="nope")
    q = mw(tmp_path, "query", "run.mwt", "--tag", "r", "--format", "jsonl")
    assert q.returncode == 0, q.stderr
    assert [(x["pid"], x["rank"]) for x in map(json.loads, q.stdout.splitlines())] == list(zip(pids, [0, 1]))
    q = mw(tmp_path, "query", "run.mwt", "--tag", "nope")
    assert q.returncode == 1 and 'no process of this run has a tag "nope"; their tags are: r' in q.stderr


def test_one_process_trace_reads_as_before(tmp_path):
    record(
        tmp_path,
        """
        import numpy as np
        import memwatch

        a = np.zeros(3, dtype=np.int32)
        memwatch.watch(a, name="a")
        a[2] = 5  # the write
        """,
    )
    assert members(tmp_path) == {}
    t = memwatch.open_trace(tmp_path / "run.mwt")
    (p,) = t.processes
    assert (p.pid, p.parent, p.rank, p.tail, p.start_offset_ns) == (t.meta["pid"], None, None, "closed", 0)
    (c,) = t.changes()
    assert (c.pid, c.rank, c.new_values, c.line) == (t.meta["pid"], None, [5], line_of(tmp_path, "the write"))
    assert t.state("a").tolist() == [0, 0, 5] and t.blame("a", index=2).pid == p.pid
    assert t.state("a", pid=p.pid).tolist() == [0, 0, 5]
    assert repr(t) == f'<memwatch.Trace "{tmp_path / "run.mwt"}">'
    with pytest.raises(KeyError):
        t.state("nope")


def test_live_changes_say_their_process():
    code = textwrap.dedent(
        """
        import os
        import numpy as np
        import memwatch

        a = np.zeros(2)
        memwatch.watch(a, name="a")
        a[0] = 1
        memwatch.check()
        (c,) = memwatch.history("a")
        print(c.pid == os.getpid(), c.rank)
        """
    )
    for rank, want in ((None, "True None"), ("3", "True 3")):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "MEMWATCH_TRACE")}
        if rank is not None:
            env["RANK"] = rank
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == want
