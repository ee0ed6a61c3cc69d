"""memwatch: record and replay memory changes in Python programs.

Watch a buffer, a tensor or an object; memwatch catches every change to it,
with the exact bytes, the line that made it and the variable, reports it live
and records it to a compact trace (``.mwt``) that the ``memwatch`` command
queries offline.

This release ships the trace format, its reader and ``memwatch dump``; the
recorder (``watch``, ``on_change``, ``start``) lands next.

>>> import memwatch
>>> memwatch.FORMAT_VERSION
1
>>> issubclass(memwatch.NotATraceError, memwatch.MemwatchError)
True
"""

from memwatch._memwatch import (
    FORMAT_VERSION,
    MemwatchError,
    NotATraceError,
    TraceCorruptError,
    TraceError,
    TraceTruncatedError,
    TraceVersionError,
    __version__,
    trace_info,
)

__all__ = [
    "FORMAT_VERSION",
    "MemwatchError",
    "NotATraceError",
    "TraceCorruptError",
    "TraceError",
    "TraceTruncatedError",
    "TraceVersionError",
    "__version__",
    "trace_info",
]
