"""``freeze``, ``unfreeze`` and ``frozen``: a frozen object raises
:class:`memwatch.MutationError` at any change.

It is a user of the watches (it watches what is not watched yet, and ends
that watch when it thaws) and of ``_guard``, which holds the freeze counts
and raises; nothing below it calls in here."""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from typing import Any

from memwatch import _memwatch
from memwatch._api import watch
from memwatch._guard import add_freeze, remove_freeze
from memwatch._memwatch import MutationError
from memwatch._names import _is_torch_tensor, _variable_name
from memwatch._objects import watch_object
from memwatch._unwatch import unwatch


def _watched_tags(obj: Any) -> list[str]:
    tags = [tag for _, tag, _, _, oid in _memwatch._regions() if oid == id(obj)]
    tags += [tag for _, tag, oid in _memwatch._object_watches() if oid == id(obj)]
    return tags


def _has_buffer(obj: Any) -> bool:
    if _is_torch_tensor(obj):
        return True
    try:
        memoryview(obj).release()
    except TypeError:
        return False
    return True


class _Freeze:
    """One freeze of one object: the tags it froze and whether it watched
    the object itself (then thawing ends that watch)."""

    __slots__ = ("tags", "handle")

    def __init__(self, tags: list[str], handle: Any) -> None:
        self.tags = tags
        self.handle = handle


# Freezes by id() of the frozen object, innermost last.
_frozen: dict[int, list[_Freeze]] = {}
# Guards `_frozen` (a thread may freeze what another unfreezes).
_frozen_lock = threading.Lock()


def _name_of(obj: Any, frame: types.FrameType | None) -> str:
    name = _variable_name(frame, obj, False) if frame is not None else None
    return name if name is not None else f"frozen {type(obj).__name__} at {id(obj):#x}"


def freeze(obj: Any, name: str | None = None, *, _frame: types.FrameType | None = None) -> None:
    """Freezes ``obj`` until :func:`unfreeze`: any change to it raises
    :class:`memwatch.MutationError` in the thread that wrote.

    An object memwatch already watches keeps its watch (and name); any
    other is watched for as long as it is frozen, as ``name`` (by default
    the variable passed in). Freezes nest: each ``freeze`` needs its
    ``unfreeze``."""
    frame = _frame or sys._getframe(1)
    tags = _watched_tags(obj)
    handle = None
    if not tags:
        tag = name if name is not None else _name_of(obj, frame)
        if _has_buffer(obj):
            handle = watch(obj, tag, _frame=frame)
        else:
            handle = watch_object(obj, tag)
        tags = [tag]
    with _frozen_lock:
        add_freeze(tags)
        _frozen.setdefault(id(obj), []).append(_Freeze(tags, handle))


def unfreeze(obj: Any) -> None:
    """Ends the last :func:`freeze` of ``obj``: writes are allowed again
    (changes made up to here are checked first)."""
    stack = _frozen.get(id(obj))
    if not stack:
        raise _memwatch.NotWatchedError(f"this {type(obj).__name__} is not frozen")
    try:
        # What changed up to here still raises, before the freeze ends.
        _memwatch.check()
    finally:
        with _frozen_lock:
            f = stack.pop()
            if not stack:
                del _frozen[id(obj)]
            remove_freeze(f.tags)
        if f.handle is not None:
            with contextlib.suppress(_memwatch.NotWatchedError):
                unwatch(f.handle)


class frozen(contextlib.ContextDecorator):
    """``with memwatch.frozen(obj):`` (or ``@memwatch.frozen(obj)`` on a
    function): inside, any change to ``obj`` raises
    :class:`memwatch.MutationError` in the thread that wrote, with
    ``.change`` and a traceback that ends with the writing line; writes
    are allowed again after the block.

    ``obj`` is anything ``watch`` takes (a numpy array, a torch tensor, a
    ``bytearray``...) or ``watch_object`` takes (an instance, a dict, a
    list). A change is seen at the line boundary right after the line that
    made it, so the memory already holds the new value when the error is
    raised: catch it and put the old value back (``err.change.old``) if you
    mean to go on."""

    def __init__(self, obj: Any, name: str | None = None) -> None:
        self.obj = obj
        self.name = name
        self._frame = sys._getframe(1)

    def __enter__(self) -> Any:
        freeze(self.obj, self.name, _frame=self._frame)
        return self.obj

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            unfreeze(self.obj)
            return
        # An error is on its way out already (maybe this freeze's own):
        # a later change's raise must not replace it.
        with contextlib.suppress(MutationError):
            unfreeze(self.obj)


__all__ = ["frozen", "freeze", "unfreeze"]
