"""Recorder throughput: changes recorded per second, with nothing dropped.

    python bench/recorder_throughput.py [N]

Run it with the interpreter of a venv memwatch is installed in
(`.venv-3.12/bin/python`). It writes a small program that watches an int64
array and changes one element of it on each of N (default 200,000) runs of
one line, records it with `memwatch record` (line mode), and reports:

- changes/s: N over the time the program's loop took while recorded
  (measured inside the program, so interpreter start-up and the final flush
  are not counted), the median of 3 runs;
- the same loop unrecorded, as the baseline (its rate, and the ratio);
- a check, from the trace itself (`memwatch dump`), that it holds exactly N
  changes to the array and no LOST record.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

N = next((int(a) for a in sys.argv[1:] if a.isdigit()), 200_000)
BIN = Path(sys.executable).parent
MEMWATCH = BIN / "memwatch"

PROGRAM = """\
import sys, time
import numpy as np
import memwatch

n = int(sys.argv[1])
a = np.zeros(4096, dtype=np.int64)
if sys.argv[2] == "watch":
    memwatch.watch(a, name="a")
t = time.perf_counter()
for i in range(n):
    a[i & 4095] = i + 1
print(time.perf_counter() - t)
"""


def run(args: list[str], cwd: Path) -> str:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def counts(trace: Path, cwd: Path) -> tuple[int, int]:
    """CHANGE records to region 1 and LOST records in the trace."""
    changes = lost = 0
    with subprocess.Popen([str(MEMWATCH), "dump", str(trace)], cwd=cwd, stdout=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("CHANGE ") and " region=1 " in line:
                changes += 1
            elif line.startswith("LOST"):
                lost += 1
    if p.returncode != 0:
        sys.exit(f"memwatch dump {trace} failed ({p.returncode})")
    return changes, lost


def main() -> None:
    d = Path(tempfile.mkdtemp(prefix="memwatch-rec-"))
    prog = d / "changes.py"
    prog.write_text(PROGRAM)
    base, rec = [], []
    for k in range(3):
        base.append(float(run([sys.executable, str(prog), str(N), "plain"], d)))
        trace = d / f"t{k}.mwt"
        out = run([str(MEMWATCH), "record", "-o", str(trace), "--", sys.executable, str(prog), str(N), "watch"], d)
        rec.append(float(out.split()[0]))
        changes, lost = counts(trace, d)
        if changes != N or lost:
            sys.exit(f"run {k}: {changes} changes recorded of {N} made, {lost} LOST records")
    b, r = statistics.median(base), statistics.median(rec)
    print(
        f"recorder throughput (line mode, one int64 element per line): {N / r / 1e6:.3f} M changes/s "
        f"over {N} changes, all {N} in the trace and no LOST record; "
        f"unrecorded loop {N / b / 1e6:.2f} M iterations/s; ratio {r / b:.1f}x"
    )
    print(f"python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
