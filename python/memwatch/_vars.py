"""Watching variables: ``watch_var``, and the two helpers the native
recorder calls at line boundaries of code that binds a watched name.

How it works: each code object's store instructions (``STORE_FAST``,
``STORE_NAME``, ``STORE_GLOBAL``, ``STORE_DEREF`` and their ``DELETE_``
forms) are read once, the first time the code reaches a line boundary while
a variable is watched. Code that binds no watched name is never looked at
again. In code that does, at each line boundary and return, the watched
names' values are compared by identity with the values seen at the last
boundary: locals per frame, globals per module (so that the module and a
function with ``global x`` compare against the same value).
"""

from __future__ import annotations

import dis
import fnmatch
import os
import re
import sys
import threading
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

from memwatch import _guard, _memwatch
from memwatch._memwatch import NotWatchedError
from memwatch._names import DEFAULT_REPR_LIMIT, _bounded_repr
from memwatch._session import _auto_start

_MISSING = object()
_NAME = re.compile(r"^[A-Za-z_*?\[\]!][A-Za-z0-9_*?\[\]!]*$")

_LOCAL_OPS = {"STORE_FAST", "DELETE_FAST", "STORE_DEREF", "DELETE_DEREF", "STORE_NAME", "DELETE_NAME"}
_GLOBAL_OPS = {"STORE_GLOBAL", "DELETE_GLOBAL"}
# 3.13 fuses some stores with the next load or store; argval is a pair.
_PAIR_OPS = {"STORE_FAST_STORE_FAST": (True, True), "STORE_FAST_LOAD_FAST": (True, False)}


@dataclass(eq=False)
class VarWatchHandle:
    """A watched variable pattern, as :func:`memwatch.watch_var` returns it.

    ``pattern`` is the name or glob, ``tag`` the tag its changes carry,
    ``scope`` the code it is limited to (``None``: all in-scope code).
    """

    pattern: str
    tag: str
    scope: tuple[Any, ...] | None
    repr_limit: int
    _codes: frozenset[Any] = field(default=frozenset(), repr=False)
    _files: tuple[str, ...] = field(default=(), repr=False)

    def covers(self, code: types.CodeType) -> bool:
        if self.scope is None:
            return True
        if code in self._codes:
            return True
        f = os.path.realpath(code.co_filename) if code.co_filename else ""
        return any(fnmatch.fnmatchcase(f, p) for p in self._files)


@dataclass(eq=False)
class KeyWatchHandle:
    """An object watched through a fingerprint, as
    ``memwatch.watch_object(obj, key=...)`` returns it: ``tag``, the ``key``
    function, and ``last``, the fingerprint seen last."""

    tag: str
    variable: str | None
    key: Any
    repr_limit: int
    last: Any = field(default=None, repr=False)
    _ref: Any = field(default=None, repr=False)
    _id: int = field(default=0, repr=False)

    def target(self) -> Any:
        return self._ref() if callable(self._ref) else self._ref


def default_fingerprint(obj: Any) -> tuple[int, str, Any]:
    """``(id, type name, hash)`` of ``obj`` (hash ``None`` when unhashable)."""
    try:
        h: Any = hash(obj)
    except TypeError:
        h = None
    return (id(obj), type(obj).__qualname__, h)


_watches: list[VarWatchHandle] = []
_keyed: list[KeyWatchHandle] = []
_lock = threading.Lock()
# Per code object: ((name, is_global, (watch, ...)), ...) of the watched
# names it binds. Holding the code objects keeps the native cache's
# addresses valid.
_binds: dict[types.CodeType, tuple[tuple[str, bool, tuple[VarWatchHandle, ...]], ...]] = {}
# Per frame (by id, holding the frame): the watched locals' last values.
_frames: dict[int, tuple[types.FrameType, dict[str, Any]]] = {}
# Per (globals dict id, name): (globals dict, last value).
_globals: dict[tuple[int, str], tuple[dict[str, Any], Any]] = {}


def watch_var(
    name: str,
    *,
    scope: Any = None,
    tag: str | None = None,
    repr_limit: int = DEFAULT_REPR_LIMIT,
    condition: Any = None,
    action: str = "record",
) -> VarWatchHandle:
    """Report every rebinding of variables called ``name`` in in-scope code:
    ``x = ...``, ``x += ...``, ``for x in ...``, ``with ... as x``,
    ``del x``, locals and globals alike.

    ``name`` is a name or a glob (``"lr"``, ``"loss_*"``). ``scope`` limits
    it to some code: a function, a code object, a module, a file path or
    glob, or a list of these; by default all in-scope code (see
    :func:`memwatch.configure`). Each rebinding is a :class:`memwatch.Change`
    of kind ``"rebind"`` (``"unbind"`` for ``del``) whose ``variable`` and
    ``key`` are the variable's name, with the old and new values' reprs cut
    to ``repr_limit`` characters, attributed to the line that rebound it.
    ``tag`` defaults to ``name``.

    Rebinding is identity: ``x = x`` or a line that leaves ``x`` the same
    object reports nothing; ``x += 1`` on an int does. A variable rebound
    twice on one line is reported once, with the first old and the last new
    value. Only code that stores to a matching name is affected; other code
    runs as before. Stop with :func:`memwatch.unwatch` (the handle or the tag).

    ``condition`` and ``action`` are as for :func:`memwatch.watch`: with
    ``action="raise"`` a rebinding raises ``MutationError`` at the line
    boundary after it, for example.
    """
    _guard.check_guard(condition, action)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"watch_var: {name!r} is not a variable name or a glob of one (letters, digits, _, * ? [ ])")
    if isinstance(repr_limit, bool) or not isinstance(repr_limit, int) or repr_limit < 8:
        raise ValueError(f"repr_limit must be an int >= 8, not {repr_limit!r}")
    codes, files, parts = _resolve_scope(scope)
    handle = VarWatchHandle(
        pattern=name,
        tag=str(tag) if tag is not None else name,
        scope=parts,
        repr_limit=repr_limit,
        _codes=frozenset(codes),
        _files=tuple(files),
    )
    with _lock:
        _watches.append(handle)
    _guard.set_guard(handle.tag, condition, action)
    _changed()
    _auto_start()
    return handle


def _resolve_scope(scope: Any) -> tuple[list[types.CodeType], list[str], tuple[Any, ...] | None]:
    if scope is None:
        return [], [], None
    items = list(scope) if isinstance(scope, (list, tuple, set, frozenset)) else [scope]
    codes: list[types.CodeType] = []
    files: list[str] = []
    for item in items:
        target = getattr(item, "__func__", item)  # bound methods
        if isinstance(target, types.CodeType):
            codes.append(target)
        elif isinstance(target, types.FunctionType):
            codes.append(target.__code__)
        elif isinstance(target, types.ModuleType):
            f = getattr(target, "__file__", None)
            if not f:
                raise ValueError(f"watch_var: module {target.__name__!r} has no source file to limit the watch to")
            files.append(os.path.realpath(f))
        elif isinstance(target, (str, os.PathLike)):
            p = os.fspath(target)
            files.append(p if any(c in p for c in "*?[") else os.path.realpath(os.path.abspath(p)))
        else:
            raise TypeError(
                "watch_var: scope must be a function, a code object, a module, a file path or glob, "
                f"or a list of these, not {type(item).__name__}"
            )
    # Nested functions and comprehensions of a chosen function are chosen too.
    todo = list(codes)
    while todo:
        for const in todo.pop().co_consts:
            if isinstance(const, types.CodeType) and const not in codes:
                codes.append(const)
                todo.append(const)
    return codes, files, tuple(items)


def unwatch_var(target: Any) -> bool:
    """Ends the variable and fingerprint watches ``target`` names (a handle,
    a tag, or the object of a fingerprint watch); False if it names none."""
    with _lock:
        if isinstance(target, (VarWatchHandle, KeyWatchHandle)):
            if target not in _watches and target not in _keyed:
                raise NotWatchedError(f"{target!r} is not watched any more")
            gone: list[Any] = [target]
        elif isinstance(target, str):
            gone = [w for w in [*_watches, *_keyed] if w.tag == target]
        else:
            gone = [w for w in _keyed if w._id == id(target) and w.target() is target]
        for w in gone:
            (_watches if isinstance(w, VarWatchHandle) else _keyed).remove(w)
    if gone:
        _changed()
    return bool(gone)


def _changed() -> None:
    """Forget what was learnt about code and values; tell the recorder."""
    with _lock:
        _binds.clear()
        _frames.clear()
        _globals.clear()
        active = bool(_watches or _keyed)
    _memwatch._vars_changed(_relevant, _check, active, _bound_names, _MISSING, bool(_keyed))


def _stored_names(code: types.CodeType) -> dict[str, bool]:
    """The names ``code`` stores to or deletes, each with whether it is a
    global of the frame (``STORE_GLOBAL``, or ``STORE_NAME`` at module level
    is decided per frame)."""
    names: dict[str, bool] = {}
    for ins in dis.get_instructions(code):
        op = ins.opname
        if op in _LOCAL_OPS:
            names.setdefault(ins.argval, False)
        elif op in _GLOBAL_OPS:
            names[ins.argval] = True
        elif op in _PAIR_OPS and isinstance(ins.argval, tuple):
            for stores, n in zip(_PAIR_OPS[op], ins.argval):
                if stores:
                    names.setdefault(n, False)
    return names


def _relevant(code: types.CodeType) -> bool:
    """Whether ``code`` binds a watched name, or a fingerprint is watched
    (then every in-scope line boundary computes it)."""
    if _keyed:
        _binds.setdefault(code, _names_bound(code))
        return True
    return bool(_names_bound(code))


def _names_bound(code: types.CodeType) -> tuple[tuple[str, bool, tuple[VarWatchHandle, ...]], ...]:
    """The watched names ``code`` binds (cached per code object)."""
    found = _binds.get(code)
    if found is None:
        with _lock:
            watches = list(_watches)
        pairs = []
        for n, is_global in _stored_names(code).items():
            ws = tuple(w for w in watches if fnmatch.fnmatchcase(n, w.pattern) and w.covers(code))
            if ws:
                pairs.append((n, is_global, ws))
        found = tuple(pairs)
        _binds[code] = found
    return found


def _read(ns: Any, name: str) -> Any:
    try:
        return ns[name]
    except KeyError:
        return _MISSING
    except Exception:  # a proxy that cannot read a cleared cell
        return _MISSING


Found = tuple[str, str, str, "str | None", "str | None"]


def _bound_names(code: types.CodeType) -> list[tuple[str, bool]]:
    """The watched names ``code`` binds, in the order :func:`_check` reads
    them, each with whether it is a global there (for the recorder's copy
    of what ``_check`` saw)."""
    return [(name, is_global) for name, is_global, _ in _binds.get(code, ())]


def _check(frame: types.FrameType, returning: bool) -> tuple[list[Found], list[Any]]:
    """Compares the watched names ``frame``'s code binds with their values at
    its last boundary, and the watched fingerprints with the last ones:
    ``(tag, key, kind, old_repr, new_repr)`` for each that changed, and the
    value of each bind it read (``_MISSING`` for unbound), in the order of
    :func:`_bound_names`."""
    out: list[Found] = []
    values: list[Any] = []
    if _keyed:
        _check_fingerprints(out)
    binds = _binds.get(frame.f_code, ())
    if not binds:
        return out, values
    f_globals = frame.f_globals
    locals_ns = frame.f_locals
    module_level = locals_ns is f_globals
    key = id(frame)
    entry = _frames.get(key)
    first = entry is None or entry[0] is not frame
    seen: dict[str, Any] = {} if first else entry[1]
    for name, is_global, watches in binds:
        if is_global or module_level:
            gkey = (id(f_globals), name)
            now = _read(f_globals, name)
            values.append(now)
            prev = _globals.get(gkey)
            _globals[gkey] = (f_globals, now)
            if prev is None:
                continue
            before = prev[1]
        else:
            now = _read(locals_ns, name)
            values.append(now)
            before = seen.get(name, _MISSING) if not first else now
            seen[name] = now
        if now is before:
            continue
        for w in watches:
            out.append(
                (
                    w.tag,
                    name,
                    "rebind" if now is not _MISSING else "unbind",
                    None if before is _MISSING else _bounded_repr(before, w.repr_limit),
                    None if now is _MISSING else _bounded_repr(now, w.repr_limit),
                )
            )
    if returning:
        _frames.pop(key, None)
    elif first:
        if len(_frames) >= 32:
            _forget_finished_frames()
        _frames[key] = (frame, seen)
    return out, values


def _check_fingerprints(out: list[Found]) -> None:
    for w in list(_keyed):
        obj = w.target()
        if obj is None:
            with _lock:
                if w in _keyed:
                    _keyed.remove(w)
            out.append((w.tag, "", "collected", _bounded_repr(w.last, w.repr_limit), None))
            continue
        try:
            now = w.key(obj)
            same = now == w.last
            if not isinstance(same, bool):  # numpy arrays and the like
                same = bool(getattr(same, "all", lambda: same)())
        except Exception as e:
            now, same = _KeyFailed(f"<key failed: {type(e).__name__}: {e}>"), False
            if now == w.last:
                continue
        if not same:
            out.append((w.tag, "", "fingerprint", _bounded_repr(w.last, w.repr_limit), _bounded_repr(now, w.repr_limit)))
            w.last = now


class _KeyFailed(str):
    """The fingerprint of an object whose key function raised: shown as the
    error, equal to the same error again (reported once)."""

    def __repr__(self) -> str:
        return str(self)


def watch_fingerprint(obj: Any, tag: str, variable: str | None, key: Any, repr_limit: int) -> KeyWatchHandle:
    """``watch_object(obj, key=...)``: see its docstring."""
    fn = default_fingerprint if key is True else key
    if not callable(fn):
        raise TypeError(f"key must be a function of the object (or True for (id, type, hash)), not {type(key).__name__}")
    try:
        first = fn(obj)
    except Exception as e:
        raise ValueError(f"key({tag}) failed when the watch started: {type(e).__name__}: {e}") from e
    try:
        ref: Any = weakref.ref(obj)
    except TypeError:
        ref = obj  # not weakly referenceable: the watch keeps it alive
    handle = KeyWatchHandle(tag=tag, variable=variable, key=fn, repr_limit=repr_limit, last=first, _ref=ref, _id=id(obj))
    with _lock:
        _keyed.append(handle)
    _changed()
    return handle


def _forget_finished_frames() -> None:
    """Drops the snapshots of frames no thread is running (they ended without
    a return event: an exception; or a generator is suspended, and starts
    afresh when it resumes). A snapshot holds its frame, and so its locals."""
    live = set()
    for top in sys._current_frames().values():
        f: types.FrameType | None = top
        while f is not None:
            live.add(id(f))
            f = f.f_back
    for k in [k for k in _frames if k not in live]:
        del _frames[k]
    # The recorder's copy of what _check saw must forget them too.
    _memwatch._vars_forgot_frames()


def _boot_from_env() -> None:
    """``memwatch record --vars``: watch the names in ``$MEMWATCH_VARS``
    (comma-separated), from the program's start."""
    for pattern in filter(None, (p.strip() for p in os.environ.get("MEMWATCH_VARS", "").split(","))):
        watch_var(pattern)
