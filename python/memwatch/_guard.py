"""Conditions and actions on watches (``watch(..., condition=, action=)``) and
frozen objects (``frozen``, ``freeze``, ``unfreeze``).

A guard belongs to a watch's tag: a condition (which changes it acts on)
and an action (what it does then). The native recorder shows each change
of a guarded tag to :func:`_on_change` at the boundary after the line
that made it; an action that must happen in the thread that wrote (a
raise, a breakpoint) waits for that thread's next boundary, where the
recorder calls :func:`_fire` and raises what it returns in the running
frame. So in line mode the memory already holds the new value when the
``MutationError`` is raised, and the traceback ends with the writing line.
"""

from __future__ import annotations

import dis
import math
import sys
import threading
import types
from typing import Any

from memwatch import _memwatch, _scope
from memwatch._memwatch import Change, MutationError

CONDITIONS = ("any", "nonfinite")
ACTIONS = ("record", "raise", "breakpoint", "log")


class _Guard:
    __slots__ = ("condition", "action", "why", "reported")

    def __init__(self, condition: Any, action: str, why: str) -> None:
        self.condition = condition
        self.action = action
        self.why = why
        self.reported = False

    def matches(self, change: Change) -> bool:
        c = self.condition
        if c is None or c == "any":
            return True
        if c == "nonfinite":
            return _nonfinite(change)
        return bool(c(change))


def _nonfinite(change: Change) -> bool:
    if change.kind == "bytes":
        return change._nonfinite()
    # An object change: its new value's repr, when that is a float's.
    r = change.new_repr
    if r is None:
        return False
    try:
        v = complex(r.strip("()"))
    except ValueError:
        return False
    return not (math.isfinite(v.real) and math.isfinite(v.imag))


# The guard of each tag given to watch(condition=, action=), and how many
# freezes each tag has now (a freeze overrides the watch's own guard).
_guards: dict[str, _Guard] = {}
_freezes: dict[str, int] = {}
_FROZEN = _Guard("any", "raise", "changed while frozen")
# The action each waiting change asked for, by seq, until it fires.
_waiting: dict[int, tuple[str, str]] = {}
# Called with each change to a frozen object, in the thread that found it,
# before its MutationError is raised (in the thread that wrote): for those
# that must know of a change even when the error is raised in another
# thread or caught (the pytest plugin). A listener must be cheap and must
# not raise.
violation_listeners: list[Any] = []
_lock = threading.Lock()


def _effective(tag: str) -> _Guard | None:
    if _freezes.get(tag, 0) > 0:
        return _FROZEN
    return _guards.get(tag)


def _sync(tag: str) -> None:
    _memwatch._set_guarded(tag, _effective(tag) is not None)


def add_freeze(tags: list[str]) -> None:
    """One more freeze of each of ``tags`` (a freeze nests: a tag stays
    frozen until every freeze of it is removed)."""
    with _lock:
        for tag in tags:
            _freezes[tag] = _freezes.get(tag, 0) + 1
            _sync(tag)


def remove_freeze(tags: list[str]) -> None:
    """Removes one freeze of each of ``tags`` (see :func:`add_freeze`)."""
    with _lock:
        for tag in tags:
            n = _freezes.get(tag, 0) - 1
            if n > 0:
                _freezes[tag] = n
            else:
                _freezes.pop(tag, None)
            _sync(tag)


def check_guard(condition: Any, action: str) -> None:
    """Raises for a condition or an action ``watch`` does not take."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(map(repr, ACTIONS))}, not {action!r}")
    if condition is not None and not callable(condition) and condition not in CONDITIONS:
        raise ValueError(
            f"condition must be a callable taking the Change, or one of "
            f"{', '.join(map(repr, CONDITIONS))}, not {condition!r}"
        )
    if condition is not None and action == "record":
        raise ValueError(
            "condition= chooses the changes an action acts on: pass action='raise', "
            "'breakpoint' or 'log' with it (every change is recorded in any case)"
        )


def set_guard(tag: str, condition: Any, action: str) -> None:
    """Gives the watch ``tag`` its guard (none for action="record")."""
    with _lock:
        if action == "record":
            _guards.pop(tag, None)
        else:
            name = condition if isinstance(condition, str) else getattr(condition, "__name__", "condition")
            why = "changed" if condition is None else f"changed (condition {name!r})"
            _guards[tag] = _Guard(condition, action, why)
        _sync(tag)


def _report_once(guard: _Guard, change: Change, exc: BaseException) -> None:
    if guard.reported:
        return
    guard.reported = True
    exc.add_note(
        f"memwatch: the condition of watch {change.tag!r} raised (the change is let through; "
        "later errors of this condition are not reported)"
    )
    _memwatch._unraisable(exc, guard.condition)


def _on_change(change: Change) -> int | None:
    """Called by the recorder for each change of a guarded tag. Returns the
    native id of the thread whose next boundary fires the action, or None."""
    guard = _effective(change.tag)
    if guard is None:
        return None
    try:
        hit = guard.matches(change)
    except Exception as e:  # noqa: BLE001 - a user's condition
        _report_once(guard, change, e)
        return None
    if not hit:
        return None
    if guard is _FROZEN:
        for listener in list(violation_listeners):
            listener(change)
    if guard.action == "log":
        sys.stderr.write(change.report())
        return None
    if guard.action not in ("raise", "breakpoint"):
        return None
    alive = [t.native_id for t in threading.enumerate() if t.native_id is not None]
    _memwatch._forget_threads(alive)
    me = threading.get_native_id()
    # In the thread that wrote, when it is a Python thread still running;
    # else here (a native thread's write, the kernel's).
    tid = change.thread_id if change.thread_id in alive else me
    _waiting[change.seq] = (guard.action, guard.why)
    return tid


def _fire(change: Change) -> Any:
    """Called by the recorder at the boundary of the thread the action waits
    for: the exception to raise, ``"breakpoint"``, or None."""
    frame = sys._getframe(1)
    if _no_raise_here(frame):
        return "later"
    action, why = _waiting.pop(change.seq, ("raise", "changed"))
    if action == "breakpoint":
        return "breakpoint"
    return mutation_error(change, why, frame)


_NOP = dis.opmap["NOP"]


def _no_raise_here(frame: types.FrameType | None) -> bool:
    """True where an error raised now would skip what the code around it
    means to run: a ``pass`` (a NOP, which no ``try`` covers) or the exit
    of a ``with`` block (the manager's ``__exit__`` would not be called).
    The action then waits for the next boundary (a frozen block's own exit
    checks, and raises from there)."""
    if frame is None:
        return False
    code, at = frame.f_code, frame.f_lasti
    raw = code.co_code
    if at < 0 or at >= len(raw):
        return False
    if raw[at] == _NOP:
        return True
    # A with block's exit calls __exit__(None, None, None).
    nones = 0
    for ins in dis.get_instructions(code):
        if ins.offset < at:
            continue
        if ins.opname == "LOAD_CONST" and ins.argval is None:
            nones += 1
            continue
        return nones == 3 and ins.opname in ("CALL", "PRECALL")
    return False


def _describe(change: Change) -> str:
    where = f"{change.location} in {change.function}" if change.file else "an unknown line"
    if change.kind == "bytes":
        what = change.report().splitlines()
        elements = next((ln[len("Elements: ") :] for ln in what if ln.startswith("Elements: ")), None)
        if elements is None:
            changed = sum(len(o) for _, o, _ in change.ranges)
            elements = f"{changed} bytes at offset {change.offset}"
        return f"{elements}, by {where} (thread {change.thread_name})"
    key = change.key or ""
    return f"{change.kind} {key}: {change.old_repr} -> {change.new_repr}, by {where} (thread {change.thread_name})"


def mutation_error(change: Change, why: str, frame: types.FrameType | None) -> MutationError:
    """The MutationError for ``change``, its traceback ending with the writing line."""
    err = MutationError(f"{change.tag!r} {why}: {_describe(change)}")
    err.change = change  # type: ignore[attr-defined]
    tb = _writing_line(change, frame)
    if tb is not None:
        err = err.with_traceback(tb)
    return err


def _writing_line(change: Change, frame: types.FrameType | None) -> types.TracebackType | None:
    """A traceback entry for the line that made ``change``, in the first
    frame from ``frame`` outwards that runs its function."""
    line = change.line
    f = frame
    while f is not None and line is not None:
        code = f.f_code
        if change.file in (code.co_filename, _scope.display_name(code.co_filename)) and change.function in (code.co_name, getattr(code, "co_qualname", None)):
            # The instruction of that line the frame ran last (the store).
            offsets = [2 * i for i, p in enumerate(code.co_positions()) if p[0] == line]
            if not offsets:
                return None
            before = [o for o in offsets if o <= f.f_lasti]
            lasti = max(before) if before else max(offsets)
            return types.TracebackType(None, f, lasti, line)
        f = f.f_back
    return None


def _install() -> None:
    _memwatch._set_guard_hooks(_on_change, _fire)


_install()

__all__ = ["CONDITIONS", "ACTIONS", "check_guard", "set_guard", "mutation_error", "MutationError"]
