"""Watching Python objects: ``watch_object``, and the helpers the native
recorder calls (bounded reprs, ``__slots__``, what a line's code does)."""

from __future__ import annotations

import dis
import os
import sys
import threading
import types
from typing import Any

from memwatch import _guard, _memwatch
from memwatch._names import DEFAULT_REPR_LIMIT, _bounded_repr, _variable_name
from memwatch._session import _auto_start
from memwatch._vars import watch_fingerprint

def watch_object(
    obj: Any,
    name: str | None = None,
    *,
    depth: int = 1,
    repr_limit: int = DEFAULT_REPR_LIMIT,
    key: Any = None,
    condition: Any = None,
    action: str = "record",
    _variable: str | None = None,
) -> Any:
    """Watch a Python object; every change to it becomes a :class:`memwatch.Change`
    with ``kind``, ``key``, ``old_repr`` and ``new_repr``.

    ``obj`` is an instance (its attributes, through ``__dict__`` or
    ``__slots__``, whoever sets them, native code included), a ``dict``, a
    ``list`` or a ``set`` (its items). ``depth`` is how many levels of the
    containers and instances it holds are watched too: with the default 1,
    ``cfg.layers.append(4)`` is a change of ``cfg`` (key ``.layers[3]``);
    with 0 only ``cfg``'s own attributes are. ``name`` is the tag; without
    it, the name of the variable passed in. Reprs of old and new values are
    cut to ``repr_limit`` characters.

    ``key=`` watches a cheap fingerprint instead, for objects that are
    expensive to compare or cannot be watched item by item (a model, a
    dataframe): ``key(obj)`` is computed at each line boundary of in-scope
    code, and each time it differs (``!=``) from the last one that is a
    change of kind ``"fingerprint"`` with both keys' reprs. ``key=True``
    uses ``(id, type, hash)``. Returns a ``KeyWatchHandle``.

    The object's behaviour does not change (type, ``isinstance``, equality,
    pickling, identity). Unwatch with :func:`memwatch.unwatch` (the handle,
    the object or its name). When the object is garbage-collected the watch
    ends with a change of kind ``"collected"``.

    ``condition`` and ``action`` act on some changes as they happen:
    ``action="raise"`` raises :class:`memwatch.MutationError` in the thread
    that wrote, ``"breakpoint"`` calls ``sys.breakpointhook()`` there (pdb,
    IPython and debuggers stop; ``PYTHONBREAKPOINT`` is honoured) and
    ``"log"`` prints the change's ``[MEMWATCH]`` report; ``"record"`` (the
    default) does nothing more than record. ``condition`` chooses the
    changes the action acts on: a callable taking the :class:`Change` and
    returning a bool, ``"nonfinite"`` (a NaN or an infinity among the new
    values) or ``"any"`` (the default). Every change is recorded and kept
    in the history either way. A watch with an action reports through it:
    its changes are not printed live.
    For an object, ``"nonfinite"`` looks at a new value that is a float.
    """
    _guard.check_guard(condition, action)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an int >= 0, not {depth!r}")
    if isinstance(repr_limit, bool) or not isinstance(repr_limit, int) or repr_limit < 8:
        raise ValueError(f"repr_limit must be an int >= 8, not {repr_limit!r}")
    variable = _variable or _variable_name(sys._getframe(1), obj, False)
    tag = name if name is not None else variable
    if tag is None:
        raise ValueError("cannot tell which variable this object is; pass name=")
    if key is not None and key is not False:
        handle = watch_fingerprint(obj, str(tag), variable, key, repr_limit)
        _guard.set_guard(str(tag), condition, action)
        _auto_start()
        return handle
    handle = _memwatch._watch_object(obj, str(tag), variable, depth, repr_limit)
    _guard.set_guard(str(tag), condition, action)
    _auto_start()
    return handle


# --- helpers the native recorder calls ----------------------------------------

_SLOTS: dict[type, list[tuple[str, Any]]] = {}


def _slots_of(obj: Any) -> list[tuple[str, Any]]:
    """``(name, member descriptor)`` for each ``__slots__`` entry of ``obj``'s
    class and its bases (``__dict__`` and ``__weakref__`` are not slots)."""
    cls = type(obj)
    found = _SLOTS.get(cls)
    if found is None:
        found, seen = [], set()
        for klass in cls.__mro__:
            for key, value in vars(klass).items():
                if key in seen:
                    continue
                seen.add(key)
                # C types such as types.SimpleNamespace expose their instance
                # dict as a member named __dict__: it is the attributes,
                # watched as such, not a slot holding a dict.
                if key in ("__dict__", "__weakref__"):
                    continue
                if isinstance(value, types.MemberDescriptorType):
                    found.append((key, value))
        _SLOTS[cls] = found
    return found


_LINE_OPS: dict[tuple[Any, int], frozenset[str]] = {}


def _line_ops(code: types.CodeType, line: int) -> frozenset[str]:
    """The method names a line loads (``append``, ``pop``) and its item and
    in-place operators (``[]=``, ``del[]``, ``+=``, ``|=``)."""
    key = (code, line)
    ops = _LINE_OPS.get(key)
    if ops is None:
        names = set()
        for ins in dis.get_instructions(code):
            pos = ins.positions
            if pos is None or pos.lineno != line:
                continue
            if ins.opname in ("LOAD_ATTR", "LOAD_METHOD"):
                names.add(str(ins.argval))
            elif ins.opname == "STORE_SUBSCR":
                names.add("[]=")
            elif ins.opname == "DELETE_SUBSCR":
                names.add("del[]")
            elif ins.opname == "BINARY_OP" and ins.argrepr.endswith("=") and ins.argrepr not in ("==", "!="):
                names.add(ins.argrepr)
        ops = frozenset(names)
        _LINE_OPS[key] = ops
    return ops


def _thread_name(ident: int) -> str | None:
    t = threading._active.get(ident)  # noqa: SLF001 - no public lookup by ident
    return t.name if t is not None else None


class _Probe:
    pass


def _probe_store(obj: _Probe) -> None:
    for i in range(3):  # specialised after the first store
        obj.x = i


_memwatch._set_object_hooks(_slots_of, _line_ops, _bounded_repr, _thread_name, _Probe, _probe_store)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_memwatch._objects_after_fork_child)
