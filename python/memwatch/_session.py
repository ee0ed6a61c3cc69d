"""The recording session of this process: start, stop and configure, the
automatic start under `memwatch record`, the traces of every process of a
run, and what happens at fork and exit.

It sits below every way of watching (``_api``, ``_objects``, ``_vars``):
they call :func:`_auto_start` after a watch, and nothing here calls them."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from memwatch import _memwatch, _scope
from memwatch._memwatch import Change

_auto_started = False


def _auto_start() -> None:
    """Under `memwatch record` (MEMWATCH_TRACE), the first watch starts
    recording: to the trace itself in the process `memwatch record`
    started, to a trace of its own beside it in every other process of the
    run (see :func:`_trace_for_this_process`)."""
    global _auto_started, _run
    if _auto_started or _memwatch._recording() is not None:
        return
    mine = _trace_for_this_process()
    if mine is None:
        return
    _auto_started = True
    path, root, is_root = mine
    if is_root:
        start(trace=path)
        return
    _run = {"id": os.environ.get("MEMWATCH_RUN") or _new_run_id(), "root": root}
    try:
        _start_member(path)
    except Exception as e:  # noqa: BLE001 - the program goes on, and says so
        _warn_child(f"this process (pid {os.getpid()}) records nothing: {e}")


# --- runs of several processes ---------------------------------------------
#
# A run is the process that records (the one `memwatch record` started, or
# one that called start()) and every process started from it: each writes
# a trace of its own beside the root trace, `<stem>.<pid>.mwt` (with $RANK,
# `<stem>.rank<R>.<pid>.mwt`), whose header names the run (`run`, `root`,
# `parent`, `rank` properties). Readers find a run's traces by those names
# and headers: nothing is written to the root trace for them, so a parent
# that dies (or never watched anything) loses none of its children.

# The run this process records in: {"id": ..., "root": root trace path}.
_run: dict[str, str] | None = None


def _new_run_id() -> str:
    import time

    return f"{os.getpid()}-{time.time_ns()}"


def _rank() -> str | None:
    """$RANK (torchrun, torch.distributed launchers) when it is a number."""
    r = os.environ.get("RANK", "").strip()
    return r if r.isdigit() else None


def _member_path(root: str | os.PathLike[str], pid: int) -> str:
    """The trace of process ``pid`` of the run whose root trace is ``root``."""
    d, name = os.path.split(os.path.abspath(root))
    stem = name[: -len(".mwt")] if name.endswith(".mwt") and len(name) > 4 else name
    rank = _rank()
    return os.path.join(d, f"{stem}.rank{rank}.{pid}.mwt" if rank is not None else f"{stem}.{pid}.mwt")


def _trace_for_this_process() -> tuple[str, str, bool] | None:
    """Under `memwatch record` (or MEMWATCH_TRACE): ``(trace, root trace,
    is_root)`` for this process, else None. The root is the process whose
    parent is $MEMWATCH_TRACE_PARENT (`memwatch record` itself)."""
    trace_env = os.environ.get("MEMWATCH_TRACE")
    if not trace_env:
        return None
    parent = os.environ.get("MEMWATCH_TRACE_PARENT")
    if parent is None or parent == str(os.getppid()):
        return trace_env, trace_env, True
    return _member_path(trace_env, os.getpid()), trace_env, False


def _run_properties(is_root: bool) -> list[tuple[str, str]]:
    assert _run is not None
    props = [("run", _run["id"])]
    if not is_root:
        props += [("root", os.path.basename(_run["root"])), ("parent", str(os.getppid()))]
    rank = _rank()
    if rank is not None:
        props.append(("rank", rank))
    return props


def _start_member(path: str) -> None:
    """Starts this process's own trace of the run ``_run``."""
    _memwatch._start(Path(path), list(sys.argv), sys.version.split()[0], _run_properties(False))
    _close_with_multiprocessing()


def _close_with_multiprocessing() -> None:
    """A multiprocessing child ends with ``os._exit`` (no atexit) after its
    own finalizers: close the trace among them, last, so that it ends
    cleanly. (Were it not closed, its journal would still hold every
    record.)"""
    mp = sys.modules.get("multiprocessing")
    if mp is None or mp.parent_process() is None:
        return
    try:
        from multiprocessing import util

        util.Finalize(None, _shutdown, exitpriority=-(2**31))
    except Exception:  # noqa: BLE001 - closing at exit is a nicety here
        pass


def _warn_child(msg: str) -> None:
    """A warning from a process of a run (it must not stop the program, even
    where warnings are errors)."""
    try:
        warnings.warn(f"memwatch: {msg}", RuntimeWarning, stacklevel=3)
    except Exception:  # noqa: BLE001
        sys.stderr.write(f"memwatch: {msg}\n")


def _after_fork_in_child() -> None:
    """``os.fork()`` (multiprocessing's fork and forkserver, too), in the
    child: the recorder starts clean with the parent's watches, and a child
    of a recording process records to its own trace of the run."""
    try:
        recording, problems = _memwatch._after_fork_child()
        for p in problems:
            _warn_child(f"in the fork child {os.getpid()}: {p}")
        if recording and _run is not None:
            path = _member_path(_run["root"], os.getpid())
            try:
                _start_member(path)
            except Exception as e:  # noqa: BLE001
                _warn_child(f"the fork child {os.getpid()} records nothing: {e}")
    except Exception as e:  # noqa: BLE001 - never a traceback from a fork
        _warn_child(f"the fork child {os.getpid()} could not set up recording: {e}")


def configure(
    *,
    live: bool | Literal["short"] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    max_history: int | None = None,
    max_history_bytes: int | None = None,
) -> dict[str, Any]:
    """Set options; ``None`` leaves one as it is. Returns them all.

    - ``live``: print a ``[MEMWATCH]`` report per change to stderr when no
      callback takes it. By default reports are printed unless a trace is
      recording; ``live=True`` (or ``MEMWATCH_LIVE=1``) prints them while
      recording too, ``live=False`` (or ``MEMWATCH_LIVE=0``) never.
      ``live="short"`` (or ``MEMWATCH_LIVE=short``, ``memwatch record
      --live=short``) prints one line per change instead, also while
      recording: ``memwatch: #12 w [3] 0.5 -> 0.25 (+15 more) train.py:12 in
      step``. The returned ``live`` is ``True``, ``False`` or ``"short"``.
    - ``include`` / ``exclude``: which code is in scope (paths or globs).
    - ``max_history``: how many changes :func:`history` keeps (default 100,000).
    - ``max_history_bytes``: how many bytes of old and new values it keeps
      (default 64 MiB); the oldest changes go first, and a change larger
      than this is not kept.
    """
    for value, label in ((max_history, "max_history"), (max_history_bytes, "max_history_bytes")):
        if value is not None and value < 0:
            raise ValueError(f"{label} must be >= 0")
    for value, label in ((include, "include"), (exclude, "exclude")):
        if value is not None and (isinstance(value, str | bytes) or not all(isinstance(p, str | os.PathLike) for p in value)):
            raise TypeError(f"{label}= must be a list of paths or globs")
    if include is not None or exclude is not None:
        _scope.set_patterns(
            [os.fspath(p) for p in include] if include is not None else None,
            [os.fspath(p) for p in exclude] if exclude is not None else None,
        )
        _memwatch._rescope()
    opts = dict(_memwatch._configure(live, max_history, max_history_bytes))
    inc, exc = _scope.patterns()
    opts["include"], opts["exclude"] = inc, exc
    return opts


# Set while a recording that gives way to the program's own is on (the
# pytest plugin's trace of the running test): start() calls it first, and
# it stops that recording.
_give_way: Callable[[], None] | None = None


def start(trace: str | os.PathLike[str] = "memwatch.mwt") -> None:
    """Record every change of every watch to ``trace`` until :func:`stop`
    (or interpreter exit). Regions already watched are recorded with their
    current contents."""
    global _run
    path = Path(trace)
    if _give_way is not None and _memwatch._recording() is not None:
        _give_way()
    if _memwatch._recording() is None:
        # Processes forked from here on record to traces of their own beside it.
        _run = {"id": os.environ.get("MEMWATCH_RUN") or _new_run_id(), "root": os.path.abspath(path)}
    _memwatch._start(path, list(sys.argv), sys.version.split()[0], _run_properties(True) if _run else [])


def stop() -> dict[str, Any] | None:
    """Stop recording and close the trace. Returns ``{"path", "changes",
    "bytes"}``, or ``None`` when nothing was recording."""
    result = _memwatch._stop()
    if result is None:
        return None
    path, changes, nbytes = result
    return {"path": str(path), "changes": changes, "bytes": nbytes}


def on_change(callback: Callable[[Change], Any]) -> Callable[[Change], Any]:
    """Call ``callback(change)`` for every change (usable as a decorator).
    While any callback is registered the live report is not printed."""
    return _memwatch.on_change(callback)


def _shutdown() -> None:
    """At exit: report what is pending, close the trace, release buffers.
    Problems are one line on stderr, never a traceback."""
    try:
        _memwatch._shutdown()
    except Exception as e:  # noqa: BLE001 - exit must go on
        print(f"memwatch: {e}", file=sys.stderr)


_memwatch._set_hooks(_scope.in_scope, threading.current_thread, sys, _scope.display_name)
atexit.register(_shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
# MEMWATCH_TRACE set by hand: this process is the root of the run, and
# the processes it starts record beside it.
if os.environ.get("MEMWATCH_TRACE") and "MEMWATCH_TRACE_PARENT" not in os.environ:
    os.environ["MEMWATCH_TRACE_PARENT"] = str(os.getppid())
    os.environ.setdefault("MEMWATCH_RUN", _new_run_id())
