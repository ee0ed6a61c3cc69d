"""Watching tensors whose memory cannot be write-protected: ``watch(t, via="dispatch")``.

memwatch finds changes by write-protecting host memory, which a tensor on a
GPU (CUDA, MPS, any device) does not live in. For those, and for any CPU
tensor the caller chooses to watch so, this module finds the writes a level
up, in torch's dispatcher: every aten op that writes a tensor argument
(in-place ops, ``out=``, ``copy_``, indexed assignment) passes through one
``TorchDispatchMode``, ``_Mode``, that this module owns.

What it owns:

- A *mirror* per watch: a CPU tensor of the watched tensor's shape and
  dtype, holding a copy of its elements, which the recorder watches through
  memory like any CPU tensor (so initial contents, dtype decoding, history,
  traces, ``state`` and ``blame`` work unchanged). Only the recorder holds
  the mirror; a watch entry here holds weak references to it and to the
  watched tensor, so the watched tensor can be collected (its watch then
  ends as ``collected``) and an entry goes when its mirror does.
- The mode, entered while at least one dispatch watch exists. Its
  ``__torch_dispatch__`` runs the op, then, if the op writes an argument
  (known per op from its schema, cached: an argument with
  ``alias_info.is_write``, which ``out=`` arguments and ``self`` of in-place
  ops have) whose memory overlaps a watched tensor's (same device, byte
  ranges from ``data_ptr``, sizes and strides), copies the watched tensor
  into its mirror (``mirror.copy_(t)``: a device-to-host copy, which waits
  for the device) and asks the recorder to check now
  (``_memwatch._check_op``), so the change is emitted at once, attributed
  to the innermost in-scope Python line (memwatch's and torch's own frames
  are out of scope) and carrying the op's name (``Change.op``). A
  higher-order op (``torch.cond``) runs the ops of its body below the mode,
  unseen: after one, every watched tensor is copied and compared.

Threads: torch keeps dispatch modes per thread. The mode is entered on each
thread that calls ``watch(..., via="dispatch")``; autograd's backward
threads inherit it from the thread that calls ``backward()``. Ops on other
threads (a ``threading.Thread`` started by the program) are not seen. The
mode leaves a thread's mode stack when the last dispatch watch ends, if that
happens on that thread while the mode is on top of its stack; otherwise (the
watch ended inside an op, or the program entered a mode of its own after
memwatch's) it stays there, doing nothing but run each op, until an
``unwatch`` on that thread finds it on top (or a new dispatch watch uses it
again).

Cost: every op on a covered thread pays the mode's Python call, while any
dispatch watch exists; an op that writes nothing pays one dict lookup more,
an op that writes a tensor the byte-range comparison with each watched
tensor, and an op that writes a watched tensor the copy to the host and a
check (docs/pytorch.md has the figures).

Locking: none of its own; everything here runs with the GIL held. Nothing
here runs in signal context.
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref
from typing import Any

from memwatch import _memwatch

# func -> (position, name) of each argument the op writes; () when none;
# _ANY for a higher-order op (torch.cond), whose body may write anything.
_WRITES: dict[Any, tuple[tuple[int, str], ...]] = {}
_ANY = ((-1, ""),)
# region -> its entry, for every dispatch watch.
_entries: dict[int, _Entry] = {}
_mode: Any = None
# .entered: this thread's mode stack holds the mode.
_local = threading.local()
# Frames of these modules are memwatch's (or torch's wrapping of a mode's
# handler), never the line an op is attributed to.
_OWN_MODULES = (__name__, "torch._dynamo.eval_frame", "torch._compile")
# What an op's Tensor[] argument arrives as.
_SEQUENCES = (list, tuple)


class _Entry:
    """One dispatch watch: its region, tag, and weak references to the
    watched tensor and its mirror."""

    __slots__ = ("region", "tag", "tensor", "mirror", "__weakref__")

    def __init__(self, region: int, tag: str, tensor: Any, mirror: Any) -> None:
        self.region = region
        self.tag = tag
        self.tensor = weakref.ref(tensor)
        self.mirror = weakref.ref(mirror, lambda _: _forget_quietly(region))


def _written_arguments(func: Any) -> tuple[tuple[int, str], ...]:
    """Position and name of each argument ``func`` writes (its schema's
    ``Tensor(a!)`` arguments: ``self`` of an in-place op, ``out=``);
    ``_ANY`` for an op without a schema (a higher-order op: the ops of its
    body run below the mode, unseen, so every watched tensor may have
    changed)."""
    try:
        arguments = func._schema.arguments
    except AttributeError:
        return _ANY
    return tuple(
        (i, a.name) for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write
    )


def _span(t: Any) -> tuple[int, int]:
    """``(first byte, end)`` of the memory tensor ``t`` spans on its device;
    empty (``start == end``) when it has none (no elements, no storage)."""
    try:
        start = t.data_ptr()
        if t.is_contiguous():
            return start, start + t.nbytes
        if t.numel() == 0:
            return start, start
        reach = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        return start, start + (reach + 1) * t.element_size()
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return 0, 0


def _own_frames() -> int:
    """How many of the innermost Python frames are memwatch's handler and
    torch's wrapping of it (left out of a change's stack where no in-scope
    line led to the op)."""
    f = sys._getframe(1)
    n = 0
    while f is not None and f.f_globals.get("__name__", "") in _OWN_MODULES:
        n += 1
        f = f.f_back
    return n


def _after_write(func: Any, written: tuple[tuple[int, str], ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``func`` has written its ``written`` arguments: report the watched
    tensors whose memory they overlap (every one, for ``_ANY``)."""
    if written is _ANY:
        hits = list(_entries.values())
    else:
        spans = []
        for pos, name in written:
            v = args[pos] if pos < len(args) else kwargs.get(name)
            for w in v if type(v) in _SEQUENCES else (v,):
                if w is not None:
                    start, end = _span(w)
                    if start != end:
                        spans.append((start, end, w))
        if not spans:
            return
        hits = []
        for e in _entries.values():
            t = e.tensor()
            if t is None:
                continue
            start, end = _span(t)
            for w0, w1, w in spans:
                # Addresses first (cheap); the device only where they overlap.
                if w0 < end and start < w1 and w.device == t.device:
                    hits.append(e)
                    break
        if not hits:
            return
    regions = []
    for e in hits:
        t = e.tensor()
        m = e.mirror()
        if t is None or m is None:
            continue
        if t.shape != m.shape or t.dtype != m.dtype:
            _reshaped(e, t, m, func)
            continue
        # The mode is off inside its own handler: this copy is not seen here.
        m.copy_(t)
        regions.append(e.region)
    if regions:
        for gone in _memwatch._check_op(regions, func.name(), _own_frames()):
            _forget(gone)


def _reshaped(e: _Entry, t: Any, m: Any, func: Any) -> None:
    """Op ``func`` gave watched tensor ``t`` another shape or dtype than its
    mirror (an ``out=`` argument torch resized): the watch cannot go on."""
    _forget(e.region)
    if any(r == e.region for r, *_ in _memwatch._regions()):
        _memwatch._unwatch(e.region)
    warnings.warn(
        f"memwatch: {func.name()} made {e.tag!r} a {str(t.dtype).removeprefix('torch.')} tensor of shape "
        f"{tuple(t.shape)} (it was {str(m.dtype).removeprefix('torch.')}, {tuple(m.shape)} when watched), "
        f"so its watch ended; watch it again to go on (memwatch.watch(t, name={e.tag!r}, via='dispatch'))",
        RuntimeWarning,
        # At the first frame that is not memwatch's handler (the op's caller).
        stacklevel=_own_frames() + 1,
    )


def _mode_class() -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Mode(TorchDispatchMode):
        """memwatch's dispatch mode: see ``memwatch._torch_dispatch``."""

        # Without this torch refuses to run a higher-order op (torch.cond)
        # under the mode. The ops of its body run below the mode: after it,
        # every watched tensor is compared with its mirror.
        supports_higher_order_operators = True

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
            if kwargs is None:
                kwargs = {}
            out = func(*args, **kwargs)
            written = _WRITES.get(func)
            if written is None:
                written = _WRITES[func] = _written_arguments(func)
            if written and _entries:
                _after_write(func, written, args, kwargs)
            return out

    return _Mode


def mirror_of(t: Any) -> Any:
    """A CPU tensor of ``t``'s shape and dtype holding a copy of its elements."""
    import torch

    with torch.no_grad():
        mirror = torch.empty(tuple(t.shape), dtype=t.dtype, device="cpu")
        mirror.copy_(t.detach())
    return mirror


def add(region: int, tag: str, tensor: Any, mirror: Any) -> None:
    """Starts finding the ops that write ``tensor`` (watched as ``region``,
    through ``mirror``): enters the mode on this thread."""
    _entries[region] = _Entry(region, tag, tensor, mirror)
    _enter()


def _forget(region: int) -> None:
    if _entries.pop(region, None) is not None and not _entries:
        settle()


def _forget_quietly(region: int) -> None:
    """``_forget``, when a mirror is freed: that happens wherever the
    recorder lets it go (an unwatch, a collection, interpreter exit), where
    an error would only be printed; the mode then stays, passing ops
    through, until a later ``settle``."""
    try:
        _forget(region)
    except Exception:  # noqa: BLE001 - see above
        pass


def _on_top(mode: Any) -> bool:
    import torch

    n = torch._C._len_torch_dispatch_stack()
    return n > 0 and torch._C._get_dispatch_stack_at(n - 1) is mode


def _enter() -> None:
    global _mode
    if _mode is None:
        _mode = _mode_class()()
    if not getattr(_local, "entered", False):
        _mode.__enter__()
        _local.entered = True


def settle() -> None:
    """With no dispatch watch left, takes the mode off this thread's stack,
    where it is on top (not inside its own handler, nor under a mode the
    program entered later); elsewhere it stays until a later call finds it so."""
    if _entries or not entered() or not _on_top(_mode):
        return
    _mode.__exit__(None, None, None)
    _local.entered = False


def tags_of(storage: Any) -> list[str]:
    """Tags of the dispatch watches whose tensor's memory is ``storage``'s."""
    if not _entries:
        return []
    try:
        start, device = storage.data_ptr(), storage.device
    except (AttributeError, RuntimeError):
        return []
    tags = []
    for e in _entries.values():
        t = e.tensor()
        if t is None:
            continue
        try:
            s = t.untyped_storage()
            if s.device == device and s.data_ptr() == start:
                tags.append(e.tag)
        except (AttributeError, RuntimeError):
            continue
    return tags


def entered() -> bool:
    """True while the mode is on this thread's mode stack (for tests)."""
    return getattr(_local, "entered", False)
