"""A torch DataLoader's workers, and torchrun's ranks, are processes of the
run: each records the changes it makes, in a trace of its own."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

import memwatch
from conftest import BIN
from test_multiprocess import line_of, members, props, record

pytest.importorskip("torch")


def test_dataloader_workers_record_their_changes(tmp_path):
    # GIVEN a DataLoader with 2 workers whose dataset watches and writes an array per item
    record(
        tmp_path,
        """
        import json, os
        import numpy as np
        import torch
        import memwatch

        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return 6

            def __getitem__(self, i):
                a = np.zeros(2, dtype=np.float32)
                memwatch.watch(a, name="item")
                a[0] = i * 2.0 + 1  # the worker's write
                return torch.tensor([float(os.getpid()), a[0]])

        if __name__ == "__main__":
            got = [row.tolist() for batch in torch.utils.data.DataLoader(Items(), num_workers=2) for row in batch]
            open("results.json", "w").write(json.dumps([[int(p), v] for p, v in got]))
        """,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    line = line_of(tmp_path, "the worker's write")
    found = members(tmp_path)
    # THEN each of the 2 workers wrote its own trace, with exactly its items' values
    assert set(found) == {pid for pid, _ in results} and len(found) == 2
    root_pid = memwatch.trace_info(tmp_path / "run.mwt")["pid"]
    for pid, path in found.items():
        assert props(path)["parent"] == str(root_pid)
        changes = memwatch.open_trace(path).changes(tag="item")
        assert sorted(c.new_values[0] for c in changes) == sorted(v for p, v in results if p == pid)
        assert all(c.indices == [0] and c.line == line for c in changes)


TRAIN = """
import torch
import torch.distributed as dist
import memwatch

dist.init_process_group("gloo")
rank = dist.get_rank()
t = torch.zeros(4)
memwatch.watch(t, name="w")
t[:2] = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])  # the rank's write
dist.all_reduce(t)  # gloo's write, from native code
t[3] = -1.0 - rank  # after the all_reduce
dist.destroy_process_group()
"""


def test_torchrun_ranks_each_record_their_own_trace(tmp_path):
    # GIVEN a 2-rank torchrun job (CPU, gloo) in which each rank watches a
    # tensor, writes it in Python and lets all_reduce write it
    (tmp_path / "train.py").write_text(TRAIN)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run(
        [str(BIN / "memwatch"), "record", "-o", "run.mwt", sys.executable, "-m", "torch.distributed.run",
         "--standalone", "--nproc-per-node", "2", "train.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = TRAIN.splitlines()
    at = {m: next(i for i, text in enumerate(lines, 1) if m in text) for m in ("rank's write", "gloo's", "after")}
    # THEN each rank wrote run.rankR.PID.mwt, its header saying its rank and parent (torchrun)
    names = sorted(p.name for p in tmp_path.glob("run.*.mwt"))
    assert [n.split(".")[1] for n in names] == ["rank0", "rank1"], (names, r.stderr)
    root = memwatch.trace_info(tmp_path / "run.mwt")["pid"]
    pid_of = {}
    for rank, name in enumerate(names):
        pid_of[rank] = int(name.split(".")[2])
        assert props(tmp_path / name)["rank"] == str(rank)
        assert props(tmp_path / name)["parent"] == str(root)
        assert memwatch.trace_info(tmp_path / name)["pid"] == pid_of[rank]
        assert f"process {pid_of[rank]} (rank {rank}) recorded" in r.stderr

    def expected(rank: int) -> list[tuple]:
        mine = [rank + 1.0, 10.0 * (rank + 1)]
        return [
            ([0, 1], [0.0, 0.0], mine, at["rank's write"]),
            ([0, 1], mine, [3.0, 30.0], at["gloo's"]),  # the sum over both ranks
            ([3], [0.0], [-1.0 - rank], at["after"]),
        ]

    # AND each rank's trace holds exactly its changes, with their values and lines
    for rank, name in enumerate(names):
        changes = memwatch.open_trace(tmp_path / name).changes(tag="w")
        assert [(c.indices, c.old_values, c.new_values, c.line) for c in changes] == expected(rank)
        assert all(c.rank == rank and c.pid == pid_of[rank] for c in changes)
    # AND open_trace("run.mwt") reads both ranks as one, merged by time
    t = memwatch.open_trace(tmp_path / "run.mwt")
    assert [(p.pid, p.rank) for p in t.processes] == [(root, None), (pid_of[0], 0), (pid_of[1], 1)]
    merged = t.changes(tag="w")
    assert [c.time_ns for c in merged] == sorted(c.time_ns for c in merged)
    for rank in (0, 1):
        mine = [(c.indices, c.old_values, c.new_values, c.line) for c in merged if c.rank == rank]
        assert mine == expected(rank)
        assert {c.pid for c in merged if c.rank == rank} == {pid_of[rank]}
        assert t.state("w", pid=pid_of[rank]).tolist() == [3.0, 30.0, 0.0, -1.0 - rank]
    with pytest.raises(ValueError, match=rf"\({pid_of[0]} \(rank 0\), {pid_of[1]} \(rank 1\)\): name one with pid="):
        t.state("w")
    # AND memwatch query sees both ranks, each row with its pid and rank
    q = subprocess.run(
        [str(BIN / "memwatch"), "query", "run.mwt", "--format", "jsonl"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert q.returncode == 0, q.stderr
    rows = [json.loads(x) for x in q.stdout.splitlines()]
    assert len(rows) == 6 and {(x["pid"], x["rank"]) for x in rows} == {(pid_of[0], 0), (pid_of[1], 1)}
    for rank in (0, 1):
        mine = [x for x in rows if x["rank"] == rank]
        assert [x["line"] for x in mine] == [at["rank's write"], at["gloo's"], at["after"]]
        gloo = mine[1]["ranges"]
        assert [g["offset"] for g in gloo] == [0]
        assert struct.unpack("<2f", bytes.fromhex(gloo[0]["new"])) == (3.0, 30.0)
    # AND --tag w skips torchrun's own process, which watched nothing
    q = subprocess.run(
        [str(BIN / "memwatch"), "query", "run.mwt", "--tag", "w", "--format", "jsonl"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert q.returncode == 0, q.stderr
    assert [json.loads(x) for x in q.stdout.splitlines()] == rows
