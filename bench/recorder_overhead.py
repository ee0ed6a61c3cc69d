"""What watching costs, as ratios against the same work unwatched, measured in
one run (medians of several repetitions, alternating the two).

    python bench/recorder_overhead.py [--quick]

Run it with the interpreter of the venv memwatch is installed in
(`.venv/bin/python` is CPython 3.11, `.venv-3.12/bin/python` 3.12). Cases:

1. numpy workload on unwatched arrays while another (small) array is watched
   (target <= 1.01x);
2. line mode, `w -= lr * g` on a 100 MB float32 array that is watched
   (target <= 2x);
3. a pure-Python loop that writes nothing, in in-scope code while something
   is watched (target <= 1.5x), and the same loop in out-of-scope code
   (target <= 1.01x). On 3.12+ the floor of any design that takes a
   `sys.monitoring` LINE event per line is printed beside 3a: the same loop
   with a C function that does nothing (`operator.is_`) as the callback.
4. no target, figures to watch: in-scope code calling a small in-scope
   function in a loop (a return boundary per call) while a small buffer is
   watched; and the loop of 3a while a 100 MB array is watched by page
   tracking, after one write to all of it (its huge pages split).

The store-mode case of the issue is not here: mode="store" does not exist yet.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import memwatch

QUICK = "--quick" in sys.argv
REPS = 3 if QUICK else 15


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(name, target, base_fn, test_fn, setup=None, teardown=None):
    """Alternate base and test runs; report the median ratio."""
    base, test = [], []
    base_fn()  # warm up
    for _ in range(REPS):
        base.append(timed(base_fn))
        if setup:
            setup()
        test.append(timed(test_fn))
        if teardown:
            teardown()
    b, t = statistics.median(base), statistics.median(test)
    if target is None:
        verdict = "(no target)"
    else:
        verdict = f"(target <= {target}) " + ("ok" if t / b <= target else "OVER TARGET")
    print(f"{name:<58} base {b * 1e3:9.2f} ms  watched {t * 1e3:9.2f} ms  ratio {t / b:6.3f}  {verdict}")
    return t / b


# --- 1. unwatched numpy work while something else is watched -------------------

a = np.random.default_rng(0).random((256, 256))
b = np.random.default_rng(1).random((256, 256))


def numpy_work():
    x = a
    for _ in range(30 if QUICK else 60):
        x = np.tanh(x @ b) + a
    return x


small = np.zeros(16, dtype=np.float32)
compare(
    "1. numpy work on unwatched arrays, a small array watched",
    1.01,
    numpy_work,
    numpy_work,
    setup=lambda: memwatch.watch(small, name="small"),
    teardown=lambda: memwatch.unwatch("small"),
)

# --- 2. w -= lr * g on 100 MB ----------------------------------------------------

n = 25_000_000  # 100 MB of float32
w = np.ones(n, dtype=np.float32)
g = np.full(n, 0.5, dtype=np.float32)
lr = np.float32(0.001)


def steps(k=5):
    global w
    for _ in range(k):
        w -= lr * g


memwatch.configure(live=False, max_history=0)
memwatch.watch(w, name="w")
steps(1)  # the first check after watch builds the second snapshot buffer
memwatch.unwatch("w")
compare(
    "2. line mode: 5 x (w -= lr * g), watched 100 MB float32",
    2.0,
    steps,
    steps,
    setup=lambda: (memwatch.watch(w, name="w"), steps(1)),
    teardown=lambda: memwatch.unwatch("w"),
)
print(f"   (tracking: {memwatch.backend()} for regions over 16 KiB; the first step after watch, not timed,")
print("    also allocates the second snapshot buffer)")
del w, g

# --- 3. a Python loop that writes nothing -----------------------------------------


def loop_in_scope(n=200_000 if QUICK else 1_000_000):
    total = 0
    for i in range(n):
        total += i * 2
    return total


tmp = Path(tempfile.mkdtemp())
(tmp / "outside.py").write_text(
    "def loop(n=%d):\n    total = 0\n    for i in range(n):\n        total += i * 2\n    return total\n"
    % (200_000 if QUICK else 1_000_000)
)
sys.path.insert(0, str(tmp))
outside = importlib.import_module("outside")
memwatch.configure(exclude=[str(tmp)])
keep = bytearray(64)
compare(
    "3a. pure-Python loop writing nothing, in scope",
    1.5,
    loop_in_scope,
    loop_in_scope,
    setup=lambda: memwatch.watch(keep, name="keep"),
    teardown=lambda: memwatch.unwatch("keep"),
)
compare(
    "3b. the same loop out of scope",
    1.01,
    outside.loop,
    outside.loop,
    setup=lambda: memwatch.watch(keep, name="keep"),
    teardown=lambda: memwatch.unwatch("keep"),
)
if sys.version_info >= (3, 12):
    import operator

    mon = sys.monitoring

    def floor_on():
        mon.use_tool_id(4, "floor")
        mon.register_callback(4, mon.events.LINE, operator.is_)
        mon.set_local_events(4, loop_in_scope.__code__, mon.events.LINE)

    def floor_off():
        mon.set_local_events(4, loop_in_scope.__code__, 0)
        mon.free_tool_id(4)

    compare(
        "   floor of 3a: a no-op C LINE callback, nothing watched",
        None,
        loop_in_scope,
        loop_in_scope,
        setup=floor_on,
        teardown=floor_off,
    )


# --- 4. figures without a target -------------------------------------------------


def bump(x):
    return x + 1


def loop_calls(n=100_000 if QUICK else 500_000):
    t = 0
    for _ in range(n):
        t = bump(t)
    return t


compare(
    "4a. in-scope calls to a small in-scope function",
    None,
    loop_calls,
    loop_calls,
    setup=lambda: memwatch.watch(keep, name="keep"),
    teardown=lambda: memwatch.unwatch("keep"),
)
big = np.ones(25_000_000, dtype=np.float32)


def watch_big():
    memwatch.watch(big, name="big")
    big[:] += 1  # every page written once: the huge pages split


compare(
    "4b. the loop of 3a, 100 MB watched (page tracking)",
    None,
    loop_in_scope,
    loop_in_scope,
    setup=watch_big,
    teardown=lambda: memwatch.unwatch("big"),
)
print(f"python {sys.version.split()[0]}, numpy {np.__version__}, memwatch {memwatch.__version__}")
