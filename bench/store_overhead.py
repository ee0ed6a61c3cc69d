"""What one caught store costs in mode="store", against the bare mechanism.

    .venv-3.12/bin/python bench/store_overhead.py [--stores N]

Builds bench/store_bare.c (a C program doing exactly the kernel work of one
caught store: userfaultfd write fault, fault thread, step signal, page copy,
unprotect, single step, diff, protect) and runs it; then times a Python
loop of N single-element stores to an int64 array watched with
mode="store", and the same loop on an unwatched array, in the same run.

memwatch's cost per store is (watched - unwatched) / N: the mechanism plus
everything memwatch adds (the event ring, the line-boundary check, a
memwatch.Change per store, history). Reported as medians of 5 rounds, and
the ratio to the bare program's cost per store (target: at most 1.3).
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import memwatch

HERE = Path(__file__).resolve().parent


def bare_ns_per_store(stores: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "store_bare"
        subprocess.run(["cc", "-O2", "-pthread", "-o", str(exe), str(HERE / "store_bare.c")], check=True)
        out = subprocess.run([str(exe), str(stores)], check=True, capture_output=True, text=True).stdout
    return float(out.split()[1])


def loop(a: np.ndarray, n: int) -> float:
    t0 = time.perf_counter_ns()
    for i in range(n):
        a[0] = i
    return time.perf_counter_ns() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n = args.stores
    memwatch.configure(live=False, max_history=1000)
    # Page-aligned arrays of their own, so no unrelated write shares the
    # page (a small numpy array usually shares one with other objects, and
    # every write to those is stepped over too).
    pages = mmap.mmap(-1, 2 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    watched = np.frombuffer(pages, dtype=np.int64, count=8, offset=0)
    plain = np.frombuffer(pages, dtype=np.int64, count=8, offset=mmap.PAGESIZE)
    h = memwatch.watch(watched, name="counter", mode="store")
    assert h.tracking == "uffd-wp-step", h
    got = 0

    def count(_change: memwatch.Change) -> None:
        nonlocal got
        got += 1

    memwatch.on_change(count)
    with_mw, without = [], []
    for _ in range(args.rounds):
        watched[0] = -1
        memwatch.check()
        got = 0
        with_mw.append(loop(watched, n))
        memwatch.check()
        assert got == n, f"caught {got} of {n} stores"
        plain[0] = -1
        without.append(loop(plain, n))
    bare = bare_ns_per_store(n)
    per_store = (statistics.median(with_mw) - statistics.median(without)) / n
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {n} stores x {args.rounds} rounds (medians)")
    print(f"unwatched loop        {statistics.median(without) / n:10.0f} ns/iteration")
    print(f"memwatch store mode   {per_store:10.0f} ns/store (every store caught: {n} of {n})")
    print(f"bare C, same kernel   {bare:10.0f} ns/store")
    print(f"ratio                 {per_store / bare:10.2f}x (target <= 1.3)")


if __name__ == "__main__":
    main()
