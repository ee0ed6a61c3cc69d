"""``unwatch()``: ends any kind of watch, whatever names it (a handle, the
object, its tag, ``buffer=address``).

It is above every way of watching, since it ends each of them: module
groups (``_torch_module``), variables (``_vars``), objects, and buffers
(``_api.unwatch_regions``)."""

from __future__ import annotations

from typing import Any

from memwatch import _api, _memwatch
from memwatch._memwatch import NotWatchedError, ObjectWatchHandle
from memwatch._torch_module import unwatch_group
from memwatch._vars import unwatch_var


def unwatch(target: Any = None, *, buffer: int | None = None) -> None:
    """Stop watching: pass the handle ``watch``, ``watch_object``, ``watch_var``,
    ``watch_module`` or ``watch_optimizer`` returned,
    the object, its name, or ``buffer=address``. Changes made up to now are
    reported first."""
    if buffer is None and target is not None:
        if unwatch_group(target):
            return

        # A tag can name a variable watch and an object watch at once: end both.
        found_vars = unwatch_var(target)
        if _unwatch_objects(target) or found_vars:
            return
    _api.unwatch_regions(target, buffer)


def _unwatch_objects(target: Any) -> bool:
    """Ends the object watches ``target`` names (an ObjectWatchHandle, a tag
    or the watched object); False if it names none."""
    watches = _memwatch._object_watches()
    if isinstance(target, ObjectWatchHandle):
        found = [w for w, *_ in watches if w == target.watch]
        if not found:
            raise NotWatchedError(f"{target!r} is not watched any more")
    elif isinstance(target, str):
        found = [w for w, tag, _ in watches if tag == target]
    else:
        found = [w for w, _, oid in watches if oid == id(target)]
    for w in found:
        _memwatch._unwatch_object(w)
    return bool(found)


__all__ = ["unwatch"]
