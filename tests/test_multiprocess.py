"""`memwatch record` follows every process of a run: each process that
watches writes a trace of its own beside the first one (``run.PID.mwt``),
named by pid, whose header names the run; the reader finds them from the
first trace."""

from __future__ import annotations

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
from conftest import BIN


def record(tmp_path: Path, source: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    (tmp_path / "prog.py").write_text(textwrap.dedent(source))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run(
        [str(BIN / "memwatch"), "record", "-o", "run.mwt", sys.executable, "prog.py", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Traceback" not in r.stderr, r.stderr
    return r


def line_of(tmp_path: Path, marker: str) -> int:
    lines = (tmp_path / "prog.py").read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if marker in text)


def members(tmp_path: Path) -> dict[int, Path]:
    """The traces of the run other than run.mwt, by the pid in their names."""
    out = {}
    for p in tmp_path.glob("run.*.mwt"):
        out[int(p.name.split(".")[-2])] = p
    return out


def props(path: Path) -> dict[str, str]:
    return dict(memwatch.trace_info(path)["properties"])


POOL = """
    import os, sys, multiprocessing as mp
    import numpy as np
    import memwatch

    def task(i):
        a = np.zeros(4, dtype=np.float32)
        memwatch.watch(a, name="worker")
        a[1] = i + 0.5  # the worker's write
        return os.getpid(), float(a[1])

    if __name__ == "__main__":
        with mp.get_context(sys.argv[1]).Pool(2) as pool:
            results = pool.map(task, range(6), chunksize=1)
        with open("results.json", "w") as f:
            f.write(__import__("json").dumps(results))
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pool_workers_each_record_their_own_trace(tmp_path, method):
    # GIVEN a Pool whose workers watch and write an array (the parent watches nothing)
    r = record(tmp_path, POOL, method)
    results = json.loads((tmp_path / "results.json").read_text())
    line = line_of(tmp_path, "the worker's write")
    # THEN each worker that ran a task wrote run.PID.mwt, with exactly the
    # changes of the tasks it ran, on the task's line
    found = members(tmp_path)
    by_pid: dict[int, list[float]] = {}
    for pid, value in results:
        by_pid.setdefault(pid, []).append(value)
    assert set(found) == set(by_pid), (found, r.stderr)
    root = memwatch.trace_info(tmp_path / "run.mwt")
    run_id = props(tmp_path / "run.mwt")["run"]
    for pid, path in found.items():
        info = memwatch.trace_info(path)
        assert info["pid"] == pid
        p = props(path)
        assert p["run"] == run_id and p["root"] == "run.mwt"
        if method == "forkserver":
            assert int(p["parent"]) != root["pid"]  # the fork server's child
        else:
            assert int(p["parent"]) == root["pid"]
        changes = memwatch.open_trace(path).changes(tag="worker")
        assert sorted(c.new_values[0] for c in changes) == sorted(by_pid[pid])
        assert all(c.indices == [1] and c.old_values == [0.0] and c.line == line for c in changes)
    # AND the summary names each process's trace
    for pid, path in found.items():
        assert f"process {pid} recorded" in r.stderr and str(path) in r.stderr


def test_a_task_run_twice_in_a_worker_watches_again(tmp_path):
    # GIVEN one worker that runs tasks watching a module-level array (the
    # same object each time) and tasks that watch a fresh array each
    record(
        tmp_path,
        """
        import multiprocessing as mp
        import numpy as np
        import memwatch

        buf = np.zeros(4, dtype=np.float32)
        kept = []

        def same(i):
            memwatch.watch(buf, name="worker")
            buf[i] = i + 1  # same object
            return "ok"

        def fresh(i):
            a = np.zeros(2)
            memwatch.watch(a, name="fresh")
            a[0] = i + 1  # fresh object
            return "ok"

        def leaked(i):
            a = np.zeros(2)
            kept.append(a)
            try:
                memwatch.watch(a, name="leaked")
            except ValueError as e:
                return str(e)
            return "ok"

        if __name__ == "__main__":
            with mp.get_context("spawn").Pool(1) as pool:
                print(pool.map(same, range(3), chunksize=1))
                print(pool.map(fresh, range(3), chunksize=1))
                print(pool.map(leaked, range(2), chunksize=1))
        """,
    ).stdout
    out = (tmp_path / "prog.py").parent
    (path,) = members(out).values()
    t = memwatch.open_trace(path)
    # THEN the same object watched again is the same watch: every write is there
    assert [(c.indices, c.new_values) for c in t.changes(tag="worker")] == [([0], [1.0]), ([1], [2.0]), ([2], [3.0])]
    # AND a fresh array under the name of one that is gone is watched too
    assert [c.new_values for c in t.changes(tag="fresh")] == [[1.0], [2.0], [3.0]]


def test_a_second_live_object_under_a_watched_name_says_how_to_fix_it():
    import numpy as np

    a, b = np.zeros(2), np.zeros(2)
    h = memwatch.watch(a, name="twice")
    try:
        assert memwatch.watch(a, name="twice").region == h.region
        with pytest.raises(ValueError, match=r"already watched: another buffer .* unwatch\('twice'\) .* name="):
            memwatch.watch(b, name="twice")
    finally:
        memwatch.unwatch(h)


def test_fork_child_keeps_the_watches_and_records_its_own_trace(tmp_path):
    # GIVEN a parent that watches w, writes it, then forks
    record(
        tmp_path,
        """
        import os
        import numpy as np
        import memwatch

        w = np.zeros(4, dtype=np.int64)
        memwatch.watch(w, name="w")
        w[0] = 1  # before the fork
        pid = os.fork()
        if pid == 0:
            w[1] = 2  # in the child
            os._exit(0)
        os.waitpid(pid, 0)
        w[2] = 3  # in the parent, after
        open("child", "w").write(str(pid))
        """,
    )
    child = int((tmp_path / "child").read_text())
    root = memwatch.open_trace(tmp_path / "run.mwt")
    assert [(c.indices, c.new_values, c.line) for c in root.changes(tag="w", pid=root.meta["pid"])] == [
        ([0], [1], line_of(tmp_path, "before the fork")),
        ([2], [3], line_of(tmp_path, "in the parent, after")),
    ]
    # THEN the child's trace starts from w as the fork left it, and holds the child's write only
    path = tmp_path / f"run.{child}.mwt"
    info = memwatch.trace_info(path)
    assert info["pid"] == child and props(path)["parent"] == str(root.meta["pid"])
    t = memwatch.open_trace(path)
    assert [(c.indices, c.old_values, c.new_values, c.line) for c in t.changes()] == [
        ([1], [0], [2], line_of(tmp_path, "in the child"))
    ]
    assert t.state("w", at=1).tolist() == [1, 0, 0, 0]  # watched again at the fork, seq 1
    assert t.state("w").tolist() == [1, 2, 0, 0]


def test_a_python_subprocess_records_beside_its_parent(tmp_path):
    # GIVEN a program that runs another Python program with subprocess
    (tmp_path / "child.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            import memwatch

            c = np.zeros(3, dtype=np.float64)
            memwatch.watch(c, name="c")
            c[2] = 7.5  # in the subprocess
            """
        )
    )
    record(
        tmp_path,
        """
        import subprocess, sys
        import numpy as np
        import memwatch

        p = np.zeros(2)
        memwatch.watch(p, name="p")
        p[0] = 1.0
        proc = subprocess.run([sys.executable, "child.py"])
        open("child", "w").write(str(proc.returncode))
        """,
    )
    ((pid, path),) = members(tmp_path).items()
    assert props(path)["parent"] == str(memwatch.trace_info(tmp_path / "run.mwt")["pid"])
    changes = memwatch.open_trace(path).changes()
    assert [(c.tag, c.indices, c.new_values) for c in changes] == [("c", [2], [7.5])]
    assert changes[0].file.endswith("child.py") and changes[0].line == 7
    root = memwatch.open_trace(tmp_path / "run.mwt")
    assert [c.tag for c in root.changes(pid=root.meta["pid"])] == ["p"]
    # AND the root's trace read as a run has both, merged by time
    assert [(c.tag, c.pid) for c in root.changes()] == [("p", root.meta["pid"]), ("c", pid)]


def test_a_new_recording_to_the_same_path_removes_the_old_runs_traces(tmp_path):
    record(tmp_path, POOL, "fork")
    old = set(members(tmp_path))
    assert old
    record(tmp_path, POOL, "fork")
    new = set(members(tmp_path))
    assert new and not (old & new)
    run_id = props(tmp_path / "run.mwt")["run"]
    assert all(props(p)["run"] == run_id for p in members(tmp_path).values())


def test_rank_names_the_trace(tmp_path):
    (tmp_path / "rank.py").write_text(
        "import numpy as np, memwatch\nr = np.zeros(1)\nmemwatch.watch(r, name='r')\nr[0] = 1\n"
    )
    record(
        tmp_path,
        """
        import os, subprocess, sys
        for rank in ("0", "1"):
            subprocess.run([sys.executable, "rank.py"], env=dict(os.environ, RANK=rank), check=True)
        """,
    )
    names = sorted(p.name for p in tmp_path.glob("run.rank*.mwt"))
    assert [n.split(".")[1] for n in names] == ["rank0", "rank1"]
    for n in names:
        assert props(tmp_path / n)["rank"] == n.split(".")[1][4:]


def test_query_reads_the_whole_run_merged_by_time_with_pid(tmp_path):
    record(tmp_path, POOL, "spawn")
    results = json.loads((tmp_path / "results.json").read_text())
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")

    def query(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "memwatch"), "query", "run.mwt", *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )

    rows = [json.loads(x) for x in query("--format", "jsonl").stdout.splitlines()]
    # THEN every worker's changes are there, each with its pid, in time order
    assert sorted((r["pid"], json.dumps(r["ranges"])) for r in rows) and len(rows) == len(results)
    assert {r["pid"] for r in rows} == {pid for pid, _ in results}
    starts = {pid: memwatch.trace_info(p)["start_time_ns"] for pid, p in members(tmp_path).items()}
    times = [starts[r["pid"]] + r["time_ns"] for r in rows]
    assert times == sorted(times)
    # AND --pid keeps one process
    pid = results[0][0]
    mine = [json.loads(x) for x in query("--format", "jsonl", "--pid", str(pid)).stdout.splitlines()]
    assert {r["pid"] for r in mine} == {pid} and len(mine) == sum(1 for p, _ in results if p == pid)
    table = query().stdout.splitlines()
    assert table[0].split()[0] == "pid" and len(table) == len(results) + 1
    bad = query("--pid", "1")
    assert bad.returncode == 1 and "--pid 1: no process of this run has that pid" in bad.stderr


def mw(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(
        [str(BIN / "memwatch"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100
    )


FORK = """
    import os
    import numpy as np
    import memwatch

    w = np.zeros(4, dtype=np.int64)
    memwatch.watch(w, name="w")
    w[0] = 1  # before the fork
    pid = os.fork()
    if pid == 0:
        c = np.zeros(2, dtype=np.float64)
        memwatch.watch(c, name="c")
        w[1] = 2  # in the child
        c[1] = 0.25  # the child's own array
        os._exit(0)
    os.waitpid(pid, 0)
    w[2] = 3  # in the parent, after
    open("child", "w").write(str(pid))
"""


def test_state_and_blame_read_the_process_that_watched_the_tag(tmp_path):
    # GIVEN a fork: w in both processes (the child keeps it), c only in the child
    record(tmp_path, FORK)
    child = int((tmp_path / "child").read_text())
    parent = memwatch.trace_info(tmp_path / "run.mwt")["pid"]
    # THEN a tag of one process needs no --pid
    r = mw(tmp_path, "state", "run.mwt", "--tag", "c", "--format", "values")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[0]", "0.0", "[1]", "0.25"]
    # AND a tag in both asks which, naming them
    r = mw(tmp_path, "state", "run.mwt", "--tag", "w")
    assert r.returncode == 1
    assert f'"w" was watched in 2 processes of this run ({parent}, {child}): name one with --pid' in r.stderr
    def values(pid: int) -> list[str]:
        r = mw(tmp_path, "state", "run.mwt", "--tag", "w", "--pid", str(pid), "--format", "values")
        assert r.returncode == 0, r.stderr
        return r.stdout.split()[1::2]

    assert values(child) == ["1", "2", "0", "0"]
    assert values(parent) == ["1", "0", "3", "0"]
    # AND blame says which process wrote it, on which line
    r = mw(tmp_path, "blame", "run.mwt", "--tag", "w", "--index", "1", "--pid", str(child))
    assert r.returncode == 0, r.stderr
    assert f"prog.py:{line_of(tmp_path, 'in the child')} in <module> (process {child}, thread" in r.stdout
    assert r.stdout.rstrip().endswith("0 -> 2")
    r = mw(tmp_path, "blame", "run.mwt", "--tag", "w", "--index", "1", "--pid", str(parent))
    assert re.search(rf"element \[1\] of w was never written after it was watched \(seq \d+ in process {parent}\)", r.stdout)
    # AND the errors name what is wrong
    r = mw(tmp_path, "state", "run.mwt", "--tag", "w", "--pid", "1")
    assert r.returncode == 1 and f"--pid 1: no process of this run has that pid (its processes: {parent}, {child})" in r.stderr
    r = mw(tmp_path, "blame", "run.mwt", "--tag", "nope", "--offset", "0")
    assert r.returncode == 1 and 'no process of this run watched a region tagged "nope"' in r.stderr
    # AND a time counts from the run's start: at 0 the child had not begun
    r = mw(tmp_path, "state", "run.mwt", "--tag", "c", "--at", "0ns")
    assert r.returncode == 1 and f"process {child} started" in r.stderr and "after the run did" in r.stderr


def test_query_of_a_tag_that_only_some_processes_watched(tmp_path):
    record(tmp_path, FORK)
    child = int((tmp_path / "child").read_text())
    r = mw(tmp_path, "query", "run.mwt", "--tag", "c", "--format", "jsonl")
    assert r.returncode == 0, r.stderr
    assert [(j["pid"], j["tag"]) for j in map(json.loads, r.stdout.splitlines())] == [(child, "c")]
    r = mw(tmp_path, "query", "run.mwt", "--tag", "nope")
    assert r.returncode == 1 and 'no process of this run has a tag "nope"; their tags are: c, w' in r.stderr


def test_export_of_a_run_merges_every_process_by_time(tmp_path):
    import pandas as pd

    # GIVEN a spawn Pool (the parent watches nothing) and its traces
    record(tmp_path, POOL, "spawn")
    results = json.loads((tmp_path / "results.json").read_text())
    root = memwatch.trace_info(tmp_path / "run.mwt")["pid"]
    r = mw(tmp_path, "export", "run.mwt", "-o", "all.parquet")
    assert r.returncode == 0, r.stderr
    workers = {pid for pid, _ in results}
    assert r.stdout.strip() == f"wrote {len(results)} rows to all.parquet (from {len(workers) + 1} processes)"
    df = pd.read_parquet(tmp_path / "all.parquet")
    # THEN every worker's changes are there with its pid, in time order, with the values written
    assert set(df.pid) == workers and df["rank"].isna().all()
    assert list(df.wall_time_ns) == sorted(df.wall_time_ns)
    assert sorted(zip(df.pid, (np.frombuffer(b, np.float32)[0] for b in df.new))) == sorted(map(tuple, results))
    for pid, g in df.groupby("pid"):
        assert list(g.seq) == sorted(g.seq)
    # AND --tag keeps the processes that watched it; --pid keeps one
    r = mw(tmp_path, "export", "run.mwt", "-o", "w.jsonl", "--tag", "worker", "--elements")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert sorted((x["pid"], x["new_value"]) for x in rows) == sorted(map(tuple, results))
    assert all(x["index"] == "1" and x["old_value"] == 0.0 for x in rows)
    pid = results[0][0]
    r = mw(tmp_path, "export", "run.mwt", "-o", "one.csv", "--pid", str(pid))
    assert r.returncode == 0, r.stderr
    one = pd.read_csv(tmp_path / "one.csv")
    assert set(one.pid) == {pid} and len(one) == sum(1 for p, _ in results if p == pid)
    r = mw(tmp_path, "export", "run.mwt", "-o", "x.parquet", "--tag", "nope")
    assert r.returncode == 1 and "nope" in r.stderr and "worker" in r.stderr
    assert not (tmp_path / "x.parquet").exists()
    # AND the Perfetto timeline has a process per trace
    r = mw(tmp_path, "export", "run.mwt", "--format", "perfetto", "-o", "run.json")
    assert r.returncode == 0, r.stderr
    events = json.loads((tmp_path / "run.json").read_text())["traceEvents"]
    changes = [e for e in events if e.get("cat") == "change"]
    assert sorted(e["pid"] for e in changes) == sorted(p for p, _ in results)
    assert {e["pid"] for e in events if e.get("name") == "process_name"} == workers | {root}


def test_export_partitioned_by_pid_reads_in_duckdb_and_pyarrow(tmp_path):
    # Real readers, installed by make (tests/requirements.txt): never skipped.
    import duckdb
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    record(tmp_path, POOL, "fork")
    results = json.loads((tmp_path / "results.json").read_text())
    root = memwatch.trace_info(tmp_path / "run.mwt")["pid"]
    r = mw(tmp_path, "export", "run.mwt", "-o", "by_pid", "--partition-by", "pid")
    assert r.returncode == 0, r.stderr
    pids = {p for p, _ in results} | {root}
    # THEN a file per process, the root's (no changes) too, without a pid column
    files = sorted(p.relative_to(tmp_path / "by_pid").as_posix() for p in (tmp_path / "by_pid").rglob("*.parquet"))
    assert files == sorted(f"pid={p}/part-0.parquet" for p in pids)
    assert "pid" not in pq.read_schema(tmp_path / "by_pid" / f"pid={root}" / "part-0.parquet").names
    assert f"pid={root} 0 rows" in r.stdout
    # AND DuckDB reads it with the pid back from the path
    con = duckdb.connect()
    got = con.execute(
        f"SELECT pid, count(*), sum(new_value IS NULL) FROM read_parquet('{tmp_path}/by_pid/**/*.parquet', "
        "hive_partitioning = true) GROUP BY pid ORDER BY pid"
    ).fetchall()
    want: dict[int, int] = {}
    for p, _ in results:
        want[p] = want.get(p, 0) + 1
    assert [(int(p), n) for p, n, _ in got] == sorted(want.items())
    # AND pyarrow.dataset too, with the values written
    t = ds.dataset(tmp_path / "by_pid", format="parquet", partitioning="hive").to_table().to_pandas()
    assert sorted(zip(t.pid, (np.frombuffer(b, np.float32)[1 - 1] for b in t.new))) == sorted(map(tuple, results))
    # AND a tag that the root never watched still gives the root its (empty) file
    r = mw(tmp_path, "export", "run.mwt", "-o", "tagged", "--partition-by", "pid", "--tag", "worker")
    assert r.returncode == 0, r.stderr
    assert pq.read_table(tmp_path / "tagged" / f"pid={root}" / "part-0.parquet").num_rows == 0
    assert pq.read_schema(tmp_path / "tagged" / f"pid={root}" / "part-0.parquet") == pq.read_schema(
        tmp_path / "by_pid" / f"pid={root}" / "part-0.parquet"
    )
    # AND exporting again replaces it, while a directory holding anything else is refused
    assert mw(tmp_path, "export", "run.mwt", "-o", "by_pid", "--partition-by", "pid", "--elements").returncode == 0
    el = ds.dataset(tmp_path / "by_pid", format="parquet", partitioning="hive").to_table().to_pandas()
    assert sorted(zip(el.pid, el.new_value)) == sorted(map(tuple, results))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = mw(tmp_path, "export", "run.mwt", "-o", "mine", "--partition-by", "pid")
    assert r.returncode == 1 and "notes.txt" in r.stderr and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    r = mw(tmp_path, "export", "run.mwt", "-o", "x.csv", "--partition-by", "pid")
    assert r.returncode == 1 and "--partition-by writes a directory" in r.stderr
    assert not list(tmp_path.glob("*.partial-*"))
