"""The pytest plugin (entry point ``pytest11``: ``memwatch``): recording each
test into its own trace, and freezing the objects a test names.

This module owns:

- the options ``--memwatch``, ``--memwatch-dir=DIR`` and
  ``--memwatch-keep=failed|all`` (ini: ``memwatch_dir``, ``memwatch_keep``);
- per-test recording under ``--memwatch``: a trace per test, from before
  its setup to after its teardown, deleted when the test passed (unless
  ``--memwatch-keep=all``), named in the failure report of a test that
  failed and listed in the terminal summary. A failed test is one with a
  failed phase (setup, call or teardown; a strict xfail that passed): an
  xfail that failed as expected is not one. A recording this process
  makes already (``memwatch record``, ``MEMWATCH_TRACE``, a conftest's
  ``memwatch.start()``) is left alone: then no test is recorded. A test
  that calls ``memwatch.start()`` itself ends its trace there
  (``memwatch._session._give_way``);
- the marker ``@pytest.mark.memwatch_frozen("name", "name.attr", ...)``
  (freezes those fixtures of the test for its call) and the fixtures
  ``memwatch_freeze`` (freezes an object for the rest of the test) and
  ``memwatch_trace`` (the path of the test's trace, or None). A change to
  an object they froze fails the test with its ``MutationError``, also one
  made in another thread or one the test caught
  (``memwatch._guard.violation_listeners``).

Importing it is cheap and changes nothing (beyond what importing the
``memwatch`` package does: its exit hooks): until ``--memwatch`` is given,
or a test uses the marker or a fixture of this plugin, nothing is recorded,
watched or frozen, and no directory is made.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
import threading
import warnings
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from memwatch import Change, MutationError

KEEP = ("failed", "all")
DEFAULT_DIR = ".memwatch"
FROZEN_MARKER = "memwatch_frozen"
# How many kept traces the terminal summary lists (all of them with -v).
SUMMARY_LINES = 20
# Longest trace file name (without ".mwt") before it is cut and given a hash.
MAX_NAME = 120

_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+@\[\]-]")


# --- options and configuration ----------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("memwatch", "memwatch: record the memory changes of each test")
    group.addoption(
        "--memwatch",
        action="store_true",
        default=False,
        help="record each test (setup, call and teardown) into its own memwatch trace (.mwt) "
        "in --memwatch-dir; the traces of failed tests are kept, the others deleted",
    )
    group.addoption(
        "--memwatch-dir",
        metavar="DIR",
        default=None,
        help=f"where --memwatch puts the traces (default: the memwatch_dir ini option, else "
        f"{DEFAULT_DIR}); a relative DIR is relative to the rootdir",
    )
    group.addoption(
        "--memwatch-keep",
        choices=KEEP,
        default=None,
        help="which traces --memwatch keeps: 'failed' (default: those of tests that failed in "
        "setup, call or teardown) or 'all'",
    )
    parser.addini(
        "memwatch_dir",
        f"where --memwatch puts the traces (default {DEFAULT_DIR}), relative to the rootdir",
        default=DEFAULT_DIR,
    )
    parser.addini("memwatch_keep", "which traces --memwatch keeps: failed (default) or all", default="failed")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{FROZEN_MARKER}(*names): freeze the named fixtures of the test (or attributes of "
        "them: 'model.weight') during its call; a change to one fails the test with "
        "memwatch.MutationError",
    )
    if not config.getoption("memwatch"):
        return
    keep = config.getoption("memwatch_keep") or config.getini("memwatch_keep") or "failed"
    if keep not in KEEP:
        raise pytest.UsageError(f"memwatch_keep must be one of {', '.join(KEEP)}, not {keep!r}")
    raw = config.getoption("memwatch_dir") or config.getini("memwatch_dir") or DEFAULT_DIR
    directory = Path(os.path.expanduser(raw))
    if not directory.is_absolute():
        directory = config.rootpath / directory
    config.pluginmanager.register(_Recorder(config, directory, keep), "memwatch-recorder")


def trace_name(nodeid: str) -> str:
    """The file name of a test's trace: its node id made safe for a file
    name (``tests/test_x.py::test_a[1-2]`` -> ``tests__test_x.py__test_a[1-2].mwt``),
    cut and given a hash of the node id when longer than :data:`MAX_NAME`."""
    name = nodeid.replace("::", "__").replace("/", "__").replace("\\", "__")
    name = _UNSAFE.sub("_", name).lstrip(".") or "test"
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 11]}-{_digest(nodeid)}"
    return name + ".mwt"


def _digest(nodeid: str) -> str:
    return hashlib.sha1(nodeid.encode(), usedforsecurity=False).hexdigest()[:10]


def _recording_elsewhere() -> str | None:
    """Where this process records already, when that is not ours to manage:
    a trace being written, or the one `memwatch record` (MEMWATCH_TRACE)
    starts at the first watch (see ``memwatch._session._auto_start``)."""
    from memwatch import _memwatch

    current = _memwatch._recording()
    if current is not None:
        return str(current)
    from memwatch import _session

    mine = _session._trace_for_this_process()
    return mine[0] if mine is not None else None


# --- recording ---------------------------------------------------------------


class _TestTrace:
    """The trace of one test while it runs."""

    __slots__ = ("path", "failed", "done", "gave_way")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failed = False
        self.done = False
        self.gave_way = False  # the test started a recording of its own


_trace_key = pytest.StashKey[_TestTrace]()


class _Recorder:
    """Records each test into its own trace (registered under ``--memwatch``)."""

    def __init__(self, config: pytest.Config, directory: Path, keep: str) -> None:
        self.config = config
        self.directory = directory
        self.keep = keep
        self.elsewhere: str | None = None  # known at the session's start
        self.made_directory = False
        self.recorded = 0
        self.kept: list[tuple[str, Path, int | None]] = []
        self.changes: dict[str, int] = {}  # trace path -> changes in it
        self.not_recorded = 0  # tests that ran while something else recorded
        self.other_recording: str | None = None
        self.problems: list[str] = []  # each distinct problem once
        self._names: dict[str, str] = {}  # file name -> node id, this session

    def show(self, path: Path) -> str:
        """``path`` as the user would type it: relative to where pytest was started, if under it."""
        try:
            return str(path.relative_to(self.config.invocation_params.dir))
        except ValueError:
            return str(path)

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

    def path_for(self, nodeid: str) -> Path:
        name = trace_name(nodeid)
        owner = self._names.setdefault(name, nodeid)
        if owner != nodeid:  # two node ids that read the same once made safe
            name = f"{name[:-4]}-{_digest(nodeid)}.mwt"
            self._names[name] = nodeid
        return self.directory / name

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        # After every pytest_configure (a conftest's may start recording),
        # before the terminal's header.
        self.elsewhere = _recording_elsewhere()

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        if self.elsewhere is not None:
            return [
                f"memwatch: this process records to {self.elsewhere} already: "
                "--memwatch records no test of its own"
            ]
        which = "failed tests" if self.keep == "failed" else "every test"
        return [f"memwatch: recording each test to {self.show(self.directory)}/ (keeping the traces of {which})"]

    def _start(self, item: pytest.Item) -> _TestTrace | None:
        import memwatch
        from memwatch import _session

        if self.elsewhere is not None:
            return None
        elsewhere = _recording_elsewhere()
        if elsewhere is not None:
            # An earlier test started its own recording: leave it be.
            self.not_recorded += 1
            self.other_recording = elsewhere
            return None
        path = self.path_for(item.nodeid)
        try:
            if not self.directory.is_dir():
                self.directory.mkdir(parents=True, exist_ok=True)
                self.made_directory = True
            for stale in (path, Path(f"{path}.journal")):
                stale.unlink(missing_ok=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                memwatch.start(trace=path)
        except Exception as e:  # noqa: BLE001 - a test must run, recorded or not
            self._problem(f"cannot record to {self.show(path)}: {type(e).__name__}: {e}")
            return None
        for w in caught:
            self._problem(str(w.message))
        trace = _TestTrace(path)
        item.stash[_trace_key] = trace
        self.recorded += 1
        _session._give_way = lambda: self._give_way(trace)
        return trace

    def _give_way(self, trace: _TestTrace) -> None:
        """The test calls memwatch.start(): this trace ends there."""
        from memwatch import _session

        _session._give_way = None
        trace.gave_way = True
        self._stop(trace)

    def _stop(self, trace: _TestTrace) -> None:
        import memwatch

        try:
            result = memwatch.stop()
        except Exception as e:  # noqa: BLE001 - report it, go on with the next test
            self._problem(f"cannot close {self.show(trace.path)}: {type(e).__name__}: {e}")
            return
        if result is not None:
            self.changes[str(trace.path)] = int(result["changes"])

    def _finish(self, item: pytest.Item, trace: _TestTrace, report: pytest.TestReport | None) -> None:
        from memwatch import _memwatch, _session

        trace.done = True
        _session._give_way = None
        current = _memwatch._recording()
        if current is not None and Path(current) == trace.path:
            self._stop(trace)
        # Else the test stopped this recording itself (memwatch.stop(), or
        # memwatch.start() of its own).
        if trace.failed or self.keep == "all":
            if trace.path.exists():
                # The teardown report carries it to pytest_runtest_logreport
                # (and to a JUnit XML file, as a property of the test).
                item.user_properties.append(("memwatch_trace", str(trace.path)))
                if report is not None:
                    report.user_properties.append(("memwatch_trace", str(trace.path)))
                else:
                    self.kept.append((item.nodeid, trace.path, self.changes.get(str(trace.path))))
        else:
            for p in (trace.path, Path(f"{trace.path}.journal")):
                p.unlink(missing_ok=True)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
        trace = self._start(item)
        try:
            return (yield)
        finally:
            if trace is not None and not trace.done:  # no teardown report came
                self._finish(item, trace, None)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        trace = item.stash.get(_trace_key, None)
        if trace is None or trace.done:
            return report
        if report.failed:
            trace.failed = True
            self._name_trace(report, trace)
        if report.when == "teardown":
            self._finish(item, trace, report)
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Here rather than in _finish: this also sees the tests that
        # pytest-xdist's workers ran.
        if report.when != "teardown":
            return
        for name, value in report.user_properties:
            if name == "memwatch_trace":
                self.kept.append((report.nodeid, Path(value), self.changes.get(str(value))))

    def _name_trace(self, report: pytest.TestReport, trace: _TestTrace) -> None:
        shown = shlex.quote(self.show(trace.path))
        span = "setup to its own memwatch.start()" if trace.gave_way else "setup to teardown"
        text = (
            f"trace of this test ({span}): {self.show(trace.path)}\n"
            f"read it with: memwatch summary {shown}   or   memwatch query {shown}"
        )
        longrepr = report.longrepr
        if hasattr(longrepr, "addsection"):
            longrepr.addsection("memwatch", text)
        else:
            report.sections.append(("memwatch", text))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        lines: list[str] = []
        if self.elsewhere is not None:
            lines.append(
                f"no test recorded: this process records to {self.elsewhere} already "
                "(memwatch record, MEMWATCH_TRACE or memwatch.start())"
            )
        elif self.kept:
            which = "failed tests only; --memwatch-keep=all keeps every one" if self.keep == "failed" else "every test"
            lines.append(f"{len(self.kept)} trace(s) kept in {self.show(self.directory)}/ ({which}):")
            shown = self.kept if tr.config.option.verbose > 0 else self.kept[:SUMMARY_LINES]
            for nodeid, path, changes in shown:
                count = "" if changes is None else f" ({changes} change{'' if changes == 1 else 's'})"
                lines.append(f"  {nodeid}: {self.show(path)}{count}")
            if len(shown) < len(self.kept):
                lines.append(f"  ... and {len(self.kept) - len(shown)} more (-v lists them all)")
            example = shlex.quote(self.show(self.kept[0][1]))
            lines.append(
                f"read one with: memwatch summary {example}, memwatch query {example} "
                "(or memwatch.open_trace(path) in Python)"
            )
        elif self.recorded:
            lines.append(
                f"{self.recorded} test(s) recorded, none failed: no trace kept "
                "(--memwatch-keep=all keeps every one)"
            )
        if self.not_recorded:
            lines.append(
                f"{self.not_recorded} test(s) not recorded: the process was recording to "
                f"{self.other_recording} (memwatch.start() in a test); --memwatch leaves that recording alone"
            )
        lines.extend(self.problems)
        if not lines:
            return
        tr.write_sep("-", "memwatch")
        for line in lines:
            tr.write_line(line)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.made_directory:
            try:
                self.directory.rmdir()  # only when no trace was kept in it
            except OSError:
                pass


@pytest.fixture
def memwatch_trace(request: pytest.FixtureRequest) -> Path | None:
    """The trace this test is recorded into under ``--memwatch`` (a
    ``pathlib.Path``; it is still being written), else None."""
    trace = request.node.stash.get(_trace_key, None)
    return None if trace is None else trace.path


# --- freezing ----------------------------------------------------------------


class _Freezer:
    """The objects the plugin froze for one test, and every change made to a
    frozen object while it runs (``memwatch._guard.violation_listeners``):
    a change to one of its objects fails the test even when its
    ``MutationError`` was raised in another thread, or caught."""

    def __init__(self) -> None:
        from memwatch import _freeze, _guard

        self._guard = _guard
        self._freeze = _freeze
        self.tags: set[str] = set()
        self.seen: list[Change] = []
        self.reported: set[int] = set()
        self.fixture_frozen: list[Any] = []
        self.main_thread = threading.get_native_id()
        _guard.violation_listeners.append(self.seen.append)

    def freeze(self, obj: Any, name: str | None, frame: Any) -> None:
        self._freeze.freeze(obj, name, _frame=frame)
        self.tags.update(self._freeze._frozen[id(obj)][-1].tags)

    def thaw(self, objs: list[Any]) -> list[MutationError]:
        """Unfreezes ``objs`` (last frozen first); returns the errors of the
        changes still pending."""
        from memwatch import MutationError, NotWatchedError

        errors = []
        for obj in reversed(objs):
            try:
                self._freeze.unfreeze(obj)
            except MutationError as e:
                errors.append(e)
            except NotWatchedError:
                pass  # the test unfroze it itself
        objs.clear()
        return errors

    def check(self, raised: BaseException | None, pending: list[MutationError]) -> BaseException | None:
        """The error to fail the test with for the changes to its frozen
        objects not yet reported, when ``raised`` (what the test raised, if
        anything) is not that error already; else None (a note on ``raised``
        tells of them, when it is another failure)."""
        if raised is not None and getattr(raised, "change", None) is not None:
            self.reported.add(raised.change.seq)  # type: ignore[union-attr]
        new = [c for c in self.seen if c.tag in self.tags and c.seq not in self.reported]
        # A change the test's own watch(action="raise") asked to raise for,
        # seen only now (its line was the test's last).
        other = [e for e in pending if e.change.tag not in self.tags and e.change.seq not in self.reported]
        if not new:
            if other and raised is None:
                self.reported.add(other[0].change.seq)
                return _at_writing_line(other[0], other[0].change)
            return None
        self.reported.update(c.seq for c in new)
        first = new[0]
        err = next((e for e in pending if e.change.seq == first.seq), None)
        if err is None:
            err = self._guard.mutation_error(first, self._guard._FROZEN.why, None)
        if first.thread_id != self.main_thread:
            err.add_note(
                f"memwatch: written in thread {first.thread_name!r}: the MutationError was raised "
                "there, and the test fails for it"
            )
        elif raised is None and first.seq not in self._guard._waiting and all(e.change.seq != first.seq for e in pending):
            # Raised in the test (no longer waiting to be), yet the test passed.
            err.add_note("memwatch: the test caught this MutationError; the test fails for it all the same")
        if len(new) > 1:
            err.add_note(f"memwatch: {len(new) - 1} more change(s) to frozen objects in this test")
        if raised is None:
            return _at_writing_line(err, first)
        if isinstance(raised, Exception | pytest.fail.Exception):
            raised.add_note(f"memwatch: also, {err}")
        return None

    def close(self) -> None:
        try:
            self._guard.violation_listeners.remove(self.seen.append)
        except ValueError:
            pass


_freezer_key = pytest.StashKey[_Freezer]()


def _freezer(item: pytest.Item) -> _Freezer:
    freezer = item.stash.get(_freezer_key, None)
    if freezer is None:
        freezer = item.stash[_freezer_key] = _Freezer()
    return freezer


def _at_writing_line(err: BaseException, change: Change) -> BaseException:
    """``err`` with a traceback whose last entry is the line that made
    ``change``, for a change seen after the code that made it returned (in
    another thread, or on the test's last line): the failure report then
    shows that line, as it does for an error raised where it was written."""
    file, line = change.file, change.line
    if not file or not line or line < 1 or not os.path.exists(file):
        return err
    try:
        code = compile("raise __memwatch_error__\n", file, "exec")
        code = code.replace(co_firstlineno=line, co_name=change.function or "<module>")
        exec(code, {"__memwatch_error__": err})  # noqa: S102 - raises err from that line
    except BaseException as e:  # noqa: BLE001 - err itself
        if e is err and e.__traceback__ is not None and e.__traceback__.tb_next is not None:
            return err.with_traceback(e.__traceback__.tb_next)
    return err


def _free_tag(name: str, test: str) -> str:
    """The tag a marked object is watched under, when it is not watched
    yet: the marker's name, unless another watch has it (an earlier test's
    object can outlive it, kept by a traceback): then one naming the test."""
    from memwatch import _memwatch

    taken = {tag for _, tag, *_ in _memwatch._regions()} | {tag for _, tag, _ in _memwatch._object_watches()}
    tag, n = name, 1
    while tag in taken:
        n += 1
        tag = f"{name} ({test})" if n == 2 else f"{name} ({test}, {n - 1})"
    return tag


def _nameless_frame() -> Any:
    """A frame with no name for anything: what ``freeze`` is given for an
    object the marker names, so that its watch has the marker's name as its
    tag and no variable (the object has no variable in the plugin's code)."""
    return sys._getframe()


def _marked_names(item: pytest.Item) -> list[str]:
    """The names the test's memwatch_frozen markers give, checked."""
    names: list[str] = []
    for mark in item.iter_markers(FROZEN_MARKER):
        if mark.kwargs:
            pytest.fail(
                f"@pytest.mark.{FROZEN_MARKER} takes only names, not {', '.join(sorted(mark.kwargs))}=",
                pytrace=False,
            )
        if not mark.args:
            pytest.fail(f"@pytest.mark.{FROZEN_MARKER}() needs the names of fixtures to freeze", pytrace=False)
        for name in mark.args:
            if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
                pytest.fail(
                    f"@pytest.mark.{FROZEN_MARKER}: {name!r} is not a fixture name or a dotted path "
                    "('model.weight')",
                    pytrace=False,
                )
            names.append(name)
    return names


def _fixtures_of(item: pytest.Item) -> list[str]:
    return sorted(n for n in getattr(item, "fixturenames", ()) if n != "request")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker(FROZEN_MARKER) is None:
        return
    if not isinstance(item, pytest.Function):
        pytest.fail(f"@pytest.mark.{FROZEN_MARKER} is for test functions, not {type(item).__name__}", pytrace=False)
    have = _fixtures_of(item)
    for name in _marked_names(item):
        root = name.split(".")[0]
        if root not in have:
            pytest.fail(
                f"@pytest.mark.{FROZEN_MARKER}({name!r}): {root!r} is not a fixture of {item.name} "
                f"(its fixtures: {', '.join(have) or 'none'})",
                pytrace=False,
            )


def _resolve(item: pytest.Function, name: str) -> Any:
    root, *attrs = name.split(".")
    obj = item.funcargs[root]
    path = root
    missing = object()
    for attr in attrs:
        value = getattr(obj, attr, missing)
        if value is missing:
            pytest.fail(
                f"@pytest.mark.{FROZEN_MARKER}({name!r}): {path} (a {type(obj).__name__}) has no attribute {attr!r}",
                pytrace=False,
            )
        obj, path = value, f"{path}.{attr}"
    return obj


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    __tracebackhide__ = True
    marked = isinstance(item, pytest.Function) and item.get_closest_marker(FROZEN_MARKER) is not None
    freezer = item.stash.get(_freezer_key, None)
    if not marked and freezer is None:
        return (yield)
    from memwatch import MutationError, _memwatch

    freezer = _freezer(item)
    frozen: list[Any] = []
    if marked:
        assert isinstance(item, pytest.Function)
        try:
            for name in _marked_names(item):
                obj = _resolve(item, name)
                problem = None
                try:
                    freezer.freeze(obj, _free_tag(name, item.name), _nameless_frame())
                except Exception as e:  # noqa: BLE001 - told as a usage error
                    problem = f"{type(e).__name__}: {e}"
                if problem is not None:
                    pytest.fail(
                        f"@pytest.mark.{FROZEN_MARKER}({name!r}): cannot freeze this {type(obj).__name__}: {problem}",
                        pytrace=False,
                    )
                frozen.append(obj)
        except BaseException:
            freezer.thaw(frozen)
            raise
    try:
        result = yield
    except BaseException as e:
        pending = _pending(MutationError, _memwatch) + freezer.thaw(frozen)
        freezer.check(e, pending)
        raise
    pending = _pending(MutationError, _memwatch) + freezer.thaw(frozen)
    err = freezer.check(None, pending)
    if err is not None:
        raise err
    return result


def _pending(error: type[MutationError], native: Any) -> list[MutationError]:
    """The errors of changes made on the test's last line (seen only now)."""
    try:
        native.check()
    except error as e:
        return [e]
    return []


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    try:
        return (yield)
    finally:
        freezer = item.stash.get(_freezer_key, None)
        if freezer is not None:
            freezer.close()


@pytest.fixture
def memwatch_freeze(request: pytest.FixtureRequest) -> Generator[Callable[..., Any], None, None]:
    """A function that freezes an object for the rest of the test
    (``memwatch_freeze(obj, name=None)``, returning ``obj``): a change to it
    fails the test with ``memwatch.MutationError``, also when made in
    another thread. The objects are unfrozen when the fixture is torn down."""
    from memwatch import MutationError, _memwatch

    freezer = _freezer(request.node)

    def freeze(obj: Any, name: str | None = None) -> Any:
        freezer.freeze(obj, name, sys._getframe(1))
        freezer.fixture_frozen.append(obj)
        return obj

    yield freeze
    __tracebackhide__ = True
    pending = _pending(MutationError, _memwatch) + freezer.thaw(freezer.fixture_frozen)
    err = freezer.check(None, pending)
    if err is not None:
        raise err
