"""Stopping at a change as it happens: frozen objects, and watches with a
condition and an action (raise, breakpoint, log)."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import traceback

import numpy as np
import pytest

import memwatch
from conftest import here, run_py

THIS = os.path.realpath(__file__)


def last_frame(err: BaseException) -> traceback.FrameSummary:
    return traceback.extract_tb(err.__traceback__)[-1]


def assert_raised_for_line(err: memwatch.MutationError, line: int, function: str) -> None:
    """The error carries the change, and its traceback ends with the writing line."""
    assert isinstance(err, memwatch.MemwatchError)
    assert (os.path.realpath(err.change.file), err.change.line, err.change.function) == (THIS, line, function)
    f = last_frame(err)
    assert (os.path.realpath(f.filename), f.lineno, f.name) == (THIS, line, function)


def test_a_python_store_into_a_frozen_bytearray_raises_on_its_line(changes):
    buf = bytearray(8)
    with pytest.raises(memwatch.MutationError) as ei:
        with memwatch.frozen(buf):
            line = here() + 1
            buf[2] = 9
            pytest.fail("the line after the write must not run")
    err = ei.value
    assert_raised_for_line(err, line, "test_a_python_store_into_a_frozen_bytearray_raises_on_its_line")
    assert err.change.tag == "buf"
    assert err.change.ranges == [(2, b"\x00", b"\x09")]
    assert "'buf' changed while frozen" in str(err)
    assert f"test_guard.py:{line}" in str(err)
    # The raise comes after the line: the memory holds the new value.
    assert buf[2] == 9
    # The change is recorded like any other.
    assert [c.seq for c in changes] == [err.change.seq]
    # After the block: writable again, and no longer watched (frozen watched it).
    buf[3] = 1
    assert "buf" not in [t for _, t, *_ in memwatch._memwatch._regions()]


def test_numpy_kernels_and_ctypes_writes_raise_inside_frozen(changes):
    for size in (64, 1 << 20):  # compared, then page-tracked
        a = np.zeros(size // 8, dtype=np.float64)
        with pytest.raises(memwatch.MutationError) as ei:
            with memwatch.frozen(a, name=f"a{size}"):
                line = here() + 1
                np.add(a, 1.5, out=a)
        assert_raised_for_line(ei.value, line, "test_numpy_kernels_and_ctypes_writes_raise_inside_frozen")
        assert ei.value.change.new_values[:2] == [1.5, 1.5]
        assert ei.value.change.indices[:2] == [0, 1]
    b = np.zeros(16, dtype=np.uint8)
    with pytest.raises(memwatch.MutationError) as ei:
        with memwatch.frozen(b):
            line = here() + 1
            ctypes.memset(b.ctypes.data + 4, 0xFF, 2)
    assert_raised_for_line(ei.value, line, "test_numpy_kernels_and_ctypes_writes_raise_inside_frozen")
    assert ei.value.change.ranges == [(4, b"\x00\x00", b"\xff\xff")]


def test_torch_kernels_and_an_optimizer_step_raise_inside_frozen(changes):
    # torch is in the CPython 3.12 test venv only (tests/requirements-3.12.txt).
    torch = pytest.importorskip("torch")
    t = torch.zeros(4)
    with pytest.raises(memwatch.MutationError) as ei:
        with memwatch.frozen(t):
            line = here() + 1
            t.add_(2.5)
    assert_raised_for_line(ei.value, line, "test_torch_kernels_and_an_optimizer_step_raise_inside_frozen")
    assert (ei.value.change.tag, ei.value.change.new_values) == ("t", [2.5] * 4)
    # A parameter an optimizer must not touch (a frozen layer).
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 3)).sum().backward()
    before = layer.weight.detach().clone()
    with pytest.raises(memwatch.MutationError) as ei:
        with memwatch.frozen(layer.weight, name="layer.weight"):
            line = here() + 1
            opt.step()
    assert ei.value.change.tag == "layer.weight" and ei.value.change.line == line
    assert torch.allclose(layer.weight.detach(), before - 0.1)  # the memory holds the new values


def test_a_kernel_write_into_a_frozen_buffer_raises(changes, tmp_path):
    p = tmp_path / "data"
    p.write_bytes(b"hello")
    buf = bytearray(5)
    with open(p, "rb") as f, pytest.raises(memwatch.MutationError) as ei:
        with memwatch.frozen(buf):
            line = here() + 1
            f.readinto(buf)
    assert_raised_for_line(ei.value, line, "test_a_kernel_write_into_a_frozen_buffer_raises")
    assert bytes(buf) == b"hello"


def test_the_thread_that_wrote_gets_the_error(changes):
    a = np.zeros(1 << 18, dtype=np.float32)  # 1 MB: page-tracked, the writer is known
    got: dict[str, object] = {}
    started = threading.Event()
    go = threading.Event()

    def writer():
        started.set()
        go.wait()
        try:
            got["line"] = here() + 1
            a[10] = 3.0
            got["after"] = True
            x = 1  # the boundary after the write
            got["x"] = x
        except memwatch.MutationError as e:
            got["err"] = e

    t = threading.Thread(target=writer, name="w-thread")
    with memwatch.frozen(a):
        t.start()
        started.wait()
        go.set()
        t.join()
        # The main thread's boundaries see the change too: nothing raised here.
        y = 2
    assert y == 2
    err = got["err"]
    assert isinstance(err, memwatch.MutationError)
    assert err.change.thread_name == "w-thread"
    assert err.change.line == got["line"]
    assert last_frame(err).name == "writer"


def test_frozen_objects_dicts_and_decorated_functions(changes):
    class Config:
        def __init__(self):
            self.lr = 0.1

    cfg = Config()
    with pytest.raises(memwatch.MutationError) as ei:
        with memwatch.frozen(cfg):
            line = here() + 1
            cfg.lr = 0.2
    assert_raised_for_line(ei.value, line, "test_frozen_objects_dicts_and_decorated_functions")
    assert (ei.value.change.kind, ei.value.change.key) == ("setattr", ".lr")
    assert ei.value.change.new_repr == "0.2"

    table = {"a": 1}

    @memwatch.frozen(table, name="table")
    def update():
        table["b"] = 2

    with pytest.raises(memwatch.MutationError) as ei:
        update()
    assert ei.value.change.tag == "table"
    assert last_frame(ei.value).name == "update"
    table["c"] = 3  # after the call: allowed
    assert table == {"a": 1, "b": 2, "c": 3}


def test_a_frozen_object_raises_before_the_next_line_runs(changes):
    # As with a buffer, the boundary right after the writing line raises:
    # the line after it never runs (the line fast path once let it run).
    class Box:
        v = 0

    box, table, items, ran = Box(), {"k": 0}, [0], []
    with pytest.raises(memwatch.MutationError) as ei:
        with memwatch.frozen(box):
            line = here() + 1
            box.v = 1
            ran.append("box")
            ran.append("box, again")
    assert (ei.value.change.line, ei.value.change.key) == (line, ".v")
    with pytest.raises(memwatch.MutationError) as ei:
        with memwatch.frozen(table):
            line = here() + 1
            table["k"] = 1
            ran.append("table")
            ran.append("table, again")
    assert (ei.value.change.line, ei.value.change.key) == (line, "['k']")
    with pytest.raises(memwatch.MutationError) as ei:
        with memwatch.frozen(items):
            line = here() + 1
            items.append(1)
            ran.append("items")
            ran.append("items, again")
    assert ei.value.change.line == line
    assert ran == []


def test_freeze_and_unfreeze_nest_and_keep_an_existing_watch(changes):
    a = np.zeros(4, dtype=np.int32)
    memwatch.watch(a, name="weights")
    memwatch.freeze(a)
    memwatch.freeze(a)
    memwatch.unfreeze(a)
    with pytest.raises(memwatch.MutationError) as ei:
        a[1] = 5
        pytest.fail("not raised at the next line")
    assert ei.value.change.tag == "weights"  # the existing watch's name
    memwatch.unfreeze(a)
    a[2] = 6
    assert [c.tag for c in changes] == ["weights", "weights"]
    assert changes[-1].new_values == [6]
    # Still watched after the last unfreeze: it was watched before.
    assert "weights" in [t for _, t, *_ in memwatch._memwatch._regions()]
    with pytest.raises(memwatch.NotWatchedError, match="not frozen"):
        memwatch.unfreeze(a)


def test_a_change_on_the_blocks_last_line_raises_when_it_ends(changes):
    buf = bytearray(4)
    with pytest.raises(memwatch.MutationError) as ei:
        with memwatch.frozen(buf):
            line = here() + 1
            buf[0] = 1
    assert ei.value.change.line == line
    assert buf[0] == 1
    # Raised from the block's exit, so the freeze ended with it.
    buf[1] = 2
    assert memwatch._guard._freezes == {}


def test_a_raise_waits_past_a_pass_to_a_line_its_try_covers(changes):
    buf = bytearray(4)
    memwatch.watch(buf, action="raise")
    caught = []
    try:
        buf[0] = 1
        pass
        caught.append("not yet")
    except memwatch.MutationError as e:
        caught.append(e.change.line)
    assert caught == [here() - 5]


def test_nonfinite_condition_raises_only_on_nan_or_inf(changes):
    w = np.ones(8, dtype=np.float32)
    memwatch.watch(w, condition="nonfinite", action="raise")
    w[0] = 2.0
    w[1] = 3.0
    with pytest.raises(memwatch.MutationError) as ei:
        line = here() + 1
        w[5] = np.nan
        pytest.fail("not raised at the next line")
    assert_raised_for_line(ei.value, line, "test_nonfinite_condition_raises_only_on_nan_or_inf")
    assert "condition 'nonfinite'" in str(ei.value)
    with pytest.raises(memwatch.MutationError):
        w[6] = -np.inf
        pytest.fail("not raised at the next line")
    # Every change is recorded, those that raised and those that did not.
    assert [c.indices for c in changes] == [[0], [1], [5], [6]]
    h = np.ones(4, dtype=np.float16)
    memwatch.watch(h, condition="nonfinite", action="raise")
    with pytest.raises(memwatch.MutationError):
        h[1] = np.inf
        pytest.fail("not raised at the next line")
    i = np.zeros(4, dtype=np.int64)
    memwatch.watch(i, condition="nonfinite", action="raise")
    i[0] = -1  # an integer is never nonfinite
    assert changes[-1].tag == "i"


def test_a_callable_condition_with_the_log_action_prints_only_matches(changes, capsys):
    a = np.zeros(4, dtype=np.int64)
    memwatch.watch(a, condition=lambda c: any(v > 100 for v in c.new_values), action="log")
    a[0] = 5
    line = here() + 1
    a[1] = 500
    a[2] = 7
    err = capsys.readouterr().err
    assert err.count("[MEMWATCH] Tag: a") == 1
    assert "500" in err and f"test_guard.py:{line}" in err
    assert len(changes) == 3


def test_a_condition_that_raises_is_reported_once(changes, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    buf = bytearray(4)

    def broken(change):
        raise ZeroDivisionError("boom")

    memwatch.watch(buf, condition=broken, action="raise")
    buf[0] = 1
    buf[1] = 2
    assert len(changes) == 2  # let through, and recorded
    assert len(seen) == 1
    assert isinstance(seen[0].exc_value, ZeroDivisionError)
    assert seen[0].object is broken
    assert "condition of watch 'buf' raised" in seen[0].exc_value.__notes__[0]


def test_breakpoint_calls_the_hook_in_the_writing_frame(changes, monkeypatch):
    calls = []

    def hook():
        f = sys._getframe(1)
        calls.append((f.f_code.co_name, f.f_lineno, bytes(buf)))

    monkeypatch.setattr(sys, "breakpointhook", hook)
    buf = bytearray(2)
    memwatch.watch(buf, action="breakpoint")
    line = here() + 1
    buf[0] = 7
    after = here()
    assert calls == [("test_breakpoint_calls_the_hook_in_the_writing_frame", after, b"\x07\x00")]
    assert line + 1 == after


def test_breakpoint_honours_pythonbreakpoint_and_stops_pdb(tmp_path):
    (tmp_path / "myhook.py").write_text(
        "import sys\ndef hook():\n    f = sys._getframe(1)\n    print('HOOK', f.f_code.co_name, f.f_lineno)\n"
    )
    code = """
        import memwatch
        def train():
            buf = bytearray(4)
            memwatch.watch(buf, action="breakpoint")
            buf[1] = 42
            return buf
        train()
    """
    r = run_py(code, env={"PYTHONBREAKPOINT": "myhook.hook", "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["HOOK", "train", "7"]
    # pdb stops there: the frame that wrote, with the new value in memory.
    r = run_py(code, env={"PYTHONBREAKPOINT": "pdb.set_trace"}, input_text="p buf[1]\nwhere\nc\n")
    assert r.returncode == 0, r.stderr
    assert "42" in r.stdout
    assert "train()" in r.stdout


def test_bad_conditions_and_actions_are_clear_errors(changes):
    buf = bytearray(2)
    with pytest.raises(ValueError, match="action must be one of"):
        memwatch.watch(buf, action="explode")
    with pytest.raises(ValueError, match="condition must be a callable"):
        memwatch.watch(buf, condition="weird", action="raise")
    with pytest.raises(ValueError, match="chooses the changes an action acts on"):
        memwatch.watch(buf, condition="nonfinite")
    with pytest.raises(ValueError, match="action must be one of"):
        memwatch.watch_object({}, name="d", action="nope")
    assert memwatch._memwatch._regions() == []


def test_watch_var_with_action_raise(changes):
    lr = 0.1
    memwatch.watch_var("lr", action="raise")
    with pytest.raises(memwatch.MutationError) as ei:
        line = here() + 1
        lr = 0.5
        pytest.fail("not raised at the next line")
    assert ei.value.change.line == line
    assert ei.value.change.new_repr == "0.5"
    assert lr == 0.5


def test_the_guides_examples_run():
    import re

    from conftest import ROOT, run

    guide = (ROOT / "docs" / "index.md").read_text()
    section = guide.split("## Stopping at a change")[1].split("\n## ")[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(code) == 2
    for src in code:
        r = run(["python", "-c", src])
        assert r.returncode == 0, f"{src}\n{r.stderr}"
        assert "not reached" not in r.stdout
        for line in src.splitlines():
            if line.lstrip().startswith("print(") and "#" in line:
                assert line.split("#", 1)[1].strip() in r.stdout, (line, r.stdout)
