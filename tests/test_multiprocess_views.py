"""`memwatch summary` and `memwatch report` read a run of several processes
whole, from its first trace: each process (pid, rank, parent, trace, how it
ended), each tag per process (a fork's child keeps its parent's watches
under the same tag), times on the run's clock; `--pid` keeps some."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import BIN
from test_multiprocess import POOL, line_of, members, props, record
from test_report import data_of, open_in_browser

FORK = """
    import os
    import numpy as np
    import memwatch

    w = np.zeros(4, dtype=np.float32)
    memwatch.watch(w, name="w")
    w[0] = 1  # before the fork
    pid = os.fork()
    if pid == 0:
        w[1] = 2  # in the child
        w[2] = 3  # in the child again
        os._exit(0)
    os.waitpid(pid, 0)
    w[3] = 4  # in the parent, after
    open("child", "w").write(str(pid))
"""


def mw(tmp_path: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run(
        [str(BIN / "memwatch"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture
def fork_run(tmp_path) -> tuple[Path, int, int]:
    """A recorded run of a parent and its fork's child: (folder, parent pid, child pid)."""
    record(tmp_path, FORK)
    child = int((tmp_path / "child").read_text())
    parent = int(props(tmp_path / f"run.{child}.mwt")["parent"])
    assert set(members(tmp_path)) == {child}
    return tmp_path, parent, child


def test_summary_of_a_fork_run_lists_each_process_and_its_tags(fork_run):
    cwd, parent, child = fork_run
    # WHEN the run is summarized from its first trace
    text = mw(cwd, "summary", "run.mwt").stdout
    lines = text.splitlines()
    # THEN the run section lists both processes: pid, parent, trace file, changes, how each ended
    assert lines[1].startswith("run: 2 processes, from "), text
    root_line = next(x for x in lines if x.startswith(f"  pid {parent}: "))
    child_line = next(x for x in lines if x.startswith(f"  pid {child} (parent {parent}): "))
    assert "run.mwt, from 0ns for " in root_line and ", 2 changes, " in root_line
    assert root_line.endswith("ended: closed normally")
    assert f"run.{child}.mwt, from " in child_line and ", 2 changes, " in child_line
    assert "ended: not closed" in child_line  # os._exit: its trace has no trailer
    # AND the run's totals, and the tag both processes changed
    assert "total: 4 changes, 16 bytes changed, 2 regions watched, 0 checkpoints; 2 traces, " in text
    assert f"  w: 4 changes, 16 bytes changed, in 2 processes (pids {parent}, {child})" in lines
    # AND each (pid, tag) apart, with its own changes and lines
    i, j = lines.index(f"w (pid {parent}): 2 changes, 8 bytes changed, 2 elements changed"), lines.index(
        f"w (pid {child}): 2 changes, 8 bytes changed, 2 elements changed"
    )
    mine, theirs = "\n".join(lines[i:j]), "\n".join(lines[j:])
    for marker in ["before the fork", "in the parent, after"]:
        assert f"prog.py:{line_of(cwd, marker)} (<module>)" in mine and f"prog.py:{line_of(cwd, marker)} " not in theirs
    for marker in ["in the child", "in the child again"]:
        assert f"prog.py:{line_of(cwd, marker)} (<module>)" in theirs
    # the child's seqs are its own; its times are after it started, on the run's clock
    assert "first: seq " in theirs


def test_summary_pid_keeps_some_processes(fork_run):
    cwd, parent, child = fork_run
    one = mw(cwd, "summary", "run.mwt", "--pid", str(child)).stdout
    assert one.splitlines()[1].startswith("run: 1 process, ")
    assert f"  pid {child} (parent {parent}): run.{child}.mwt" in one
    assert f"pid {parent}:" not in one and f"w (pid {parent})" not in one
    assert f"w (pid {child}): 2 changes" in one and "total: 2 changes, 8 bytes changed" in one
    # comma-separated and repeated are the same as all of them
    both = mw(cwd, "summary", "run.mwt", "--pid", f"{parent},{child}").stdout
    assert both == mw(cwd, "summary", "run.mwt", "--pid", str(parent), "--pid", str(child)).stdout
    assert both == mw(cwd, "summary", "run.mwt").stdout
    # a pid of no process of the run is refused, naming the run's pids
    bad = mw(cwd, "summary", "run.mwt", "--pid", "1", ok=False)
    assert bad.returncode == 1 and "--pid 1: no process of this run has that pid" in bad.stderr
    assert str(parent) in bad.stderr and str(child) in bad.stderr


def test_summary_json_of_a_run_has_its_processes_and_a_pid_per_tag(fork_run):
    cwd, parent, child = fork_run
    d = json.loads(mw(cwd, "summary", "run.mwt", "--format", "json").stdout)
    procs = {p["pid"]: p for p in d["processes"]}
    assert list(procs) == [parent, child]
    assert (procs[parent]["parent"], procs[child]["parent"]) == (None, parent)
    assert (procs[parent]["trace"], Path(procs[child]["trace"]).name) == ("run.mwt", f"run.{child}.mwt")
    assert (procs[parent]["changes"], procs[child]["changes"]) == (2, 2)
    assert procs[parent]["ending"]["how"] == "closed" and procs[child]["ending"]["how"] != "closed"
    assert procs[parent]["start_ns"] == 0 and procs[child]["start_ns"] > 0
    assert procs[child]["start_time_ns"] == procs[parent]["start_time_ns"] + procs[child]["start_ns"]
    assert (d["changes"], d["bytes_changed"], d["regions_watched"]) == (4, 16, 2)
    assert d["trace_bytes"] == sum(p["trace_bytes"] for p in d["processes"])
    assert d["duration_ns"] >= procs[child]["start_ns"] + procs[child]["duration_ns"]
    tags = {(t["pid"], t["tag"]): t for t in d["tags"]}
    assert set(tags) == {(parent, "w"), (child, "w")}
    assert all(t["rank"] is None and t["changes"] == 2 for t in tags.values())
    theirs = tags[(child, "w")]
    assert sorted(x["line"] for x in theirs["lines"]) == [
        line_of(cwd, "in the child"),
        line_of(cwd, "in the child again"),
    ]
    # times are on the run's clock: the child's changes come after it started
    assert theirs["first_time_ns"] >= procs[child]["start_ns"]
    # --pid in JSON too
    one = json.loads(mw(cwd, "summary", "run.mwt", "--format", "json", "--pid", str(child)).stdout)
    assert [p["pid"] for p in one["processes"]] == [child] and [t["pid"] for t in one["tags"]] == [child]


def test_summary_of_one_process_has_no_run_section(tmp_path):
    record(
        tmp_path,
        """
        import numpy as np
        import memwatch

        w = np.zeros(4, dtype=np.float32)
        memwatch.watch(w, name="w")
        w[0] = 1
        w[1] = 2
        """,
    )
    assert members(tmp_path) == {}
    text = mw(tmp_path, "summary", "run.mwt").stdout
    assert "\nrun: " not in text and "\ntotal: " not in text and "(pid " not in text
    assert text.splitlines()[1].startswith("process: pid ") and "\nw: 2 changes" in text
    d = json.loads(mw(tmp_path, "summary", "run.mwt", "--format", "json").stdout)
    assert "processes" not in d and all("pid" not in t for t in d["tags"])
    mw(tmp_path, "report", "run.mwt")
    r = data_of((tmp_path / "run.html").read_text())
    assert "processes" not in r["run"] and all("pid" not in t and "label" not in t for t in r["tags"])


def test_summary_of_a_pool_says_which_worker_changed_what(tmp_path):
    record(tmp_path, POOL, "fork")
    results = json.loads((tmp_path / "results.json").read_text())
    by_pid: dict[int, int] = {}
    for pid, _ in results:
        by_pid[pid] = by_pid.get(pid, 0) + 1
    d = json.loads(mw(tmp_path, "summary", "run.mwt", "--format", "json").stdout)
    root = d["processes"][0]
    assert root["parent"] is None and root["changes"] == 0
    workers = {p["pid"]: p for p in d["processes"][1:]}
    assert set(workers) == set(by_pid) and all(p["parent"] == root["pid"] for p in workers.values())
    assert {t["pid"]: t["changes"] for t in d["tags"] if t["tag"] == "worker"} == by_pid
    text = mw(tmp_path, "summary", "run.mwt").stdout
    assert f"run: {1 + len(by_pid)} processes, " in text
    for pid, n in by_pid.items():
        assert f"worker (pid {pid}): {n} change" in text


def test_report_of_a_fork_run_shows_both_processes(fork_run):
    cwd, parent, child = fork_run
    r = mw(cwd, "report", "run.mwt")
    assert "run.html" in r.stdout
    d = data_of((cwd / "run.html").read_text())
    # THEN the metadata lists the processes: pid, parent, trace, how each ended
    procs = {p["pid"]: p for p in d["run"]["processes"]}
    assert list(procs) == [parent, child] and d["run"]["processes_total"] == 2
    assert (procs[parent]["parent"], procs[child]["parent"]) == (None, parent)
    assert (procs[parent]["trace"], procs[child]["trace"]) == ("run.mwt", f"run.{child}.mwt")
    assert not procs[parent]["ending"]["bad"] and procs[child]["ending"]["bad"]
    assert (procs[parent]["changes"], procs[child]["changes"]) == (2, 2) and d["run"]["changes"] == 4
    # AND the tag of each process apart, labelled with its pid, on the run's clock
    tags = {(t["pid"], t["name"]): t for t in d["tags"]}
    assert set(tags) == {(parent, "w"), (child, "w")}
    assert tags[(child, "w")]["label"] == f"w (pid {child})" and tags[(parent, "w")]["label"] == f"w (pid {parent})"
    assert tags[(child, "w")]["first_ns"] >= procs[child]["start_ns"] > 0
    assert len(d["timeline"]["tags"]) == 2
    # AND the lines say which process
    lines = {(l["pid"], l["line"]) for l in d["lines"]}
    assert lines == {
        (parent, line_of(cwd, "before the fork")),
        (parent, line_of(cwd, "in the parent, after")),
        (child, line_of(cwd, "in the child")),
        (child, line_of(cwd, "in the child again")),
    }
    assert all(d["tags"][l["tag"]]["pid"] == l["pid"] for l in d["lines"])
    assert all("pid" in s for s in d["suspicious"])
    assert {t["label"] for t in d["trajectories"]} <= {f"w[{i}] (pid {p})" for i in range(4) for p in (parent, child)}

    # AND in a browser: both processes, pid-labelled tags, the child's ending, no error or request
    seen = open_in_browser(cwd / "run.html", "report-fork-run.png")
    assert seen.problems == []
    text = seen.text
    for want in ["Processes", "2 processes", f"run.{child}.mwt", f"w (pid {parent})", f"w (pid {child})",
                 "not closed", f"the recording of run.{child}.mwt ended", "run.mwt and 1 other trace",
                 "time since the run started"]:
        assert want in text, want
    assert seen.charts["sections"][0] == "Run" and seen.charts["canvases"] == 2


def test_report_pid_and_element_in_a_run(fork_run):
    cwd, parent, child = fork_run
    mw(cwd, "report", "run.mwt", "-o", "child.html", "--pid", str(child))
    d = data_of((cwd / "child.html").read_text())
    assert [p["pid"] for p in d["run"]["processes"]] == [child]
    assert [(t["pid"], t["label"]) for t in d["tags"]] == [(child, f"w (pid {child})")]
    assert d["run"]["changes"] == 2
    # an element of a tag both processes have is followed in each
    mw(cwd, "report", "run.mwt", "-o", "e.html", "--element", "w:1")
    traj = {t["label"]: t for t in data_of((cwd / "e.html").read_text())["trajectories"]}
    assert set(traj) == {f"w[1] (pid {parent})", f"w[1] (pid {child})"}
    assert [p[2] for p in traj[f"w[1] (pid {child})"]["points"]] == [2]
    assert traj[f"w[1] (pid {parent})"]["points"] == []
    bad = mw(cwd, "report", "run.mwt", "--pid", "1", ok=False)
    assert bad.returncode == 1 and "--pid 1: no process of this run has that pid" in bad.stderr
