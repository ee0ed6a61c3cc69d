"""A dense training loop under `memwatch record`: slowdown and trace size.

    python bench/record_sgd.py [--mb 16] [--steps 10] [--repeat 3]

Run it with the interpreter of a venv memwatch is installed in
(`.venv-3.12/bin/python`, `.venv-3.13/bin/python`). The program holds MB
megabytes of float32 weights and runs STEPS steps of `w -= 0.001 * g` (g a
fresh gradient each step, made before the timed part of the step). It runs:

- unwatched, as the baseline;
- under `memwatch record` with `w` watched (line mode).

and reports the medians of REPEAT runs of the loop's time (measured inside
the program: start-up, watching and the final close are not counted), the
ratio of the two, the trace's size in bytes per changed element (initial
contents included), and the time the program spent waiting for the
recorder where the trace says so. It checks from the trace that it holds
STEPS changes of the whole array and that the state at the end is the
program's final array.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
MEMWATCH = BIN / "memwatch"

PROGRAM = """\
import sys, time
import numpy as np
import memwatch

n, steps, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
w = rng.standard_normal(n, dtype=np.float32)
grads = [rng.standard_normal(n, dtype=np.float32) for _ in range(2)]
if mode == "live":
    memwatch.configure(live=False, max_history=0)
if mode != "plain":
    memwatch.watch(w, name="w")
total = write = 0.0
for i in range(steps):
    g = grads[i % 2]
    t = time.perf_counter()
    w -= 0.001 * g; t1 = time.perf_counter()
    t2 = time.perf_counter()
    total += t2 - t
    write += t1 - t
np.save("final.npy", w)
print(total, write)
"""


def run(args: list[str], cwd: Path) -> str:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=1200, env=dict(os.environ))
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def waited_ms(summary: str) -> float:
    """The time `memwatch summary` says the program waited for the writer."""
    m = re.search(r"the program waited ([0-9.]+)(ns|us|ms|s) ", summary)
    if not m:
        return 0.0
    return float(m.group(1)) * {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--levels", default="default", help="comma-separated --compression levels to compare")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also run the loop watched without a trace, and split each step into its write "
        "(the store and its first-write faults) and the check at the next line (diff, and handing "
        "the change to the trace writer)",
    )
    a = ap.parse_args()
    n = a.mb * (1 << 20) // 4
    levels = [None if x == "default" else int(x) for x in a.levels.split(",")]
    with tempfile.TemporaryDirectory() as d:
        cwd = Path(d)
        prog = cwd / "sgd.py"
        prog.write_text(PROGRAM)
        plain: list[float] = []
        plain_write: list[float] = []
        live: list[tuple[float, float]] = []
        split: dict[int | None, list[tuple[float, float]]] = {lv: [] for lv in levels}
        recorded: dict[int | None, list[float]] = {lv: [] for lv in levels}
        info: dict[int | None, tuple[int, float]] = {}
        for _ in range(a.repeat):
            # Side by side: one plain run, then one recorded run per level.
            total, write = map(float, run([sys.executable, str(prog), str(n), str(a.steps), "plain"], cwd).split())
            plain.append(total)
            plain_write.append(write)
            if a.floor:
                live.append(tuple(map(float, run([sys.executable, str(prog), str(n), str(a.steps), "live"], cwd).split())))
            for lv in levels:
                opt = [] if lv is None else [f"--compression={lv}"]
                cmd = [str(MEMWATCH), "record", *opt, "-o", "sgd.mwt", sys.executable, str(prog), str(n), str(a.steps), "record"]
                total, write = map(float, run(cmd, cwd).split())
                recorded[lv].append(total)
                split[lv].append((total, write))
                trace = memwatch_open(cwd / "sgd.mwt")
                changes = trace.changes(tag="w")
                assert len(changes) == a.steps, f"{len(changes)} changes, expected {a.steps}"
                final = np.load(cwd / "final.npy")
                assert np.array_equal(trace.state("w"), final), "the state at the end is not the program's array"
                summary = run([str(MEMWATCH), "summary", "sgd.mwt"], cwd)
                info[lv] = ((cwd / "sgd.mwt").stat().st_size, waited_ms(summary))
        elements = n * a.steps
        p = statistics.median(plain)
        print(f"CPython {sys.version.split()[0]}, {a.mb} MB float32, {a.steps} steps, median of {a.repeat}")
        print(f"  unwatched loop      {p * 1e3:9.1f} ms  ({p / a.steps * 1e3:.2f} ms/step)")
        for lv in levels:
            r = statistics.median(recorded[lv])
            size, waited = info[lv]
            name = "default" if lv is None else str(lv)
            print(
                f"  record, level {name:>7} {r * 1e3:8.1f} ms  ({r / a.steps * 1e3:.2f} ms/step)  "
                f"ratio {r / p:5.1f}x  {size / elements:.2f} B/element  waited {waited:.1f} ms (last run)"
            )
        if a.floor:
            # Per step, medians: the write line alone (store + first-write
            # faults), then the check at the next line.
            pw = statistics.median(plain_write) / a.steps * 1e3
            lw = statistics.median(x[1] for x in live) / a.steps * 1e3
            lc = statistics.median(x[0] - x[1] for x in live) / a.steps * 1e3
            print(f"  floor, per step: plain write {pw:.2f} ms")
            print(f"    watched, no trace: write {lw:.2f} ms (faults {lw - pw:+.2f}), check {lc:.2f} ms (diff)")
            for lv in levels:
                rw = statistics.median(x[1] for x in split[lv]) / a.steps * 1e3
                rc = statistics.median(x[0] - x[1] for x in split[lv]) / a.steps * 1e3
                name = "default" if lv is None else str(lv)
                print(
                    f"    recorded, level {name}: write {rw:.2f} ms, check {rc:.2f} ms "
                    f"(diff + handing to the writer; encode runs on the writer's thread: {rc - lc:+.2f} ms over the diff)"
                )
            floor = pw + (lw - pw) + lc
            print(f"    floor without encoding {floor:.2f} ms/step = {floor / (p / a.steps * 1e3):.1f}x the plain step")


def memwatch_open(path: Path):
    import memwatch

    return memwatch.open_trace(path)


if __name__ == "__main__":
    main()
