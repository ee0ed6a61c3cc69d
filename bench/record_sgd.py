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

n, steps, watch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "watch"
rng = np.random.default_rng(0)
w = rng.standard_normal(n, dtype=np.float32)
grads = [rng.standard_normal(n, dtype=np.float32) for _ in range(2)]
if watch:
    memwatch.watch(w, name="w")
total = 0.0
for i in range(steps):
    g = grads[i % 2]
    t = time.perf_counter()
    w -= 0.001 * g
    total += time.perf_counter() - t
np.save("final.npy", w)
print(total)
"""


def run(args: list[str], cwd: Path) -> str:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=1200, env=dict(os.environ))
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    n = a.mb * (1 << 20) // 4
    with tempfile.TemporaryDirectory() as d:
        cwd = Path(d)
        prog = cwd / "sgd.py"
        prog.write_text(PROGRAM)
        plain, recorded = [], []
        for _ in range(a.repeat):
            plain.append(float(run([sys.executable, str(prog), str(n), str(a.steps), "plain"], cwd)))
            out = run([str(MEMWATCH), "record", "-o", "sgd.mwt", sys.executable, str(prog), str(n), str(a.steps), "watch"], cwd)
            recorded.append(float(out))
        trace = memwatch_open(cwd / "sgd.mwt")
        changes = trace.changes(tag="w")
        assert len(changes) == a.steps, f"{len(changes)} changes, expected {a.steps}"
        final = np.load(cwd / "final.npy")
        assert np.array_equal(trace.state("w"), final), "the state at the end is not the program's array"
        size = (cwd / "sgd.mwt").stat().st_size
        elements = n * a.steps
        p, r = statistics.median(plain), statistics.median(recorded)
        print(f"CPython {sys.version.split()[0]}, {a.mb} MB float32, {a.steps} steps, median of {a.repeat}")
        print(f"  unwatched loop      {p * 1e3:9.1f} ms  ({p / a.steps * 1e3:.2f} ms/step)")
        print(f"  memwatch record     {r * 1e3:9.1f} ms  ({r / a.steps * 1e3:.2f} ms/step)")
        print(f"  ratio               {r / p:9.1f}x")
        print(f"  trace               {size / 1e6:9.1f} MB = {size / elements:.2f} bytes per changed element")


def memwatch_open(path: Path):
    import memwatch

    return memwatch.open_trace(path)


if __name__ == "__main__":
    main()
