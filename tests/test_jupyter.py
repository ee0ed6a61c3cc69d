"""Jupyter and IPython: ``%load_ext memwatch``, ``%%memwatch``, cell names
and ``_repr_html_``, in a real kernel (ipykernel, driven by nbclient) and a
real terminal IPython."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

import memwatch

CELLS = [
    # [1]
    "import numpy as np\nimport memwatch\n%load_ext memwatch",
    # [2]
    'w = np.zeros(4, dtype=np.float32)\ncfg = {"lr": 0.1}\nsteps = 0',
    # [3]
    '%%memwatch w cfg steps\nw[1] = 2.5\ncfg["lr"] = 0.01\nw[3] += 1\nsteps = steps + 1',
    # [4]
    "def scale(a):\n    a *= 2",
    # [5]
    'h = memwatch.watch(w, name="weights")\nscale(w)',
    # [6]
    'memwatch.history("weights")',
    # [7]
    'memwatch.history("weights")[0]',
    # [8]
    "print(len(_memwatch_changes), [(c.tag, c.location) for c in _memwatch_changes])",
    # [9]
    "with memwatch.frozen(cfg):\n    cfg['lr'] = 1.0",
    # [10]
    "%%memwatch\nx = 1",
    # [11]
    "%%memwatch fresh\nfresh = 5",
    # [12]
    'memwatch.start("nb.mwt")\nw2 = np.zeros(2)\nh2 = memwatch.watch(w2, name="w2")',
    # [13]
    "w2[0] = 1.5",
    # [14]
    "memwatch.stop()",
]


def _run_notebook(tmp_path) -> list:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    for i in (8, 9):  # the frozen write and the magic without names fail
        nb.cells[i].metadata["tags"] = ["raises-exception"]
    env = dict(os.environ)
    env.pop("MEMWATCH_TRACE", None)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    # The kernel is this interpreter (jupyter_client's native kernel spec).
    client.kernel_manager_class = "jupyter_client.manager.KernelManager"
    client.execute(env=env)
    return nb.cells


def _out(cell, kind: str, mime: str | None = None) -> str:
    texts = []
    for o in cell.outputs:
        if o.output_type == kind == "stream":
            texts.append(o.text)
        elif o.output_type == kind and mime is not None:
            texts.append(o.data.get(mime, ""))
        elif o.output_type == kind == "error":
            texts.append(f"{o.ename}: {o.evalue}\n" + "\n".join(o.traceback))
    return "".join(texts)


@pytest.fixture(scope="module")
def notebook_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nb")


@pytest.fixture(scope="module")
def notebook(notebook_dir):
    return _run_notebook(notebook_dir)


def _strip_ansi(s: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", s)


def test_cell_magic_shows_the_cells_changes_as_a_table(notebook):
    cell = notebook[2]
    page = _out(cell, "display_data", "text/html")
    assert '<table class="memwatch">' in page
    rows = re.findall(r"<tr>(.*?)</tr>", page)[1:]
    cells = [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", r)] for r in rows]
    # seq, line, function, tag, change, thread: one row per line that changed, in order.
    got = [(c[1], c[3], c[4]) for c in cells]
    assert got == [
        ("cell [3], line 2", "w", "[1] 0.0 -> 2.5"),
        ("cell [3], line 3", "cfg", "setitem ['lr']: 0.1 -> 0.01"),
        ("cell [3], line 4", "w", "[3] 0.0 -> 1.0"),
        ("cell [3], line 5", "steps", "rebind steps: 0 -> 1"),
    ]
    assert all(c[2] == "<module>" and c[5] == "MainThread" for c in cells)
    # The text form too (what a terminal shows), and no [MEMWATCH] report each.
    text = _out(cell, "display_data", "text/plain")
    assert "cell [3], line 3" in text and "4 changes" in text
    assert "[MEMWATCH]" not in _out(cell, "stream")
    # The magic's watches ended with the cell; its changes are kept.
    assert _out(notebook[7], "stream") == (
        "4 [('w', 'cell [3], line 2'), ('cfg', 'cell [3], line 3'), "
        "('w', 'cell [3], line 4'), ('steps', 'cell [3], line 5')]\n"
    )


def test_a_change_names_the_cell_of_the_line_that_made_it(notebook):
    # scale() was defined in cell [4] and called from cell [5].
    report = _out(notebook[4], "stream")
    assert "[MEMWATCH] Tag: weights" in report
    assert "Elements: [1] 2.5 -> 5.0; [3] 1.0 -> 2.0" in report
    assert "Line: cell [4], line 2 in scale" in report
    assert "ipykernel" not in report


def test_lists_of_changes_and_a_change_render_as_html(notebook):
    table = _out(notebook[5], "execute_result", "text/html")
    assert "<td>cell [4], line 2</td>" in table and "<td>scale</td>" in table
    assert "memwatch: 1 change" in table
    one = html.unescape(_out(notebook[6], "execute_result", "text/html"))
    assert "<th>tag</th>" in one and ">weights<" in one
    assert "cell [4], line 2 in scale" in one
    assert "[1] 2.5 -> 5.0; [3] 1.0 -> 2.0" in one
    # The stack of the change: the write in scale(), called from cell [5].
    assert "cell [5], line 2 in &lt;module&gt;" in _out(notebook[6], "execute_result", "text/html")


def test_a_frozen_write_in_a_cell_names_the_cell(notebook):
    err = _strip_ansi(_out(notebook[8], "error"))
    assert err.startswith("MutationError: 'cfg' changed while frozen: setitem ['lr']: 0.01 -> 1.0, by cell [9], line 2")
    # The traceback shows the cell and, last, the writing line (IPython's
    # kernel renders that entry's arrow on the cell's first line: the
    # traceback entry itself says line 2, see test_guard).
    assert "Cell In[9]" in err and err.rstrip().endswith("by cell [9], line 2 in <module> (thread MainThread)")
    assert "cfg['lr'] = 1.0" in err


def test_cell_magic_without_names_is_a_usage_error(notebook):
    # IPython prints a UsageError on stderr, without a traceback.
    err = _out(notebook[9], "stream")
    assert err.startswith("UsageError: %%memwatch needs the names of the variables to watch: %%memwatch w b")


def test_cell_magic_watches_a_name_not_bound_yet(notebook):
    text = _out(notebook[10], "display_data", "text/plain")
    row = text.splitlines()[2]
    assert re.search(r"cell \[11\], line 2\s+<module>\s+fresh\s+rebind fresh: 5", row), text


def test_a_trace_recorded_in_a_notebook_names_the_cells(notebook, notebook_dir, memwatch_cmd):
    assert notebook[13].outputs[0]["data"]["text/plain"].startswith("{'path': ")
    q = memwatch_cmd("query", str(notebook_dir / "nb.mwt"), "--tag", "w2")
    assert q.returncode == 0, q.stderr
    assert "cell [13], line 1" in q.stdout and "1.5" in q.stdout, q.stdout
    b = memwatch_cmd("blame", str(notebook_dir / "nb.mwt"), "--tag", "w2", "--index", "0")
    assert "at cell [13], line 1 in <module>" in b.stdout, b.stdout


def test_terminal_ipython_shows_a_text_table(tmp_path):
    script = "\n".join(
        [
            "import numpy as np",
            "%load_ext memwatch",
            "b = np.arange(3.0)",
            "%%memwatch b",
            "b[2] = 7",
            "",
            "",
            "print('done', _memwatch_changes[0].location)",
        ]
    )
    env = dict(os.environ, NO_COLOR="1")
    env.pop("MEMWATCH_TRACE", None)
    p = subprocess.run(
        [sys.executable, "-m", "IPython", "--simple-prompt", "--no-banner", "--colors=NoColor", "--HistoryManager.enabled=False"],
        input=script + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    out = p.stdout
    lines = [ln for ln in out.splitlines() if "cell [4], line 2" in ln]
    assert lines, out
    assert re.search(r"cell \[4\], line 2\s+<module>\s+b\s+\[2\] 2\.0 -> 7\.0\s+MainThread", lines[0]), lines[0]
    assert "1 change" in out
    assert "done cell [4], line 2" in out
    assert "Traceback" not in p.stderr


def test_change_list_is_a_list_shown_as_a_table(tmp_path):
    # What history() returns outside a notebook: still a list, sliceable.
    from conftest import here

    from memwatch._display import text_table

    memwatch.clear_history()
    b = bytearray(4)
    h = memwatch.watch(b, name="jb")
    quiet = memwatch.on_change(lambda c: None)
    try:
        b[0] = 1; line = here()  # fmt: skip
        b[1] = 2
        memwatch.check()
    finally:
        memwatch.unwatch(h)
        memwatch.remove_callback(quiet)
    got = memwatch.history("jb")
    assert isinstance(got, list) and len(got) == 2
    assert type(got[:1]).__name__ == "ChangeList" and len(got[:1]) == 1
    table = text_table(got)
    assert table.splitlines()[0].split() == ["seq", "line", "function", "tag", "change", "thread"]
    assert table.splitlines()[-1] == "2 changes"
    first = table.splitlines()[2]
    assert f"test_jupyter.py:{line}" in first and "jb" in first
    assert got[0].location.endswith(f"test_jupyter.py:{line}")
    # A trace's changes are one too.
    memwatch.start(tmp_path / "t.mwt")
    h = memwatch.watch(b, name="jt")
    try:
        b[2] = 3
        memwatch.check()
    finally:
        memwatch.unwatch(h)
        memwatch.stop()
    read = memwatch.open_trace(tmp_path / "t.mwt").changes(tag="jt")
    assert type(read).__name__ == "ChangeList" and [c.new for c in read] == [b"\x03"]
    assert "jt" in read._repr_html_()


def test_the_guides_notebook_example_shows_the_guides_table(tmp_path):
    from conftest import ROOT

    guide = (ROOT / "docs" / "index.md").read_text()
    section = guide.split("## In Jupyter and IPython")[1].split("\n## ")[0]
    transcript = re.search(r"```\n(In \[1\]:.*?)```", section, re.S).group(1)
    # "In [N]: " starts a cell; its later lines are indented to match.
    parts = re.split(r"^In \[\d+\]: ", transcript, flags=re.M)[1:]
    cells = ["\n".join([p.splitlines()[0], *(ln[8:] for ln in p.splitlines()[1:])]).strip("\n") for p in parts]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    env = dict(os.environ)
    env.pop("MEMWATCH_TRACE", None)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute(
        env=env
    )
    page = _out(nb.cells[-1], "display_data", "text/html")
    rows = re.findall(r"<tr>(.*?)</tr>", page)[1:]
    shown = [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", r)] for r in rows]
    table = [ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    documented = [[c.strip().strip("`") for c in ln.strip("|").split("|")] for ln in table]
    assert shown == documented, shown
