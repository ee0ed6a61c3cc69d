"""watch_var: every rebinding of a chosen name in in-scope code (locals and
globals), with old and new values and the exact line; `record --vars`;
coexistence with coverage.py. On 3.11, 3.12 and 3.13."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

import memwatch
from conftest import BIN, here, run, run_py

THIS = os.path.realpath(__file__)


def rebinds(changes):
    return [(c.kind, c.key, c.old_repr, c.new_repr, c.line) for c in changes]


def test_every_kind_of_local_rebinding(changes):
    memwatch.watch_var("acc")

    def f(items):
        acc = 0; first = here()  # noqa: E702
        acc += 5
        for acc in items:
            pass
        acc = acc  # the same object: nothing
        with open(os.devnull) as acc:
            pass
        del acc
        return first

    first = f([7, 8])
    assert [(k, key, old, new) for k, key, old, new, _ in rebinds(changes)][:4] == [
        ("rebind", "acc", None, "0"),
        ("rebind", "acc", "0", "5"),
        ("rebind", "acc", "5", "7"),
        ("rebind", "acc", "7", "8"),
    ]
    got = rebinds(changes)
    assert [line for *_, line in got] == [first, first + 1, first + 2, first + 2, first + 5, first + 7]
    assert got[4][:3] == ("rebind", "acc", "8") and got[4][3].startswith("<_io.TextIOWrapper")
    assert got[5][:4] == ("unbind", "acc", got[4][3], None)
    assert all(c.tag == "acc" and c.variable == "acc" and c.function.endswith(".f") for c in changes)
    assert all(c.file == THIS and c.thread_name == "MainThread" for c in changes)


def helper_that_binds_nothing():
    return here()


def test_a_rebinding_belongs_to_the_frame_that_made_it(changes):
    # A rebinding and a call on one line: the call's own lines (and those
    # of code it calls in turn) must not take the change, with variables
    # alone watched or with a buffer watched too.
    memwatch.watch_var("counter")

    def inner():
        return helper_that_binds_nothing()

    def f():
        counter = 0
        counter += 1; a = here(); helper_that_binds_nothing()  # noqa: E702
        counter += 1; b = here(); inner()  # noqa: E702
        counter += 1; c = here()  # noqa: E702
        return a, b, c

    a, b, c = f()
    f()  # the helpers' events are off by now: the same lines again
    buf = bytearray(4)
    memwatch.watch(buf, name="buf")
    f()
    lines = [ch.line for ch in changes if ch.tag == "counter"]
    assert lines == [a - 1, a, b, c] * 3
    assert all(ch.function.endswith(".f") for ch in changes if ch.tag == "counter")


def test_globals_rebound_at_module_level_and_through_global(changes):
    code = textwrap.dedent(
        """
        import memwatch
        got = []
        memwatch.configure(live=False)
        memwatch.on_change(got.append)
        memwatch.watch_var("lr")
        lr = 0.1
        def decay():
            global lr
            lr = lr / 2
        decay()
        lr = [lr]
        lr += [1]  # in place: the same list, not a rebinding
        print([(c.kind, c.key, c.old_repr, c.new_repr, c.line, c.function) for c in got])
        """
    )
    p = run_py(f"exec(compile({code!r}, 'prog.py', 'exec'))")
    assert p.returncode == 0, p.stderr
    assert eval(p.stdout) == [
        ("rebind", "lr", None, "0.1", 7, "<module>"),
        ("rebind", "lr", "0.1", "0.05", 10, "decay"),
        ("rebind", "lr", "0.05", "[0.05]", 12, "<module>"),
    ]


def test_globs_scope_and_unwatch(changes):
    def inside():
        loss_a = 1
        loss_b = 2
        other = 3
        return loss_a + loss_b + other

    def outside():
        loss_a = 1
        return loss_a

    h = memwatch.watch_var("loss_*", scope=inside, tag="losses")
    assert h.tag == "losses" and h.pattern == "loss_*"
    inside()
    outside()
    assert [(c.tag, c.key, c.new_repr, c.function.rsplit(".", 1)[-1]) for c in changes] == [
        ("losses", "loss_a", "1", "inside"),
        ("losses", "loss_b", "2", "inside"),
    ]
    # Code that binds no watched name is looked at once, then never again.
    assert memwatch._vars._binds[outside.__code__] == ()
    memwatch.unwatch(h)
    inside()
    assert len(changes) == 2
    with pytest.raises(memwatch.NotWatchedError):
        memwatch.unwatch(h)


def test_recursion_and_threads_keep_their_own_frames(changes):
    import threading

    memwatch.watch_var("depth_seen")

    def walk(n):
        depth_seen = n
        if n:
            walk(n - 1)
        depth_seen = -n
        return depth_seen

    t = threading.Thread(target=walk, args=(1,), name="walker")
    t.start()
    t.join()
    walk(1)
    got = [(c.thread_name, c.old_repr, c.new_repr) for c in changes]
    for name in ("walker", "MainThread"):
        mine = [(o, n) for t_, o, n in got if t_ == name]
        # -0 is the same int object as 0: no rebinding in the inner frame.
        assert mine == [(None, "1"), (None, "0"), ("1", "-1")], (name, mine)


def test_rebindings_between_many_unchanged_lines_are_each_seen(changes):
    # Lines that rebind nothing skip the Python comparison (3.12+): what they
    # skip must never hide a rebinding, whoever makes it and wherever.
    import threading

    memwatch.watch_var("step")
    memwatch.watch_var("shared")
    want = []

    def train(n):
        step = 0
        want.append(("step", None, "0", here() - 1))
        total = 0
        for i in range(n):
            total += i
            if i % 4 == 3:
                step = i; want.append(("step", str(i - 4 if i > 3 else 0), str(i), here()))  # noqa: E702
            total -= 1
        return total

    train(12)

    def gen():
        step = 1
        want.append(("step", None, "1", here() - 1))
        yield
        yield
        step = 2; want.append(("step", "1", "2", here()))  # noqa: E702
        yield

    g = gen()
    next(g)
    next(g)
    next(g)

    def bump():
        global shared
        shared = 2

    def reader():
        global shared
        shared = 1
        want.append(("shared", None, "1", here() - 1))
        for _ in range(3):
            pass
        t = threading.Thread(target=bump)
        t.start()
        t.join()
        want.append(("shared", "1", "2", bump.__code__.co_firstlineno + 2))
        for _ in range(3):
            pass
        shared = 3; want.append(("shared", "2", "3", here()))  # noqa: E702

    reader()
    got = [(c.key, c.old_repr, c.new_repr, c.line) for c in changes]
    assert got == want


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="not a variable name"):
        memwatch.watch_var("a.b")
    with pytest.raises(ValueError, match="repr_limit"):
        memwatch.watch_var("x", repr_limit=2)
    with pytest.raises(TypeError, match="scope must be"):
        memwatch.watch_var("x", scope=42)
    assert memwatch._vars._watches == []


def test_record_vars_needs_no_change_to_the_program(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text(
        textwrap.dedent(
            """\
            lr = 0.1
            def train(steps):
                global lr
                for i in range(steps):
                    lr = lr * 0.5
            train(2)
            """
        )
    )
    trace = tmp_path / "prog.mwt"
    p = run([str(BIN / "memwatch"), "record", "-o", str(trace), "--vars", "lr", "--", sys.executable, str(prog)])
    assert p.returncode == 0, p.stderr
    assert "recorded 3 changes to 1 tag " in p.stderr
    t = memwatch.open_trace(trace)
    got = [(c.kind, c.key, c.old_repr, c.new_repr, c.line, c.function) for c in t.changes()]
    assert got == [
        ("rebind", "lr", None, "0.1", 1, "<module>"),
        ("rebind", "lr", "0.1", "0.05", 5, "train"),
        ("rebind", "lr", "0.05", "0.025", 5, "train"),
    ]
    q = run([str(BIN / "memwatch"), "query", str(trace), "--tag", "lr", "--format", "jsonl"])
    assert q.returncode == 0, q.stderr
    rows = [json.loads(line) for line in q.stdout.splitlines()]
    assert [(r["kind"], r["variable"]) for r in rows] == [("rebind", "lr")] * 3
    assert [c.variable for c in t.changes()] == ["lr"] * 3


COVERED = """\
import sys
import threading
import memwatch
got = []
memwatch.configure(live=False)
memwatch.on_change(got.append)
buf = bytearray(4)
memwatch.watch(buf, name="buf")
memwatch.watch_var("total")
total = 0
for i in range(3):
    buf[0] = i + 1
    total += i
def unused():
    return 1
def worker():
    buf[1] = 9
t = threading.Thread(target=worker)
t.start(); t.join()
memwatch.unwatch("buf"); memwatch.unwatch("total")
after = [1]
print(sorted({(c.tag, c.line) for c in got}), file=sys.stderr)
"""


@pytest.mark.parametrize("core", ["ctrace", "sysmon", "pytrace"])
def test_coverage_still_measures_correctly(tmp_path, core):
    # Both see everything: memwatch its changes (a thread's too), coverage.py
    # every line, whichever core it uses, also after memwatch stops (nothing
    # left watched). On 3.11 memwatch's trace function is installed on top
    # of coverage's and hands it every event first; stopping puts coverage's
    # back.
    if core == "sysmon" and sys.version_info < (3, 12):
        pytest.skip("3.11 has no sys.monitoring")
    pytest.importorskip("coverage")
    prog = tmp_path / "covered.py"
    prog.write_text(COVERED)
    env = dict(os.environ, COVERAGE_CORE=core, COVERAGE_FILE=str(tmp_path / ".coverage"))
    p = run([sys.executable, "-m", "coverage", "run", str(prog)], cwd_override=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    assert "Warning" not in p.stderr, p.stderr
    assert eval(p.stderr.strip().splitlines()[-1]) == [("buf", 12), ("buf", 17), ("total", 10), ("total", 13)]
    j = run([sys.executable, "-m", "coverage", "json", "-o", "cov.json"], cwd_override=tmp_path, env=env)
    assert j.returncode == 0, j.stderr
    data = json.loads((tmp_path / "cov.json").read_text())["files"]
    f = next(v for k, v in data.items() if k.endswith("covered.py"))
    assert f["missing_lines"] == [15]
    assert f["executed_lines"] == [*range(1, 15), *range(16, 23)]


class Model:
    def __init__(self):
        self.w = [0.0, 0.0, 0.0]


def test_a_fingerprint_key_reports_when_it_changes(changes):
    m = Model()
    h = memwatch.watch_object(m, name="model", key=lambda o: sum(o.w))
    assert h.tag == "model" and h.last == 0.0
    m.w[1] = 2.0; line = here()  # noqa: E702
    m.w[1] = 2.0  # the same fingerprint: nothing
    m.w = [1.0, 1.0, 1.0]; line2 = here()  # noqa: E702
    assert [(c.kind, c.tag, c.key, c.old_repr, c.new_repr, c.line) for c in changes] == [
        ("fingerprint", "model", None, "0.0", "2.0", line),
        ("fingerprint", "model", None, "2.0", "3.0", line2),
    ]
    memwatch.unwatch(m)
    m.w[0] = 5.0
    assert len(changes) == 2


def test_a_fingerprint_that_fails_is_reported_not_raised(changes):
    m = Model()
    memwatch.watch_object(m, name="model", key=lambda o: 1 / o.w[0] if o.w[0] else 0)
    m.w[0] = 0.5; line = here()  # noqa: E702
    assert [(c.kind, c.new_repr, c.line) for c in changes] == [("fingerprint", "2.0", line)]
    del m.w; line = here()  # noqa: E702
    assert changes[-1].kind == "fingerprint" and changes[-1].line == line
    assert changes[-1].new_repr == "<key failed: AttributeError: 'Model' object has no attribute 'w'>"
    m.w = [0.0]; line = here()  # noqa: E702 - the key works again
    assert (changes[-1].old_repr, changes[-1].new_repr, changes[-1].line) == (
        "<key failed: AttributeError: 'Model' object has no attribute 'w'>",
        "0",
        line,
    )
    with pytest.raises(TypeError, match="key must be a function"):
        memwatch.watch_object(Model(), name="bad", key=5)
    with pytest.raises(ValueError, match="failed when the watch started"):
        memwatch.watch_object(Model(), name="bad", key=lambda o: o.nope)


def test_the_default_fingerprint_is_id_type_hash(changes):
    from memwatch._vars import default_fingerprint

    t = (1, 2)
    assert default_fingerprint(t) == (id(t), "tuple", hash(t))
    lst = [1]
    assert default_fingerprint(lst) == (id(lst), "list", None)
    h = memwatch.watch_object(Model(), name="m", key=True)
    assert h.key is default_fingerprint


def test_lines_a_variable_watch_did_not_need_come_back_for_a_buffer(changes):
    # With only variables watched, 3.12+ switches off the line events of
    # code that binds none of them; watching a buffer switches them on again.
    memwatch.watch_var("never_bound_anywhere")

    def fill(buf):
        buf[0] = 1; first = here()  # noqa: E702
        buf[1] = 2
        return first

    fill(bytearray(2))
    b = bytearray(2)
    memwatch.watch(b, name="b")
    first = fill(b)
    assert [(c.tag, c.line, c.ranges) for c in changes] == [
        ("b", first, [(0, b"\x00", b"\x01")]),
        ("b", first + 1, [(1, b"\x00", b"\x02")]),
    ]


def test_the_live_report_names_the_variable():
    p = run_py(
        """
        import memwatch
        memwatch.watch_var("lr")
        lr = 1
        lr = 2
        """
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("[MEMWATCH] Tag: lr\n") == 2
    assert "Change: rebind lr\nOld Value: 1\nNew Value: 2\nPython Variable: lr\nLine: <string>:5" in p.stderr


def test_three_eleven_says_when_a_later_trace_function_replaced_memwatchs():
    if sys.version_info >= (3, 12):
        pytest.skip("3.12+: sys.monitoring, no trace function to lose")
    r = run_py(
        """
        import sys, warnings
        import memwatch
        memwatch.configure(live=False)
        buf = bytearray(4)
        memwatch.watch(buf, name="buf")
        sys.settrace(lambda *a: None)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            memwatch.unwatch(buf)
        sys.settrace(None)
        print([str(x.message) for x in w])
        """
    )
    assert r.returncode == 0, r.stderr
    assert "replaced memwatch's on this thread" in r.stdout
