"""The `memwatch` command as pip installs it (a console script into the Rust CLI)."""

from __future__ import annotations

import sys

import memwatch
from conftest import GOLDEN, GOLDEN_DUMP, run


def test_version(memwatch_cmd):
    r = memwatch_cmd("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"memwatch {memwatch.__version__}"


def test_dump_of_golden_trace_is_the_expected_text(memwatch_cmd):
    r = memwatch_cmd("dump", str(GOLDEN))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout == GOLDEN_DUMP.read_text()


def test_python_dash_m_is_the_same_command():
    r = run([sys.executable, "-m", "memwatch", "dump", "--records-only", str(GOLDEN)])
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first == "STRING id=1 value=MainThread"


def test_dump_of_a_killed_recording_says_what_it_ignored(memwatch_cmd, tmp_path):
    cut = tmp_path / "killed.mwt"
    cut.write_bytes(GOLDEN.read_bytes()[:700])
    r = memwatch_cmd("dump", str(cut))
    assert r.returncode == 0
    assert r.stdout.splitlines()[-1] == "TAIL status=truncated chunks=2 bytes_ignored=54"
    assert r.stderr.strip() == f"memwatch: note: {cut}: truncated: 2 chunks read, 54 bytes ignored"


def test_errors_are_messages_not_tracebacks(memwatch_cmd, tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello\n")
    r = memwatch_cmd("dump", str(p))
    assert r.returncode == 1
    assert r.stderr.startswith(f"memwatch: error: {p}: not a memwatch trace")
    assert "Traceback" not in r.stderr

    r = memwatch_cmd("dump", str(tmp_path / "missing.mwt"))
    assert r.returncode == 1
    assert "No such file or directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_usage_error_exits_2(memwatch_cmd):
    r = memwatch_cmd("dump", "--max-bytes", "lots", str(GOLDEN))
    assert r.returncode == 2
    assert "invalid value 'lots'" in r.stderr
    assert "Traceback" not in r.stderr


def test_help_explains_the_output(memwatch_cmd):
    r = memwatch_cmd("dump", "--help")
    assert r.returncode == 0
    assert "CHANGE      seq t region tag" in r.stdout
    assert "memwatch dump run.mwt" in r.stdout
