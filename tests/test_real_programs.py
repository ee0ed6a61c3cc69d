"""Programs no one here wrote, recorded and checked for exact states.

Each program below uses a real library's in-place operation on a watched
array (scikit-learn, scipy, numpy, pandas, torch). It runs under
`memwatch record`, saves the array right after watching it
(`snap(x, "tag", "before")`) and at its end (`"after"`), and marks every
line that writes the array with `# writes: tag`. One generic comparison
then checks, for every tag:

- the changes are on exactly the marked lines;
- the rebuilt state before the first change is the saved "before", and at
  the end the saved "after", byte for byte;
- each change is exactly the difference between the states around it:
  its old bytes are what the state held, and applying its new bytes to
  the state before gives the state after.

A library missing on this machine skips its program, with the reason.
"""

from __future__ import annotations

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

PRELUDE = """\
import numpy as np
import memwatch


def snap(a, tag, when):
    np.save(f"{tag}.{when}.npy", np.asarray(a))
"""


def memwatch_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([str(BIN / "memwatch"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def raw_state(d: Path, tag: str, at: int | None = None) -> bytes:
    out = d / "state.raw"
    args = ["state", "prog.mwt", "--tag", tag, "--format", "raw", "-o", str(out)]
    if at is not None:
        args += ["--at", str(at)]
    r = memwatch_cli(*args, cwd=d)
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


def marked_lines(source: str) -> dict[str, set[int]]:
    marks: dict[str, set[int]] = {}
    for n, text in enumerate(source.splitlines(), 1):
        m = re.search(r"# writes: ([\w, ]+)$", text)
        for tag in m.group(1).split(",") if m else ():
            marks.setdefault(tag.strip(), set()).add(n)
    return marks


def record_and_check(tmp_path: Path, body: str, replayed: int = 8) -> memwatch.Trace:
    """Records `body` (after PRELUDE) and checks every marked tag."""
    source = PRELUDE + textwrap.dedent(body)
    prog = tmp_path / "prog.py"
    prog.write_text(source)
    r = memwatch_cli("record", "-o", "prog.mwt", sys.executable, str(prog), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    trace = memwatch.open_trace(tmp_path / "prog.mwt")
    marks = marked_lines(source)
    assert marks, "the program marks no line that writes"
    assert sorted(trace.tags) == sorted(marks)
    for tag, lines in marks.items():
        changes = trace.changes(tag=tag)
        assert changes, f"{tag}: nothing recorded"
        assert {c.line for c in changes} == lines, tag
        assert all(os.path.samefile(c.file, prog) for c in changes), tag
        before = np.load(tmp_path / f"{tag}.before.npy")
        after = np.load(tmp_path / f"{tag}.after.npy")
        first = trace.state(tag, at=changes[0].seq - 1)
        last = trace.state(tag)
        assert first.dtype == before.dtype and first.shape == before.shape, tag
        assert np.ascontiguousarray(first).tobytes() == np.ascontiguousarray(before).tobytes(), tag
        assert np.ascontiguousarray(last).tobytes() == np.ascontiguousarray(after).tobytes(), tag
        # Each change, replayed on the raw state before it, gives the state
        # after it (the first few and the last: a state costs a scan).
        for c in [*changes[: replayed - 1], changes[-1]]:
            state = bytearray(raw_state(tmp_path, tag, at=c.seq - 1))
            for off, old, new in c.ranges:
                assert bytes(state[off : off + len(old)]) == old, (tag, c.seq, off)
                state[off : off + len(new)] = new
            assert bytes(state) == raw_state(tmp_path, tag, at=c.seq), (tag, c.seq)
    return trace


def test_scikit_learn_standard_scaler_in_place(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed in this venv (tests/requirements.txt)")
    record_and_check(
        tmp_path,
        """
        from sklearn.preprocessing import StandardScaler

        X = np.random.default_rng(0).normal(3.0, 2.0, size=(40, 3))
        memwatch.watch(X, name="X")
        snap(X, "X", "before")
        out = StandardScaler(copy=False).fit_transform(X)  # writes: X
        assert np.shares_memory(out, X)
        assert np.allclose(X.mean(axis=0), 0) and np.allclose(X.std(axis=0), 1)
        snap(X, "X", "after")
        """,
    )


def test_scipy_lu_factor_overwrites_a_fortran_array(tmp_path):
    pytest.importorskip("scipy", reason="scipy is not installed in this venv (tests/requirements.txt)")
    trace = record_and_check(
        tmp_path,
        """
        from scipy.linalg import lu_factor

        a = np.asfortranarray(np.random.default_rng(1).normal(size=(6, 6)))
        memwatch.watch(a, name="a")
        snap(a, "a", "before")
        lu, piv = lu_factor(a, overwrite_a=True, check_finite=False)  # writes: a
        assert np.shares_memory(lu, a)
        snap(a, "a", "after")
        """,
    )
    # The state keeps the array's Fortran layout and element values.
    lu = np.load(tmp_path / "a.after.npy")
    got = trace.state("a")
    assert got.shape == (6, 6) and np.array_equal(got, lu)
    c = trace.changes(tag="a")[0]
    assert c.indices and all(len(i) == 2 for i in c.indices)


def test_numpy_random_shuffle(tmp_path):
    record_and_check(
        tmp_path,
        """
        x = np.arange(20, dtype=np.int64)
        memwatch.watch(x, name="x")
        snap(x, "x", "before")
        np.random.seed(3)
        np.random.shuffle(x)  # writes: x
        np.random.default_rng(2).shuffle(x)  # writes: x
        assert sorted(x) == list(range(20))
        snap(x, "x", "after")
        """,
    )


def test_pandas_frame_over_a_watched_array_without_a_copy(tmp_path):
    pytest.importorskip("pandas", reason="pandas is not installed in this venv (tests/requirements.txt)")
    record_and_check(
        tmp_path,
        """
        import pandas as pd

        arr = np.zeros((5, 2))
        memwatch.watch(arr, name="arr")
        snap(arr, "arr", "before")
        df = pd.DataFrame(arr, copy=False)
        df.iloc[2, 1] = 9.0  # writes: arr
        s = pd.Series(arr[:, 0], copy=False)
        s.iloc[4] = -1.5  # writes: arr
        assert arr[2, 1] == 9.0 and arr[4, 0] == -1.5
        snap(arr, "arr", "after")
        """,
    )


def test_torch_sgd_step(tmp_path):
    pytest.importorskip("torch", reason="torch is installed only in the CPython 3.12 test venv (tests/requirements-3.12.txt)")
    trace = record_and_check(
        tmp_path,
        """
        import torch

        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        memwatch.watch(model.weight, name="weight")
        memwatch.watch(model.bias, name="bias")
        snap(model.weight.detach(), "weight", "before")
        snap(model.bias.detach(), "bias", "before")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(8, 4), torch.randn(8, 3)
        for _ in range(3):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()  # writes: weight, bias
        snap(model.weight.detach(), "weight", "after")
        snap(model.bias.detach(), "bias", "after")
        """,
    )
    # One change per step and parameter, each a float32 update.
    assert len(trace.changes(tag="weight")) == 3 and len(trace.changes(tag="bias")) == 3
    assert trace.state("weight").dtype == np.float32
