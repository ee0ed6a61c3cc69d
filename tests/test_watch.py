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
    with pytest.raises(memwatch.UnsupportedError, match="a meta tensor: it has a shape and a dtype but no data"):
        memwatch.watch(torch.zeros(2, device="meta"), name="m")


# --- every torch dtype ------------------------------------------------------------

# (dtype, two values written, the values they are stored as): chosen so the
# float types round (0.1 is not exact in any of them) and the integer types
# reach their limits. Expected values are what torch itself reads back.
TORCH_WRITES = [
    ("bool", (True, True), [True, True]),
    ("uint8", (200, 255), [200, 255]),
    ("int8", (-128, 127), [-128, 127]),
    ("int16", (-32768, 12345), [-32768, 12345]),
    ("int32", (-(2**31), 2**31 - 1), [-(2**31), 2**31 - 1]),
    ("int64", (-(2**63), 2**63 - 1), [-(2**63), 2**63 - 1]),
    ("uint16", (65535, 7), [65535, 7]),
    ("uint32", (2**32 - 1, 7), [2**32 - 1, 7]),
    ("uint64", (2**64 - 1, 7), [2**64 - 1, 7]),
    ("float16", (0.1, -65504.0), [0.0999755859375, -65504.0]),
    ("bfloat16", (0.1, 3.14159), [0.10009765625, 3.140625]),
    ("float32", (0.1, -2.0), [0.10000000149011612, -2.0]),
    ("float64", (0.1, -2.0), [0.1, -2.0]),
    ("float8_e4m3fn", (0.1, 448.0), [0.1015625, 448.0]),
    ("float8_e4m3fnuz", (0.1, -240.0), [0.1015625, -240.0]),
    ("float8_e5m2", (0.1, -57344.0), [0.09375, -57344.0]),
    ("float8_e5m2fnuz", (0.1, 57344.0), [0.09375, 57344.0]),
    ("float8_e8m0fnu", (0.5, 4.0), [0.5, 4.0]),
    ("complex32", (1 + 2j, complex(0, -0.1)), [1 + 2j, complex(0, -0.0999755859375)]),
    ("complex64", (1 + 2j, complex(0, -0.1)), [1 + 2j, complex(0, -0.10000000149011612)]),
    ("complex128", (1 + 2j, complex(0, -0.1)), [1 + 2j, complex(0, -0.1)]),
]


def _zeros(torch, name, n=4):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
        return torch.zeros(n, dtype=getattr(torch, name))


def _torch_values(t):
    """Python values of tensor t's elements, as torch reads them (float8 and
    bfloat16 through float64, which holds each exactly)."""
    import torch

    if t.dtype.is_complex:
        return t.to(torch.complex128).tolist()
    if t.dtype.is_floating_point:
        return t.to(torch.float64).tolist()
    return t.tolist()


def _same(a, b):
    """Equal lists of values, NaN equal to NaN and -0.0 told from 0.0."""
    import math
    import struct

    def key(x):
        if isinstance(x, complex):
            return (key(x.real), key(x.imag))
        if isinstance(x, float):
            return "nan" if math.isnan(x) else struct.pack("<d", x)
        return (type(x), x)

    return [key(x) for x in a] == [key(x) for x in b]


@pytest.mark.parametrize("name,written,stored", TORCH_WRITES, ids=[w[0] for w in TORCH_WRITES])
def test_torch_dtype_gives_element_values(changes, name, written, stored):
    torch = pytest.importorskip("torch")
    if not hasattr(torch, name):
        pytest.skip(f"torch {torch.__version__} has no {name}")
    t = _zeros(torch, name)
    old = _torch_values(t[[1, 3]])
    h = memwatch.watch(t, name="t")
    t[1] = written[0]; t[3] = written[1]; line = here()  # noqa: E702
    assert _torch_values(t[[1, 3]]) == stored  # the table above is torch's own rounding
    c = only(changes)
    assert (c.line, c.indices) == (line, [1, 3])
    assert _same(c.old_values, old) and _same(c.new_values, stored), (c.old_values, c.new_values)
    assert all(type(v) is type(w) for v, w in zip(c.new_values, stored))
    assert c.dtype == h.dtype
    if name in ("bfloat16", "complex32") or name.startswith("float8"):
        assert c.dtype in (f"<{name}", f"|{name}")
    # The live report shows the values too.
    assert f"[1] {old[0]!r} -> {stored[0]!r}; [3] {old[1]!r} -> {stored[1]!r}" in c.report()


def test_torch_dtypes_recorded_queried_and_exported(tmp_path, changes):
    """Every dtype through a trace: Trace.changes, Trace.state, and the CLI's
    query, state --format values / npy and export --elements."""
    torch = pytest.importorskip("torch")
    import json

    from conftest import BIN, run

    cases = [(n, w, s) for n, w, s in TORCH_WRITES if hasattr(torch, n)]
    tensors = {n: _zeros(torch, n) for n, _, _ in cases}
    olds = {n: _torch_values(t[[1, 3]]) for n, t in tensors.items()}
    path = tmp_path / "dtypes.mwt"
    memwatch.start(path)
    for n, t in tensors.items():
        memwatch.watch(t, name=n)
    for n, w, _ in cases:
        tensors[n][1] = w[0]; tensors[n][3] = w[1]  # noqa: E702
    memwatch.stop()
    trace = memwatch.open_trace(path)
    for n, _, stored in cases:
        got = trace.changes(tag=n)
        assert len(got) == 1, (n, got)
        assert got[0].indices == [1, 3]
        assert _same(got[0].old_values, olds[n]) and _same(got[0].new_values, stored), (n, got[0].new_values)
        # state(): the recorded dtype, or float32/complex64 for those numpy lacks, each value exact.
        st = trace.state(n)
        want = tensors[n]
        if n in ("bfloat16", "complex32") or n.startswith("float8"):
            assert st.dtype == (np.complex64 if n == "complex32" else np.float32), n
            assert _same(st.tolist(), _torch_values(want)), n
            back = torch.from_numpy(st).to(want.dtype)
            assert torch.equal(back.view(torch.uint8), want.view(torch.uint8)), n
        else:
            assert st.dtype == want.numpy().dtype and st.tolist() == want.tolist(), n

    def mw(*args):
        r = run([str(BIN / "memwatch"), *args], cwd_override=tmp_path)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def text(v, n):  # how the CLI prints a value: as Python does, a float32 as numpy does
        if isinstance(v, bool):
            return str(v).lower()
        return str(np.float32(v)) if n == "float32" else repr(v)

    for n, _, stored in cases:
        # query: the first changed element, old -> new.
        table = mw("query", str(path), "--tag", n).splitlines()
        assert len(table) == 2 and table[1].endswith(f"  {text(olds[n][0], n)} -> {text(stored[0], n)}"), (n, table)
        # state --format values: every element, index and value.
        values = mw("state", str(path), "--tag", n, "--format", "values").splitlines()
        assert values == [f"[{i}] {text(v, n)}" for i, v in enumerate(_torch_values(tensors[n]))], n
        # state --format npy: a file numpy reads.
        mw("state", str(path), "--tag", n, "--format", "npy", "-o", f"{n}.npy")
        assert _same(np.load(tmp_path / f"{n}.npy").tolist(), _torch_values(tensors[n])), n
        # export --elements: old and new values of each element (numbers only).
        mw("export", str(path), "-o", f"{n}.jsonl", "--elements", "--tag", n)
        rows = [json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == ["1", "3"], n
        if not n.startswith("complex"):
            as_f = [float(v) for v in stored]
            assert [float(r["new_value"]) for r in rows] == as_f, n
            assert [float(r["old_value"]) for r in rows] == [float(v) for v in olds[n]], n
        else:
            assert [r["new_value"] for r in rows] == [None, None], n  # complex: no single float


def test_float8_table_matches_torch(changes):
    """All 256 bytes of each float8 type decode as torch converts them, in a
    live change; and format/tests/data/float8_torch.txt (the Rust unit
    test's table) is what the installed torch computes."""
    torch = pytest.importorskip("torch")
    import struct
    from pathlib import Path

    table = {}
    for line in (Path(__file__).parent.parent / "format/tests/data/float8_torch.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, bits = line.split(":")
            table[name] = [struct.unpack("<f", int(b, 16).to_bytes(4, "little"))[0] for b in bits.split()]
    assert len(table) == 5
    for name, want_table in table.items():
        if not hasattr(torch, name):
            continue
        f8 = getattr(torch, name)
        everything = torch.arange(256, dtype=torch.uint8)
        want = everything.view(f8).float().tolist()
        assert _same(want, want_table), name
        t = everything.roll(1).view(f8).clone()  # every byte changes
        memwatch.watch(t, name=name)
        t.view(torch.uint8).copy_(everything)
        c = only(changes, name)
        assert c.indices == list(range(256))
        assert _same(c.new_values, want), name
        assert _same([memwatch._memwatch._decode(f"|{name}", bytes([b])) for b in range(256)], want)


def test_bfloat16_sample_matches_torch(changes):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(17)
    bits = torch.randint(-(2**15), 2**15, (4096,), dtype=torch.int16, generator=gen)
    specials = torch.tensor([0x0000, -0x8000, 0x7F80, 0xFF80 - 2**16, 0x7FC0, 0x0001, 0x7F7F, 0x3F80], dtype=torch.int16)
    bits = torch.cat([specials, bits])
    t = torch.zeros(bits.numel(), dtype=torch.bfloat16)
    t.view(torch.int16).fill_(0x1234)
    memwatch.watch(t, name="bf")
    t.view(torch.int16).copy_(bits)
    c = only(changes)
    changed = [i for i in range(bits.numel()) if bits[i] != 0x1234]
    assert c.indices == changed
    want = bits.view(torch.bfloat16).double().tolist()
    assert _same(c.new_values, [want[i] for i in changed])
    assert c._nonfinite()  # the infinities and the NaN among them


def test_strided_bfloat16_view_reports_only_its_elements(tmp_path, changes):
    torch = pytest.importorskip("torch")
    w = torch.zeros(4, 4, dtype=torch.bfloat16)
    col = w[:, 1]
    path = tmp_path / "col.mwt"
    memwatch.start(path)
    memwatch.watch(col, name="col")
    w[:, 0] = 1.0  # its neighbours: not its changes
    w[:, 2:] = 2.0
    w[:, :] += 0.1; line = here()  # noqa: E702
    memwatch.stop()
    got = [c for c in changes if c.tag == "col"]
    assert [(c.line, c.indices, c.old_values, c.new_values) for c in got] == [
        (line, [0, 1, 2, 3], [0.0] * 4, [0.10009765625] * 4)
    ]
    trace = memwatch.open_trace(path)
    st = trace.state("col")
    assert st.shape == (4,) and st.dtype == np.float32 and st.tolist() == [0.10009765625] * 4
    assert [c.indices for c in trace.changes(tag="col")] == [[0, 1, 2, 3]]


def _unsupported_tensors(torch):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested and quantized tensors warn that they are prototypes
        yield "sparse_coo", torch.eye(3).to_sparse(), ["sparse tensor (layout sparse_coo)", "t.to_dense()", "t._values()"]
        yield "sparse_csr", torch.eye(3).to_sparse_csr(), ["sparse tensor (layout sparse_csr)", "t.to_dense()", "t.crow_indices()"]
        yield "nested", torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]), ["a nested tensor", "t.unbind()"]
        yield (
            "quantized",
            torch.quantize_per_tensor(torch.zeros(3), 0.1, 0, torch.quint8),
            ["a quantized tensor (torch.quint8)", "t.dequantize()", "t.int_repr()"],
        )
        yield "meta", torch.zeros(3, device="meta"), ["a meta tensor", "no data", "device='cpu'"]
        yield "conj", torch.zeros(3, dtype=torch.complex64).conj(), ["conjugate bit", "t.resolve_conj()"]
        yield "neg", torch.zeros(3, dtype=torch.complex64).conj().imag, ["negative bit", "t.resolve_neg()"]
        if hasattr(torch, "float4_e2m1fn_x2"):
            yield "float4", torch.zeros(3, dtype=torch.uint8).view(torch.float4_e2m1fn_x2), ["dtype torch.float4_e2m1fn_x2", "t.to(torch.float32)"]


def test_unsupported_tensor_kinds_say_what_to_do(changes):
    torch = pytest.importorskip("torch")
    for kind, t, words in _unsupported_tensors(torch):
        for how in (memwatch.watch, memwatch.frozen):
            with pytest.raises(memwatch.UnsupportedError) as e:
                if how is memwatch.frozen:
                    with memwatch.frozen(t, name=kind):
                        pass
                else:
                    memwatch.watch(t, name=kind)
            msg = str(e.value)
            assert msg.startswith("cannot watch "), (kind, msg)
            for w in words:
                assert w in msg, (kind, w, msg)
            # Nothing of torch's own errors leaks, and nothing was watched.
            assert "numpy" not in msg and "ScalarType" not in msg, (kind, msg)
            assert e.value.__context__ is None or e.value.__suppress_context__, kind
            assert memwatch._memwatch._regions() == [], kind


def test_resize_and_set_of_a_watched_tensor(changes):
    torch = pytest.importorskip("torch")
    t = torch.zeros(4)
    memwatch.watch(t, name="t")
    for call in (
        lambda: t.resize_(8),
        lambda: t.resize_(2),  # shrinking would change its shape just as much
        lambda: t.resize_((4,), memory_format=torch.contiguous_format),
        lambda: t.resize_as_(torch.zeros(8)),
        lambda: t.set_(torch.zeros(8)),
        lambda: t.untyped_storage().resize_(64),
    ):
        with pytest.raises(memwatch.MemwatchError, match=r"memwatch watches \('t'\).*memwatch.unwatch\('t'\) first"):
            call()
    assert t.shape == (4,) and t.untyped_storage().nbytes() == 16
    t.resize_(4)  # its own shape: a no-op, let through
    t.resize_as_(torch.ones(4))
    # A view's watch guards the memory of its base too.
    base = torch.zeros(8)
    memwatch.watch(base[2:4], name="part")
    with pytest.raises(memwatch.MemwatchError, match="'part'"):
        base.resize_(100)
    # Still watched and followed after the refusals.
    t[0] = 5.0; line = here()  # noqa: E702
    assert [(c.line, c.new_values) for c in changes if c.tag == "t"] == [(line, [5.0])]
    # Unwatched, the storage still cannot grow (torch cannot undo numpy's
    # mark): torch's error, with a note saying why.
    memwatch.unwatch(t)
    with pytest.raises(RuntimeError, match="not resizable") as e:
        t.resize_(8)
    assert any("watched by memwatch (as 't')" in n and "t.clone()" in n for n in getattr(e.value, "__notes__", []))
    t2 = t.clone()
    t2.resize_(8)
    assert t2.shape == (8,)
    # A tensor memwatch never watched is untouched by all this.
    other = torch.zeros(2)
    other.resize_(16)
    other.set_(torch.ones(3))
    assert other.tolist() == [1.0, 1.0, 1.0]


def test_raw_memory_with_a_torch_dtype(changes):
    torch = pytest.importorskip("torch")
    t = torch.zeros(4, dtype=torch.bfloat16)
    memwatch.watch(buffer=t.data_ptr(), size=t.nbytes, name="raw", dtype=torch.bfloat16)
    memwatch.watch(buffer=t.data_ptr(), size=t.nbytes, name="grid", dtype="bfloat16", shape=(2, 2))
    t[1] = 0.1; line = here()  # noqa: E702
    assert [(c.tag, c.dtype, c.line, c.indices, c.new_values) for c in changes] == [
        ("raw", "<bfloat16", line, [1], [0.10009765625]),
        ("grid", "<bfloat16", line, [(0, 1)], [0.10009765625]),
    ]
    with pytest.raises(ValueError, match="'bf16' is not a numpy dtype"):
        memwatch.watch(buffer=t.data_ptr(), size=t.nbytes, name="bad", dtype="bf16")
