"""``memwatch.explain_inplace()``: which line modified the tensor that
autograd's "modified by an inplace operation" error is about.

This module owns three things, all off until ``explain_inplace()`` turns
them on and all undone by ``explain_inplace(False)``:

- a :class:`torch.utils._python_dispatch.TorchDispatchMode` that logs, for
  every aten op that writes to one of its arguments (``alias_info.is_write``
  in its schema: ``mul_``, ``copy_``, ``fill_``, ``out=``...), the storage and
  byte range it wrote, the tensor's version before the write, the op
  (``aten::mul_.Tensor``) and the innermost Python frame outside torch and
  memwatch. The log is bounded: the last ``_WRITES_PER_STORAGE`` writes of
  each of the last ``_STORAGES`` storages written;
- where torch has :class:`torch.autograd.graph.node_creation_hook` (2.15 and
  later), a hook that notes in each autograd node's ``metadata`` the line
  that created it: the place where the op that saved tensors for backward
  ran;
- a wrapper around ``torch.autograd._engine_run_backward`` (what
  ``Tensor.backward``, ``torch.autograd.backward`` and ``torch.autograd.grad``
  call; on a torch without it, those three are wrapped). When the backward
  pass raises torch's RuntimeError, the wrapper walks the graph from the
  tensors backward started at, finds the saved tensor the message is about
  (its type, shape and version; torch's own unpack of it raises the same
  message), looks up the logged writes to its storage that took its version
  from the saved one to the current one, and adds them to the exception as
  notes (``err.add_note``). torch's message and exception are untouched.

Saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``) are not
used: with hooks installed torch no longer checks the versions of saved
tensors (the error would silently become wrong gradients), and
``torch.func.grad`` refuses to run under them.

Threads: torch keeps dispatch modes and node-creation hooks per thread.
``explain_inplace()`` covers the thread that calls it and the threads the
autograd engine runs backward on for it (they inherit its thread-local
state); call it in each other thread whose writes you want explained. The
note is added whichever thread calls backward.

Cost: every aten op of a covered thread goes through Python, about 5 us
each (3.6x for ops on 16 floats, 1.3x for a training step of a width-256
MLP; ``bench/torch_inplace_cost.py``, docs/pytorch.md): ops that write
nothing pay one dict lookup on top of torch's call into the mode, in-place
ops a few microseconds more for the log, each autograd node one call of
the creation hook. Nothing at all while off.
"""

from __future__ import annotations

import collections
import itertools
import linecache
import os
import re
import sys
import threading
from typing import Any

PHRASE = "has been modified by an inplace operation"
# torch's message (torch/csrc/autograd/saved_variable.cpp), since 1.x:
# "... inplace operation: [torch.FloatTensor [3]], which is output 0 of
# SigmoidBackward0, is at version 1; expected version 0 instead. Hint: ..."
_MESSAGE = re.compile(
    r"modified by an inplace operation: \[(?P<type>\S+) \[(?P<sizes>[^\]]*)\]\]"
    r"(?:, which is output (?P<output>\d+) of (?P<grad_fn>[^,]+),)?"
    r" is at version (?P<now>\d+); expected version (?P<saved>\d+) instead"
)

_WRITES_PER_STORAGE = 8
_STORAGES = 4096
_MAX_NODES = 200_000
_META_KEY = "memwatch.created_at"


class _State:
    on = False
    # (owner, attribute, original, wrapper) for each function wrapped.
    wrapped: list[tuple[Any, str, Any, Any]] = []
    # Storage address -> its last writes, oldest storage first.
    log: dict[int, collections.deque[_Write]] = {}
    # Thread ident -> name, for the threads explain_inplace() covers.
    threads: dict[int, str] = {}
    lock = threading.Lock()


_seq = itertools.count(1)
_tls = threading.local()
# Path prefixes of code that is not the program's own: torch's and memwatch's.
_internal_prefixes: tuple[str, ...] = ()
# co_filename -> whether it is internal (see _internal_prefixes).
_internal: dict[str, bool] = {}
# OpOverload -> what _written() says of it.
_writes_of_op: dict[Any, tuple[Any, ...]] = {}
_tensor_class: Any = None
_mode_class: Any = None


class _Write:
    """One logged in-place write: its op, its line, the tensor's version
    before it and where in its storage the tensor lies. Taken on every
    in-place op, so it copies what it needs and computes nothing."""

    __slots__ = (
        "seq",
        "op",
        "file",
        "line",
        "function",
        "version",
        "offset",
        "shape",
        "stride",
        "itemsize",
        "base_shape",
        "dtype",
        "thread",
    )

    def __init__(self, seq: int, op: str, site: tuple[str, int, str], t: Any) -> None:
        self.seq = seq
        self.op = op
        self.file, self.line, self.function = site
        self.version = t._version
        self.offset = t.storage_offset()
        self.shape = t.shape
        self.stride = t.stride()
        self.itemsize = t.element_size()
        base = t._base
        self.base_shape = None if base is None else base.shape
        self.dtype = t.dtype
        self.thread = threading.current_thread().name

    def span(self) -> tuple[int, int]:
        """The bytes of the storage the write covered (all it may have written)."""
        return _extent(self.offset, self.shape, self.stride, self.itemsize)


def _extent(offset: int, shape: Any, stride: Any, itemsize: int) -> tuple[int, int]:
    start = offset * itemsize
    if any(n == 0 for n in shape):
        return start, start
    last = sum((n - 1) * s for n, s in zip(shape, stride))
    return start, start + (last + 1) * itemsize


# --- where code runs --------------------------------------------------------


def _is_internal(filename: str) -> bool:
    inside = _internal.get(filename)
    if inside is None:
        inside = _internal[filename] = filename.startswith(_internal_prefixes)
    return inside


def _caller(frame: Any) -> tuple[str, int, str] | None:
    """(file, line, function) of the innermost frame outside torch and memwatch."""
    while frame is not None:
        code = frame.f_code
        if not _is_internal(code.co_filename):
            return code.co_filename, frame.f_lineno, code.co_qualname
        frame = frame.f_back
    return None


def _where(file: str, line: int) -> str:
    """``train.py:12``: relative to the working directory when under it."""
    try:
        from memwatch import _scope

        name = _scope.display_name(file)
        if name.startswith("cell ["):
            return f"{name}, line {line}"
        cwd = os.getcwd() + os.sep
        if name.startswith(cwd):
            name = name[len(cwd) :]
        return f"{name}:{line}"
    except Exception:  # noqa: BLE001 - a name is only for show
        return f"{file}:{line}"


def _source(file: str, line: int) -> str:
    """`` (y = x.relu())``: the line's code, without its comment."""
    text = linecache.getline(file, line).strip()
    if "#" in text:
        import io
        import tokenize

        try:
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                if tok.type == tokenize.COMMENT:
                    text = text[: tok.start[1]].rstrip()
                    break
        except (tokenize.TokenError, SyntaxError):
            pass
    return f" ({text})" if text else ""


# --- the write log ----------------------------------------------------------


def _written(op: Any) -> tuple[Any, ...]:
    """Where ``op`` writes: ``(name, ((index, argument name, keyword-only), ...))``,
    or ``()`` for an op that writes none of its arguments."""
    try:
        args = tuple(
            (i, a.name, bool(a.kwarg_only))
            for i, a in enumerate(op._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        )
        found: tuple[Any, ...] = (op.name(), args) if args else ()
    except Exception:  # noqa: BLE001 - an op without a schema writes nothing we can see
        found = ()
    _writes_of_op[op] = found
    return found


def _span(t: Any) -> tuple[int, int, int]:
    """(storage address, first byte, end byte) of ``t`` in its storage."""
    return (t.untyped_storage().data_ptr(), *_extent(t.storage_offset(), t.shape, t.stride(), t.element_size()))


def _log_write(where: tuple[Any, ...], args: Any, kwargs: Any) -> None:
    try:
        site = _caller(sys._getframe(2))
        if site is None:
            return
        name, written = where
        for index, arg_name, kwarg_only in written:
            arg = kwargs.get(arg_name) if kwarg_only or index >= len(args) else args[index]
            for t in arg if isinstance(arg, list | tuple) else (arg,):
                _log_one(name, site, t)
    except Exception:  # noqa: BLE001 - the log must never break the program
        pass


def _log_one(name: str, site: tuple[str, int, str], t: Any) -> None:
    if not isinstance(t, _tensor_class):
        return
    try:
        ptr = t.untyped_storage().data_ptr()
        w = _Write(next(_seq), name, site, t)
    except Exception:  # noqa: BLE001 - no storage (meta, sparse, a wrapper subclass)
        return
    if not ptr:
        return
    log = _State.log
    writes = log.pop(ptr, None)
    if writes is None:
        writes = collections.deque(maxlen=_WRITES_PER_STORAGE)
        while len(log) >= _STORAGES:
            log.pop(next(iter(log)))
    writes.append(w)
    log[ptr] = writes


def _make_mode_class(torch: Any) -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    op_class = torch._ops.OpOverload
    writes_of_op = _writes_of_op

    class _WriteLog(TorchDispatchMode):
        """Logs the in-place writes of the thread it is pushed on."""

        # Higher-order operators (torch.cond...) are passed through, not refused.
        supports_higher_order_operators = True

        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            # torch's default wraps __torch_dispatch__ in torch._dynamo.disable,
            # which imports torch._dynamo at the first op (over a second) and
            # costs a microsecond per op. Under torch.compile a function runs
            # eagerly while a mode like this one is on, and the one branch
            # dynamo may trace (a higher-order operator, below) only calls func.
            return False

        def __init__(self) -> None:
            super().__init__()
            self.active = True

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if kwargs is None:
                kwargs = {}
            if type(func) is not op_class:
                return func(*args, **kwargs)
            out = func(*args, **kwargs)
            where = writes_of_op.get(func)
            if where is None:
                where = _written(func)
            if where and self.active and _State.on:
                _log_write(where, args, kwargs)
            return out

    return _WriteLog


def _on_node(node: Any) -> None:
    if not _State.on:
        return
    try:
        site = _caller(sys._getframe(1))
        if site is not None:
            node.metadata[_META_KEY] = (*site, next(_seq))
    except Exception:  # noqa: BLE001 - the hook must never break the program
        pass


# --- turning it on and off -------------------------------------------------


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"memwatch.explain_inplace() explains errors of PyTorch's autograd, but torch cannot be "
            f"imported here ({e}); install PyTorch in this environment (pip install torch)"
        ) from e
    return torch


def _init(torch: Any) -> None:
    global _internal_prefixes, _mode_class, _tensor_class
    if _mode_class is not None:
        return
    _tensor_class = torch.Tensor
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    dirs = [torch_dir, os.path.join(os.path.dirname(torch_dir), "functorch")]
    dirs.append(os.path.dirname(os.path.abspath(__file__)))  # memwatch itself
    _internal_prefixes = tuple(d + os.sep for d in dirs)
    _internal.clear()
    _mode_class = _make_mode_class(torch)


def _wrap_backward(torch: Any) -> None:
    import functools

    autograd = torch.autograd
    graph = getattr(autograd, "graph", None)
    if callable(getattr(autograd, "_engine_run_backward", None)):
        targets = [(autograd, "_engine_run_backward")]
        if graph is not None and getattr(graph, "_engine_run_backward", None) is autograd._engine_run_backward:
            targets.append((graph, "_engine_run_backward"))
    else:  # torch before 2.3
        targets = [(autograd, "backward"), (autograd, "grad")]
    originals: dict[int, Any] = {}
    for owner, attr in targets:
        original = getattr(owner, attr)
        wrapper = originals.get(id(original))
        if wrapper is None:
            wrapper = originals[id(original)] = _backward_wrapper(original, functools)
        setattr(owner, attr, wrapper)
        _State.wrapped.append((owner, attr, original, wrapper))


# The name of the first parameter of _engine_run_backward, backward, grad.
_OUTPUTS = ("t_outputs", "tensors", "outputs")


def _backward_wrapper(original: Any, functools: Any) -> Any:
    @functools.wraps(original)
    def run_backward(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except RuntimeError as err:
            if _State.on and PHRASE in str(err):
                outputs = args[0] if args else next((kwargs[k] for k in _OUTPUTS if k in kwargs), ())
                _explain(err, outputs)
            # The frames from here down are memwatch's; the bare raise
            # keeps the traceback set here, so this frame is not added back.
            tb = err.__traceback__
            if tb is not None and tb.tb_frame is sys._getframe():
                err.__traceback__ = tb.tb_next
            raise

    run_backward.__memwatch_wrapper__ = True  # type: ignore[attr-defined]
    return run_backward


def _unwrap_backward() -> None:
    for owner, attr, original, wrapper in reversed(_State.wrapped):
        if getattr(owner, attr, None) is wrapper:
            setattr(owner, attr, original)
    _State.wrapped.clear()


def _cover_thread(torch: Any) -> None:
    """Pushes the write log (and the node hook) on the calling thread, once."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    mode = getattr(_tls, "mode", None)
    if mode is not None and any(m is mode for m in _get_current_dispatch_mode_stack()):
        mode.active = True
    else:
        mode = _mode_class()
        mode.__enter__()
        _tls.mode = mode
    push_hook = getattr(torch._C._autograd, "_push_node_creation_hook", None)
    if push_hook is not None and not getattr(_tls, "node_hook", False):
        push_hook(_on_node)
        _tls.node_hook = True
    me = threading.current_thread()
    _State.threads[me.ident or 0] = me.name


def _uncover_thread(torch: Any) -> None:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    mode = getattr(_tls, "mode", None)
    if mode is None:
        return
    stack = _get_current_dispatch_mode_stack()
    if stack and stack[-1] is mode:
        # Nothing was pushed after it: both come off the stacks.
        mode.__exit__(None, None, None)
        _tls.mode = None
        if getattr(_tls, "node_hook", False):
            torch._C._autograd._pop_node_creation_hook()
            _tls.node_hook = False
    else:
        # A mode pushed later is still on: taking this one out from under it
        # would undo the other's bookkeeping. It stays, passing ops through,
        # until explain_inplace() turns it on again in this thread.
        mode.active = False
    _State.threads.pop(threading.current_thread().ident or 0, None)


def _set(on: bool) -> None:
    if not on:
        if "torch" not in sys.modules:
            return
        torch = sys.modules["torch"]
        with _State.lock:
            was = _State.on
            _State.on = False
            if was:
                _unwrap_backward()
                _State.log.clear()
            try:
                _uncover_thread(torch)
            except Exception:  # noqa: BLE001 - off is off, even if a stack was odd
                pass
        return
    torch = _torch()
    with _State.lock:
        _init(torch)
        if not _State.on:
            _wrap_backward(torch)
            _State.on = True
        _cover_thread(torch)


class explain_inplace:
    """Explain autograd's "modified by an inplace operation" errors.

    While on, a ``RuntimeError: one of the variables needed for gradient
    computation has been modified by an inplace operation`` from
    ``Tensor.backward``, ``torch.autograd.backward`` or
    ``torch.autograd.grad`` gets notes naming where the saved tensor was
    modified, the aten op and the versions, and where it was saved (one
    line)::

        memwatch: tensor [torch.FloatTensor [4, 3]] saved by SigmoidBackward0 at train.py:10
        (y = h.sigmoid()) was modified in place at train.py:11 in step() (y.mul_(2)):
        aten::mul_.Tensor (version 0 -> 1)

    No tensor needs to be watched. ``explain_inplace()`` turns it on,
    ``explain_inplace(False)`` off; as a context manager
    (``with memwatch.explain_inplace(): ...``) it is on inside the block
    and back to what it was after. Turning it on twice is the same as once.
    ``memwatch record --torch-inplace`` turns it on from the program's start,
    once it imports torch.

    Threads: the backward wrapper is process-wide, but torch keeps dispatch
    modes per thread, so in-place writes are seen in the thread that called
    ``explain_inplace()`` and the autograd threads its backward passes run
    on; call it in any other thread whose writes should be explained.

    Cost: while on, each aten op of a covered thread passes through a Python
    dispatch mode, about 5 us per op; off, nothing.
    """

    def __init__(self, on: bool = True) -> None:
        self._before = _State.on
        _set(bool(on))

    def __enter__(self) -> explain_inplace:
        return self

    def __exit__(self, *exc: object) -> None:
        _set(self._before)

    def __repr__(self) -> str:
        return f"memwatch.explain_inplace({'on' if _State.on else 'off'})"


# --- the explanation --------------------------------------------------------


def _roots(outputs: Any) -> list[Any]:
    import torch

    if isinstance(outputs, torch.Tensor) or not isinstance(outputs, list | tuple):
        outputs = (outputs,)
    nodes = []
    for o in outputs:
        node = o.grad_fn if isinstance(o, torch.Tensor) else getattr(o, "node", None)
        if node is not None:
            nodes.append(node)
    return nodes


_saved_attrs: dict[type, tuple[str, ...]] = {}


def _saved_of(node: Any) -> list[tuple[str, Any]]:
    """(the attribute that unpacks it, SavedTensor) for each tensor ``node`` saved."""
    names = _saved_attrs.get(type(node))
    if names is None:
        names = _saved_attrs[type(node)] = tuple(a for a in dir(node) if a.startswith("_raw_saved_"))
    found = []
    for raw in names:
        try:
            value = getattr(node, raw)
        except Exception:  # noqa: BLE001 - released, or not a tensor
            continue
        unpack = "saved_tensors" if raw == "_raw_saved_tensors" else "_saved_" + raw[len("_raw_saved_") :]
        for st in value if isinstance(value, list | tuple) else (value,):
            if st is not None:
                found.append((unpack, st))
    return found


def _same_error(node: Any, unpack: str, head: str) -> bool:
    try:
        getattr(node, unpack)
    except RuntimeError as e:
        return str(e).startswith(head)
    except Exception:  # noqa: BLE001
        return False
    return False


def _find_saved(roots: list[Any], msg: str, fields: Any) -> tuple[list[Any], Any]:
    """The nodes that saved the tensor ``msg`` is about, and that tensor
    (``None`` where torch does not show saved tensors' data)."""
    head = msg.split(" instead.")[0]
    sizes = [int(s) for s in fields["sizes"].split(",") if s.strip()]
    now = int(fields["now"])
    seen: set[int] = set()
    keep: list[Any] = []  # holds the nodes, so that their ids stay theirs
    queue = collections.deque(roots)
    nodes: list[Any] = []
    data = None
    while queue and len(keep) < _MAX_NODES:
        node = queue.popleft()
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        for unpack, st in _saved_of(node):
            try:
                # SavedTensor.data (torch 2.15+): the saved tensor, unchecked.
                d = st.data if hasattr(type(st), "data") else None
                if d is not None and (d._version != now or list(d.shape) != sizes or d.type() != fields["type"]):
                    continue
            except Exception:  # noqa: BLE001 - released, or not a plain tensor
                continue
            if _same_error(node, unpack, head):
                if d is not None and data is not None and _span(d)[0] != _span(data)[0]:
                    continue  # another tensor that fits the same message
                nodes.append(node)
                if data is None:
                    data = d
                break
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is not None and id(nxt) not in seen:
                queue.append(nxt)
    return nodes, data


def _chain(writes: list[_Write], saved: int, now: int, after: int) -> list[_Write]:
    """The writes that took the version from ``saved`` to ``now``, oldest first:
    for each step the latest write logged from that version, after ``after``."""
    chain: list[_Write] = []
    limit = None
    for version in range(now - 1, saved - 1, -1):
        match = None
        for w in reversed(writes):
            if w.version == version and w.seq > after and (limit is None or w.seq < limit):
                match = w
                break
        if match is not None:
            chain.append(match)
            limit = match.seq
    chain.reverse()
    return chain


def _describe_write(w: _Write, saved_span: tuple[int, int] | None) -> str:
    func = w.function if w.function.startswith("<") else f"{w.function}()"
    how = ""
    start, end = w.span()
    if saved_span is not None and (end <= saved_span[0] or start >= saved_span[1]):
        how = " on other elements of its storage (torch counts versions per storage)"
    elif w.base_shape is not None:
        how = " on a view of it"
    if w.thread != threading.current_thread().name:
        func += f" in thread {w.thread!r}"
    return (
        f"at {_where(w.file, w.line)} in {func}{_source(w.file, w.line)}: {w.op}{how} "
        f"(version {w.version} -> {w.version + 1})"
    )


def _covered() -> str:
    alive = {t.ident for t in threading.enumerate()}
    names = sorted({name for ident, name in _State.threads.items() if ident in alive})
    return ", ".join(names) if names else "none"


def _tensor_text(fields: Any) -> str:
    return f"[{fields['type']} [{fields['sizes']}]]"


def _notes(err: BaseException, outputs: Any) -> list[str]:
    msg = str(err)
    fields = _MESSAGE.search(msg)
    if fields is None:
        return []
    saved, now = int(fields["saved"]), int(fields["now"])
    nodes, data = _find_saved(_roots(outputs), msg, fields)
    what = f"tensor {_tensor_text(fields)}"
    after = 0
    if nodes:
        parts = []
        for node in nodes:
            site = node.metadata.get(_META_KEY) if hasattr(node, "metadata") else None
            if site is not None:
                parts.append(f"{node.name()} at {_where(site[0], site[1])}{_source(site[0], site[1])}")
                after = max(after, site[3])
            else:
                parts.append(node.name())
        what += " saved by " + " and by ".join(parts)
    if data is not None:
        ptr, start, end = _span(data)
        chain = _chain(list(_State.log.get(ptr, ())), saved, now, after)
        if not chain:
            return [
                f"memwatch: {what} is at version {now}, not {saved}, but memwatch saw no in-place write to its "
                f"memory since it was saved: the write ran in a thread explain_inplace() does not cover "
                f"(it covers {_covered()}; call it in that thread too), before explain_inplace() was on, or "
                f"so long before that memwatch's log (the last {_WRITES_PER_STORAGE} writes of each of the "
                f"last {_STORAGES} storages written) no longer holds it"
            ]
        notes = [f"memwatch: {what} was modified in place {_describe_write(chain[0], (start, end))}"]
        notes += [f"memwatch: and {_describe_write(w, (start, end))}" for w in chain[1:]]
        missing = (now - saved) - len(chain)
        if missing:
            notes.append(
                f"memwatch: {missing} more in-place write{'s' if missing > 1 else ''} to it memwatch did not "
                f"see (a thread explain_inplace() does not cover, it covers {_covered()}; or dropped from its log)"
            )
        return notes
    return _guess(what, fields, saved, now, bool(nodes))


def _type_of(w: _Write) -> str:
    """The tensor type torch's message names (``torch.FloatTensor``); the device is not logged."""
    import torch

    try:
        return torch.empty(0, dtype=w.dtype).type()
    except Exception:  # noqa: BLE001
        return ""


def _guess(what: str, fields: Any, saved: int, now: int, found: bool) -> list[str]:
    """Without the saved tensor's memory: the logged writes that fit the message."""
    sizes = tuple(int(s) for s in fields["sizes"].split(",") if s.strip())
    fits = []
    for writes in _State.log.values():
        last = writes[-1]
        if last.version == now - 1 and sizes in (last.shape, last.base_shape) and _type_of(last) == fields["type"]:
            fits.append(_chain(list(writes), saved, now, 0))
    fits = [c for c in fits if c]
    why = (
        "torch does not show saved tensors' memory (SavedTensor.data, torch 2.15 and later)"
        if found
        else "memwatch did not find it in the graph: it was saved before explain_inplace() was on, or backward "
        "started from a tensor memwatch was not given"
    )
    if not fits:
        return [
            f"memwatch: {what} (version {saved} -> {now}): memwatch cannot tell which write modified it, "
            f"{why}, and no in-place write it logged fits the message (same type and shape, "
            f"version {saved} -> {now}); covered threads: {_covered()}"
        ]
    fits.sort(key=lambda c: c[-1].seq)
    chain = fits[-1]
    others = f"; {len(fits) - 1} other logged writes fit too, this is the latest" if len(fits) > 1 else ""
    notes = [
        f"memwatch: {what}: memwatch cannot be sure which write modified it ({why}); the in-place write "
        f"that fits the message (same type and shape, version {saved} -> {now}){others} was "
        f"{_describe_write(chain[0], None)}"
    ]
    notes += [f"memwatch: and {_describe_write(w, None)}" for w in chain[1:]]
    return notes


def _explain(err: BaseException, outputs: Any) -> None:
    """Adds memwatch's notes to ``err``; never raises."""
    if getattr(err, "_memwatch_explained", False):
        return
    try:
        err._memwatch_explained = True  # type: ignore[attr-defined]
        notes = _notes(err, outputs)
    except Exception as e:  # noqa: BLE001 - an explanation must never replace the error
        notes = [f"memwatch: could not look into this error ({type(e).__name__}: {e})"]
    for note in notes:
        err.add_note(note)


# --- memwatch record --torch-inplace ----------------------------------------


class _OnTorchImport:
    """A meta-path finder that turns explain_inplace() on right after torch
    is imported, so that a program that never imports torch never does."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "torch":
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        import importlib.util

        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_explain(module: Any) -> None:
            exec_module(module)
            try:
                explain_inplace(True)
            except Exception as e:  # noqa: BLE001 - the program runs on without it
                sys.stderr.write(f"memwatch: --torch-inplace could not start ({type(e).__name__}: {e})\n")

        loader.exec_module = exec_then_explain
        return spec


def _boot_from_env() -> None:
    """``memwatch record --torch-inplace``: explain_inplace() on once torch is imported."""
    if "torch" in sys.modules:
        explain_inplace(True)
    elif not any(isinstance(f, _OnTorchImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnTorchImport())
