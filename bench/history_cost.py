"""What `memwatch.history()` costs: a watched 100 MB float32 array rewritten
in place, line mode, with the default history against `max_history=0`,
alternating the two in one run (medians).

    python bench/history_cost.py [--mb 100] [--steps 5] [--repeat 9]

Target (issue #13.7): at most 1.3x on every supported version. Run it with
each interpreter's venv. Beside the ratio it prints how many bytes of new
memory the process touched per step in each setting (minor page faults x
4 KiB): a history entry that keeps a change's bytes alive makes the next
check take a fresh snapshot buffer instead of reusing the last one.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import numpy as np

import memwatch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    n = args.mb * (1 << 20) // 4
    w = np.ones(n, dtype=np.float32)
    g = np.full(n, 0.5, dtype=np.float32)
    lr = np.float32(0.001)

    def steps() -> None:
        for _ in range(args.steps):
            w.__isub__(lr * g)

    def run(max_history: int) -> tuple[float, float]:
        memwatch.configure(live=False, max_history=max_history)
        memwatch.watch(w, name="w")
        steps()  # warm: the second snapshot buffer
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        steps()
        dt = time.perf_counter() - t
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        memwatch.unwatch("w")
        memwatch.clear_history() if hasattr(memwatch, "clear_history") else None
        return dt, faults * 4096 / args.steps

    off, on, off_mem, on_mem = [], [], [], []
    for _ in range(args.repeat):
        t, m = run(0)
        off.append(t)
        off_mem.append(m)
        t, m = run(100_000)
        on.append(t)
        on_mem.append(m)
    b, h = statistics.median(off), statistics.median(on)
    v = sys.version_info
    print(f"CPython {v.major}.{v.minor}.{v.micro}, {args.mb} MB float32, {args.steps} steps, median of {args.repeat}")
    print(f"  max_history=0      {b * 1e3:8.1f} ms  new memory/step {statistics.median(off_mem) / 2**20:7.1f} MB")
    print(f"  default history    {h * 1e3:8.1f} ms  new memory/step {statistics.median(on_mem) / 2**20:7.1f} MB")
    print(f"  ratio {h / b:5.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
