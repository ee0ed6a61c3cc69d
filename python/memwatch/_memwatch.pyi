"""Type stubs for the native module ``memwatch._memwatch`` (built from recorder/)."""

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

