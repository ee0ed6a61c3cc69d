"""What `memwatch record --live=short` costs: does printing a line per
change slow the recording by more than the printing itself costs?

    python bench/live_cost.py [--changes 20000] [--repeat 5]

Run it with the interpreter of a venv memwatch is installed in
(`.venv-3.12/bin/python`). It writes a small program that watches an int64
array and changes one element of it on each of N (default 20,000) runs of
one line, and records it with `memwatch record` in three settings, taking
turns, `--repeat` times each:

- without `--live` (the baseline);
- `--live=short` with stderr sent to /dev/null;
- `--live=short` with stderr sent to a file (the file is then checked: one
  `memwatch: #` line per change).

Each figure is the loop's, measured inside the program (interpreter
start-up and the trace's final flush are not counted): its wall-clock time
and the CPU time of the program's thread (`time.thread_time`; on a shared,
loaded machine the wall clock also counts the time other processes held
the CPU, which grows with the system calls a loop makes). It also
measures, in the same program, what the printing alone costs: N
`sys.stderr.write` calls of a line as long as the live ones, to /dev/null
and to a file. It prints the medians, per change, and the live overhead
next to the printing alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
MEMWATCH = BIN / "memwatch"

PROGRAM = """\
import sys, time
import numpy as np
import memwatch

n = int(sys.argv[1])
if sys.argv[2] == "print":
    line = "memwatch: #12345 a [1234] 1233 -> 1234 changes.py:13 in <module>\\n"
    w = sys.stderr.write
    t, c = time.perf_counter(), time.thread_time()
    for i in range(n):
        w(line)
    print(time.perf_counter() - t, time.thread_time() - c)
    sys.exit()
a = np.zeros(4096, dtype=np.int64)
memwatch.watch(a, name="a")
t, c = time.perf_counter(), time.thread_time()
for i in range(n):
    a[i & 4095] = i + 1
print(time.perf_counter() - t, time.thread_time() - c)
"""


def run(args: list[str], cwd: Path, stderr_to: Path | None) -> tuple[float, float]:
    """The loop's wall-clock and thread CPU seconds."""
    with open(stderr_to or os.devnull, "w") as err:
        r = subprocess.run(args, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=600)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({r.returncode})")
    wall, cpu = r.stdout.split()[:2]
    return float(wall), float(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = args.changes
    d = Path(tempfile.mkdtemp(prefix="memwatch-live-"))
    prog = d / "changes.py"
    prog.write_text(PROGRAM)
    log = d / "stderr.txt"

    def record(*live: str, to: Path | None) -> tuple[float, float]:
        cmd = [str(MEMWATCH), "record", *live, "-o", str(d / "t.mwt"), "--", sys.executable, str(prog), str(n), "watch"]
        return run(cmd, d, to)

    times: dict[str, list[tuple[float, float]]] = {k: [] for k in ("none", "null", "file", "print_null", "print_file")}
    for _ in range(args.repeat):
        times["none"].append(record(to=None))
        times["null"].append(record("--live=short", to=None))
        times["file"].append(record("--live=short", to=log))
        lines = [x for x in log.read_text().splitlines() if x.startswith("memwatch: #")]
        if len(lines) != n:
            sys.exit(f"--live=short printed {len(lines)} lines for {n} changes")
        times["print_null"].append(run([sys.executable, str(prog), str(n), "print"], d, None))
        times["print_file"].append(run([sys.executable, str(prog), str(n), "print"], d, log))
    labels = {
        "none": "memwatch record, no --live",
        "null": "--live=short, stderr to /dev/null",
        "file": "--live=short, stderr to a file",
        "print_null": "printing alone, to /dev/null",
        "print_file": "printing alone, to a file",
    }
    # Per change, in microseconds: (wall, thread CPU) medians.
    us = {k: tuple(statistics.median(x[i] for x in v) / n * 1e6 for i in (0, 1)) for k, v in times.items()}
    print(f"{n} single-element changes, medians of {args.repeat} runs, per change (wall / thread CPU):")
    for k, label in labels.items():
        print(f"  {label + ':':38} {us[k][0]:6.2f} us / {us[k][1]:6.2f} us")
    for i, what in ((0, "wall"), (1, "thread CPU")):
        print(
            f"live overhead ({what}): {us['null'][i] - us['none'][i]:.2f} us to /dev/null "
            f"(printing alone {us['print_null'][i]:.2f} us), {us['file'][i] - us['none'][i]:.2f} us to a file "
            f"(printing alone {us['print_file'][i]:.2f} us)"
        )


if __name__ == "__main__":
    main()
