"""Type stubs for the native module ``memwatch._memwatch`` (built from recorder/)."""

import datetime
from os import PathLike
from typing import Any, Literal, TypedDict

__version__: str
FORMAT_VERSION: int

class MemwatchError(Exception):
    """Base class of every memwatch error."""

class TraceError(MemwatchError):
    """A trace file cannot be read."""

class NotATraceError(TraceError):
    """The file is not a memwatch trace."""

class TraceVersionError(TraceError):
    """The trace was written by a newer memwatch."""

class TraceTruncatedError(TraceError):
    """The trace ends early."""

class TraceCorruptError(TraceError):
    """The trace is damaged."""

class TraceInfo(TypedDict):
    path: str
    version: int
    pid: int
    argv: list[str]
    python_version: str
    platform: str
    page_size: int
    start_time_ns: int
    writer: str
    properties: dict[str, str]
    chunks: int
    file_bytes: int
    tail: Literal["closed", "unclosed", "truncated"]
    bytes_ignored: int

def trace_info(path: str | PathLike[str]) -> TraceInfo:
    """Read a trace's header and framing (cheap: no record is decoded).

    Raises FileNotFoundError, NotATraceError, TraceVersionError,
    TraceTruncatedError or TraceCorruptError.
    """

def _cli_main(argv: list[str]) -> int:
    """Run the memwatch command line (program name first); return the exit status."""


class WatchHandle:
    """A watched region, as ``watch`` returns it."""

    region: int
    tag: str
    variable: str | None
    address: int
    size: int
    dtype: str | None
    tracking: str
    """``"compare"``, ``"uffd-wp-async"`` (line mode) or ``"uffd-wp-step"`` (store mode)."""
    tracking_note: str | None

class ObjectWatchHandle:
    """A watched Python object, as ``watch_object`` returns it."""

    watch: int
    tag: str
    variable: str | None
    depth: int
    repr_limit: int
    mechanism: Literal["dict-watcher", "dict-watcher+compare", "compare"]

class Change:
    """One change to one watched region or Python object."""

    seq: int
    """Position in its process's sequence of events, from 1."""
    time_ns: int
    """When the change was seen, nanoseconds since the Unix epoch."""
    pid: int
    """The process that made it (a trace's recorded process; this one, live)."""
    rank: int | None
    """That process's ``$RANK`` (torchrun), if it had one."""
    tag: str
    variable: str | None
    thread_id: int
    thread_name: str
    @property
    def kind(self) -> str:
        """``"bytes"``, or what happened to an object (``"setattr"``, ``"append"``, ...)."""
    @property
    def key(self) -> str | None:
        """Where in a watched object (``.lr``, ``['k']``, ``[3]``); None for bytes or the whole object."""
    @property
    def old_repr(self) -> str | None: ...
    @property
    def new_repr(self) -> str | None: ...
    @property
    def address(self) -> int | None: ...
    @property
    def offset(self) -> int | None: ...
    @property
    def ranges(self) -> list[tuple[int, bytes, bytes]]: ...
    @property
    def old(self) -> bytes | None: ...
    @property
    def new(self) -> bytes | None: ...
    @property
    def dtype(self) -> str | None: ...
    @property
    def indices(self) -> list[int | tuple[int, ...]] | None: ...
    @property
    def old_values(self) -> list[Any] | None: ...
    @property
    def new_values(self) -> list[Any] | None: ...
    @property
    def file(self) -> str | None: ...
    @property
    def location(self) -> str | None: ...
    @property
    def line(self) -> int | None: ...
    @property
    def function(self) -> str | None: ...
    @property
    def stack(self) -> list[tuple[str, int, str]]: ...
    @property
    def op(self) -> str | None:
        """The torch op that made the change (``"aten::add_.Tensor"``), for a tensor watched ``via="dispatch"``."""
    def report(self) -> str:
        """The ``[MEMWATCH]`` report of this change, as the live report prints it."""
    def _nonfinite(self) -> bool: ...

class Process:
    """One process of a recorded run, as ``Trace.processes`` lists it."""

    pid: int
    rank: int | None
    """``$RANK`` (torchrun), if it had one."""
    parent: int | None
    """The pid of the process that started it; None for the run's root."""
    path: Any
    """Its trace (a ``pathlib.Path``)."""
    argv: list[str]
    start_time_ns: int
    """When its trace started, ns since the Unix epoch."""
    start_offset_ns: int
    """How long after the run's first process it started, in ns."""
    tail: Literal["closed", "unclosed", "truncated"]
    """How its trace ends."""
    note: str | None
    """What the reader says about an ending other than a clean close."""

_Pids = int | list[int] | tuple[int, ...]

class Trace:
    """A recorded trace, opened for reading (``open_trace``), with the other
    traces of its run (forks, multiprocessing, subprocesses, torchrun's ranks)."""

    path: Any
    @property
    def tags(self) -> list[str]:
        """Every tag, in every process of the run, sorted."""
    @property
    def meta(self) -> TraceInfo:
        """The trace opened's header (the run's root), and how it ends."""
    @property
    def processes(self) -> list[Process]:
        """Every process read: the trace opened first, then the others by rank and pid."""
    def changes(
        self,
        tag: str | None = None,
        file: str | None = None,
        line: int | None = None,
        function: str | None = None,
        thread: str | None = None,
        seq: tuple[int, int] | None = None,
        limit: int | None = None,
        pid: _Pids | None = None,
    ) -> list[Change]:
        """The changes matching every filter; a run's processes merged by time."""
    def state(
        self, tag: str, at: int | str | datetime.timedelta | None = None, pid: int | None = None
    ) -> Any: ...
    def blame(
        self,
        tag: str,
        index: int | tuple[int, ...] | None = None,
        offset: int | None = None,
        at: int | str | datetime.timedelta | None = None,
        pid: int | None = None,
    ) -> Change | None: ...
    def to_pandas(self, elements: bool = False, tag: str | None = None, pid: _Pids | None = None) -> Any: ...

class NotWatchedError(MemwatchError): ...
class UnsupportedError(MemwatchError): ...

class MutationError(MemwatchError):
    """A frozen object, or one watched with ``action="raise"``, changed."""

    change: Change

def open_trace(path: str | PathLike[str], pid: _Pids | None = None) -> Trace: ...
def backend() -> str: ...
def _store_stats() -> dict[str, int]: ...
def _frame_walker_in_use() -> bool | None: ...
def _vars_changed(relevant: Any, check: Any, active: bool, names: Any, missing: Any, keyed: bool) -> None: ...
def _vars_forgot_frames() -> None: ...
def check() -> None: ...
def _check_op(regions: list[int], op: str, skip: int = 0) -> list[int]:
    """``check()`` right after torch op ``op`` wrote ``regions``; returns those not watched any more."""
def _set_guard_hooks(on_change: Any, fire: Any) -> None: ...
def _set_guarded(tag: str, on: bool) -> None: ...
def _forget_threads(alive: list[int]) -> None: ...
def _unraisable(exc: BaseException, obj: Any) -> None: ...
def on_change(callback: Any) -> Any: ...
def remove_callback(callback: Any) -> None: ...
def history(name: str | None = None) -> list[Change]: ...
def location(file: str, line: int) -> str: ...
def _decode(dtype: str, b: bytes) -> Any: ...
def clear_history() -> None: ...
