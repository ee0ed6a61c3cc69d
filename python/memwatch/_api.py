"""The Python side of watching buffers: argument handling and the small
conveniences around the native recorder in ``memwatch._memwatch``.

Below it: ``_names`` (what a watch is called), ``_session`` (recording
starts at the first watch), ``_guard``, and the torch helpers. Above it:
``_torch_module`` (which watches through :func:`watch`) and ``_unwatch``
(which ends every kind of watch)."""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from memwatch import _guard, _memwatch, _torch_dispatch, _torch_resize
from memwatch._memwatch import (
    Change,
    MemwatchError,
    NotWatchedError,
    UnsupportedError,
    WatchHandle,
)
from memwatch._names import _is_torch_tensor, _variable_name
from memwatch._session import _auto_start

MODES = ("line", "store")
# How a tensor's changes are found: its memory write-protected, or the torch
# ops that write it (memwatch._torch_dispatch).
VIAS = ("memory", "dispatch")


def _memory_owner(obj: Any) -> Any:
    """What owns the memory that view `obj` shows (a numpy view's base, a
    memoryview's exporter, a torch view's base), or None when `obj` owns
    its memory: while that object lives, the watch of the view goes on."""
    if isinstance(obj, memoryview):
        return obj.obj
    if _is_torch_tensor(obj):
        return obj._base if obj._is_view() else None
    base = getattr(obj, "base", None) if hasattr(obj, "__array_interface__") else None
    while base is not None and hasattr(base, "__array_interface__") and getattr(base, "base", None) is not None:
        base = base.base
    return base


# Torch dtypes numpy has no type for: memwatch's dtype string for each (see
# docs/format.md) and the same-size integer dtype the tensor is exported as.
_TORCH_NAMED = {
    "bfloat16": ("<bfloat16", "int16"),
    "float8_e4m3fn": ("|float8_e4m3fn", "uint8"),
    "float8_e4m3fnuz": ("|float8_e4m3fnuz", "uint8"),
    "float8_e5m2": ("|float8_e5m2", "uint8"),
    "float8_e5m2fnuz": ("|float8_e5m2fnuz", "uint8"),
    "float8_e8m0fnu": ("|float8_e8m0fnu", "uint8"),
    "complex32": ("<complex32", "int32"),
}
_NAMED_DTYPES = {v[0] for v in _TORCH_NAMED.values()}


def _normalize_dtype(dtype: Any) -> str:
    """The dtype string for ``dtype=``: a numpy dtype's array-protocol
    string (``"float32"`` -> ``"<f4"``), or memwatch's name for a torch
    dtype numpy lacks (``torch.bfloat16`` or ``"bfloat16"`` -> ``"<bfloat16"``)."""
    text = str(dtype).removeprefix("torch.")
    if text in _NAMED_DTYPES:
        return text
    if text in _TORCH_NAMED:
        return _TORCH_NAMED[text][0]
    if _is_torch_dtype(dtype):
        dtype = text
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        try:
            return np.dtype(dtype).str
        except TypeError as e:
            raise ValueError(f"dtype {dtype!r} is not a numpy dtype: {e}") from None
    return str(dtype)


def _is_torch_dtype(obj: Any) -> bool:
    return type(obj).__module__ == "torch" and type(obj).__name__ == "dtype"


def _unsupported_tensor(t: Any) -> str | None:
    """Why tensor ``t`` cannot be watched, and what to do instead; None if it can."""
    if t.is_nested:
        return (
            "a nested tensor: its components live in one buffer that memwatch cannot index; "
            "watch each component instead (for i, part in enumerate(t.unbind()): "
            "memwatch.watch(part, name=f'part{i}'); they share t's memory), "
            "or a padded copy (t.to_padded_tensor(0))"
        )
    if t.is_quantized:
        return (
            f"a quantized tensor ({t.dtype}): its elements are scaled integers with their own "
            "scale and zero point; watch a float copy (t.dequantize()) or the integers (t.int_repr(), "
            "also a copy), or the float tensor before quantization"
        )
    import torch

    if t.layout != torch.strided:
        layout = str(t.layout).removeprefix("torch.")
        if layout.startswith("sparse"):
            parts = (
                "t._values() and t._indices()"
                if layout == "sparse_coo"
                else "t.values() and its index tensors (t.crow_indices(), t.col_indices() and the like)"
            )
            return (
                f"a sparse tensor (layout {layout}): memwatch watches strided memory; watch a dense "
                f"copy (t.to_dense()), or the strided tensors it is made of, {parts}, which share its memory"
            )
        return f"a tensor with layout {layout}: memwatch watches strided tensors; watch t.to_dense() (a copy)"
    if t.device.type == "meta":
        return (
            "a meta tensor: it has a shape and a dtype but no data; materialize it on the CPU "
            "(torch.empty_like(t, device='cpu'), or module.to_empty(device='cpu') for a model) and watch that"
        )
    if t.is_conj():
        return (
            "a tensor with its conjugate bit set (a lazy view from .conj()): its memory holds the "
            "unconjugated values; watch the tensor it was made from, or a resolved copy (t.resolve_conj())"
        )
    if t.is_neg():
        return (
            "a tensor with its negative bit set (a lazy view, e.g. .conj().imag): its memory holds the "
            "values' negations; watch the tensor it was made from, or a resolved copy (t.resolve_neg())"
        )
    return None


def _dispatch_target(t: Any) -> tuple[Any, str | None, Any]:
    """What memwatch exports for tensor ``t`` on any device watched
    ``via="dispatch"``: its mirror's numpy view, the dtype string, and the
    mirror (a CPU copy of ``t``, see ``memwatch._torch_dispatch``)."""
    why = _unsupported_tensor(t)
    if why is not None:
        raise UnsupportedError(f"cannot watch {why}")
    mirror = _torch_dispatch.mirror_of(t)
    target, dtype = _tensor_target(mirror)
    return target, dtype, mirror


def _tensor_target(t: Any) -> tuple[Any, str | None]:
    """What memwatch exports for CPU tensor ``t`` (a numpy view of its
    memory, same strides) and the dtype string its elements have when the
    view's own dtype is a stand-in (bfloat16 and float8 are exported as
    integers of their size)."""
    if t.device.type not in ("cpu", "meta"):
        raise UnsupportedError(
            f"cannot watch a tensor on {t.device} through its memory: memwatch write-protects host "
            f"memory, and {t.device} memory is not host memory; pass via=\"dispatch\" to record "
            "every torch op that writes it instead (memwatch.watch(t, via=\"dispatch\"))"
        )
    why = _unsupported_tensor(t)
    if why is not None:
        raise UnsupportedError(f"cannot watch {why}")
    import torch

    name = str(t.dtype).removeprefix("torch.")
    t = t.detach()
    named = _TORCH_NAMED.get(name)
    if named is not None:
        t = t.view(getattr(torch, named[1]))
    try:
        return t.numpy(), named[0] if named else None
    except (TypeError, RuntimeError):
        raise UnsupportedError(
            f"cannot watch a tensor of dtype torch.{name}: memwatch decodes bool, integer, float "
            "(float16, bfloat16, float32, float64, float8_*) and complex tensors; "
            "watch a copy in one of those (e.g. t.to(torch.float32))"
        ) from None


def watch(
    obj: Any = None,
    name: str | None = None,
    *,
    mode: str | None = None,
    buffer: int | None = None,
    size: int | None = None,
    dtype: Any = None,
    shape: tuple[int, ...] | None = None,
    condition: Any = None,
    action: str = "record",
    via: str | None = None,
    _frame: Any = None,
    _variable: str | None = None,
) -> WatchHandle:
    """Watch a buffer; every change to it becomes a :class:`memwatch.Change`.

    ``obj`` is anything exporting a writable buffer: ``bytearray``,
    ``array.array``, ``memoryview``, ``mmap.mmap``, a numpy array (contiguous
    or a strided view, which reports only its own elements) or a torch CPU
    tensor (a tensor on any device with ``via="dispatch"``, below) of any
    strided dtype (bool, integers, float16, bfloat16, float32,
    float64, the float8 types, complex), also a strided view; sparse,
    nested, quantized and meta tensors raise :class:`memwatch.UnsupportedError`
    saying what to watch instead. A watched tensor cannot be resized or
    ``set_`` to other memory (:class:`memwatch.MemwatchError`; unwatch first),
    and its storage stays not resizable after the watch (torch cannot undo
    it). For raw memory pass ``buffer=address, size=nbytes`` (and
    optionally ``dtype=`` and ``shape=`` to get element values; ``dtype=``
    is a numpy dtype or a torch dtype, ``torch.bfloat16`` included).

    ``name`` is the tag; without it, the name of the variable passed in.
    A name is watched once at a time: watching a second object under a
    name still in use is a ``ValueError`` (pass another ``name=``, or
    unwatch the first). The object is pinned while watched: it cannot be
    freed, and a ``bytearray`` cannot be resized (``BufferError``). When
    nothing but memwatch refers to it any more (a function's local array
    after the function returned; for a view, nor to its base), its watch
    ends by itself at the next line boundary, recorded as ``collected``, and
    its name is free again. A ``memoryview``'s watch lasts until unwatched.

    ``mode="line"`` (the default) reports the net change of each executed
    line of in-scope code. ``mode="store"`` reports every store instruction
    that changes the buffer as its own change, with the writing thread and
    the time of the store: intermediate values are kept, at a cost of tens of
    microseconds per store, so it suits sparse writes (a counter, a flag, a
    few elements), never a whole-array update. Without ``mode=``, the mode
    is ``$MEMWATCH_MODE`` (``memwatch record --mode``) or ``"line"``.

    ``via`` says how a torch tensor's changes are found. ``"memory"`` (the
    default) write-protects its memory, as for any buffer: CPU tensors only.
    ``"dispatch"`` records every torch op that writes the tensor or a view
    of it (in-place ops, ``out=``, indexed assignment, the optimizer's
    updates), for a tensor on any device (CUDA, MPS, CPU): memwatch keeps a
    CPU copy of it, updated after each such op, and each op's effect is its
    own change, with ``Change.op`` naming the op (``"aten::add_.Tensor"``).
    Writes that bypass torch's dispatcher (a custom kernel, a numpy view
    of a CPU tensor) and ops on threads that did not call ``watch`` are not
    seen; see docs/pytorch.md. ``mode="store"`` is for ``via="memory"``.

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
    """
    _guard.check_guard(condition, action)
    if via is None:
        via = "memory"
    if via not in VIAS:
        raise ValueError(f"via must be one of {', '.join(map(repr, VIAS))}, not {via!r}")
    dispatch = via == "dispatch"
    if dispatch:
        if buffer is not None:
            raise TypeError(
                'via="dispatch" records the torch ops that write a tensor; raw memory (buffer=) is '
                "watched through memory: leave via= out"
            )
        if not _is_torch_tensor(obj):
            raise TypeError(
                f'via="dispatch" is for torch tensors, not {type(obj).__name__}: '
                "other objects are watched through memory (leave via= out)"
            )
        if mode == "store":
            raise ValueError(
                'mode="store" catches single stores to memory, which via="dispatch" does not watch: '
                "it records each torch op that writes the tensor already; leave mode= out"
            )
        # Each op is its own change already; $MEMWATCH_MODE is for memory.
        mode = "line"
    if mode is None:
        mode = os.environ.get("MEMWATCH_MODE") or "line"
    if mode not in MODES:
        raise ValueError(
            f"mode must be one of {', '.join(map(repr, MODES))}, not {mode!r}"
        )
    frame = _frame or sys._getframe(1)
    keep: list[Any] = []
    bytes_like = False
    address: int | None = None
    target: Any = None
    tensor_dtype: str | None = None
    mirror: Any = None
    if buffer is not None:
        if obj is not None:
            raise TypeError("pass either an object or buffer=address, not both")
        try:
            address = int(buffer)
        except (TypeError, ValueError):
            raise TypeError(f"buffer= must be an integer address, not {type(buffer).__name__}") from None
        if size is None:
            raise TypeError("watch(buffer=...) needs size=nbytes")
        size = int(size)
    elif obj is None:
        raise TypeError("watch() needs an object with a buffer, or buffer=address and size=nbytes")
    else:
        target = obj
        if dispatch:
            target, tensor_dtype, mirror = _dispatch_target(obj)
            keep.extend((mirror, obj))
        elif _is_torch_tensor(obj):
            target, tensor_dtype = _tensor_target(obj)
            keep.append(obj)
        elif isinstance(obj, bytearray | mmap.mmap) or (
            isinstance(obj, memoryview) and obj.format in ("B", "b", "c") and not hasattr(obj.obj, "__array_interface__")
        ):
            bytes_like = True
        if size is not None or dtype is not None or shape is not None:
            raise TypeError("size=, dtype= and shape= are for raw memory (buffer=address) only")
    dtype_str = _normalize_dtype(dtype) if dtype is not None else tensor_dtype
    variable = _variable or _variable_name(frame, address if buffer is not None else obj, buffer is not None)
    tag = name if name is not None else variable
    if tag is None:
        raise ValueError("cannot tell which variable this buffer is; pass name=")
    _memwatch._check_buffer_name(str(tag))
    if dispatch:
        # Resizing it would leave its mirror behind: refused while watched.
        _torch_resize.install()
    elif tensor_dtype is not None or (buffer is None and _is_torch_tensor(obj)):
        # The numpy view made the storage not resizable: say so when resized.
        _torch_resize.install()
        _torch_resize.pinned(obj, str(tag))
    before = {r for r, *_ in _memwatch._regions()}
    handle = _memwatch._watch(
        target,
        address,
        size,
        str(tag),
        variable,
        dtype_str,
        list(shape) if shape is not None else None,
        keep,
        bytes_like,
        mode,
        obj,
        _memory_owner(obj) if buffer is None else None,
    )
    if handle.region in before:
        # This object under this name is watched already (a task run twice):
        # that watch goes on; a condition or action given now replaces its own.
        _guard.set_guard(str(tag), condition, action)
        _auto_start()
        return handle
    if dispatch:
        _torch_dispatch.add(handle.region, str(tag), obj, mirror)
    _guard.set_guard(str(tag), condition, action)
    if mode == "store" and handle.tracking_note:
        warnings.warn(f"memwatch: {handle.tracking_note}", RuntimeWarning, stacklevel=2)
    _auto_start()
    return handle


def _resolve(target: Any, buffer: int | None) -> list[int]:
    regions = _memwatch._regions()
    if buffer is not None:
        found = [r for r, _, addr, _, _ in regions if addr == int(buffer)]
        what = f"buffer={int(buffer):#x}"
    elif isinstance(target, WatchHandle):
        found = [r for r, *_ in regions if r == target.region]
        what = repr(target)
    elif isinstance(target, str):
        found = [r for r, tag, *_ in regions if tag == target]
        what = f"name {target!r}"
    elif target is None:
        raise TypeError("unwatch() needs a handle, the watched object, its name, or buffer=address")
    else:
        found = [r for r, _, _, _, oid in regions if oid == id(target)]
        what = f"this {type(target).__name__}"
    if not found:
        tags = [t for _, t, *_ in regions] + [t for _, t, _ in _memwatch._object_watches()]
        tags = ", ".join(repr(t) for t in tags) or "nothing"
        raise NotWatchedError(f"{what} is not watched (watched: {tags})")
    return found


def unwatch_regions(target: Any = None, buffer: int | None = None, missing_ok: bool = False) -> None:
    """Ends the buffer watches ``target`` (a WatchHandle, the object, its
    tag) or ``buffer=address`` names; :class:`NotWatchedError` if none
    (unless ``missing_ok``). :func:`memwatch.unwatch` ends the other kinds
    of watch first."""
    try:
        regions = _resolve(target, buffer)
    except NotWatchedError:
        if not missing_ok:
            raise
        regions = []
    for region in regions:
        _memwatch._unwatch(region)
    _torch_dispatch.settle()


@contextlib.contextmanager
def watching(obj: Any = None, name: str | None = None, **kwargs: Any) -> Iterator[WatchHandle]:
    """``with memwatch.watching(arr, name="w"):`` watches for the block only."""
    handle = watch(obj, name, _frame=sys._getframe(2), **kwargs)
    try:
        yield handle
    finally:
        # The block may have unwatched it already.
        unwatch_regions(handle, missing_ok=True)


__all__ = [
    "Change",
    "MemwatchError",
    "NotWatchedError",
    "UnsupportedError",
    "WatchHandle",
    "unwatch_regions",
    "watch",
    "watching",
]
