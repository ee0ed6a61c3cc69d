"""memwatch: record and replay memory changes in Python programs.

Watch a buffer, a tensor or an object; memwatch catches every change to it,
with the exact bytes, the line that made it and the variable, reports it live
and records it to a compact trace (``.mwt``) that the ``memwatch`` command
queries offline.

Watching buffers (``watch``, ``unwatch``, ``watching``, ``on_change``,
``history``, ``start``/``stop``), watching Python objects
(``watch_object``), watching variables (``watch_var``), watching torch
models and optimizers (``watch_module``, ``watch_optimizer``), stopping at a change as it happens
(``frozen``, ``freeze``/``unfreeze``, ``watch(condition=, action=)``), explaining autograd's
"modified by an inplace operation" errors (``explain_inplace``) and reading traces back (``open_trace``,
and the ``memwatch`` command: ``record``, ``query``, ``state``, ``blame``,
``summary``, ``dump``) work today.

>>> import memwatch
>>> memwatch.FORMAT_VERSION
4
>>> issubclass(memwatch.NotATraceError, memwatch.MemwatchError)
True
"""

from memwatch._api import watch, watching
from memwatch._freeze import freeze, frozen, unfreeze
from memwatch._session import configure, on_change, start, stop
from memwatch._unwatch import unwatch
from memwatch import _ipython
from memwatch._ipython import load_ipython_extension, unload_ipython_extension
from memwatch._objects import watch_object
from memwatch._torch_module import ModuleWatchHandle, OptimizerWatchHandle, watch_module, watch_optimizer
from memwatch._torch_inplace import explain_inplace
from memwatch._vars import VarWatchHandle, watch_var
from memwatch._memwatch import (
    FORMAT_VERSION,
    Change,
    MemwatchError,
    MutationError,
    NotATraceError,
    NotWatchedError,
    ObjectWatchHandle,
    Process,
    TraceCorruptError,
    TraceError,
    TraceTruncatedError,
    TraceVersionError,
    UnsupportedError,
    WatchHandle,
    __version__,
    backend,
    check,
    clear_history,
    Trace,
    history,
    open_trace,
    remove_callback,
    trace_info,
)

__all__ = [
    "FORMAT_VERSION",
    "Change",
    "MemwatchError",
    "ModuleWatchHandle",
    "MutationError",
    "NotATraceError",
    "NotWatchedError",
    "ObjectWatchHandle",
    "OptimizerWatchHandle",
    "Process",
    "TraceCorruptError",
    "TraceError",
    "TraceTruncatedError",
    "TraceVersionError",
    "UnsupportedError",
    "VarWatchHandle",
    "WatchHandle",
    "__version__",
    "backend",
    "check",
    "clear_history",
    "configure",
    "explain_inplace",
    "freeze",
    "frozen",
    "Trace",
    "history",
    "on_change",
    "open_trace",
    "remove_callback",
    "start",
    "stop",
    "trace_info",
    "unfreeze",
    "unwatch",
    "watch",
    "watch_module",
    "watch_object",
    "watch_optimizer",
    "watch_var",
    "watching",
]

_ipython._in_ipython()
