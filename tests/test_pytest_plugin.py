"""The pytest plugin (``memwatch.pytest_plugin``): recording each test with
``--memwatch``, and freezing the objects a test names. Each case runs pytest
in a fresh interpreter (``pytester.runpytest_subprocess``): memwatch's
recorder is process-global."""

from __future__ import annotations

import importlib.metadata
import re
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import memwatch
from memwatch.pytest_plugin import MAX_NAME, trace_name

pytest_plugins = ["pytester"]


def line_of(path: Path, marker: str) -> int:
    """The line number (1-based) of the only line of the file ``path`` that holds ``marker``."""
    found = [i for i, text in enumerate(path.read_text().splitlines(), 1) if marker in text]
    assert len(found) == 1, (marker, found)
    return found[0]


def glob(pattern: str) -> str:
    """``pattern`` for ``fnmatch_lines`` with its brackets taken literally (``*`` stays a wildcard)."""
    return pattern.replace("[", "[[]")


def traces(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_the_entry_point_is_registered():
    eps = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "memwatch"]
    assert [ep.value for ep in eps] == ["memwatch.pytest_plugin"]
    assert eps[0].load() is memwatch.pytest_plugin


@pytest.mark.parametrize(
    ("nodeid", "name"),
    [
        ("tests/test_x.py::test_a[1-2]", "tests__test_x.py__test_a[1-2].mwt"),
        ("test_y.py::TestK::test_b", "test_y.py__TestK__test_b.mwt"),
        ("t.py::test_c[a b/ü]", "t.py__test_c[a_b___].mwt"),
        ("../up.py::test_d", "__up.py__test_d.mwt"),
    ],
)
def test_trace_names_are_readable_and_safe(nodeid, name):
    assert trace_name(nodeid) == name


def test_a_long_node_id_is_cut_and_given_a_hash():
    a = trace_name("tests/test_long.py::test_p[" + "x" * 300 + "]")
    b = trace_name("tests/test_long.py::test_p[" + "x" * 299 + "y]")
    assert len(a) == len(b) == MAX_NAME + len(".mwt")
    assert a.startswith("tests__test_long.py__test_p[xxx") and a.endswith(".mwt")
    assert a != b


def test_off_by_default_nothing_is_recorded_frozen_or_made(pytester):
    pytester.makepyfile(
        test_off="""
        import memwatch
        from memwatch import _guard, _memwatch

        def test_writes(memwatch_trace):
            buf = bytearray(8)
            memwatch.watch(buf, name="buf")
            buf[1] = 7
            x = 1
            assert [c.new for c in memwatch.history("buf")] == [b"\\x07"]
            assert memwatch_trace is None
            assert _memwatch._recording() is None
            assert _guard.violation_listeners == [] and _guard._freezes == {}
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "memwatch: recording" not in result.stdout.str()
    assert not (pytester.path / ".memwatch").exists()
    assert list(pytester.path.rglob("*.mwt")) == []
    # The options and the marker are there all the same.
    helped = pytester.runpytest_subprocess("--help")
    helped.stdout.fnmatch_lines(["*--memwatch *record each test*", "*--memwatch-dir=DIR*", "*--memwatch-keep=*"])
    marked = pytester.runpytest_subprocess("--markers")
    marked.stdout.fnmatch_lines(["@pytest.mark.memwatch_frozen(*names): freeze the named fixtures*"])


RECORD = """
import numpy as np
import pytest
import memwatch

def test_passes(memwatch_trace):
    buf = bytearray(8)
    memwatch.watch(buf, name="buf")
    buf[1] = 7  # PASSING WRITE
    x = 1
    memwatch.unwatch(buf)
    assert memwatch_trace.name == "test_record.py__test_passes.mwt"

def test_fails(memwatch_trace):
    a = np.zeros(4, dtype=np.int32)
    memwatch.watch(a, name="weights")
    a[2] = 42  # FAILING WRITE
    x = 1
    assert memwatch_trace == memwatch_trace.parent / "test_record.py__test_fails.mwt"
    assert a[2] == 0, "the test fails here"

@pytest.mark.xfail(strict=True, reason="expected")
def test_xfails():
    a = np.zeros(4, dtype=np.int32)
    memwatch.watch(a, name="xfail_weights")
    a[0] = 1
    assert False

@pytest.fixture
def broken():
    b = bytearray(2)
    memwatch.watch(b, name="setup_buf")
    b[0] = 5  # SETUP WRITE
    x = 1
    raise RuntimeError("the fixture fails")

def test_setup_error(broken):
    pass
"""


def test_memwatch_keeps_the_traces_of_failed_tests_and_names_them(pytester):
    src = pytester.makepyfile(test_record=RECORD)
    result = pytester.runpytest_subprocess("--memwatch", "-p", "no:cacheprovider", "--junitxml=junit.xml")
    result.assert_outcomes(passed=1, failed=1, xfailed=1, errors=1)
    directory = pytester.path / ".memwatch"
    assert traces(directory) == ["test_record.py__test_fails.mwt", "test_record.py__test_setup_error.mwt"]
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "memwatch: recording each test to .memwatch/ (keeping the traces of failed tests)",
            "*_ test_fails _*",
            "*AssertionError: the test fails here*",
            "*- memwatch -*",
            "trace of this test (setup to teardown): .memwatch/test_record.py__test_fails.mwt",
            "read it with: memwatch summary .memwatch/test_record.py__test_fails.mwt   or   "
            "memwatch query .memwatch/test_record.py__test_fails.mwt",
        ]
    )
    assert "trace of this test (setup to teardown): .memwatch/test_record.py__test_setup_error.mwt" in out
    result.stdout.fnmatch_lines(
        [
            "*- memwatch -*",
            "2 trace(s) kept in .memwatch/ (failed tests only; --memwatch-keep=all keeps every one):",
            "  test_record.py::test_fails: .memwatch/test_record.py__test_fails.mwt (1 change)",
            "  test_record.py::test_setup_error: .memwatch/test_record.py__test_setup_error.mwt (1 change)",
            "read one with: memwatch summary .memwatch/test_record.py__test_fails.mwt, memwatch query *",
        ]
    )
    assert "test_passes.mwt" not in out and "test_xfails.mwt" not in out

    # The trace holds what the test did, and nothing of the other tests.
    trace = memwatch.open_trace(directory / "test_record.py__test_fails.mwt")
    assert trace.tags == ["weights"]
    (change,) = trace.changes()
    assert (change.tag, change.indices, change.old_values, change.new_values) == ("weights", [2], [0], [42])
    assert (Path(change.file).name, change.line, change.function) == (
        "test_record.py",
        line_of(src, "FAILING WRITE"),
        "test_fails",
    )
    assert trace.meta["tail"] == "closed"
    # A fixture's write in setup is recorded too (recording starts before setup).
    (setup_change,) = memwatch.open_trace(directory / "test_record.py__test_setup_error.mwt").changes()
    assert (setup_change.tag, setup_change.new, setup_change.line) == ("setup_buf", b"\x05", line_of(src, "SETUP WRITE"))
    assert not list(directory.glob("*.journal"))

    # JUnit XML names the trace too, as a property of the test.
    props = {
        case.get("name"): [p.get("value") for p in case.iter("property") if p.get("name") == "memwatch_trace"]
        for case in ET.parse(pytester.path / "junit.xml").iter("testcase")
    }
    assert props["test_fails"] == [str(directory / "test_record.py__test_fails.mwt")]
    assert props["test_passes"] == [] and props["test_xfails"] == []


def test_keep_all_keeps_every_trace(pytester):
    src = pytester.makepyfile(test_record=RECORD)
    result = pytester.runpytest_subprocess("--memwatch", "--memwatch-keep=all", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, xfailed=1, errors=1)
    directory = pytester.path / ".memwatch"
    assert traces(directory) == [
        "test_record.py__test_fails.mwt",
        "test_record.py__test_passes.mwt",
        "test_record.py__test_setup_error.mwt",
        "test_record.py__test_xfails.mwt",
    ]
    result.stdout.fnmatch_lines(["memwatch: recording each test to .memwatch/ (keeping the traces of every test)"])
    result.stdout.fnmatch_lines(["4 trace(s) kept in .memwatch/ (every test):"])
    (change,) = memwatch.open_trace(directory / "test_record.py__test_passes.mwt").changes()
    assert (change.tag, change.ranges, change.line) == ("buf", [(1, b"\x00", b"\x07")], line_of(src, "PASSING WRITE"))
    (xchange,) = memwatch.open_trace(directory / "test_record.py__test_xfails.mwt").changes()
    assert (xchange.tag, xchange.new_values) == ("xfail_weights", [1])


def test_a_teardown_failure_keeps_the_trace_and_the_summary_stays_short(pytester):
    pytester.makepyfile(
        test_many="""
        import pytest
        import memwatch

        @pytest.fixture
        def flaky_teardown():
            yield
            raise RuntimeError("teardown fails")

        def test_fails_in_teardown(flaky_teardown):
            buf = bytearray(2)
            memwatch.watch(buf, name="td")
            buf[1] = 4
            x = 1

        @pytest.mark.parametrize("i", range(25))
        def test_many(i):
            pass
        """
    )
    result = pytester.runpytest_subprocess("--memwatch", "--memwatch-keep=all", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=26, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_fails_in_teardown*",
            "*RuntimeError: teardown fails",
            "*- memwatch -*",
            "trace of this test (setup to teardown): .memwatch/test_many.py__test_fails_in_teardown.mwt",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "26 trace(s) kept in .memwatch/ (every test):",
            "  test_many.py::test_fails_in_teardown: .memwatch/test_many.py__test_fails_in_teardown.mwt (1 change)",
            glob("  test_many.py::test_many[0]: .memwatch/test_many.py__test_many[0].mwt (0 changes)"),
            "  ... and 6 more (-v lists them all)",
        ]
    )
    assert len(traces(pytester.path / ".memwatch")) == 26
    assert "test_many.py__test_many[24].mwt" not in result.stdout.str()
    verbose = pytester.runpytest_subprocess("--memwatch", "--memwatch-keep=all", "-p", "no:cacheprovider", "-v")
    verbose.stdout.fnmatch_lines([glob("  test_many.py::test_many[24]: .memwatch/test_many.py__test_many[24].mwt (0 changes)")])
    assert "more (-v lists them all)" not in verbose.stdout.str()


def test_no_failure_keeps_nothing_and_leaves_no_directory(pytester):
    pytester.makepyfile(
        test_ok="""
        import memwatch
        def test_ok():
            buf = bytearray(4)
            memwatch.watch(buf, name="b")
            buf[0] = 1
            x = 1
        """
    )
    result = pytester.runpytest_subprocess("--memwatch", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["1 test(s) recorded, none failed: no trace kept (--memwatch-keep=all keeps every one)"])
    assert not (pytester.path / ".memwatch").exists()


def test_the_directory_from_the_option_or_the_ini_file_is_relative_to_the_rootdir(pytester, monkeypatch, tmp_path):
    pytester.makeini(
        """
        [pytest]
        memwatch_dir = from-ini
        memwatch_keep = all
        """
    )
    sub = pytester.mkdir("sub")
    (sub / "test_here.py").write_text(
        textwrap.dedent(
            """
            import memwatch
            def test_a():
                buf = bytearray(4)
                memwatch.watch(buf, name="b")
                buf[0] = 1
                x = 1
            """
        )
    )
    monkeypatch.chdir(sub)
    result = pytester.runpytest_subprocess("--memwatch", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert traces(pytester.path / "from-ini") == ["sub__test_here.py__test_a.mwt"]
    # Shown relative to where pytest was started.
    # Not under where pytest was started: shown absolute.
    result.stdout.fnmatch_lines([f"  sub/test_here.py::test_a: {pytester.path}/from-ini/sub__test_here.py__test_a.mwt (1 change)"])

    result = pytester.runpytest_subprocess("--memwatch", "--memwatch-dir=opt", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert traces(pytester.path / "opt") == ["sub__test_here.py__test_a.mwt"]
    assert not (sub / "opt").exists()

    absolute = tmp_path / "abs" / "traces"
    result = pytester.runpytest_subprocess("--memwatch", f"--memwatch-dir={absolute}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert traces(absolute) == ["sub__test_here.py__test_a.mwt"]

    bad = pytester.runpytest_subprocess("--memwatch", "-o", "memwatch_keep=some", "-p", "no:cacheprovider")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*memwatch_keep must be one of failed, all, not 'some'*"])


FIXTURE = """
import numpy as np
import pytest
import memwatch

@pytest.fixture
def weights():
    w = np.arange(4, dtype=np.float64)
    memwatch.watch(w, name="weights")
    w[0] = -1.0  # SETUP WRITE
    yield w
    w[3] = 99.0  # TEARDOWN WRITE
    memwatch.unwatch(w)

def test_uses_it(weights):
    weights[1] = 5.0  # CALL WRITE
    assert weights.sum() == 0
"""


def test_a_fixture_that_watches_is_recorded_from_setup_to_teardown(pytester):
    src = pytester.makepyfile(test_fixture=FIXTURE)
    result = pytester.runpytest_subprocess("--memwatch", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    trace = memwatch.open_trace(pytester.path / ".memwatch" / "test_fixture.py__test_uses_it.mwt")
    got = [(c.function, c.line, c.indices, c.new_values) for c in trace.changes(tag="weights")]
    assert got == [
        ("weights", line_of(src, "SETUP WRITE"), [0], [-1.0]),
        ("test_uses_it", line_of(src, "CALL WRITE"), [1], [5.0]),
        ("weights", line_of(src, "TEARDOWN WRITE"), [3], [99.0]),
    ]
    result.stdout.fnmatch_lines(["  test_fixture.py::test_uses_it: .memwatch/test_fixture.py__test_uses_it.mwt (3 changes)"])


def test_clashing_names_get_their_own_trace(pytester):
    pytester.makepyfile(
        test_ids="""
        import pytest
        import memwatch

        @pytest.mark.parametrize("v", [1, 2], ids=["a b", "a_b"])
        def test_p(v):
            buf = bytearray(1)
            memwatch.watch(buf, name=f"b{v}")
            buf[0] = v
            x = 1
            assert False
        """
    )
    result = pytester.runpytest_subprocess("--memwatch", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    names = traces(pytester.path / ".memwatch")
    assert len(names) == 2 and "test_ids.py__test_p[a_b].mwt" in names, names
    (other,) = (n for n in names if n != "test_ids.py__test_p[a_b].mwt")
    assert re.fullmatch(r"test_ids\.py__test_p\[a_b\]-[0-9a-f]{10}\.mwt", other), other
    values = sorted(memwatch.open_trace(pytester.path / ".memwatch" / n).changes()[0].new for n in names)
    assert values == [b"\x01", b"\x02"]


def test_a_process_that_records_already_is_left_alone(pytester, monkeypatch):
    pytester.makepyfile(
        test_outer="""
        import memwatch
        def test_a(memwatch_trace):
            buf = bytearray(4)
            memwatch.watch(buf, name="outer_buf")
            buf[0] = 3
            x = 1
            assert memwatch_trace is None
            assert False
        """
    )
    outer = pytester.path / "outer.mwt"
    monkeypatch.setenv("MEMWATCH_TRACE", str(outer))
    result = pytester.runpytest_subprocess("--memwatch", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"memwatch: this process records to {outer} already: --memwatch records no test of its own",
            f"no test recorded: this process records to {outer} already*",
        ]
    )
    assert not (pytester.path / ".memwatch").exists()
    (change,) = memwatch.open_trace(outer).changes()
    assert (change.tag, change.new) == ("outer_buf", b"\x03")


def test_a_recording_a_conftest_started_is_left_alone(pytester):
    pytester.makeconftest(
        """
        import memwatch
        def pytest_configure(config):
            memwatch.start(trace=str(config.rootpath / "conftest.mwt"))
        """
    )
    pytester.makepyfile(
        test_own="""
        import memwatch
        def test_a():
            buf = bytearray(4)
            memwatch.watch(buf, name="b")
            buf[0] = 3
            x = 1
            assert False
        """
    )
    result = pytester.runpytest_subprocess("--memwatch", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"memwatch: this process records to {pytester.path / 'conftest.mwt'} already*"])
    assert not (pytester.path / ".memwatch").exists()


OWN = """
import pytest
import memwatch

@pytest.fixture
def buf():
    b = bytearray(4)
    memwatch.watch(b, name="early")
    b[0] = 1  # BEFORE
    x = 1
    yield b
    memwatch.unwatch(b)

def test_records_itself(buf, memwatch_trace):
    memwatch.start(trace="own.mwt")
    buf[1] = 2  # OWN
    x = 1
    assert memwatch.stop()["path"] == "own.mwt"
    assert memwatch_trace.name == "test_own.py__test_records_itself.mwt"
    assert False, "fails"

def test_leaves_its_recording_on():
    memwatch.start(trace="left.mwt")

def test_after_it():
    b = bytearray(1)
    memwatch.watch(b, name="later")
    b[0] = 9  # LATER
    x = 1
    assert False, "fails"
"""


def test_a_test_may_record_on_its_own(pytester):
    src = pytester.makepyfile(test_own=OWN)
    result = pytester.runpytest_subprocess("--memwatch", "-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=2)
    # The plugin's trace gave way at the test's memwatch.start().
    result.stdout.fnmatch_lines(
        ["trace of this test (setup to its own memwatch.start()): .memwatch/test_own.py__test_records_itself.mwt"]
    )
    mine = memwatch.open_trace(pytester.path / ".memwatch" / "test_own.py__test_records_itself.mwt")
    assert [(c.tag, c.new, c.line) for c in mine.changes()] == [("early", b"\x01", line_of(src, "BEFORE"))]
    own = memwatch.open_trace(pytester.path / "own.mwt")
    assert [(c.tag, c.ranges, c.line) for c in own.changes()] == [("early", [(1, b"\x00", b"\x02")], line_of(src, "OWN"))]
    # A recording left on is left alone: the next test is not recorded.
    assert traces(pytester.path / ".memwatch") == ["test_own.py__test_records_itself.mwt"]
    result.stdout.fnmatch_lines(
        ["1 test(s) not recorded: the process was recording to left.mwt (memwatch.start() in a test)*"]
    )
    assert [(c.tag, c.new) for c in memwatch.open_trace(pytester.path / "left.mwt").changes()] == [("later", b"\t")]


FROZEN = """
import numpy as np
import pytest
import memwatch

@pytest.fixture
def weights():
    w = np.zeros(8, dtype=np.float32)
    yield w
    w[7] = 1.0  # teardown may write again: the freeze was for the call only
    assert w[7] == 1.0

@pytest.fixture
def config():
    return {"lr": 0.1}

@pytest.mark.memwatch_frozen("weights", "config")
def test_writes_weights(weights, config):
    total = float(weights.sum())
    weights[3] = 2.5  # WEIGHTS WRITE
    pytest.fail("the line after the write must not run")

@pytest.mark.memwatch_frozen("weights", "config")
def test_writes_config(weights, config):
    config["lr"] = 0.2  # CONFIG WRITE
    x = 1

@pytest.mark.memwatch_frozen("weights")
def test_only_reads(weights, config):
    assert float(weights.sum()) == 0.0
    config["lr"] = 0.3  # not frozen
    assert weights[0] == 0.0

@pytest.mark.memwatch_frozen("config")
def test_writes_on_its_last_line(config):
    config["momentum"] = 0.9  # LAST LINE WRITE

@pytest.mark.memwatch_frozen("weights")
def test_catches_the_error(weights):
    with pytest.raises(memwatch.MutationError):
        weights[1] = 4.0  # CAUGHT WRITE
        x = 1
"""


def test_the_marker_freezes_fixtures_and_the_failure_shows_the_writing_line(pytester):
    src = pytester.makepyfile(test_frozen=FROZEN)
    # Without --memwatch: freezing does not need recording.
    result = pytester.runpytest_subprocess("--strict-markers", "-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1, failed=4)
    out = result.stdout.str()
    w, c, last, caught = (line_of(src, m) for m in ("WEIGHTS WRITE", "CONFIG WRITE", "LAST LINE WRITE", "CAUGHT WRITE"))
    result.stdout.fnmatch_lines(
        [
            "*_ test_writes_weights _*",
            ">       weights[3] = 2.5  # WEIGHTS WRITE",
            glob(
                "E       memwatch.MutationError: 'weights' changed while frozen: [3] 0.0 -> 2.5, "
                f"by *test_frozen.py:{w} in test_writes_weights (thread MainThread)"
            ),
            f"test_frozen.py:{w}: MutationError",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_writes_config _*",
            '>       config["lr"] = 0.2  # CONFIG WRITE',
            glob(
                "E       memwatch.MutationError: 'config' changed while frozen: setitem ['lr']: 0.1 -> 0.2, "
                f"by *test_frozen.py:{c} in test_writes_config*"
            ),
        ]
    )
    # Seen after the test returned: the report still ends with the writing line.
    result.stdout.fnmatch_lines(
        [
            "*_ test_writes_on_its_last_line _*",
            glob('>*config["momentum"] = 0.9  # LAST LINE WRITE'),
            glob(
                "E*memwatch.MutationError: 'config' changed while frozen: setitem ['momentum']: None -> 0.9, "
                f"by *test_frozen.py:{last} in test_writes_on_its_last_line*"
            ),
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_catches_the_error _*",
            ">   weights[1] = 4.0  # CAUGHT WRITE",
            glob(f"E   memwatch.MutationError: 'weights' changed while frozen: [1] 0.0 -> 4.0, by *test_frozen.py:{caught}*"),
            "E   memwatch: the test caught this MutationError; the test fails for it all the same",
        ]
    )
    assert "PASSED test_frozen.py::test_only_reads" in out
    assert "Failed: the line after the write must not run" not in out

    # With --memwatch the trace of the failed test holds the forbidden write.
    result = pytester.runpytest_subprocess("--memwatch", "-p", "no:cacheprovider", "-k", "test_writes_weights")
    result.assert_outcomes(failed=1)
    trace = memwatch.open_trace(pytester.path / ".memwatch" / "test_frozen.py__test_writes_weights.mwt")
    got = [(c.indices, c.new_values, c.line) for c in trace.changes(tag="weights")]
    assert got[0] == ([3], [2.5], w)


ATTR = """
import numpy as np
import pytest
import memwatch

leftover = np.zeros(2)

def test_leaves_a_watch_with_the_markers_name():
    memwatch.watch(leftover, name="model.weight")

class Model:
    def __init__(self):
        self.weight = np.ones(4)
        self.name = "m"

@pytest.fixture
def model():
    return Model()

@pytest.fixture
def weights():
    return np.zeros(2)

@pytest.mark.memwatch_frozen("model.weight")
def test_writes_the_attribute(model):
    model.name = "other"  # the model itself is not frozen
    model.weight[0] = 3.0  # ATTR WRITE
    x = 1

@pytest.mark.memwatch_frozen("model.bias")
def test_no_such_attribute(model):
    pass

@pytest.mark.memwatch_frozen("wieghts")
def test_typo(weights, model):
    pass

@pytest.mark.memwatch_frozen(weights=1)
def test_keyword(weights):
    pass
"""


def test_the_marker_takes_dotted_attributes_and_names_a_missing_fixture(pytester):
    src = pytester.makepyfile(test_attr=ATTR)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2, errors=2)
    line = line_of(src, "ATTR WRITE")
    # Its name is taken by an earlier test's watch: the tag names the test.
    result.stdout.fnmatch_lines(
        [
            ">       model.weight[0] = 3.0  # ATTR WRITE",
            glob(
                "E       memwatch.MutationError: 'model.weight (test_writes_the_attribute)' changed while frozen: "
                f"[0] 1.0 -> 3.0, by *test_attr.py:{line}*"
            ),
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_typo*",
            "@pytest.mark.memwatch_frozen('wieghts'): 'wieghts' is not a fixture of test_typo "
            "(its fixtures: model, weights)",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_no_such_attribute _*",
            "@pytest.mark.memwatch_frozen('model.bias'): model (a Model) has no attribute 'bias'",
        ]
    )
    assert "During handling of the above exception" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*@pytest.mark.memwatch_frozen takes only names, not weights=*"])


FREEZE_FIXTURE = """
import pytest
import memwatch
from memwatch import _guard

kept = []

def test_freezes_and_writes(memwatch_freeze):
    buf = bytearray(b"abc")
    assert memwatch_freeze(buf) is buf
    buf[0] = ord("x")  # FIXTURE WRITE
    pytest.fail("the line after the write must not run")

def test_freezes_and_reads(memwatch_freeze):
    buf = memwatch_freeze(bytearray(b"abc"), name="ro")
    kept.append(buf)
    assert bytes(buf) == b"abc"
    assert "ro" in _guard._freezes

def test_unfrozen_after_the_test_that_froze_it():
    kept[0][0] = 1
    x = 1
    assert kept[0] == bytearray(b"\\x01bc")
    assert _guard._freezes == {} and _guard.violation_listeners == []
"""


def test_the_memwatch_freeze_fixture(pytester):
    src = pytester.makepyfile(test_freeze=FREEZE_FIXTURE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    line = line_of(src, "FIXTURE WRITE")
    result.stdout.fnmatch_lines(
        [
            '>       buf[0] = ord("x")  # FIXTURE WRITE',
            f"E       memwatch.MutationError: 'buf' changed while frozen: 1 bytes at offset 0, by *test_freeze.py:{line}*",
        ]
    )
    assert "Failed: the line after the write must not run" not in result.stdout.str()


THREAD = """
import threading
import numpy as np
import pytest

@pytest.fixture
def weights():
    return np.zeros(1 << 18, dtype=np.float32)  # 1 MB: page-tracked, the writer is known

def write_in_a_thread(target):
    def writer():
        target[5] = 1.0  # THREAD WRITE
        x = 1
    t = threading.Thread(target=writer, name="w-thread")
    t.start()
    t.join()

@pytest.mark.memwatch_frozen("weights")
def test_marker(weights):
    write_in_a_thread(weights)
    assert weights[5] == 1.0  # the test itself goes on

def test_fixture(memwatch_freeze, weights):
    memwatch_freeze(weights)
    write_in_a_thread(weights)
    assert weights[5] == 1.0

@pytest.mark.memwatch_frozen("weights")
def test_reads_in_a_thread(weights):
    seen = []
    t = threading.Thread(target=lambda: seen.append(float(weights.sum())))
    t.start()
    t.join()
    assert seen == [0.0]
"""


def test_a_write_from_another_thread_fails_the_test(pytester):
    src = pytester.makepyfile(test_thread=THREAD)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnhandledThreadExceptionWarning")
    result.assert_outcomes(passed=1, failed=2)
    line = line_of(src, "THREAD WRITE")
    for name in ("test_marker", "test_fixture"):
        result.stdout.fnmatch_lines(
            [
                f"*_ {name} _*",
                ">   target[5] = 1.0  # THREAD WRITE",
                glob(
                    "E   memwatch.MutationError: 'weights' changed while frozen: [5] 0.0 -> 1.0, "
                    f"by *test_thread.py:{line} in write_in_a_thread.<locals>.writer (thread w-thread)"
                ),
                "E   memwatch: written in thread 'w-thread': the MutationError was raised there, and the test fails for it",
                f"test_thread.py:{line}: MutationError",
            ]
        )
    # The fixture's freeze lasts to its teardown: the failure is the call's.
    assert "ERROR at teardown" not in result.stdout.str()
    result.stdout.fnmatch_lines(["FAILED test_thread.py::test_marker - memwatch.MutationError: *"])


def test_the_guides_example_runs(pytester: pytest.Pytester) -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "index.md").read_text()
    section = guide.split("## In a test suite: the pytest plugin")[1].split("\n## ")[0]
    (src,) = re.findall(r"```python\n(.*?)```", section, re.S)
    pytester.makepyfile(test_normalize=src)
    result = pytester.runpytest_subprocess("--memwatch", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*w /= w.sum()*", "*MutationError: 'weights' changed while frozen*"])
    kept = sorted(p.name for p in (pytester.path / ".memwatch").iterdir())
    assert kept == ["test_normalize.py__test_normalize_leaves_its_input_alone.mwt"]
