"""The installed package: its API surface, metadata and trace errors."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

import memwatch
from conftest import ROOT


def test_version_matches_the_workspace():
    cargo = (ROOT / "Cargo.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', cargo, re.M).group(1)
    assert memwatch.__version__ == version


def test_format_version_is_4():
    assert memwatch.FORMAT_VERSION == 4


def test_exception_hierarchy():
    assert issubclass(memwatch.MemwatchError, Exception)
    for cls in (
        memwatch.NotATraceError,
        memwatch.TraceVersionError,
        memwatch.TraceTruncatedError,
        memwatch.TraceCorruptError,
    ):
        assert issubclass(cls, memwatch.TraceError)
        assert issubclass(cls, memwatch.MemwatchError)
    assert memwatch.MemwatchError.__module__ == "memwatch"


def test_module_docstring_examples_run():
    failures, tried = doctest.testmod(memwatch)
    assert tried >= 2
    assert failures == 0


def test_typed_package_ships_stub_and_marker():
    pkg = Path(memwatch.__file__).parent
    assert (pkg / "py.typed").exists()
    assert (pkg / "_memwatch.pyi").exists()


def test_trace_info_of_the_golden_trace(golden):
    # GIVEN the checked-in v1 sample trace
    # WHEN its header is read
    info = memwatch.trace_info(golden)
    # THEN the recorded metadata comes back as written
    assert info["version"] == 1
    assert info["pid"] == 4242
    assert info["argv"] == ["python", "samples/train.py"]
    assert info["python_version"] == "3.11.7 (sample)"
    assert info["page_size"] == 4096
    assert info["start_time_ns"] == 1_764_115_200_000_000_000
    assert info["properties"] == {"backend": "sample", "mode": "line"}
    assert info["chunks"] == 3
    assert info["tail"] == "closed"
    assert info["bytes_ignored"] == 0
    assert info["file_bytes"] == golden.stat().st_size
    assert info["path"] == str(golden)


def test_trace_info_of_a_killed_recording(golden, tmp_path):
    data = golden.read_bytes()
    cut = tmp_path / "killed.mwt"
    cut.write_bytes(data[:700])
    info = memwatch.trace_info(cut)
    assert info["tail"] == "truncated"
    assert info["chunks"] == 2
    assert info["bytes_ignored"] == 700 - 646  # chunk 2 starts at byte 646


def test_missing_file_is_file_not_found(tmp_path):
    missing = tmp_path / "nope.mwt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        memwatch.trace_info(missing)


def test_not_a_trace(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello\n")
    with pytest.raises(memwatch.NotATraceError, match="not a memwatch trace"):
        memwatch.trace_info(p)


def test_newer_version(golden, tmp_path):
    data = bytearray(golden.read_bytes())
    data[8:12] = (7).to_bytes(4, "little")
    p = tmp_path / "future.mwt"
    p.write_bytes(bytes(data))
    with pytest.raises(memwatch.TraceVersionError, match=r"format version 7, this build reads up to 4"):
        memwatch.trace_info(p)


def test_header_cut_short_is_truncated(golden, tmp_path):
    p = tmp_path / "short.mwt"
    p.write_bytes(golden.read_bytes()[:20])
    with pytest.raises(memwatch.TraceTruncatedError, match="truncated"):
        memwatch.trace_info(p)


def test_damaged_chunk_header_is_corrupt(golden, tmp_path):
    data = bytearray(golden.read_bytes())
    data[409 + 9] ^= 1  # chunk 1's stored length
    p = tmp_path / "bad.mwt"
    p.write_bytes(bytes(data))
    with pytest.raises(memwatch.TraceCorruptError, match=r"corrupt chunk 1 \(at byte 409\)"):
        memwatch.trace_info(p)


def test_scope_matching_imports_nothing_at_shutdown():
    # Late in interpreter shutdown sys.modules is being emptied and
    # sys.meta_path is None, so any import fails; memwatch may still decide
    # the scope of code that runs then (a __del__), and must not import.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import memwatch._scope as s\n"
        "sys.modules.pop('fnmatch', None)\n"
        "sys.meta_path = None\n"
        "print(s._matches('/a/b/c.py', ['/a/*/c.py']), s._matches('/x.py', ['/a/*']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stderr == ""
    assert r.stdout.split() == ["True", "False"]


def test_a_directory_is_not_a_trace(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory, not a trace"):
        memwatch.open_trace(tmp_path)
