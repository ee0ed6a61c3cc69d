"""Watching Python objects: every attribute and container change, with its
kind, key, old and new value, and the exact line; on 3.11, 3.12 and 3.13."""

from __future__ import annotations

import copy
import gc
import os
import pickle
import subprocess
import sys
import threading
import weakref

import pytest

import memwatch
from conftest import BIN, here, run_py

THIS = os.path.realpath(__file__)


class Config:
    def __init__(self):
        self.lr = 0.1
        self.layers = [1, 2]
        self.opts = {"beta": 0.9}
        self.tags = {"a"}

    def __eq__(self, other):
        return type(other) is Config and vars(self) == vars(other)

    __hash__ = None


class Slotted:
    __slots__ = ("a", "b", "__weakref__")

    def __init__(self):
        self.a = 1


def seen(changes, tag=None):
    """(kind, key, old_repr, new_repr, line) of each object change."""
    return [(c.kind, c.key, c.old_repr, c.new_repr, c.line) for c in changes if tag is None or c.tag == tag]


def test_setattr_and_delattr(changes):
    cfg = Config()
    h = memwatch.watch_object(cfg)
    assert (h.tag, h.variable, h.depth) == ("cfg", "cfg", 1)
    cfg.lr = 0.01; l1 = here()  # noqa: E702
    cfg.momentum = 0.9; l2 = here()  # noqa: E702
    del cfg.lr; l3 = here()  # noqa: E702
    assert seen(changes) == [
        ("setattr", ".lr", "0.1", "0.01", l1),
        ("setattr", ".momentum", None, "0.9", l2),
        ("delattr", ".lr", "0.01", None, l3),
    ]
    c = changes[0]
    assert (c.tag, c.variable) == ("cfg", "cfg")
    assert (os.path.realpath(c.file), c.function) == (THIS, "test_setattr_and_delattr")
    assert c.stack[0] == (c.file, l1, "test_setattr_and_delattr")
    assert c.thread_id == threading.get_native_id() and c.thread_name == threading.current_thread().name
    # No bytes in an object change.
    assert (c.address, c.offset, c.old, c.new, c.ranges, c.dtype, c.indices) == (None, None, None, None, [], None, None)
    assert c.seq > 0 and c.time_ns > 0


def test_object_and_buffer_changes_after_quiet_lines_keep_their_lines(changes):
    # Lines that change nothing take the line callback's fast path; the
    # first one after a write must still report it, on the writing line,
    # whether an object or a buffer (or both, on one line) changed.
    cfg = Config()
    buf = bytearray(8)
    memwatch.watch_object(cfg, name="cfg")
    memwatch.watch(buf, name="buf")
    expected = []
    for i in range(1, 4):
        total = 0
        for k in range(20):
            total += k
        cfg.lr = i; expected.append(("cfg", here()))  # noqa: E702
        buf[i] = i; expected.append(("buf", here()))  # noqa: E702
        cfg.lr = -i; buf[0] = i; line = here()  # noqa: E702
        expected += [("cfg", line), ("buf", line)]
    assert total == 190
    assert [(c.tag, c.line) for c in changes] == expected
    assert [c.new_repr for c in changes if c.tag == "cfg"] == ["1", "-1", "2", "-2", "3", "-3"]
    assert [c.ranges for c in changes if c.tag == "buf"][:2] == [[(1, b"\x00", b"\x01")], [(0, b"\x00", b"\x01")]]


def test_the_recorders_own_first_walk_turns_the_frame_walker_on():
    # Nothing asks for the walker here: the first change's stack decides
    # (the diagnostic itself decides nothing). On every supported CPython
    # the frame records are what is read, and the stacks are right.
    r = run_py(
        """
        import memwatch
        from memwatch import _memwatch as m
        memwatch.configure(live=False)
        class C:
            pass
        c = C()
        before = m._frame_walker_in_use()
        memwatch.watch_object(c, name="c")
        def store():
            c.x = 1
        store()
        memwatch.check()
        h = memwatch.history()
        print(before, m._frame_walker_in_use(), [f[2].rsplit(".", 1)[-1] for f in h[-1].stack])
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(" ", 2)[:2] == ["None", "True"]
    assert r.stdout.split(" ", 2)[2].strip() == "['store', '<module>']"


def test_stacks_through_generators_and_c_calls_are_the_interpreters(changes):
    # Stacks are read from the interpreter's frame records (checked against
    # the public API at first use): through a generator, a C function
    # calling back into Python (sorted's key) and the C-call shims between.
    import traceback

    cfg = Config()
    memwatch.watch_object(cfg, name="cfg")
    expected = []

    def key(x):
        cfg.lr = x; expected.append(traceback.extract_stack())  # noqa: E702
        return x

    def gen():
        yield from sorted([3, 1, 2], key=key)

    assert list(gen()) == [1, 2, 3]
    assert memwatch._memwatch._frame_walker_in_use()
    assert len(changes) == 3
    for c, stack in zip(changes, expected):
        want = [(os.path.realpath(f.filename), f.lineno) for f in reversed(stack)]
        assert [(os.path.realpath(f), line) for f, line, _ in c.stack] == want
        names = [fn.rsplit(".", 1)[-1] for _, _, fn in c.stack[:3]]
        assert names == ["key", "gen", "test_stacks_through_generators_and_c_calls_are_the_interpreters"]


def test_setattr_from_native_code(changes):
    cfg = Config()
    memwatch.watch_object(cfg, name="cfg")
    setattr(cfg, "lr", 1); l1 = here()  # noqa: E702
    object.__setattr__(cfg, "lr", 2); l2 = here()  # noqa: E702
    vars(cfg).update(lr=3, extra="x"); l3 = here()  # noqa: E702
    exec("cfg.lr = 4", {"cfg": cfg}); l4 = here()  # noqa: E702
    assert seen(changes) == [
        ("setattr", ".lr", "0.1", "1", l1),
        ("setattr", ".lr", "1", "2", l2),
        ("setattr", ".lr", "2", "3", l3),
        ("setattr", ".extra", None, "'x'", l3),
        ("setattr", ".lr", "3", "4", l4),
    ]


def test_slots(changes):
    s = Slotted()
    memwatch.watch_object(s)
    s.b = "x"; l1 = here()  # noqa: E702
    s.a = 2; l2 = here()  # noqa: E702
    del s.a; l3 = here()  # noqa: E702
    assert seen(changes) == [
        ("setattr", ".b", None, "'x'", l1),
        ("setattr", ".a", "1", "2", l2),
        ("delattr", ".a", "2", None, l3),
    ]


def test_a_c_type_exposing_its_dict_as_a_member_reports_each_change_once(changes):
    # types.SimpleNamespace has a `__dict__` member descriptor: it is the
    # attributes, not a slot holding a dict (each write was reported twice).
    import types

    ns = types.SimpleNamespace(step=0)
    memwatch.watch_object(ns, name="ns")
    ns.step = 1; l1 = here()  # noqa: E702
    ns.lr = 0.5; l2 = here()  # noqa: E702
    del ns.step; l3 = here()  # noqa: E702
    memwatch.check()
    assert seen(changes) == [
        ("setattr", ".step", "0", "1", l1),
        ("setattr", ".lr", None, "0.5", l2),
        ("delattr", ".step", "1", None, l3),
    ]


def test_dict_items(changes):
    d = {"a": 1, "b": 2}
    memwatch.watch_object(d)
    d["a"] = 10; l1 = here()  # noqa: E702
    d["c"] = 3; l2 = here()  # noqa: E702
    del d["b"]; l3 = here()  # noqa: E702
    d.pop("c"); l4 = here()  # noqa: E702
    d.update({"z": [1]}); l5 = here()  # noqa: E702
    d |= {"y": 2}; l6 = here()  # noqa: E702
    d.clear(); l7 = here()  # noqa: E702
    assert seen(changes) == [
        ("setitem", "['a']", "1", "10", l1),
        ("setitem", "['c']", None, "3", l2),
        ("delitem", "['b']", "2", None, l3),
        ("pop", "['c']", "3", None, l4),
        ("update", "['z']", None, "[1]", l5),
        ("update", "['y']", None, "2", l6),
        ("clear", None, "{'a': 10, 'z': [1], 'y': 2}", "{}", l7),
    ]


def test_list_mutations(changes):
    xs = [3, 1, 2]
    memwatch.watch_object(xs)
    xs.append(4); l1 = here()  # noqa: E702
    xs.extend([5, 6]); l2 = here()  # noqa: E702
    xs += [7]; l3 = here()  # noqa: E702
    xs.insert(0, 0); l4 = here()  # noqa: E702
    xs.pop(); l5 = here()  # noqa: E702
    xs.pop(1); l6 = here()  # noqa: E702
    xs.remove(2); l7 = here()  # noqa: E702
    del xs[0]; l8 = here()  # noqa: E702
    xs[0] = 9; l9 = here()  # noqa: E702
    xs.reverse(); l10 = here()  # noqa: E702
    xs.sort(); l11 = here()  # noqa: E702
    xs.clear(); l12 = here()  # noqa: E702
    assert seen(changes) == [
        ("append", "[3]", None, "4", l1),
        ("extend", "[4:6]", None, "[5, 6]", l2),
        ("extend", "[6:7]", None, "[7]", l3),
        ("insert", "[0]", None, "0", l4),
        ("pop", "[7]", "7", None, l5),
        ("pop", "[1]", "3", None, l6),
        ("remove", "[2]", "2", None, l7),
        ("delitem", "[0]", "0", None, l8),
        ("setitem", "[0]", "1", "9", l9),
        ("reverse", None, "[9, 4, 5, 6]", "[6, 5, 4, 9]", l10),
        ("sort", None, "[6, 5, 4, 9]", "[4, 5, 6, 9]", l11),
        ("clear", None, "[4, 5, 6, 9]", "[]", l12),
    ]


def test_list_slices_and_one_net_change_per_line(changes):
    xs = list(range(6))
    memwatch.watch_object(xs)
    xs[1:3] = ["a", "b"]; l1 = here()  # noqa: E702
    del xs[3:5]; l2 = here()  # noqa: E702
    xs.append(1); xs.pop(); xs[0] = -1; l3 = here()  # noqa: E702
    assert seen(changes) == [
        ("setitem", "[1:3]", "[1, 2]", "['a', 'b']", l1),
        ("delitem", "[3:5]", "[3, 4]", None, l2),
        ("setitem", "[0]", "0", "-1", l3),
    ]


def test_sort_with_a_key_calls_back_into_python(changes):
    # list.sort empties the list while the key function (in-scope code, so
    # it gets line events) runs: nothing is reported until it is done.
    xs = [3, 1, 2]
    memwatch.watch_object(xs)
    xs.sort(key=lambda v: -v); line = here()  # noqa: E702
    assert seen(changes) == [("sort", None, "[3, 1, 2]", "[3, 2, 1]", line)]


def test_set_mutations(changes):
    s = {1}
    memwatch.watch_object(s)
    s.add(2); l1 = here()  # noqa: E702
    s.discard(1); l2 = here()  # noqa: E702
    s.remove(2); l3 = here()  # noqa: E702
    s.update([5, 6]); l4 = here()  # noqa: E702
    s |= {7}; l5 = here()  # noqa: E702
    s.clear(); l6 = here()  # noqa: E702
    assert seen(changes) == [
        ("add", None, None, "2", l1),
        ("discard", None, "1", None, l2),
        ("remove", None, "2", None, l3),
        ("update", None, None, "{5, 6}", l4),
        ("update", None, None, "{7}", l5),
        ("clear", None, "{5, 6, 7}", "set()", l6),
    ]


def test_containers_reachable_through_attributes(changes):
    cfg = Config()
    memwatch.watch_object(cfg)
    cfg.layers.append(3); l1 = here()  # noqa: E702
    cfg.opts["beta"] = 0.5; l2 = here()  # noqa: E702
    cfg.tags.add("b"); l3 = here()  # noqa: E702
    cfg.lr *= 10; l4 = here()  # noqa: E702
    assert seen(changes) == [
        ("append", ".layers[2]", None, "3", l1),
        ("setitem", ".opts['beta']", "0.9", "0.5", l2),
        ("add", ".tags", None, "'b'", l3),
        ("setattr", ".lr", "0.1", "1.0", l4),
    ]


def test_rebinding_moves_the_watch_to_the_new_container(changes):
    cfg = Config()
    memwatch.watch_object(cfg)
    old = cfg.layers
    cfg.layers = [9]; l1 = here()  # noqa: E702
    old.append("not watched any more")
    cfg.layers.append(10); l2 = here()  # noqa: E702
    assert seen(changes) == [
        ("setattr", ".layers", "[1, 2]", "[9]", l1),
        ("append", ".layers[1]", None, "10", l2),
    ]


def test_depth(changes):
    cfg = Config()
    cfg.sub = Config()
    memwatch.watch_object(cfg, depth=0)
    cfg.layers.append(3)
    cfg.sub.lr = 5
    cfg.lr = 1; l1 = here()  # noqa: E702
    assert seen(changes) == [("setattr", ".lr", "0.1", "1", l1)]
    changes.clear()
    memwatch.unwatch("cfg")
    memwatch.watch_object(cfg, depth=2)
    cfg.sub.lr = 6; l2 = here()  # noqa: E702
    cfg.sub.layers.append(4); l3 = here()  # noqa: E702
    assert seen(changes) == [
        ("setattr", ".sub.lr", "5", "6", l2),
        ("append", ".sub.layers[2]", None, "4", l3),
    ]


def test_dict_update_from_another_thread(changes):
    d = {}
    memwatch.watch_object(d, name="shared")

    def work():
        d.update(x=1); line.append(here())  # noqa: E702

    line: list[int] = []
    t = threading.Thread(target=work, name="updater")
    t.start()
    t.join()
    memwatch.check()
    (c,) = changes
    assert (c.kind, c.key, c.old_repr, c.new_repr, c.line) == ("update", "['x']", None, "1", line[0])
    assert c.thread_name == "updater" and c.thread_id != threading.get_native_id()
    assert c.function == "test_dict_update_from_another_thread.<locals>.work"


def test_mutation_inside_out_of_scope_code_goes_to_the_in_scope_caller(changes, tmp_path):
    (tmp_path / "fakelib2.py").write_text("def fill(cfg):\n    cfg.lr = 7\n    cfg.layers.append(8)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import fakelib2

        memwatch.configure(exclude=[str(tmp_path)])
        cfg = Config()
        memwatch.watch_object(cfg)
        fakelib2.fill(cfg); line = here()  # noqa: E702
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fakelib2", None)
    assert seen(changes) == [
        ("setattr", ".lr", "0.1", "7", line),
        ("append", ".layers[2]", None, "8", line),
    ]
    assert {c.function for c in changes} == {"test_mutation_inside_out_of_scope_code_goes_to_the_in_scope_caller"}


def test_collected_object_ends_the_watch(changes):
    cfg = Config()
    ref = weakref.ref(cfg)
    memwatch.watch_object(cfg)
    del cfg; line = here()  # noqa: E702
    assert ref() is None  # watching does not keep it alive
    assert seen(changes) == [("collected", None, None, None, line)]
    assert memwatch._memwatch._object_watches() == []


def test_collected_object_in_a_cycle(changes):
    cfg = Config()
    cfg.me = cfg
    ref = weakref.ref(cfg)
    h = memwatch.watch_object(cfg, depth=0)
    del cfg
    gc.collect(); line = here()  # noqa: E702
    if h.mechanism == "dict-watcher":
        assert ref() is None
        assert seen(changes) == [("collected", None, None, None, line)]
    else:
        # Compared attributes are held by memwatch (docs/index.md): a cycle
        # through them lives until unwatch.
        assert ref() is not None and seen(changes) == []
        memwatch.unwatch(h)
        gc.collect()
        assert ref() is None


def test_emptying_a_one_item_container_is_a_removal(changes):
    xs, s, d = [1], {2}, {"k": 3}
    memwatch.watch_object(xs)
    memwatch.watch_object(s)
    memwatch.watch_object(d)
    xs.pop(); l1 = here()  # noqa: E702
    s.remove(2); l2 = here()  # noqa: E702
    del d["k"]; l3 = here()  # noqa: E702
    assert seen(changes) == [
        ("pop", "[0]", "1", None, l1),
        ("remove", None, "2", None, l2),
        ("delitem", "['k']", "3", None, l3),
    ]


def test_collected_list_that_cannot_be_weakly_referenced(changes):
    def make():
        xs = [1, 2]
        memwatch.watch_object(xs)
        xs.append(3)
        return here() - 1

    l1 = make(); l2 = here()  # noqa: E702
    memwatch.check()
    # memwatch holds the list; the watch ends at the first boundary after the
    # program dropped its last reference (the return from make).
    assert seen(changes) == [("append", "[2]", None, "3", l1), ("collected", None, None, None, l2)]
    assert memwatch._memwatch._object_watches() == []


def test_watching_changes_no_behaviour():
    cfg, s, d = Config(), Slotted(), {"k": [1]}
    before = (pickle.dumps(cfg), pickle.dumps(d), vars(cfg).copy(), dir(cfg))
    ids = (id(cfg), id(s), id(d))
    handles = [memwatch.watch_object(cfg), memwatch.watch_object(s), memwatch.watch_object(d)]
    try:
        assert type(cfg) is Config and cfg.__class__ is Config and isinstance(cfg, Config)
        assert type(s) is Slotted and type(d) is dict and isinstance(d, dict)
        assert (id(cfg), id(s), id(d)) == ids
        assert (pickle.dumps(cfg), pickle.dumps(d), vars(cfg), dir(cfg)) == before
        assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(d) == d
        assert cfg == Config() and d == {"k": [1]}
        assert not hasattr(s, "b") and s.a == 1
        cfg.lr = 3
        assert cfg.lr == 3 and vars(cfg)["lr"] == 3
    finally:
        for h in handles:
            memwatch.unwatch(h)


def test_failing_and_long_reprs(changes):
    class Bad:
        def __repr__(self):
            raise ValueError("no")

    cfg = Config()
    memwatch.watch_object(cfg, repr_limit=12)
    cfg.lr = Bad(); l1 = here()  # noqa: E702
    cfg.lr = "x" * 50; l2 = here()  # noqa: E702
    assert seen(changes) == [
        ("setattr", ".lr", "0.1", "<repr failed: ValueError>", l1),
        ("setattr", ".lr", "<repr failed: ValueError>", "'xxxxxxxx...", l2),
    ]


def test_unwatch_by_handle_name_and_object(changes):
    a, b, c = Config(), Config(), Config()
    ha = memwatch.watch_object(a)
    memwatch.watch_object(b)
    memwatch.watch_object(c)
    a.lr = 1; line = here()  # noqa: E702
    memwatch.unwatch(ha)  # reports what is pending first
    memwatch.unwatch("b")
    memwatch.unwatch(c)
    a.lr = b.lr = c.lr = 2
    memwatch.check()
    assert seen(changes) == [("setattr", ".lr", "0.1", "1", line)]
    with pytest.raises(memwatch.NotWatchedError, match="is not watched any more"):
        memwatch.unwatch(ha)


def test_bad_arguments_are_refused_clearly(changes):
    with pytest.raises(TypeError, match="cannot watch an int: .* an int has none that can change"):
        memwatch.watch_object(5, name="five")
    with pytest.raises(TypeError, match="cannot watch the class Config"):
        memwatch.watch_object(Config)
    with pytest.raises(ValueError, match="depth must be an int >= 0"):
        memwatch.watch_object(Config(), name="x", depth=-1)
    with pytest.raises(ValueError, match="repr_limit must be an int >= 8"):
        memwatch.watch_object(Config(), name="x", repr_limit=2)
    with pytest.raises(ValueError, match="cannot tell which variable"):
        memwatch.watch_object(Config())
    cfg = Config()
    memwatch.watch_object(cfg)
    with pytest.raises(ValueError, match="'cfg' is already watched"):
        memwatch.watch_object(Config(), name="cfg")
    with pytest.raises(ValueError, match="'cfg' is already watched"):
        memwatch.watch(bytearray(4), name="cfg")
    # The rule is the recorder's (one answer for every way of watching):
    # the extension refuses it without memwatch.watch's early check too.
    with pytest.raises(ValueError, match=r"'cfg' is already watched \(an object\)"):
        memwatch._memwatch._watch(bytearray(4), None, None, "cfg", None, None, None, [], True)
    buf = bytearray(4)
    memwatch.watch(buf, name="buf")
    with pytest.raises(ValueError, match="'buf' is already watched; pass another name="):
        memwatch.watch_object(Config(), name="buf")
    memwatch.unwatch(buf)
    other = Config()
    memwatch.unwatch(memwatch.watch_object(other, name="buf"))  # free again


def test_mechanism_per_version():
    cfg = Config()
    h = memwatch.watch_object(cfg)
    memwatch.unwatch(h)
    if sys.version_info < (3, 12):
        assert h.mechanism == "compare"
    else:
        assert h.mechanism in ("dict-watcher", "dict-watcher+compare")


def test_live_report(capsys):
    memwatch.configure(live=True)
    cfg = Config()
    memwatch.watch_object(cfg)
    try:
        cfg.lr = 0.5; line = here()  # noqa: E702
        memwatch.check()
    finally:
        memwatch.unwatch(cfg)
        memwatch.clear_history()
    err = capsys.readouterr().err
    assert err == (
        "[MEMWATCH] Tag: cfg\nChange: setattr cfg.lr\nOld Value: 0.1\nNew Value: 0.5\n"
        f"Python Variable: cfg\nLine: {__file__}:{line} in test_live_report\n"
    )


def test_recorded_places_threads_and_tags_follow_each_change(changes, tmp_path):
    # The trace writer reuses the ids of the last place, thread and tag
    # while they repeat: changes that alternate between two lines, two
    # objects and a second thread must each keep their own.
    trace = tmp_path / "alternating.mwt"
    a, b = Config(), Config()
    memwatch.watch_object(a, name="a")
    memwatch.watch_object(b, name="b")
    memwatch.start(trace=trace)
    want = []
    for i in range(3):
        a.lr = i; want.append(("a", here(), "MainThread", "test_recorded_places_threads_and_tags_follow_each_change"))  # noqa: E702
        b.lr = i; want.append(("b", here(), "MainThread", "test_recorded_places_threads_and_tags_follow_each_change"))  # noqa: E702

    def other():
        a.lr = -1; want.append(("a", here(), "other", "other"))  # noqa: E702

    t = threading.Thread(target=other, name="other")
    t.start()
    t.join()
    a.lr = 9; want.append(("a", here(), "MainThread", "test_recorded_places_threads_and_tags_follow_each_change"))  # noqa: E702
    memwatch.stop()
    got = memwatch.open_trace(trace).changes()
    assert [(c.tag, c.line, c.thread_name, c.function.rsplit(".", 1)[-1]) for c in got] == want
    assert [c.new_repr for c in got] == ["0", "0", "1", "1", "2", "2", "-1", "9"]


def test_recorded_changes_reach_query_reader_and_export(changes, tmp_path):
    trace = tmp_path / "objects.mwt"
    cfg = Config()
    memwatch.watch_object(cfg)
    memwatch.start(trace=trace)
    cfg.lr = 0.2; l1 = here()  # noqa: E702
    cfg.layers.append(3); l2 = here()  # noqa: E702
    summary = memwatch.stop()
    assert summary["changes"] == 2
    got = memwatch.open_trace(trace).changes(tag="cfg")
    assert [(c.kind, c.key, c.old_repr, c.new_repr, c.line) for c in got] == [
        ("setattr", ".lr", "0.1", "0.2", l1),
        ("append", ".layers[2]", None, "3", l2),
    ]
    assert got[0].function == "test_recorded_changes_reach_query_reader_and_export"
    # The variable the object was watched through is in the trace too.
    assert [c.variable for c in got] == ["cfg", "cfg"]
    table = subprocess.run(
        [str(BIN / "memwatch"), "query", str(trace), "--tag", "cfg"], capture_output=True, text=True, timeout=60
    ).stdout.splitlines()
    assert table[0].split()[3] == "variable" and [row.split()[3] for row in table[1:]] == ["cfg", "cfg"]
    r = subprocess.run(
        [str(BIN / "memwatch"), "query", str(trace), "--tag", "cfg", "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    assert len(rows) == 3 and "setattr" in rows[1] and f",{l1}," in rows[1] and "append" in rows[2]
    df = memwatch.open_trace(trace).to_pandas()
    assert list(df["kind"]) == ["setattr", "append"]
    assert list(df["key"]) == [".lr", ".layers[2]"]
    assert list(df["new_repr"]) == ["0.2", "3"]
    assert list(df["line"]) == [l1, l2]
    assert list(df["variable"]) == ["cfg", "cfg"]
