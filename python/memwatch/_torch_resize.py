"""Resizing a watched torch tensor: a memwatch error that says why.

memwatch watches a tensor's memory through a numpy view of it, and torch
marks a storage that numpy views as not resizable, for the rest of the
storage's life (torch has no way to undo it). That mark is what keeps the
memory memwatch reads from being freed or moved while it is watched: a
storage that grows is copied to new memory and the old one freed.

So that ``resize_`` does not fail with torch's bare "Trying to resize
storage that is not resizable", the first tensor watch wraps
``Tensor.resize_``, ``Tensor.resize_as_``, ``Tensor.set_`` and
``UntypedStorage.resize_`` (``TypedStorage.resize_`` goes through the
latter). While memory of the tensor's storage is watched, each raises
:class:`memwatch.MemwatchError` naming the watch and saying to unwatch
first (``resize_`` to the tensor's own shape, a no-op, is let through).
After the watch ended the storage stays not resizable: torch's
RuntimeError then gets a note saying memwatch watched it and to resize a
copy. Operations that resize inside torch (``out=`` arguments) are not
wrapped: they keep torch's message.

A tensor watched ``via="dispatch"`` (``memwatch._torch_dispatch``) is on
any device and its storage stays resizable, but memwatch's copy of it has
the shape it had when watched: the same wrappers refuse to resize it or
``set_`` it while it is watched, saying to unwatch it first (and after
that it resizes as usual). An ``out=`` argument torch resizes ends such a
watch, with a warning.

The wrappers cost one lookup of the watched regions per call; they stay
installed for the life of the process.
"""

from __future__ import annotations

import functools
from typing import Any

from memwatch import _memwatch, _torch_dispatch
from memwatch._memwatch import MemwatchError

_installed = False
# Storages memwatch has watched: the address of their memory -> the tag.
# Kept after the watch ends (the storage stays not resizable); bounded.
_pinned: dict[int, str] = {}
_PINNED_MAX = 4096


def _span(storage: Any) -> tuple[int, int]:
    try:
        start = storage.data_ptr()
        return start, start + storage.nbytes()
    except Exception:  # noqa: BLE001 - a storage without data (meta, fake)
        return 0, 0


def _watched(storage: Any) -> tuple[list[str], bool]:
    """Tags of the watches of ``storage``'s memory: the watched regions in
    it (host memory), else the dispatch watches of tensors on it; and
    whether they are the latter."""
    dispatched = _torch_dispatch.tags_of(storage)
    if dispatched:
        return dispatched, True
    if getattr(getattr(storage, "device", None), "type", "cpu") != "cpu":
        return [], False
    start, end = _span(storage)
    if start == end:
        return [], False
    return [tag for _, tag, addr, size, _ in _memwatch._regions() if addr < end and addr + size > start], False


def pinned(tensor: Any, tag: str) -> None:
    """Remembers that ``tensor``'s storage is watched as ``tag`` (and so,
    for good, not resizable)."""
    start, _ = _span(tensor.untyped_storage())
    if start:
        if len(_pinned) >= _PINNED_MAX:
            _pinned.pop(next(iter(_pinned)))
        _pinned[start] = tag


def _refuse(what: str, found: tuple[list[str], bool]) -> MemwatchError:
    tags, dispatched = found
    names = ", ".join(repr(t) for t in tags)
    if dispatched:
        return MemwatchError(
            f'cannot {what} a tensor that memwatch watches via="dispatch" ({names}): memwatch keeps a '
            "copy of it with the shape it had when watched. "
            f"Call memwatch.unwatch({tags[0]!r}) first (then resize it, and watch it again if you need to)"
        )
    return MemwatchError(
        f"cannot {what} a tensor whose memory memwatch watches ({names}): a watched tensor's storage "
        "is pinned so that its memory cannot be freed or moved while memwatch reads it. "
        f"Call memwatch.unwatch({tags[0]!r}) first; even then torch keeps the storage not resizable, "
        "so resize a copy (t = t.clone(); t.resize_(...)) and watch that if you need to"
    )


def _note(err: RuntimeError, storage: Any) -> None:
    start, _ = _span(storage)
    tag = _pinned.get(start)
    if tag is not None and "not resizable" in str(err) and hasattr(err, "add_note"):
        err.add_note(
            f"memwatch: this storage was watched by memwatch (as {tag!r}); torch marks a watched "
            "storage not resizable for good, and cannot undo it. Resize a copy instead "
            "(t = t.clone(); t.resize_(...))"
        )


def _same_shape(tensor: Any, sizes: tuple[Any, ...], memory_format: Any) -> bool:
    if memory_format is not None:
        return False
    try:
        if len(sizes) == 1 and not isinstance(sizes[0], int):
            sizes = tuple(sizes[0])
        return tuple(int(s) for s in sizes) == tuple(tensor.shape)
    except (TypeError, ValueError):
        return False


def install() -> None:
    """Wraps the resizing methods, once."""
    global _installed
    if _installed:
        return
    import torch

    _installed = True
    tensor_resize = torch.Tensor.resize_
    tensor_resize_as = torch.Tensor.resize_as_
    tensor_set = torch.Tensor.set_
    storage_resize = torch.UntypedStorage.resize_

    @functools.wraps(tensor_resize)
    def resize_(self: Any, *sizes: Any, memory_format: Any = None) -> Any:
        tags = _watched(self.untyped_storage())
        if tags[0] and not _same_shape(self, sizes, memory_format):
            raise _refuse("resize_", tags)
        try:
            if memory_format is None:
                return tensor_resize(self, *sizes)
            return tensor_resize(self, *sizes, memory_format=memory_format)
        except RuntimeError as e:
            _note(e, self.untyped_storage())
            raise

    @functools.wraps(tensor_resize_as)
    def resize_as_(self: Any, other: Any, *args: Any, **kwargs: Any) -> Any:
        tags = _watched(self.untyped_storage())
        if tags[0] and not (not args and not kwargs and tuple(other.shape) == tuple(self.shape)):
            raise _refuse("resize_as_", tags)
        try:
            return tensor_resize_as(self, other, *args, **kwargs)
        except RuntimeError as e:
            _note(e, self.untyped_storage())
            raise

    @functools.wraps(tensor_set)
    def set_(self: Any, *args: Any, **kwargs: Any) -> Any:
        tags = _watched(self.untyped_storage())
        if tags[0]:
            raise _refuse("set_ (point to other memory)", tags)
        return tensor_set(self, *args, **kwargs)

    @functools.wraps(storage_resize)
    def storage_resize_(self: Any, size: Any) -> Any:
        tags = _watched(self)
        if tags[0] and int(size) != self.nbytes():
            raise _refuse("resize the storage of", tags)
        try:
            return storage_resize(self, size)
        except RuntimeError as e:
            _note(e, self)
            raise

    torch.Tensor.resize_ = resize_
    torch.Tensor.resize_as_ = resize_as_
    torch.Tensor.set_ = set_
    torch.UntypedStorage.resize_ = storage_resize_
