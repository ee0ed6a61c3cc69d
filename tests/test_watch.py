"""Watching buffers: every change caught, with exact bytes, values and line."""

from __future__ import annotations

import array
import ctypes
import mmap
import os
import socket
import sys
import threading
import types

import numpy as np
import pytest

import memwatch
from conftest import here

THIS = os.path.realpath(__file__)


def only(changes, tag=None):
    got = [c for c in changes if tag is None or c.tag == tag]
    assert len(got) == 1, got
    return got[0]


def test_item_assignment(changes):
    buf = bytearray(16)
    h = memwatch.watch(buf, name="buf")
    buf[3] = 7; line = here()  # noqa: E702
    c = only(changes)
    assert (c.tag, c.variable) == ("buf", "buf")
    assert c.ranges == [(3, b"\x00", b"\x07")]
    assert (c.offset, c.old, c.new) == (3, b"\x00", b"\x07")
    assert c.address == h.address + 3
    assert (os.path.realpath(c.file), c.line, c.function) == (THIS, line, "test_item_assignment")
    assert c.stack[0] == (c.file, line, "test_item_assignment")
    assert c.thread_id == threading.get_native_id()
    assert c.thread_name == threading.current_thread().name
    assert c.indices is None and c.old_values is None and c.dtype is None
    assert c.seq > 0 and c.time_ns > 0


def test_slice_assignment_and_same_bytes_written_back(changes):
    buf = bytearray(b"0123456789")
    memwatch.watch(buf)
    buf[2:6] = b"abcd"; line = here()  # noqa: E702
    buf[0:1] = b"0"  # the same byte: no change
    buf[9] = buf[9]
    c = only(changes)
    assert c.tag == "buf"  # the variable name is the tag
    assert c.ranges == [(2, b"2345", b"abcd")]
    assert c.line == line


def test_one_change_per_line_with_every_range(changes):
    buf = bytearray(32)
    memwatch.watch(buf, name="b")
    buf[1] = 1; buf[20] = 2; line = here()  # noqa: E702
    c = only(changes)
    assert c.ranges == [(1, b"\x00", b"\x01"), (20, b"\x00", b"\x02")]
    assert c.line == line


def test_numpy_inplace_add(changes):
    arr = np.arange(8, dtype=np.float32)
    h = memwatch.watch(arr, name="w")
    assert h.dtype == "<f4"
    arr += 1; line = here()  # noqa: E702
    c = only(changes)
    assert c.line == line
    assert c.dtype == "<f4"
    assert c.indices == list(range(8))
    assert c.old_values == [float(i) for i in range(8)]
    assert c.new_values == [float(i + 1) for i in range(8)]
    assert c.ranges[0][0] == 0 and len(c.ranges[0][1]) == 32


def test_numpy_add_with_out_fill_and_sort(changes):
    arr = np.zeros(4, dtype=np.int64)
    memwatch.watch(arr, name="a")
    np.add(np.arange(4), 10, out=arr); l1 = here()  # noqa: E702
    arr.fill(3); l2 = here()  # noqa: E702
    arr[:] = [5, 1, 4, 2]
    arr.sort(); l3 = here()  # noqa: E702
    assert [c.line for c in changes] == [l1, l2, l2 + 1, l3]
    assert changes[0].new_values == [10, 11, 12, 13]
    assert changes[1].new_values == [3, 3, 3, 3]
    # [5, 1, 4, 2] -> [1, 2, 4, 5]: element 2 holds 4 before and after.
    assert changes[3].indices == [0, 1, 3]
    assert changes[3].old_values == [5, 1, 2]
    assert changes[3].new_values == [1, 2, 5]


def test_numpy_sort_reports_only_elements_that_moved(changes):
    arr = np.array([3, 1, 2, 9], dtype=np.int32)
    memwatch.watch(arr, name="a")
    arr.sort(); line = here()  # noqa: E702
    c = only(changes)
    assert c.line == line
    assert c.indices == [0, 1, 2]
    assert c.old_values == [3, 1, 2]
    assert c.new_values == [1, 2, 3]


def test_strided_view_reports_only_its_elements(changes):
    base = np.zeros(10, dtype=np.float32)
    view = base[::2]
    memwatch.watch(view, name="even")
    base[1] = 5.0  # not part of the view
    base[4] = 7.0; line = here()  # noqa: E702
    c = only(changes)
    assert c.line == line
    assert c.indices == [2]
    assert (c.old_values, c.new_values) == ([0.0], [7.0])
    assert c.ranges == [(16, b"\x00" * 4, np.float32(7.0).tobytes())]


def test_2d_column_view_indices(changes):
    m = np.zeros((3, 4), dtype=np.float64)
    memwatch.watch(m[:, 1], name="col")
    m[2, 1] = 1.5; line = here()  # noqa: E702
    m[2, 2] = 9.0
    c = only(changes)
    assert (c.line, c.indices, c.new_values) == (line, [2], [1.5])


def test_2d_indices_are_tuples(changes):
    m = np.zeros((3, 4), dtype=np.int16)
    memwatch.watch(m, name="m")
    m[1, 2] = -3; line = here()  # noqa: E702
    c = only(changes)
    assert (c.line, c.indices, c.old_values, c.new_values) == (line, [(1, 2)], [0], [-3])


def test_array_array_memoryview_and_mmap(changes):
    a = array.array("d", [1.0, 2.0])
    memwatch.watch(a, name="a")
    a[1] = 2.5; l1 = here()  # noqa: E702
    mv = memoryview(bytearray(8))
    memwatch.watch(mv, name="mv")
    mv[0] = 255; l2 = here()  # noqa: E702
    m = mmap.mmap(-1, 4096)
    memwatch.watch(m, name="map")
    m[10:12] = b"hi"; l3 = here()  # noqa: E702
    got = {c.tag: c for c in changes}
    assert (got["a"].line, got["a"].indices, got["a"].new_values) == (l1, [1], [2.5])
    assert (got["mv"].line, got["mv"].ranges) == (l2, [(0, b"\x00", b"\xff")])
    assert (got["map"].line, got["map"].ranges) == (l3, [(10, b"\x00\x00", b"hi")])
    memwatch.unwatch("map")
    m.close()


def test_ctypes_array_covers_all_its_elements(changes):
    # ctypes exports its arrays with no strides (C-contiguous): the whole
    # array is watched, not its first element.
    arr = (ctypes.c_int32 * 16)()
    h = memwatch.watch(arr, name="arr")
    assert (h.size, h.dtype) == (64, "<i4")
    arr[15] = -3; line = here()  # noqa: E702
    c = only(changes)
    assert (c.line, c.indices, c.old_values, c.new_values) == (line, [15], [0], [-3])


def test_raw_buffer_with_dtype_and_variable_name(changes):
    data = np.zeros(4, dtype=np.int32)
    h = memwatch.watch(buffer=data.ctypes.data, size=data.nbytes, name="raw", dtype="int32")
    assert h.variable == "data"
    data[3] = 42; line = here()  # noqa: E702
    c = only(changes)
    assert (c.tag, c.variable, c.line, c.indices, c.new_values) == ("raw", "data", line, [3], [42])
    memwatch.unwatch(buffer=data.ctypes.data)
    assert memwatch._memwatch._regions() == []


def test_ctypes_memset_with_the_gil_released(changes):
    buf = bytearray(64)
    memwatch.watch(buf, name="buf")
    cbuf = (ctypes.c_char * 64).from_buffer(buf)
    ctypes.memset(cbuf, 0x41, 10); line = here()  # noqa: E702
    del cbuf
    c = only(changes)
    assert c.line == line
    assert c.ranges == [(0, b"\x00" * 10, b"A" * 10)]


def test_large_array_uses_kernel_tracking_and_catches_numpy_kernels(changes):
    arr = np.zeros(1 << 20, dtype=np.float32)  # 4 MiB
    h = memwatch.watch(arr, name="big")
    if memwatch.backend() == "uffd-wp-async":
        assert h.tracking == "uffd-wp-async"
    arr[123_456] = 1.0; l1 = here()  # noqa: E702
    np.multiply(arr, 2, out=arr); l2 = here()  # noqa: E702 (numpy releases the GIL in large loops)
    arr[-1] = 3.0; l3 = here()  # noqa: E702
    assert [(c.line, c.indices, c.new_values) for c in changes] == [
        (l1, [123_456], [1.0]),
        (l2, [123_456], [2.0]),
        (l3, [(1 << 20) - 1], [3.0]),
    ]


def test_write_from_a_thread_is_attributed_to_that_thread(changes):
    buf = bytearray(16)
    memwatch.watch(buf, name="buf")
    lines = []

    def writer():
        buf[5] = 9; lines.append(here())  # noqa: E702

    t = threading.Thread(target=writer, name="writer-1")
    t.start()
    t.join()
    c = only(changes)
    assert c.ranges == [(5, b"\x00", b"\x09")]
    assert (c.line, c.function) == (lines[0], "test_write_from_a_thread_is_attributed_to_that_thread.<locals>.writer")
    assert (c.thread_name, c.thread_id) == ("writer-1", t.native_id)


def test_a_renamed_thread_shows_its_new_name(changes):
    buf = bytearray(16)
    memwatch.watch(buf, name="buf")
    cfg = types.SimpleNamespace(step=0)
    memwatch.watch_object(cfg, name="cfg")

    def writer():
        buf[0] = 1
        cfg.step = 1
        threading.current_thread().name = "renamed"
        buf[0] = 2
        cfg.step = 2

    t = threading.Thread(target=writer, name="first")
    t.start()
    t.join()
    memwatch.check()
    got = sorted((c.tag, c.seq, c.thread_name) for c in changes)
    assert [(tag, name) for tag, _, name in got] == [
        ("buf", "first"), ("buf", "renamed"), ("cfg", "first"), ("cfg", "renamed"),
    ]


def test_a_thread_started_before_watching_is_attributed_to_it(changes):
    # On 3.11 this thread's tracing is switched on from the outside, in the
    # middle of its frame.
    buf = bytearray(16)
    go, lines = threading.Event(), []

    def writer():
        go.wait()
        buf[3] = 7; lines.append(here())  # noqa: E702
        lines.append(here())

    t = threading.Thread(target=writer, name="early")
    t.start()
    memwatch.watch(buf, name="buf")
    go.set()
    t.join()
    c = only(changes)
    assert c.ranges == [(3, b"\x00", b"\x07")]
    assert (c.line, c.thread_name) == (lines[0], "early")


@pytest.mark.parametrize("size", [4096, 256 * 1024], ids=["compare", "pages"])
def test_readinto_is_a_kernel_write_that_succeeds_and_is_recorded(changes, tmp_path, size):
    data = os.urandom(size)
    p = tmp_path / "data.bin"
    p.write_bytes(data)
    buf = bytearray(size)
    memwatch.watch(buf, name="buf")
    with open(p, "rb", buffering=0) as f:
        n = f.readinto(buf); line = here()  # noqa: E702
    assert n == size
    assert bytes(buf) == data
    c = only(changes)
    assert c.line == line
    rebuilt = bytearray(size)
    for off, old, new in c.ranges:
        assert old == bytes(len(old))
        rebuilt[off : off + len(new)] = new
    assert rebuilt == data


def test_recv_into_and_readv(changes):
    buf = bytearray(64 * 1024)
    memwatch.watch(buf, name="buf")
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"hello")
        n = b.recv_into(buf); l1 = here()  # noqa: E702
    assert n == 5
    r, w = os.pipe()
    os.write(w, b"xyz")
    os.close(w)
    os.readv(r, [memoryview(buf)[100:103]]); l2 = here()  # noqa: E702
    os.close(r)
    assert [(c.line, c.ranges) for c in changes] == [
        (l1, [(0, b"\x00" * 5, b"hello")]),
        (l2, [(100, b"\x00" * 3, b"xyz")]),
    ]


def test_proc_self_mem_write_into_a_page_tracked_region(changes):
    # The kernel writes through get_user_pages here, not a user-mode store
    # and not copy_to_user: the page fault it takes is the only trace.
    buf = bytearray(256 * 1024)
    h = memwatch.watch(buf, name="buf")
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(h.address + 70_000)
        mem.write(b"xyz"); line = here()  # noqa: E702
    assert bytes(buf[70_000:70_003]) == b"xyz"
    assert [(c.line, c.ranges) for c in changes] == [(line, [(70_000, b"\x00" * 3, b"xyz")])]


def test_page_tracked_writes_after_quiet_lines_are_each_caught(changes):
    # Checks of page-tracked regions skip the kernel's page scan while the
    # process has taken no page fault since the last one; each write after
    # a run of such quiet lines still shows, on its own line.
    buf = bytearray(256 * 1024)
    memwatch.watch(buf, name="buf")
    lines = []
    for i in range(1, 6):
        total = 0
        for k in range(50):
            total += k
        buf[4096 + i] = i; lines.append(here())  # noqa: E702
    assert total == 1225
    assert [(c.line, c.ranges) for c in changes] == [
        (lines[i - 1], [(4096 + i, b"\x00", bytes([i]))]) for i in range(1, 6)
    ]


def test_two_regions_sharing_a_page_are_independent(changes):
    big = bytearray(96 * 1024)
    mv = memoryview(big)
    memwatch.watch(mv[:40_000], name="left")  # both > 16 KiB: page tracking,
    memwatch.watch(mv[40_000:80_000], name="right")  # sharing the page holding byte 40,000
    big[40_001] = 1; l1 = here()  # noqa: E702
    big[39_999] = 2; l2 = here()  # noqa: E702
    big[80_500] = 3  # same page as the end of "right", but not watched
    small = bytearray(64)
    smv = memoryview(small)
    memwatch.watch(smv[:32], name="s1")
    memwatch.watch(smv[32:], name="s2")
    small[40] = 4; l3 = here()  # noqa: E702
    assert [(c.tag, c.line, c.ranges) for c in changes] == [
        ("right", l1, [(1, b"\x00", b"\x01")]),
        ("left", l2, [(39_999, b"\x00", b"\x02")]),
        ("s2", l3, [(8, b"\x00", b"\x04")]),
    ]


def test_writes_in_out_of_scope_code_go_to_the_in_scope_caller(changes, tmp_path):
    lib = tmp_path / "fakelib.py"
    lib.write_text("def scribble(b):\n    b[0] = 1\n    b[1] = 2\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import fakelib

        memwatch.configure(exclude=[str(tmp_path)])
        buf = bytearray(8)
        memwatch.watch(buf, name="buf")
        fakelib.scribble(buf); line = here()  # noqa: E702
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fakelib", None)
    c = only(changes)
    assert c.ranges == [(0, b"\x00\x00", b"\x01\x02")]
    assert (c.line, c.function) == (line, "test_writes_in_out_of_scope_code_go_to_the_in_scope_caller")


def test_callbacks_history_and_watching(changes):
    seen = []

    @memwatch.on_change
    def cb(change):
        seen.append(change.tag)

    try:
        buf = bytearray(4)
        with memwatch.watching(buf, name="ctx") as h:
            assert h.tag == "ctx"
            buf[0] = 1
        buf[1] = 1  # no longer watched
    finally:
        memwatch.remove_callback(cb)
    assert seen == ["ctx"]
    assert [c.tag for c in memwatch.history()] == ["ctx"]
    assert [c.tag for c in memwatch.history("other")] == []
    assert memwatch._memwatch._regions() == []


def test_unwatch_by_object_name_and_handle_reports_pending_changes(changes):
    a, b, c = bytearray(4), bytearray(4), bytearray(4)
    ha = memwatch.watch(a, name="a")
    memwatch.watch(b, name="b")
    memwatch.watch(c, name="c")
    a[0] = 1; memwatch.unwatch(ha)  # noqa: E702 - the change comes out before the unwatch
    memwatch.unwatch(b)
    memwatch.unwatch("c")
    assert [ch.tag for ch in changes] == ["a"]
    assert memwatch._memwatch._regions() == []


def test_torch_cpu_tensor(changes):
    torch = pytest.importorskip("torch")
    t = torch.zeros(4)
    memwatch.watch(t, name="t")
    t.add_(1); line = here()  # noqa: E702
    c = only(changes)
    assert (c.line, c.new_values) == (line, [1.0] * 4)


def test_torch_shapes_views_optimizers_and_raw_pointers(changes):
    torch = pytest.importorskip("torch")
    w = torch.zeros(2, 3)
    memwatch.watch(w, name="w")
    w[1, 2] = 5.0; line = here()  # noqa: E702
    assert [(c.tag, c.line, c.indices, c.old_values, c.new_values) for c in changes] == [
        ("w", line, [(1, 2)], [0.0], [5.0])
    ]
    changes.clear()
    # A column is a strided view: only its own elements are its changes.
    col = w[:, 0]
    memwatch.watch(col, name="col")
    col.mul_(3); line = here()  # noqa: E702 - zeros stay zeros: nothing
    w[:, :] = 1.0
    col.mul_(3); line = here()  # noqa: E702
    assert [(c.tag, c.indices, c.new_values) for c in changes if c.line == line] == [
        ("w", [(0, 0), (1, 0)], [3.0, 3.0]),
        ("col", [0, 1], [3.0, 3.0]),
    ]
    changes.clear()
    # An optimizer step (out-of-scope code) is the in-scope line that ran it.
    p = torch.nn.Parameter(torch.ones(4))
    memwatch.watch(p, name="param")
    opt = torch.optim.SGD([p], lr=0.5)
    p.grad = torch.full((4,), 2.0)
    opt.step(); line = here()  # noqa: E702
    assert [(c.tag, c.variable, c.line, c.new_values) for c in changes] == [("param", "p", line, [0.0] * 4)]
    changes.clear()
    # The seed's form: a raw pointer, the variable it came from.
    raw = torch.zeros(8, dtype=torch.float64)
    memwatch.watch(buffer=raw.data_ptr(), size=raw.nbytes, name="raw", dtype="float64")
    raw[3] = 2.5; line = here()  # noqa: E702
    assert [(c.variable, c.line, c.indices, c.new_values) for c in changes] == [("raw", line, [3], [2.5])]
    with pytest.raises(memwatch.UnsupportedError, match="only CPU tensors"):
        memwatch.watch(torch.zeros(2, device="meta"), name="m")
