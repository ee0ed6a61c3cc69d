"""Watching a whole torch model or optimizer: ``watch_module`` and ``watch_optimizer``.

Owns the registry of module and optimizer watches (which tensor of which
model or optimizer is watched under which tag) and the torch hooks that
keep it true while the program replaces tensors:

- torch's global module hooks for parameter, buffer and submodule
  registration: an assignment such as ``model.fc.weight = nn.Parameter(w)``
  or ``model.fc = nn.Linear(4, 4)`` moves the tags to the new tensors (the
  old ones' watches end first).
- ``nn.Module._apply``, wrapped once (``to()``, ``double()``, ``half()``,
  ``cuda()`` and the like all go through it): when the outermost call
  returns, each watched tensor of a watched model whose memory moved is
  watched again at its new place under the same tag; one that moved to
  memory memwatch cannot watch (another device) has its watch ended, with a
  warning that says so. Never a watch left silently on memory the model no
  longer uses.
- an optimizer's step and ``load_state_dict`` post-hooks: its state
  tensors (momentum buffers, Adam's moments and step counts) are watched
  as soon as they exist, and followed when replaced.

Each tensor is watched through :func:`memwatch.watch`, so its changes are
ordinary buffer changes: on the line that made them (``opt.step()``), with
old and new element values, in the history and in traces.

Threads: the registry is changed under one lock, from whichever thread
calls in (the hooks run in the thread that assigns, converts or steps).
Nothing here runs in signal context. Cost: nothing per line; per optimizer
step, one comparison of each state tensor's data pointer with the watched
one; per ``_apply``, the same for every watched tensor of every watched
model; per parameter, buffer or submodule registered anywhere in the
process (any module being built), one set lookup per watched model, and a
walk of the model only when the registration is on one of its modules.
torch is imported only when one of these functions is called.
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

from memwatch import _api
from memwatch._names import _variable_name
from memwatch._memwatch import NotWatchedError, UnsupportedError, WatchHandle

_lock = threading.RLock()
_modules: list[ModuleWatchHandle] = []
_optimizers: list[OptimizerWatchHandle] = []
_installed = False
_apply_depth = threading.local()


def _user_stacklevel() -> int:
    """The ``stacklevel`` of a warning that points at the first frame
    outside torch and memwatch (the line that converted or assigned)."""
    f, level = sys._getframe(1), 1
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if not (mod == "torch" or mod.startswith(("torch.", "memwatch"))):
            return level
        f, level = f.f_back, level + 1
    return 1


def _signature(t: Any) -> tuple[Any, ...]:
    """What identifies the memory a tensor shows: moved memory, another
    dtype or shape, or another device means another watch."""
    return (t.device, t.dtype, tuple(t.shape), tuple(t.stride()), t.data_ptr())


@dataclass(eq=False)
class _Entry:
    tag: str
    handle: WatchHandle
    signature: tuple[Any, ...]
    # id() of the tensor watched: the watch keeps it alive, so the id is
    # its own while the watch lasts. Not a weak reference: torch refuses to
    # swap_tensors() a tensor with one (Module._apply under
    # torch.__future__.set_swap_module_params_on_conversion(True)).
    tensor: int
    numel: int


class _Group:
    """What module and optimizer watches share: named tensors, each watched
    under ``<name>.<key>`` with the same options, followed when replaced."""

    kind = ""

    def __init__(self, name: str, variable: str | None, options: dict[str, Any]) -> None:
        self.name = name
        self.variable = variable
        self._options = options
        self._entries: dict[str, _Entry] = {}
        self.skipped: dict[str, str] = {}
        self.active = True

    # -- what users read ---------------------------------------------------

    def _ordered(self) -> list[str]:
        """The watched keys, in the model's (the optimizer's) own order."""
        order = {k: i for i, k in enumerate(self._current())}
        return sorted(self._entries, key=lambda k: order.get(k, len(order)))

    @property
    def tags(self) -> list[str]:
        """The tags of the tensors watched now, in the model's order
        (``named_parameters()``, then ``named_buffers()``), or the optimizer's."""
        return [self._entries[k].tag for k in self._ordered()]

    @property
    def handles(self) -> dict[str, WatchHandle]:
        """Each watched tensor's :class:`WatchHandle`, by its name in the
        model (``"0.weight"``) or the optimizer (``"model.0.weight.exp_avg"``)."""
        return {k: self._entries[k].handle for k in self._ordered()}

    def __len__(self) -> int:
        return len(self._entries)

    def __enter__(self) -> _Group:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unwatch()

    def _elements(self) -> int:
        return sum(e.numel for e in self._entries.values())

    def __repr__(self) -> str:
        state = "" if self.active else ", unwatched"
        return f"<{type(self).__name__} {self.name!r}: {len(self._entries)} tensors, {self._elements():,} elements{state}>"

    # -- watching and following --------------------------------------------

    def _tag(self, key: str) -> str:
        return f"{self.name}.{key}"

    def _watch(self, key: str, t: Any) -> None:
        """Watches tensor ``t`` as ``key``, or notes why it cannot be."""
        if t.numel() == 0:
            self.skipped[key] = "empty (no elements to watch)"
            return
        tag = self._tag(key)
        variable = f"{self.variable}.{key}" if self.variable else tag
        options = dict(self._options)
        if options["via"] == "auto":
            options["via"] = "memory" if t.device.type == "cpu" else "dispatch"
        handle = _api.watch(t, name=tag, _frame=sys._getframe(1), _variable=variable, **options)
        self._entries[key] = _Entry(tag, handle, _signature(t), id(t), t.numel())
        self.skipped.pop(key, None)

    def _end(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        try:
            _api.unwatch_regions(entry.handle)
        except NotWatchedError:
            pass  # ended already (collected, or unwatched by its tag)

    def _follow(self, key: str, t: Any | None) -> str | None:
        """Makes the watch of ``key`` show tensor ``t`` (None: gone).
        Returns the device ``t`` is on when that ended a watch (memory
        memwatch cannot watch), for :meth:`_warn_lost`."""
        entry = self._entries.get(key)
        if entry is not None and t is not None and entry.tensor == id(t) and entry.signature == _signature(t):
            return None
        self._end(key)
        if t is None:
            return None
        if t.device.type == "meta":
            self.skipped[key] = "on meta: a meta tensor has no data to watch"
            return str(t.device) if entry is not None else None
        if t.device.type != "cpu" and self._options["via"] == "memory":
            self.skipped[key] = f'on {t.device}: via="memory" watches CPU memory'
            return str(t.device) if entry is not None else None
        self._watch(key, t)
        return None

    def _warn_lost(self, lost: dict[str, str]) -> None:
        """One warning for the watches a conversion or assignment ended."""
        if not lost:
            return
        names = ", ".join(self._tag(k) for k in lost)
        devices = ", ".join(sorted(set(lost.values())))
        warnings.warn(
            f"memwatch: {names} moved to {devices}, memory memwatch cannot watch, so "
            f"{'its watch has' if len(lost) == 1 else 'their watches have'} ended; watch on the CPU"
            + ("" if "meta" in lost.values() and len(set(lost.values())) == 1 else
               ', or pass via="auto" (or via="dispatch") to watch_module to follow tensors to any device'),
            RuntimeWarning,
            stacklevel=_user_stacklevel(),
        )

    def _current(self) -> dict[str, Any]:
        raise NotImplementedError

    def refresh(self) -> None:
        """Follows every tensor that was replaced or moved since it was
        watched (the hooks do this by themselves after assignments,
        ``to()``-like conversions and optimizer steps; call it after
        ``param.data = other``, which torch gives no hook for)."""
        with _lock:
            if not self.active:
                return
            current = self._current()
            for key in list(self._entries):
                if key not in current:
                    self._end(key)
            lost = {}
            for key, t in current.items():
                device = self._follow(key, t)
                if device is not None:
                    lost[key] = device
            self._warn_lost(lost)

    def unwatch(self) -> None:
        """Ends the watch of every tensor; changes made up to now are reported first."""
        with _lock:
            for key in list(self._entries):
                self._end(key)
            self.active = False
            registry = _modules if isinstance(self, ModuleWatchHandle) else _optimizers
            if self in registry:
                registry.remove(self)


class ModuleWatchHandle(_Group):
    """A watched ``torch.nn.Module``, as :func:`memwatch.watch_module`
    returns it: ``name``, ``tags``, ``handles`` (by qualified name),
    ``skipped`` (what could not be watched, and why), ``refresh()`` and
    ``unwatch()``; a context manager that unwatches on exit."""

    def __init__(self, module: Any, name: str, variable: str | None, buffers: bool, options: dict[str, Any]) -> None:
        super().__init__(name, variable, options)
        self._module = weakref.ref(module)
        self.buffers = buffers
        # ids of the model's submodules, so that a registration elsewhere in
        # the process (building another model) costs a set lookup, not a walk
        # of this one; None after a submodule assignment in this model.
        self._ids: set[int] | None = None
        weakref.finalize(module, _forget, weakref.ref(self))

    @property
    def module(self) -> Any:
        return self._module()

    def _current(self) -> dict[str, Any]:
        m = self._module()
        if m is None:
            return {}
        self._ids = None  # a refresh also rereads the model's structure
        found = {k: p for k, p in m.named_parameters() if p is not None}
        if self.buffers:
            found.update((k, b) for k, b in m.named_buffers() if b is not None)
        return found

    def _prefixes(self, sub: Any) -> list[str]:
        """The qualified names ``sub`` has in this model ("" for the model itself)."""
        m = self._module()
        if m is None:
            return []
        if self._ids is None:
            self._ids = {id(s) for s in m.modules()}
        if id(sub) not in self._ids:
            # Every way a submodule joins the model goes through a module
            # registration hook on a module of the model, which empties the
            # cache below; an id found may be a reused one, so it is checked.
            return []
        return [k for k, s in m.named_modules(remove_duplicate=False) if s is sub]

    def _assigned(self, owner: Any, attr: str, value: Any, what: str) -> None:
        """An assignment ``owner.attr = value`` is about to happen (``what``
        is parameter, buffer or module)."""
        lost = {}
        prefixes = self._prefixes(owner)
        if prefixes and what == "module":
            self._ids = None  # the model's set of submodules changes with this assignment
        for prefix in prefixes:
            key = f"{prefix}.{attr}" if prefix else attr
            found = []
            if what == "module":
                for k in [k for k in self._entries if k.startswith(key + ".")]:
                    self._end(k)
                if value is not None:
                    params = list(value.named_parameters())
                    bufs = list(value.named_buffers()) if self.buffers else []
                    found = [(f"{key}.{k}", t) for k, t in params + bufs if t is not None]
            elif what == "parameter" or self.buffers:
                found = [(key, value)]
            for k, t in found:
                if self._follow(k, t) is not None:
                    lost[k] = str(t.device)
        self._warn_lost(lost)


class OptimizerWatchHandle(_Group):
    """A watched ``torch.optim.Optimizer``, as :func:`memwatch.watch_optimizer`
    returns it. Its state tensors are watched as ``<name>.<param>.<key>``
    (``opt.model.0.weight.momentum_buffer``; a parameter of no watched model
    is named ``param<group>_<index>``) once the optimizer creates them."""

    def __init__(self, optimizer: Any, name: str, variable: str | None, options: dict[str, Any]) -> None:
        super().__init__(name, variable, options)
        self._optimizer = weakref.ref(optimizer)
        self._hooks: list[Any] = []
        weakref.finalize(optimizer, _forget, weakref.ref(self))

    @property
    def optimizer(self) -> Any:
        return self._optimizer()

    def _param_names(self, opt: Any) -> dict[int, str]:
        known: dict[int, str] = {}
        for mw in _modules:
            for entry in mw._entries.values():
                known.setdefault(entry.tensor, entry.tag)
        names = {}
        for g, group in enumerate(opt.param_groups):
            for i, p in enumerate(group["params"]):
                names[id(p)] = known.get(id(p), f"param{g}_{i}")
        return names

    def _current(self) -> dict[str, Any]:
        opt = self._optimizer()
        if opt is None:
            return {}
        import torch

        names = self._param_names(opt)
        found = {}
        for p, state in list(opt.state.items()):
            pname = names.get(id(p))
            if pname is None or not isinstance(state, dict):
                continue
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    found[f"{pname}.{k}"] = v
        return found

    def unwatch(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        super().unwatch()


def _forget(ref: Any) -> None:
    """The watched model or optimizer is gone: its watch is over. (Its
    tensors' own watches end as collected, once nothing else holds them.)"""
    group = ref()
    if group is None:
        return
    with _lock:
        group.active = False
        group._entries.clear()
        for registry in (_modules, _optimizers):
            if group in registry:
                registry.remove(group)


# --- hooks ------------------------------------------------------------------


def _install() -> None:
    """Puts memwatch's hooks into torch, once per process."""
    global _installed
    if _installed:
        return
    import torch
    from torch.nn.modules import module as torch_module

    _installed = True
    for what in ("parameter", "buffer", "module"):
        register = getattr(torch_module, f"register_module_{what}_registration_hook", None)
        if register is not None:
            register(lambda owner, attr, value, _what=what: _on_registration(owner, attr, value, _what))

    original = torch.nn.Module._apply

    def _apply(self: Any, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(_apply_depth, "n", 0)
        _apply_depth.n = depth + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _apply_depth.n = depth
            if depth == 0 and _modules:
                _after_apply(self)

    _apply.__wrapped__ = original  # type: ignore[attr-defined]
    _apply.__doc__ = original.__doc__
    torch.nn.Module._apply = _apply


def _on_registration(owner: Any, attr: str, value: Any, what: str) -> None:
    if not _modules:
        return None
    with _lock:
        for mw in list(_modules):
            mw._assigned(owner, attr, value, what)
    return None


def _after_apply(module: Any) -> None:
    with _lock:
        for mw in list(_modules):
            if mw._prefixes(module) or any(s is mw.module for s in module.modules()):
                mw.refresh()
        for ow in list(_optimizers):
            ow.refresh()


def _check_free(registry: list[Any], obj: Any, tag: str, what: str) -> None:
    """Raises ValueError when ``obj`` (a module or optimizer) or the name
    ``tag`` is already watched in ``registry``."""
    article = "an" if what[0] in "aeiou" else "a"
    for other in registry:
        if (other.module if what == "module" else other.optimizer) is obj:
            raise ValueError(f"this {what} is already watched as {other.name!r}; unwatch it first")
        if other.name == tag:
            raise ValueError(f"{tag!r} is already watched ({article} {what}); pass another name= or unwatch it first")


def _name(frame: Any, obj: Any, name: str | None, what: str) -> tuple[str, str | None]:
    variable = _variable_name(frame, obj, False)
    tag = name if name is not None else variable
    if tag is None:
        raise ValueError(f"cannot tell which variable this {what} is; pass name=")
    return str(tag), variable


def _options(mode: str | None, condition: Any, action: str, via: str) -> dict[str, Any]:
    """The options every tensor of a group is watched with; ``via`` checked
    here, where ``"auto"`` (memory on the CPU, dispatch elsewhere) is known."""
    if via not in ("memory", "dispatch", "auto"):
        raise ValueError(f"via must be 'memory', 'dispatch' or 'auto', not {via!r}")
    if via != "memory" and mode == "store":
        raise ValueError(
            f'mode="store" catches single stores to CPU memory, which via={via!r} does not always watch: '
            'leave mode= out, or use via="memory"'
        )
    return {"mode": mode, "condition": condition, "action": action, "via": via}


def watch_module(
    module: Any,
    name: str | None = None,
    *,
    buffers: bool = True,
    mode: str | None = None,
    condition: Any = None,
    action: str = "record",
    via: str = "memory",
) -> ModuleWatchHandle:
    """Watch every parameter and buffer of a ``torch.nn.Module``.

    Each tensor is watched with :func:`memwatch.watch`, tagged by its
    qualified name under ``name`` (default: the variable passed in):
    ``model.0.weight``, ``model.bn.running_mean``. A parameter shared by
    two submodules (tied weights) is watched once. ``buffers=False`` leaves
    buffers (batch-norm statistics) out. ``mode``, ``condition`` and
    ``action`` apply to every tensor, as in :func:`memwatch.watch`.

    ``via`` says how each tensor is watched: ``"memory"`` (the default)
    write-protects CPU memory, so tensors on another device are not
    watched (a ``RuntimeWarning`` names them); ``"dispatch"`` records every
    torch op that writes a tensor, on any device (see ``watch(t,
    via="dispatch")``); ``"auto"`` uses memory for CPU tensors and dispatch
    for the others, and so follows a model moved with ``model.cuda()``.

    The watch follows the model: a parameter, buffer or submodule assigned
    later (``model.fc = nn.Linear(8, 2)``) is watched in place of the old
    one, under the same tag, and ``model.double()``, ``model.half()``,
    ``model.to(...)`` re-watch each tensor whose memory moved. A tensor
    moved to memory memwatch cannot watch (a GPU) has its watch ended with
    a ``RuntimeWarning``, unless ``via`` is ``"auto"`` or ``"dispatch"``.
    ``param.data = other`` has no torch hook: call
    ``handle.refresh()`` after it. Returns a :class:`ModuleWatchHandle`;
    ``memwatch.unwatch(model)`` (or the handle, or ``name``) ends it all.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"watch_module() needs a torch.nn.Module, not {type(module).__name__}; use watch() for a tensor")
    frame = sys._getframe(1)
    tag, variable = _name(frame, module, name, "module")
    options = _options(mode, condition, action, via)
    with _lock:
        _check_free(_modules, module, tag, "module")
        _install()
        mw = ModuleWatchHandle(module, tag, variable, buffers, options)
        try:
            for key, t in mw._current().items():
                mw._follow(key, t)
        except BaseException:
            mw.unwatch()
            raise
        _modules.append(mw)
    devices = {k: why for k, why in mw.skipped.items() if why.startswith("on ")}
    if devices and not mw._entries:
        where = "; ".join(f"{k} {why}" for k, why in devices.items())
        mw.unwatch()
        fix = (
            "materialize the model (to_empty(), then load its weights) before watching it"
            if all("meta" in why for why in devices.values())
            else 'pass via="auto" to watch it where it is, or watch the model on the CPU'
        )
        raise UnsupportedError(f"nothing of {tag!r} can be watched: {where}; {fix}")
    if devices:
        warnings.warn(
            f"memwatch: {len(devices)} tensors of {tag!r} are not watched ({', '.join(devices)}): "
            f"{next(iter(devices.values()))}",
            RuntimeWarning,
            stacklevel=2,
        )
    return mw


def watch_optimizer(
    optimizer: Any,
    name: str | None = None,
    *,
    mode: str | None = None,
    condition: Any = None,
    action: str = "record",
    via: str = "memory",
) -> OptimizerWatchHandle:
    """Watch a ``torch.optim.Optimizer``'s state: momentum buffers, Adam's
    moments (``exp_avg``, ``exp_avg_sq``) and step counts, every tensor in
    ``optimizer.state``.

    An optimizer creates its state in its first ``step()``: each tensor is
    watched from the end of the step that created it (its contents then are
    its initial contents), and every later step's changes are on the
    ``opt.step()`` line. Tags are ``<name>.<param>.<key>``, where
    ``<param>`` is the parameter's tag when a :func:`watch_module` watches
    it (``opt.model.0.weight.momentum_buffer``), else ``param<group>_<index>``.
    State replaced (``load_state_dict``) is followed. ``mode``,
    ``condition``, ``action`` and ``via`` are as for :func:`watch_module`.
    Returns an
    :class:`OptimizerWatchHandle`; ``memwatch.unwatch(opt)`` ends it.
    """
    import torch

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"watch_optimizer() needs a torch.optim.Optimizer, not {type(optimizer).__name__}")
    frame = sys._getframe(1)
    tag, variable = _name(frame, optimizer, name, "optimizer")
    options = _options(mode, condition, action, via)
    with _lock:
        _check_free(_optimizers, optimizer, tag, "optimizer")
        _install()
        ow = OptimizerWatchHandle(optimizer, tag, variable, options)
        ref = weakref.ref(ow)

        def after(*_: Any) -> None:
            handle = ref()
            if handle is not None:
                handle.refresh()

        ow._hooks.append(optimizer.register_step_post_hook(after))
        if hasattr(optimizer, "register_load_state_dict_post_hook"):
            ow._hooks.append(optimizer.register_load_state_dict_post_hook(after))
        try:
            ow.refresh()
        except BaseException:
            ow.unwatch()
            raise
        _optimizers.append(ow)
    return ow


def unwatch_group(target: Any) -> bool:
    """Ends the module or optimizer watch ``target`` names (its handle, the
    module or optimizer, or its name); False if it names none."""
    if not _modules and not _optimizers and not isinstance(target, _Group):
        return False
    with _lock:
        found = [
            g
            for g in (*_modules, *_optimizers)
            if g is target
            or (isinstance(target, str) and g.name == target)
            or (isinstance(g, ModuleWatchHandle) and g.module is target)
            or (isinstance(g, OptimizerWatchHandle) and g.optimizer is target)
        ]
    if isinstance(target, _Group) and not found:
        raise NotWatchedError(f"{target!r} is not watched any more")
    for g in found:
        g.unwatch()
    return bool(found)


__all__ = ["ModuleWatchHandle", "OptimizerWatchHandle", "watch_module", "watch_optimizer"]
