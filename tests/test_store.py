"""mode="store": one change per store instruction, with intermediate values,
the writing thread and its line; kernel writes still succeed; traps that
are not memwatch's still reach the program."""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading

import numpy as np
import pytest

import memwatch
from conftest import BIN, here, run, run_py, unprivileged_prefix


def stats() -> dict[str, int]:
    return memwatch._memwatch._store_stats()


def values(changes):
    return [(c.line, c.indices, c.old_values, c.new_values) for c in changes]


def test_every_store_is_its_own_change_with_intermediate_values(changes):
    c = np.zeros(4, dtype=np.int64)
    h = memwatch.watch(c, name="c", mode="store")
    assert h.tracking == "uffd-wp-step"
    before = stats()["stepped"]
    c[0] = 1; c[0] = 2; c[1] = 7; line = here()  # noqa: E702
    c[2] = 0; line2 = here()  # noqa: E702 - writes the same bytes: nothing
    assert values(changes) == [
        (line, [0], [0], [1]),
        (line, [0], [1], [2]),
        (line, [1], [0], [7]),
    ]
    # Each store was stepped over (unrelated writes to objects sharing the
    # array's page are stepped over too, and give no change).
    assert stats()["stepped"] - before >= 3
    assert line2 not in [ch.line for ch in changes]
    assert [ch.seq for ch in changes] == sorted(ch.seq for ch in changes)
    assert all(ch.thread_name == "MainThread" for ch in changes)
    assert changes[0].time_ns <= changes[1].time_ns <= changes[2].time_ns


def test_a_loop_in_one_line_keeps_every_step(changes):
    counter = np.zeros(1, dtype=np.int32)
    memwatch.watch(counter, name="counter", mode="store")
    for _ in range(50): counter[0] += 1  # noqa: E701
    line = here() - 1
    assert [(ch.old_values, ch.new_values) for ch in changes] == [([i], [i + 1]) for i in range(50)]
    assert {ch.line for ch in changes} == {line}


def test_native_stores_with_the_gil_released(changes):
    buf = (ctypes.c_uint8 * 64)()
    memwatch.watch(buf, name="buf", mode="store")
    ctypes.memset(buf, 0xAB, 3); line = here()  # noqa: E702
    # memset of 3 bytes is one, two or three stores; together they write
    # exactly bytes 0..3, each step from the previous step's value.
    assert {ch.line for ch in changes} == {line}
    state = bytearray(64)
    for ch in changes:
        for off, old, new in ch.ranges:
            assert bytes(state[off : off + len(old)]) == old
            state[off : off + len(new)] = new
    assert bytes(state) == bytes(buf) == b"\xab" * 3 + bytes(61)


def test_a_vector_store_is_one_change(changes):
    a = np.zeros(4, dtype=np.int64)
    memwatch.watch(a, name="a", mode="store")
    np.add(a, 3, out=a); line = here()  # noqa: E702
    # However numpy's loop stores them, every element goes 0 -> 3 once, and
    # no change is wider than one store can write (64 bytes).
    assert sorted(i for ch in changes for i in ch.indices) == [0, 1, 2, 3]
    assert all(ch.line == line for ch in changes)
    assert all(sum(len(new) for _, _, new in ch.ranges) <= 64 for ch in changes)
    assert all(v == [0] * len(ch.indices) for ch in changes for v in [ch.old_values])


def own_page(n: int, dtype=np.int64) -> np.ndarray:
    """An n-element array at the start of a page nothing else uses (a small
    numpy array shares its page with Python objects that other threads
    write to)."""
    buf = np.zeros(3 * 4096, dtype=np.uint8)
    off = -buf.ctypes.data % 4096
    return buf[off : off + n * np.dtype(dtype).itemsize].view(dtype)


def test_stores_from_a_thread_are_attributed_to_it(changes):
    flag = own_page(2)
    memwatch.watch(flag, name="flag", mode="store")
    lines = {}

    def worker():
        flag[1] = 5; lines["w"] = here()  # noqa: E702
        flag[1] = 6

    t = threading.Thread(target=worker, name="worker")
    t.start()
    t.join()
    flag[0] = 1; main_line = here()  # noqa: E702
    got = [(ch.thread_name, ch.line, ch.indices, ch.old_values, ch.new_values) for ch in changes]
    assert got == [
        ("worker", lines["w"], [1], [0], [5]),
        ("worker", lines["w"] + 1, [1], [5], [6]),
        ("MainThread", main_line, [0], [0], [1]),
    ]
    assert changes[0].thread_id == changes[1].thread_id != changes[2].thread_id


def store_beside_a_hammering_thread(tmp_path) -> int:
    """2000 stores to 8 watched int64s while another thread stores to
    unwatched bytes of the same page with the GIL released; returns the
    line of the store loop's header."""
    page = own_page(512)
    ours = page[256:264]
    memwatch.watch(ours, name="ours", mode="store")
    stop = threading.Event()
    theirs = page.ctypes.data + 1024  # unwatched bytes of the same page
    # The other thread runs out of scope: a store found by a check (rather
    # than stepped over) is reported by the thread that checks, and only
    # in-scope code checks.
    (tmp_path / "hammering.py").write_text(
        "def hammer(stop, memset, at):\n"
        "    while not stop.is_set():\n"
        "        for _ in range(100):\n"
        "            memset(at, 1, 8)  # releases the GIL\n"
        "            memset(at, 0, 8)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import hammering
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("hammering", None)
    memwatch.configure(exclude=[str(tmp_path)])
    t = threading.Thread(target=hammering.hammer, args=(stop, ctypes.memset, theirs), name="hammer")
    t.start()
    loop = here() + 2
    try:
        for i in range(1, 2001):
            ours[i % 8] = i
    finally:
        stop.set()
        t.join()
    assert ours.tolist() == [2000 - (2000 - k) % 8 for k in range(8)]
    return loop


def test_a_thread_storing_to_the_same_page_takes_no_credit_for_ours(changes, tmp_path):
    # While a thread steps over its store the page is open, and a store of
    # another thread to it does not fault. memwatch must not credit that
    # store to the stepping thread, and must not leave the page open.
    loop = store_beside_a_hammering_thread(tmp_path)
    assert changes, "no store was caught"
    assert {(c.thread_name, c.tag) for c in changes} == {("MainThread", "ours")}
    # A store found by the check that follows another thread's step is
    # reported at the line that check ran after: the store's line, the
    # loop's header, or (for the last stores) a line of the `finally:`.
    assert {c.line for c in changes} <= set(range(loop, loop + 5))
    assert sum(c.line == loop + 1 for c in changes) >= 0.9 * len(changes)
    # Stores that land while the other thread has the page open are merged
    # into the next check's change (how many depends on how long that
    # thread is descheduled mid-step): each element still changes.
    assert {k for c in changes for k in c.indices} == set(range(8))
    s = stats()
    assert (s["slots_open"], s["slots_pending"]) == (0, 0)


@pytest.mark.xfail(
    strict=False,
    reason="known, rare (seen in 1 of 24 runs once, then in none of 260): an element is reported "
    "going back to a value about 200 stores old while another thread stores to the same page; "
    "cause not found yet",
)
def test_beside_a_hammering_thread_old_and_new_values_chain(changes, tmp_path):
    store_beside_a_hammering_thread(tmp_path)
    last = {}
    for c in changes:
        for k, old, new in zip(c.indices, c.old_values, c.new_values):
            assert old == last.get(k, 0) and new > old, (k, old, new)
            last[k] = new
    assert last == {k: 2000 - (2000 - k) % 8 for k in range(8)}


def test_kernel_writes_succeed_and_are_recorded(changes, tmp_path):
    src = tmp_path / "data"
    src.write_bytes(b"kernel!!")
    buf = bytearray(16)
    h = memwatch.watch(buf, name="buf", mode="store")
    if h.tracking_note:
        pytest.skip(f"not privileged to handle kernel faults here: {h.tracking_note}")
    with open(src, "rb", buffering=0) as f:
        n = f.readinto(buf); line = here()  # noqa: E702
    assert n == 8
    assert bytes(buf[:8]) == b"kernel!!"
    assert [(ch.line, ch.ranges) for ch in changes] == [(line, [(0, bytes(8), b"kernel!!")])]
    buf[9] = 1; line = here()  # noqa: E702 - the page is protected again: caught per store
    assert (changes[-1].line, changes[-1].ranges) == (line, [(9, b"\x00", b"\x01")])


def test_unwatch_stops_catching_stores(changes):
    c = np.zeros(2, dtype=np.int64)
    memwatch.watch(c, name="c", mode="store")
    c[0] = 1
    memwatch.unwatch("c")
    stepped = stats()["stepped"]
    c[0] = 2
    c[1] = 3
    assert stats()["stepped"] == stepped
    assert [ch.new_values for ch in changes] == [[1]]


def test_store_and_line_regions_side_by_side(changes):
    s = np.zeros(2, dtype=np.int64)
    ln = np.zeros(2, dtype=np.int64)
    memwatch.watch(s, name="s", mode="store")
    memwatch.watch(ln, name="l")
    s[0] = 1; s[0] = 2; ln[0] = 1; ln[0] = 2; line = here()  # noqa: E702
    assert [(ch.tag, ch.old_values, ch.new_values) for ch in changes] == [
        ("s", [0], [1]),
        ("s", [1], [2]),
        ("l", [0], [2]),
    ]
    assert {ch.line for ch in changes} == {line}


def test_store_mode_refuses_pages_of_a_line_mode_page_tracked_region():
    big = np.zeros(1 << 16, dtype=np.int64)  # 512 KiB: page tracked in line mode
    memwatch.watch(big, name="big")
    try:
        if memwatch.backend() != "uffd-wp-async":
            pytest.skip("no page tracking on this kernel")
        with pytest.raises(memwatch.MemwatchError, match="shared with 'big'.*same mode"):
            memwatch.watch(big[8:16], name="part", mode="store")
        assert [r[1] for r in memwatch._memwatch._regions()] == ["big"]
    finally:
        memwatch.unwatch("big")


def test_a_trap_that_is_not_ours_reaches_the_program():
    code = """
        import os, signal, numpy as np, memwatch
        got = []
        signal.signal(signal.SIGTRAP, lambda s, f: got.append(s))
        c = np.zeros(2, dtype=np.int64)
        memwatch.watch(c, name="c", mode="store")
        seen = []
        memwatch.on_change(seen.append)
        c[0] = 1
        os.kill(os.getpid(), signal.SIGTRAP)
        c[1] = 2
        print(got == [signal.SIGTRAP], [ch.new_values for ch in seen])
    """
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True [[1], [2]]"
    # With no handler of the program's, SIGTRAP still ends it the default way.
    r = run_py("""
        import os, signal, numpy as np, memwatch
        c = np.zeros(2, dtype=np.int64)
        memwatch.watch(c, name="c", mode="store")
        c[0] = 1
        os.kill(os.getpid(), signal.SIGTRAP)
        print("not reached")
    """)
    assert r.returncode == -5, (r.returncode, r.stderr)
    assert "not reached" not in r.stdout


def test_a_fork_child_writes_freely():
    # The child keeps the watch (its recorder starts clean, issue 18) and
    # its stores land.
    r = run_py("""
        import os, numpy as np, memwatch
        c = np.zeros(2, dtype=np.int64)
        memwatch.watch(c, name="c", mode="store")
        pid = os.fork()
        if pid == 0:
            c[0] = 41
            c[0] += 1
            kept = [t for _, t, *_ in memwatch._memwatch._regions()]
            os._exit(0 if c[0] == 42 and kept == ["c"] else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"


def test_store_mode_works_unprivileged():
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("no way to drop privileges here (not root would do; unshare is missing or refused)")
    r = run_py(
        """
        import threading, warnings, numpy as np, memwatch
        c = np.zeros(2, dtype=np.int64)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            memwatch.watch(c, name="c", mode="store")
        seen = []
        memwatch.on_change(seen.append)
        c[0] = 1; c[0] = 2
        t = threading.Thread(target=lambda: c.__setitem__(1, 9), name="t"); t.start(); t.join()
        c[0] = 3
        print([str(x.message) for x in w])
        print([(ch.thread_name, ch.old_values, ch.new_values) for ch in seen])
        """,
        prefix=prefix,
    )
    assert r.returncode == 0, r.stderr
    warned, got = r.stdout.strip().splitlines()
    assert "fail with EFAULT in store mode" in warned
    assert got == "[('MainThread', [0], [1]), ('MainThread', [1], [2]), ('t', [0], [9]), ('MainThread', [2], [3])]"


def test_record_mode_store_records_every_step(tmp_path):
    prog = tmp_path / "counter.py"
    prog.write_text(
        "import numpy as np, memwatch\n"
        "c = np.zeros(1, dtype=np.int64)\n"
        "memwatch.watch(c, name='c')\n"
        "for i in range(5): c[0] += 2\n"
        "np.save('final.npy', c)\n"
    )
    trace = tmp_path / "counter.mwt"
    r = run([str(BIN / "memwatch"), "record", "--mode", "store", "-o", str(trace), str(BIN / "python"), str(prog)], cwd_override=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run([str(BIN / "memwatch"), "query", str(trace), "--tag", "c", "--format", "jsonl"])
    assert r.returncode == 0, r.stderr

    rows = [json.loads(line) for line in r.stdout.splitlines()]
    le = lambda v: v.to_bytes(8, "little").hex()  # noqa: E731
    assert [(row["line"], row["ranges"]) for row in rows] == [
        (4, [{"offset": 0, "old": le(2 * i), "new": le(2 * i + 2)}]) for i in range(5)
    ]
    seqs = [row["seq"] for row in rows]
    r = run([str(BIN / "memwatch"), "state", str(trace), "--tag", "c", "--at", str(seqs[2]), "--format", "values"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[0]", "6"]
    assert os.path.exists(tmp_path / "final.npy")
