"""What a watch is called and how values are shown: the variable an
argument names (read from the caller's source), and bounded reprs.

A leaf: it imports nothing of memwatch, so every module may use it."""

from __future__ import annotations

import ast
import linecache
import reprlib
from typing import Any

DEFAULT_REPR_LIMIT = 120



def _root_name(expr: ast.expr | None, address: bool = False) -> str | None:
    """The variable an argument expression names: ``t.data_ptr()`` -> ``t``,
    ``ctypes.addressof(buf)`` -> ``buf``, ``arr[::2]`` -> ``arr``,
    ``self.w`` -> ``self.w``; for an address (``buffer=``), the object it
    was taken from: ``a.ctypes.data`` -> ``a``."""
    while expr is not None:
        if address and isinstance(expr, ast.Attribute):
            expr = expr.value
            continue
        if isinstance(expr, ast.Call):
            if expr.args:
                expr = expr.args[0]
            elif isinstance(expr.func, ast.Attribute):
                expr = expr.func.value
            else:
                return None
        elif isinstance(expr, ast.Subscript | ast.Starred):
            expr = expr.value
        elif isinstance(expr, ast.Name | ast.Attribute):
            try:
                return ast.unparse(expr)
            except Exception:  # pragma: no cover - unparse of odd nodes
                return None
        else:
            return None
    return None


def _call_source(frame: Any) -> str | None:
    """The source text of the call being made in ``frame``."""
    code = frame.f_code
    try:
        positions = list(code.co_positions())[frame.f_lasti // 2]
    except (AttributeError, IndexError):
        return None
    line, end_line, col, end_col = positions
    if None in positions:
        return None
    lines = linecache.getlines(code.co_filename, frame.f_globals)
    if not lines or end_line > len(lines):
        return None
    chunk = [ln.encode() for ln in lines[line - 1 : end_line]]
    if len(chunk) == 1:
        text = chunk[0][col:end_col]
    else:
        text = chunk[0][col:] + b"".join(chunk[1:-1]) + chunk[-1][:end_col]
    return text.decode(errors="replace")


def _variable_name(frame: Any, obj: Any, by_address: bool) -> str | None:
    """The name in the caller's frame through which the buffer was passed."""
    src = _call_source(frame)
    if src:
        try:
            call = ast.parse(src.strip(), mode="eval").body
        except SyntaxError:
            call = None
        if isinstance(call, ast.Call):
            want = "buffer" if by_address else "obj"
            expr = next((k.value for k in call.keywords if k.arg == want), None)
            if expr is None and not by_address and call.args:
                expr = call.args[0]
            name = _root_name(expr, address=by_address)
            if name:
                return name
    for ns in (frame.f_locals, frame.f_globals):
        for k, v in ns.items():
            if k.startswith("__"):
                continue
            if (v is obj) if not by_address else _data_address(v) == obj:
                return k
    return None


def _data_address(v: Any) -> int | None:
    """Where an array's or tensor's data starts, if ``v`` is one."""
    try:
        if hasattr(v, "__array_interface__"):
            return v.__array_interface__["data"][0]
        if _is_torch_tensor(v):
            return v.data_ptr()
    except Exception:
        return None
    return None


def _is_torch_tensor(obj: Any) -> bool:
    t = type(obj)
    return t.__module__.startswith("torch") and hasattr(obj, "data_ptr") and hasattr(obj, "device")


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _short_repr(value: Any, limit: int) -> str:
    r = reprlib.Repr()
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = max(1, limit // 4)
    r.maxstring = r.maxother = r.maxlong = limit
    return r.repr(value)


def _bounded_repr(value: Any, limit: int) -> str:
    """``repr(value)`` cut to ``limit`` characters; ``<repr failed: E>`` when
    ``__repr__`` raises."""
    try:
        if isinstance(value, _CONTAINERS) and len(value) > limit:
            # Only the first items: a full repr of a huge container costs its size.
            text = _short_repr(value, limit)
        else:
            text = repr(value)
        if not isinstance(text, str):
            raise TypeError("__repr__ returned a non-string")
    except Exception as e:  # noqa: BLE001 - a user's __repr__ may raise anything
        return f"<repr failed: {type(e).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
