"""`memwatch report`: a recorded program as one self-contained HTML page,
opened in a real browser (headless Chromium driven by playwright).

The browser tests need Debian's `chromium` (`make` installs it when run as
root) and playwright from pip (tests/requirements.txt); without them they
are skipped, saying why, except where MEMWATCH_REQUIRE_BROWSER or CI is set
(`.ci/run` sets it): there they fail. Screenshots are kept under
$MEMWATCH_TEST_ARTIFACTS (default target/test-artifacts/) and their paths
printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT

ARTIFACTS = Path(os.environ.get("MEMWATCH_TEST_ARTIFACTS") or ROOT / "target" / "test-artifacts")
CHROMIUM = os.environ.get("MEMWATCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def mw(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run([str(BIN / "memwatch"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def data_of(html: str) -> dict:
    """The JSON the page draws from."""
    m = re.search(r'<script type="application/json" id="memwatch-data">(.*?)</script>', html, re.S)
    assert m, "no data blob in the page"
    return json.loads(m.group(1))


def browser_or_skip():
    """playwright's sync API and the path of a Chromium, or a skip (a failure where one is required)."""
    required = bool(os.environ.get("MEMWATCH_REQUIRE_BROWSER") or os.environ.get("CI"))
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (pip install -r tests/requirements.txt)"
    if why is None and not Path(CHROMIUM).exists():
        why = f"no Chromium at {CHROMIUM} (apt-get install chromium; `make` does it as root)"
    if why is not None:
        if required:
            pytest.fail(f"the browser test must run here (MEMWATCH_REQUIRE_BROWSER or CI is set): {why}")
        print(f"skipping: {why}")
        pytest.skip(why)
    return sync_playwright


class Opened:
    """What opening a page in the browser showed."""

    def __init__(self):
        self.problems: list[str] = []
        self.text = ""
        self.charts: dict = {}
        self.screenshot: Path | None = None


def open_in_browser(html_path: Path, shot_name: str) -> Opened:
    """Opens the page in headless Chromium, every request but the page's own refused and
    recorded, every console error or warning and page error recorded; takes a
    full-page screenshot."""
    sync_playwright = browser_or_skip()
    seen = Opened()
    url = html_path.resolve().as_uri()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on(
                "console",
                lambda m: seen.problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None,
            )
            page.on("pageerror", lambda e: seen.problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: seen.problems.append(f"request failed: {r.url}") if r.url != url else None)

            def route(r):
                if r.request.url == url:
                    r.continue_()
                else:
                    seen.problems.append(f"network request: {r.request.url}")
                    r.abort()

            page.route("**/*", route)
            page.goto(url)
            page.wait_for_selector("body[data-ready]", timeout=20_000)
            seen.text = page.inner_text("body")
            seen.charts = page.evaluate(
                """() => {
                  const svgs = [...document.querySelectorAll('svg.chart')];
                  const canvases = [...document.querySelectorAll('canvas')];
                  const painted = canvases.map(c => {
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    const colors = new Set();
                    for (let i = 0; i < d.length; i += 4 * 7) colors.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]);
                    return colors.size;
                  });
                  return {
                    svgs: svgs.length,
                    svg_shapes: svgs.map(s => s.querySelectorAll('path[d]:not([d="M0 0"]), rect, circle').length),
                    canvases: canvases.length,
                    canvas_colors: painted,
                    sections: [...document.querySelectorAll('section.card h2')].map(h => h.textContent),
                  };
                }"""
            )
            # Hovering a heatmap cell and a value chart shows exact values.
            page.hover("canvas", position={"x": 2, "y": 2})
            seen.charts["heat_tip"] = page.inner_text("#tooltip")
            page.mouse.move(0, 0)
            page.evaluate("window.scrollTo(0, 0)")
            seen.screenshot = ARTIFACTS / shot_name
            page.screenshot(path=str(seen.screenshot), full_page=True)
            print(f"screenshot: {seen.screenshot}")
        finally:
            browser.close()
    return seen


PROGRAM = """\
import threading, numpy as np, memwatch
grid = np.zeros((6, 8), dtype=np.float32)
memwatch.watch(grid, name="grid")
bias = np.zeros(5, dtype=np.float64)
memwatch.watch(bias, name="bias")
for step in range(4):
    grid[step, :] += step + 1
    bias[step] = 0.5 * step
grid[0, 0] = float("nan")
def worker():
    bias[4] = 9.0
t = threading.Thread(target=worker, name="helper")
t.start(); t.join()
"""
GRID_LINE, BIAS_LINE, NAN_LINE, WORKER_LINE = 7, 8, 9, 11


@pytest.fixture
def sample_trace(tmp_path) -> Path:
    (tmp_path / "prog.py").write_text(textwrap.dedent(PROGRAM))
    mw("record", "-o", "run.mwt", sys.executable, "prog.py", cwd=tmp_path)
    return tmp_path / "run.mwt"


def test_the_report_of_a_small_run_says_what_changed(sample_trace):
    # GIVEN a recorded program: a 2-D and a 1-D array, a NaN, a write from another thread
    cwd = sample_trace.parent
    # WHEN the report is written (to the trace's name by default)
    r = mw("report", "run.mwt", cwd=cwd)
    assert r.stdout.startswith("wrote ") and "run.html" in r.stdout and "open it in a browser" in r.stdout
    html = (cwd / "run.html").read_text()
    d = data_of(html)

    # THEN it is self-contained: no address to load anything from
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", html), "the page refers to an outside resource"
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html

    tags = {t["name"]: t for t in d["tags"]}
    assert sorted(tags) == ["bias", "grid"]
    assert (tags["grid"]["dtype"], tags["grid"]["shape"], tags["grid"]["changes"]) == ("<f4", [6, 8], 5)
    assert tags["grid"]["elements"] == 4 * 8 + 1 and tags["grid"]["nonfinite"] == 1
    # bias[0] = 0.0 changes nothing; bias[1..3] and the worker's bias[4] do.
    assert (tags["bias"]["changes"], tags["bias"]["elements"]) == (4, 4)
    assert dict(map(tuple, tags["bias"]["threads"])) == {"MainThread": 3, "helper": 1}

    # the lines: which line changed what, how often, how many bytes
    lines = {(d["tags"][l["tag"]]["name"], l["line"]): l for l in d["lines"]}
    assert set(lines) == {("grid", GRID_LINE), ("grid", NAN_LINE), ("bias", BIAS_LINE), ("bias", WORKER_LINE)}
    g = lines[("grid", GRID_LINE)]
    assert (g["changes"], g["bytes"], g["elements"], g["function"]) == (4, 4 * 32, 32, "<module>")
    assert lines[("bias", WORKER_LINE)]["threads"] == ["helper"]
    assert lines[("bias", WORKER_LINE)]["function"] == "worker"

    # the heatmap: one cell per element, rows 0..3 changed once, [0, 0] twice; by how much
    heat = {d["tags"][h["tag"]]["name"]: h for h in d["heatmaps"]}
    h = heat["grid"]
    assert (h["grid_rows"], h["grid_cols"], h["cell_rows"], h["cell_cols"]) == (6, 8, 1, 1)
    assert h["counts"] == [2] + [1] * 31 + [0] * 16
    assert h["delta"][8:16] == [2] * 8 and h["delta"][0] == 1  # the NaN change has no finite delta
    assert heat["bias"]["counts"] == [0, 1, 1, 1, 1]

    # the values of the busiest element of each array, with the line of each change
    traj = {t["label"]: t for t in d["trajectories"]}
    assert set(traj) == {"grid[0, 0]", "bias[1]"}
    assert traj["grid[0, 0]"]["initial"] == 0 and [p[2] for p in traj["grid[0, 0]"]["points"]] == [1, "nan"]
    assert [d["wheres"][p[3]] for p in traj["grid[0, 0]"]["points"]] == [
        f"prog.py:{GRID_LINE} (<module>)",
        f"prog.py:{NAN_LINE} (<module>)",
    ]

    # the suspicious events: the NaN, the new thread, and new lines
    kinds = {(s["kind"], d["tags"][s["tag"]]["name"]) for s in d["suspicious"]}
    assert {("nonfinite", "grid"), ("new_thread", "bias"), ("new_line", "bias"), ("new_line", "grid")} <= kinds
    nan = next(s for s in d["suspicious"] if s["kind"] == "nonfinite")
    assert nan["severity"] == "error" and "[0, 0]" in nan["detail"] and "nan" in nan["detail"]
    assert d["wheres"][nan["where"]] == f"prog.py:{NAN_LINE} (<module>)"
    assert d["run"]["ending"] == {"how": "closed", "message": "closed normally", "bad": False}
    assert d["sampled"] == []

    # AND in a browser it draws without a single error or request
    seen = open_in_browser(cwd / "run.html", "report-small.png")
    assert seen.problems == []
    c = seen.charts
    assert c["sections"] == ["Run", "Timeline", "Lines", "Element heatmaps", "Element values", "Suspicious", "Sampling"]
    assert c["svgs"] == 1 + 2  # the timeline, a value chart per element
    assert all(n > 0 for n in c["svg_shapes"]), c["svg_shapes"]
    # gray for the elements never changed, and color for the others
    assert c["canvases"] == 2 and all(n >= 2 for n in c["canvas_colors"]), c["canvas_colors"]
    assert "grid[0, 0]" in c["heat_tip"] and "element changes\n2" in c["heat_tip"].replace("\t", "\n")
    text = seen.text
    for want in ["grid", "bias", f"prog.py:{GRID_LINE}", f"prog.py:{BIAS_LINE}", f"prog.py:{WORKER_LINE}", "helper",
                 "NaN or Inf written", "closed normally", "Nothing was sampled"]:
        assert want in text, want


def test_asked_elements_are_followed(sample_trace):
    cwd = sample_trace.parent
    mw("report", "run.mwt", "-o", "r.html", "--element", "bias:3", "--element", "grid:1,2", cwd=cwd)
    d = data_of((cwd / "r.html").read_text())
    traj = {t["label"]: t for t in d["trajectories"]}
    assert list(traj) == ["bias[3]", "grid[1, 2]"] and all(t["asked"] for t in traj.values())
    assert [p[2] for p in traj["bias[3]"]["points"]] == [1.5]
    assert [p[2] for p in traj["grid[1, 2]"]["points"]] == [2]
    # a flat index is an element too
    mw("report", "run.mwt", "-o", "r.html", "--element", "grid:10", cwd=cwd)
    assert [t["label"] for t in data_of((cwd / "r.html").read_text())["trajectories"]] == ["grid[1, 2]"]


def test_bad_input_gets_a_clear_message(sample_trace, tmp_path):
    cwd = sample_trace.parent
    cases = [
        (["report", "missing.mwt"], "missing.mwt"),
        (["report", "run.mwt", "--element", "nosuch:1"], 'no changes to a tag "nosuch"; its tags are: bias, grid'),
        (["report", "run.mwt", "--element", "grid:9,0"], "has shape (6, 8)"),
        (["report", "run.mwt", "--element", "grid"], "give TAG:INDEX"),
        (["report", "run.mwt", "-o", "no/such/dir/r.html"], "cannot write no/such/dir/r.html"),
        (["report", "run.mwt", "-o", "."], "is a folder"),
    ]
    for args, want in cases:
        r = mw(*args, cwd=cwd, ok=False)
        assert r.returncode in (1, 2), (args, r.returncode)
        assert want in r.stderr, (args, r.stderr)
        assert "panicked" not in r.stderr and "RUST_BACKTRACE" not in r.stderr
    # A corrupt trace gets the error every other command gives.
    data = bytearray(sample_trace.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (cwd / "bad.mwt").write_bytes(bytes(data))
    report = mw("report", "bad.mwt", cwd=cwd, ok=False)
    dump = mw("dump", "bad.mwt", cwd=cwd, ok=False)
    assert report.returncode == 1 and "corrupt" in report.stderr.lower(), report.stderr
    assert report.stderr.splitlines()[-1] == dump.stderr.splitlines()[-1]
    assert not (cwd / "bad.html").exists()
    (cwd / "text.mwt").write_text("not a trace")
    r = mw("report", "text.mwt", cwd=cwd, ok=False)
    assert r.returncode == 1 and "not a memwatch trace" in r.stderr.lower(), r.stderr


BIG = """\
import numpy as np, memwatch
big = np.zeros(400_000, dtype=np.float32)
memwatch.watch(big, name="big")
for i in range(30):
    big += 1
one = np.zeros(2, dtype=np.float64)
memwatch.watch(one, name="one")
for i in range(4000):
    one[0] = i + 1
small = [np.zeros(3, dtype=np.int32) for _ in range(50)]
for k, a in enumerate(small):
    memwatch.watch(a, name=f"small{k:02d}")
for k, a in enumerate(small):
    a[1] = k + 1
"""


def test_a_large_trace_gives_a_small_report_that_says_what_it_sampled(tmp_path):
    # GIVEN a trace of 12 million element changes, an element changed 4000
    # times, and 52 tags
    (tmp_path / "big.py").write_text(textwrap.dedent(BIG))
    mw("record", "-o", "big.mwt", sys.executable, "big.py", cwd=tmp_path)
    trace_size = (tmp_path / "big.mwt").stat().st_size
    # WHEN it is reported
    start = time.monotonic()
    mw("report", "big.mwt", "-o", "big.html", cwd=tmp_path)
    took = time.monotonic() - start
    html = (tmp_path / "big.html").read_text()
    print(f"trace {trace_size} bytes -> report {len(html)} bytes in {took:.1f} s")
    # THEN the page is small, and says what it binned, cut and thinned
    assert len(html.encode()) < 5 * 1024 * 1024
    d = data_of(html)
    assert d["run"]["changes"] == 30 + 4000 + 50
    tags = {t["name"]: t for t in d["tags"]}
    assert tags["big"]["elements"] == 30 * 400_000 and tags["one"]["changes"] == 4000
    sampled = "\n".join(d["sampled"])
    assert "Heatmap of big: 1 × 400000 elements are binned into cells of 1 × 782." in sampled
    assert "Timeline: the 40 busiest of 52 tags are drawn." in sampled
    assert "Values of one[0]: every 4th of its 4000 changes is drawn (and the last)." in sampled
    heat = next(h for h in d["heatmaps"] if d["tags"][h["tag"]]["name"] == "big")
    assert len(heat["counts"]) == 512 and sum(heat["counts"]) == 30 * 400_000
    one = next(t for t in d["trajectories"] if t["label"] == "one[0]")
    assert one["changes"] == 4000 and len(one["points"]) <= 1501 and one["points"][-1][2] == 4000
    assert len(d["timeline"]["tags"]) == 40 and d["timeline"]["hidden"] == 12

    seen = open_in_browser(tmp_path / "big.html", "report-large.png")
    assert seen.problems == []
    assert "binned into cells of 1 × 782" in seen.text and "Sampling" in seen.text
