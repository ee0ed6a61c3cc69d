"""Bad input gets a clear error and changes nothing; watched memory is
pinned; memwatch never breaks the program (crashes, forks, other users)."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest

import memwatch
from conftest import ROOT, run_py, unprivileged_prefix


def regions():
    return memwatch._memwatch._regions()


@pytest.fixture(autouse=True)
def nothing_left_watched():
    yield
    for region, *_ in regions():
        memwatch._memwatch._unwatch(region)


def refused(exc, match, fn, *args, **kwargs):
    before = regions()
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    assert regions() == before, "a failed call must not change what is watched"


def test_object_without_a_buffer():
    refused(TypeError, r"type int: it does not export a buffer", memwatch.watch, 42, name="x")
    refused(TypeError, r"type list", memwatch.watch, [1, 2], name="x")


def test_read_only_buffers():
    refused(ValueError, r"read-only bytes buffer", memwatch.watch, b"abc", name="x")
    ro = np.zeros(4)
    ro.flags.writeable = False
    refused(ValueError, r"read-only", memwatch.watch, ro, name="x")


def test_empty_and_bad_sizes():
    refused(ValueError, r"empty buffer \(size 0\)", memwatch.watch, bytearray(), name="x")
    buf = np.zeros(4)
    addr = buf.ctypes.data
    refused(ValueError, r"size must be a positive number of bytes, got 0", memwatch.watch, buffer=addr, size=0, name="x")
    refused(ValueError, r"got -8", memwatch.watch, buffer=addr, size=-8, name="x")
    refused(TypeError, r"needs size=nbytes", memwatch.watch, buffer=addr, name="x")
    refused(ValueError, r"not a whole number of 8-byte elements", memwatch.watch, buffer=addr, size=12, dtype="f8", name="x")
    refused(ValueError, r"does not cover size", memwatch.watch, buffer=addr, size=32, dtype="f8", shape=(3,), name="x")
    # (2**61 + 4) * 8 wraps around to 32 in 64-bit arithmetic: still refused.
    refused(ValueError, r"does not cover size", memwatch.watch, buffer=addr, size=32, dtype="f8", shape=(2**61 + 4,), name="x")


def test_unmapped_raw_address():
    refused(memwatch.MemwatchError, r"is not writable memory mapped in this process", memwatch.watch, buffer=4096, size=8, name="x")
    refused(ValueError, r"null address", memwatch.watch, buffer=0, size=8, name="x")
    refused(TypeError, r"must be an integer address", memwatch.watch, buffer="0x10", size=8, name="x")


def test_cuda_tensor_through_memory_is_refused_saying_to_pass_via_dispatch():
    # A stand-in with torch's shape: the real check only looks at these.
    Tensor = type("Tensor", (), {"__module__": "torch", "data_ptr": lambda self: 0})
    t = Tensor()
    t.device = types.SimpleNamespace(type="cuda", __str__=lambda self: "cuda:0")
    refused(
        memwatch.UnsupportedError,
        r'cannot watch a tensor on .* through its memory: .* pass via="dispatch" to record every torch op',
        memwatch.watch,
        t,
        name="gpu",
    )


def test_duplicate_tag_and_unknown_mode():
    a, b = bytearray(4), bytearray(4)
    memwatch.watch(a, name="same")
    refused(ValueError, r"'same' is already watched", memwatch.watch, b, name="same")
    refused(ValueError, r"mode must be one of 'line', 'store', not 'fast'", memwatch.watch, b, name="other", mode="fast")


def test_unwatching_what_is_not_watched():
    buf = bytearray(4)
    memwatch.watch(buf, name="w")
    refused(memwatch.NotWatchedError, r"name 'nope' is not watched \(watched: 'w'\)", memwatch.unwatch, "nope")
    refused(memwatch.NotWatchedError, r"this bytearray is not watched", memwatch.unwatch, bytearray(4))
    refused(memwatch.NotWatchedError, r"buffer=0x10 is not watched", memwatch.unwatch, buffer=16)
    refused(TypeError, r"needs a handle", memwatch.unwatch)
    assert issubclass(memwatch.NotWatchedError, memwatch.MemwatchError)


def test_raw_arguments_with_an_object_are_refused():
    refused(TypeError, r"for raw memory", memwatch.watch, bytearray(4), name="x", size=4)
    refused(TypeError, r"either an object or buffer", memwatch.watch, bytearray(4), buffer=1, size=4, name="x")


def test_watched_bytearray_is_pinned_until_unwatched():
    buf = bytearray(8)
    memwatch.watch(buf, name="pinned")
    with pytest.raises(BufferError):
        buf.extend(b"more")
    memwatch.unwatch(buf)
    buf.extend(b"more")
    assert len(buf) == 12


def test_a_genuine_segfault_still_crashes_with_signal_11():
    code = """
        import ctypes, memwatch
        big = bytearray(1 << 20)
        memwatch.watch(big, name="big")
        big[0] = 1
        ctypes.string_at(0)
    """
    r = run_py(code)
    assert r.returncode == -11, r.stderr
    r = run_py(code, "-X", "faulthandler")
    assert r.returncode == -11
    assert "Fatal Python error: Segmentation fault" in r.stderr


def test_fork_child_keeps_the_watches_and_sees_only_its_own_changes():
    r = run_py(
        """
        import os, memwatch
        buf = bytearray(8)
        memwatch.watch(buf, name="parent")
        seen = []
        memwatch.on_change(seen.append)
        pid = os.fork()
        if pid == 0:
            buf[0] = 1
            mine = [(c.tag, c.line) for c in seen]
            ok = [t for _, t, *_ in memwatch._memwatch._regions()] == ["parent"] and mine == [("parent", 9)]
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        buf[1] = 2
        print(os.waitstatus_to_exitcode(status), [(c.tag, c.line) for c in seen])
        """,
        env={"MEMWATCH_LIVE": "0"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0 [('parent', 14)]"


UNPRIVILEGED_SCENARIO = """
    import ctypes, os, threading, memwatch
    # Unprivileged for userfaultfd's purposes: not root, or root only inside
    # a user namespace (the initial namespace maps all 2**32-1 ids).
    assert os.geteuid() != 0 or "4294967295" not in open("/proc/self/uid_map").read(), "still privileged"
    libc = ctypes.CDLL(None, use_errno=True)
    import platform
    if platform.machine() == "x86_64" and open("/proc/sys/vm/unprivileged_userfaultfd").read().strip() == "0":
        # A userfaultfd that may handle kernel faults is refused here ...
        assert libc.syscall(323, 0o2000000) == -1 and ctypes.get_errno() == 1  # EPERM
    big = bytearray(256 * 1024)
    h = memwatch.watch(big, name="big")
    seen = []
    memwatch.on_change(seen.append)
    r, w = os.pipe()
    os.write(w, b"kernel")
    os.close(w)
    n = os.readv(r, [memoryview(big)[1000:1006]])
    def worker():
        big[200_000] = 7
    t = threading.Thread(target=worker, name="worker")
    t.start(); t.join()
    print(memwatch.backend(), h.tracking, n, [(c.thread_name, c.ranges) for c in seen])
"""


def test_kernel_writes_and_threads_work_unprivileged():
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("no way to drop privileges here (not root would do; unshare is missing or refused)")
    r = run_py(UNPRIVILEGED_SCENARIO, prefix=prefix)
    assert r.returncode == 0, r.stderr
    backend, tracking, n, rest = r.stdout.split(" ", 3)
    assert n == "6"
    if backend == "uffd-wp-async":
        assert tracking == "uffd-wp-async"
    assert rest.strip() == (
        "[('MainThread', [(1000, b'\\x00\\x00\\x00\\x00\\x00\\x00', b'kernel')]), "
        "('worker', [(200000, b'\\x00', b'\\x07')])]"
    )
