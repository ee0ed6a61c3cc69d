"""What watching Python objects costs, as ratios against the same work with
nothing watched, measured in one run (medians of several repetitions,
alternating base and watched runs).

    python bench/objects_overhead.py [--quick]

Run it with a venv's interpreter (`.venv/bin/python` is CPython 3.11,
`.venv-3.12/bin/python` 3.12, `.venv-3.13/bin/python` 3.13). Cases:

1. a loop of attribute writes on a watched object (every write is a change:
   a `memwatch.Change` is made and kept in `memwatch.history()`, no callback,
   no live report), per write, and against the `watchpoints` package (PyPI)
   on the same loop when it is installed (`pip install watchpoints`, its
   callback doing nothing; target: memwatch >= 10x faster); then the same
   loop with every change going to a callback (1c) or recorded to a trace
   file (1d) instead of history;
2. unrelated code while an object is watched: the same pure-Python loop in
   scope and out of scope (target <= 1.02x out of scope);
3. `watch_var`: a loop that rebinds a watched local every iteration (every
   rebinding is a change), per rebinding; a loop in scope that binds no
   watched name; the same loop out of scope (target <= 1.02x).
"""

from __future__ import annotations

import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import memwatch

QUICK = "--quick" in sys.argv
REPS = 3 if QUICK else 11
WRITES = 2_000 if QUICK else 20_000


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(name, base_fn, test_fn, setup=None, teardown=None, target=None, per=None):
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
    verdict = "" if target is None else ("  ok" if t / b <= target else "  OVER TARGET")
    extra = f"  {(t - b) / per * 1e6:6.2f} us/write extra" if per else ""
    goal = f" (target <= {target})" if target is not None else ""
    print(f"{name:<56} base {b * 1e3:8.2f} ms  watched {t * 1e3:8.2f} ms  ratio {t / b:7.2f}{goal}{verdict}{extra}")
    return b, t


class Config:
    def __init__(self):
        self.step = 0
        self.lr = 0.1


def write_loop(cfg, n=WRITES):
    for i in range(n):
        cfg.step = i


memwatch.configure(live=False, max_history=0)

# --- 1. attribute writes on a watched object ------------------------------------
cfg = Config()
handle = None


def watch_cfg():
    global handle
    memwatch.configure(max_history=WRITES)
    handle = memwatch.watch_object(cfg, name="cfg")


def unwatch_cfg():
    memwatch.unwatch(handle)
    kept = len(memwatch.history("cfg"))
    assert kept == WRITES, f"{kept} changes kept, not {WRITES}"
    memwatch.clear_history()
    memwatch.configure(max_history=0)


def write_case(name, setup, teardown):
    """The write loop on `cfg`, unwatched against watched as `setup` says."""
    _, t = compare(name, lambda: write_loop(cfg), lambda: write_loop(cfg), setup=setup, teardown=teardown, per=WRITES)
    return t


mw = write_case(f"1. {WRITES} attribute writes, object watched by memwatch", watch_cfg, unwatch_cfg)
wp = None
try:
    import watchpoints
except ImportError:
    print("   watchpoints is not installed: no comparison (pip install watchpoints)")
else:
    def wp_watch():
        watchpoints.watch(cfg.step, callback=lambda *a: None)

    def wp_unwatch():
        watchpoints.unwatch()

    wp = write_case(
        f"1b. the same loop, cfg.step watched by watchpoints {getattr(watchpoints, '__version__', '')}",
        wp_watch,
        wp_unwatch,
    )
    print(f"   memwatch is {wp / mw:.1f}x faster than watchpoints on this loop (target >= 10x)")

# The same loop with the changes going elsewhere than history: to a callback
# (which does nothing), and recorded to a trace file (history off).
sink = []
to_sink = sink.append


def watch_cb():
    global handle
    memwatch.on_change(to_sink)
    handle = memwatch.watch_object(cfg, name="cfg")


def unwatch_cb():
    memwatch.unwatch(handle)
    memwatch.remove_callback(to_sink)
    assert len(sink) == WRITES, f"{len(sink)} changes to the callback, not {WRITES}"
    sink.clear()


cb = write_case("1c. the same loop, every change to a callback instead", watch_cb, unwatch_cb)
trace_dir = Path(tempfile.mkdtemp())


def watch_rec():
    global handle
    memwatch.start(trace_dir / "objects_overhead.mwt")
    handle = memwatch.watch_object(cfg, name="cfg")


def unwatch_rec():
    memwatch.unwatch(handle)
    summary = memwatch.stop()
    # The watch's start and end are records of their own.
    assert summary["changes"] >= WRITES, summary


rec = write_case("1d. the same loop, every change recorded to a trace instead", watch_rec, unwatch_rec)
if wp is not None:
    print(f"   against watchpoints: {wp / cb:.1f}x (callback), {wp / rec:.1f}x (trace)")

# --- 2. unrelated code while an object is watched -------------------------------
N = 200_000 if QUICK else 1_000_000


def loop_in_scope(n=N):
    total = 0
    for i in range(n):
        total += i * 2
    return total


tmp = Path(tempfile.mkdtemp())
(tmp / "outside_objects.py").write_text(
    "def loop(n=%d):\n    total = 0\n    for i in range(n):\n        total += i * 2\n    return total\n" % N
)
sys.path.insert(0, str(tmp))
outside = importlib.import_module("outside_objects")
memwatch.configure(exclude=[str(tmp)])
other = Config()
compare(
    "2a. pure-Python loop, in scope, an object watched",
    loop_in_scope,
    loop_in_scope,
    setup=lambda: memwatch.watch_object(other, name="other"),
    teardown=lambda: memwatch.unwatch("other"),
)
compare(
    "2b. the same loop out of scope",
    outside.loop,
    outside.loop,
    setup=lambda: memwatch.watch_object(other, name="other"),
    teardown=lambda: memwatch.unwatch("other"),
    target=1.02,
)


# --- 3. watched variables ---------------------------------------------------------
def rebind_loop(n=WRITES):
    lr = 0.0
    for i in range(n):
        lr = i  # noqa: F841 - the watched rebinding
    return n


compare(
    f"3a. {WRITES} rebindings of a variable watched by watch_var",
    rebind_loop,
    rebind_loop,
    setup=lambda: memwatch.watch_var("lr", tag="lr"),
    teardown=lambda: memwatch.unwatch("lr"),
    per=WRITES,
)
compare(
    "3b. pure-Python loop in scope binding no watched name",
    loop_in_scope,
    loop_in_scope,
    setup=lambda: memwatch.watch_var("lr", tag="lr"),
    teardown=lambda: memwatch.unwatch("lr"),
)
compare(
    "3c. the same loop out of scope",
    outside.loop,
    outside.loop,
    setup=lambda: memwatch.watch_var("lr", tag="lr"),
    teardown=lambda: memwatch.unwatch("lr"),
    target=1.02,
)
print(f"python {sys.version.split()[0]}, memwatch {memwatch.__version__}, mechanism "
      f"{memwatch.watch_object(other, name='probe').mechanism}")
