"""What ``watch(t, via="dispatch")`` costs per torch op, in nanoseconds:
medians of several repetitions, each case timed beside its baseline.

    python bench/dispatch_overhead.py [--quick] [--device cuda]

Run it with the interpreter of the venv memwatch is installed in (the 3.12
venv has torch). The loops run in a function this file excludes from
memwatch's scope, so the figures are the dispatch mode's alone, not the
line-boundary check every in-scope line pays while anything is watched
(docs/index.md has those). Cases, on small tensors (the op itself is cheap,
so the mode's cost shows):

1. ``a.add(b)``, an op that writes nothing, with no dispatch watch and with
   one (of another tensor); beside it the floor of any such design, a
   ``TorchDispatchMode`` whose handler only runs the op;
2. ``c.add_(1)``, an op that writes a tensor that is not watched (and the
   same floor);
3. ``w.add_(1)`` on the watched tensor itself, 16 elements and 1M elements:
   the copy to the host mirror, the check and the change (kept in the
   history; nothing printed); beside it, for comparison, the same CPU
   tensor watched through memory (``via="memory"``) with ``memwatch.check()``
   after each op, which finds and delivers the same change.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import memwatch

QUICK = "--quick" in sys.argv
REPS = 3 if QUICK else 9
N = 2_000 if QUICK else 20_000
DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"


def per_op(fn, n: int) -> float:
    """Nanoseconds per call of ``fn``, over ``n`` calls."""
    t0 = time.perf_counter_ns()
    for _ in range(n):
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter_ns() - t0) / n


def median(fn, n: int = N) -> float:
    per_op(fn, n // 10 or 1)  # warm up
    return statistics.median(per_op(fn, n) for _ in range(REPS))


def main() -> None:
    memwatch.configure(live=False, exclude=[__file__])
    a = torch.ones(16, device=DEVICE)
    b = torch.ones(16, device=DEVICE)
    c = torch.zeros(16, device=DEVICE)
    print(f"torch {torch.__version__}, device {DEVICE}, {N} ops x {REPS} repetitions, median ns per op")

    read_bare = median(lambda: a.add(b))
    write_bare = median(lambda: c.add_(1))
    from torch.utils._python_dispatch import TorchDispatchMode

    class Floor(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Floor():
        read_floor = median(lambda: a.add(b))
        write_floor = median(lambda: c.add_(1))
    other = torch.zeros(16, device=DEVICE)
    memwatch.watch(other, name="other", via="dispatch")
    read_mode = median(lambda: a.add(b))
    write_mode = median(lambda: c.add_(1))
    for case, bare, floor, mode in (
        ("1. a.add(b), writes nothing:", read_bare, read_floor, read_mode),
        ("2. c.add_(1), c not watched:", write_bare, write_floor, write_mode),
    ):
        print(
            f"{case:<38}{bare:8.0f} bare  {mode:8.0f} with a dispatch watch (+{mode - bare:.0f}); "
            f"a mode that only runs the op: {floor:.0f} (+{floor - bare:.0f})"
        )
    memwatch.unwatch(other)

    def add_and_check(w):
        w.add_(1)
        memwatch.check()

    for size in (16, 1 << 20):
        w = torch.zeros(size, device=DEVICE)
        n = N if size < 1024 else max(N // 100, 20)
        bare = median(lambda: w.add_(1), n)
        memwatch.watch(w, name="w", via="dispatch")
        watched = median(lambda: w.add_(1), n)
        memwatch.unwatch(w)
        memwatch.clear_history()
        memory = float("nan")
        if DEVICE == "cpu":
            m = torch.zeros(size)
            memwatch.watch(m, name="m")
            memory = median(lambda: add_and_check(m), n)
            memwatch.unwatch(m)
            memwatch.clear_history()
        print(
            f"3. w.add_(1), w watched, {size:>7} floats: {bare:8.0f} bare  {watched:8.0f} watched  (+{watched - bare:.0f});"
            f"  via='memory' + check(): {memory:.0f}"
        )


if __name__ == "__main__":
    main()
