"""The README's examples run as written."""

from __future__ import annotations

import re
import shlex

from conftest import ROOT, run

README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_python_examples_run():
    code = blocks("python")
    assert code, "the README has Python examples"
    for src in code:
        r = run(["python", "-c", src])
        assert r.returncode == 0, f"{src}\n{r.stderr}"
        # A `# value` comment after a print is its expected output, and so
        # are the comment lines that end a block.
        lines = src.splitlines()
        for line in lines:
            if line.lstrip().startswith("print(") and "#" in line:
                expected = line.split("#", 1)[1].strip()
                assert expected in r.stdout, f"{expected!r} not in {r.stdout!r}"
        tail = []
        for line in reversed(lines):
            if not line.startswith("# "):
                break
            tail.insert(0, line[2:])
        if tail:
            assert r.stdout.splitlines() == tail


def test_memwatch_shell_examples_run(tmp_path):
    # In a scratch folder that sees the repository's samples and data, so
    # the traces the examples write land there.
    for name in ("samples", "format"):
        (tmp_path / name).symlink_to(ROOT / name)
    lines = [ln.split("  #", 1)[0].strip() for b in blocks("sh") for ln in b.splitlines()]
    commands = [ln for ln in lines if ln.startswith("memwatch ")]
    assert len(commands) >= 7
    for cmd in commands:
        # memwatch's own exit status (a `| head` may end grep early, and a
        # closed pipe is success for memwatch).
        r = run(["bash", "-c", cmd + "; exit ${PIPESTATUS[0]}"], cwd_override=tmp_path)
        assert r.returncode == 0, f"{cmd}\n{r.stderr}"
        assert r.stdout.strip(), cmd
        if shlex.split(cmd)[1] == "dump" and "grep" in cmd:
            assert all(ln.startswith("CHANGE ") for ln in r.stdout.splitlines())


def test_pytest_plugin_example_runs(tmp_path):
    import memwatch

    src = next(b for b in blocks("python") if b.startswith("# test_normalize.py"))
    (tmp_path / "test_normalize.py").write_text(src)
    line = next(ln for b in blocks("sh") for ln in b.splitlines() if ln.startswith("pytest "))
    cmd, comment = line.split("  #", 1)
    r = run(["python", "-m", *shlex.split(cmd), "-p", "no:cacheprovider"], cwd_override=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "MutationError: 'weights' changed while frozen" in r.stdout
    assert ">       w /= w.sum()" in r.stdout or "w /= w.sum()" in r.stdout.split("MutationError")[0]
    kept = tmp_path / ".memwatch" / "test_normalize.py__test_normalize_leaves_its_input_alone.mwt"
    assert f".memwatch/{kept.name}" in comment and kept.exists(), r.stdout
    changes = memwatch.open_trace(kept).changes(tag="weights")
    writing = src.splitlines().index("    w /= w.sum()                  # in place: the caller's array changes") + 1
    assert [(c.line, c.new_values) for c in changes] == [(writing, [0.25] * 4)]
