"""Which code is in scope: the code memwatch gets line events for.

By default everything outside the standard library, site-packages and
memwatch itself. ``configure(include=[...])`` narrows that to the given
paths; ``configure(exclude=[...])`` takes paths out. A pattern with ``*``,
``?`` or ``[`` is a glob matched against the absolute file name; any other
pattern is a file or a directory (everything under it).
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from typing import Any

# Imported here, never inside a function: a function of this module may run
# while the interpreter shuts down, when imports fail (sys.meta_path is None).
from fnmatch import fnmatchcase

_include: list[str] = []
_exclude: list[str] = []


def _default_excluded() -> tuple[str, ...]:
    paths = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            paths.add(os.path.realpath(p))
    try:
        paths.update(os.path.realpath(p) for p in site.getsitepackages())
    except AttributeError:  # pragma: no cover - virtualenv's old site.py
        pass
    user = getattr(site, "getusersitepackages", lambda: None)()
    if user:
        paths.add(os.path.realpath(user))
    paths.add(os.path.realpath(os.path.dirname(__file__)))
    return tuple(sorted(paths))


_DEFAULT_EXCLUDED = _default_excluded()


def _norm(pattern: str) -> str:
    return pattern if _is_glob(pattern) else os.path.realpath(os.path.abspath(os.path.expanduser(pattern)))


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _matches(path: str, patterns: list[str] | tuple[str, ...]) -> bool:
    for p in patterns:
        if _is_glob(p):
            if fnmatchcase(path, p) or fnmatchcase(path, os.path.abspath(p)):
                return True
        elif path == p or path.startswith(p.rstrip(os.sep) + os.sep):
            return True
    return False


def set_patterns(include: list[str] | None, exclude: list[str] | None) -> None:
    """Replaces the include and/or exclude patterns (None keeps them)."""
    global _include, _exclude
    if include is not None:
        _include = [_norm(str(p)) for p in include]
    if exclude is not None:
        _exclude = [_norm(str(p)) for p in exclude]


def _from_env() -> None:
    """`memwatch record --include/--exclude` hand their patterns over here."""
    inc = os.environ.get("MEMWATCH_INCLUDE")
    exc = os.environ.get("MEMWATCH_EXCLUDE")
    set_patterns(
        [p for p in inc.split(":") if p] if inc else None,
        [p for p in exc.split(":") if p] if exc else None,
    )


def patterns() -> tuple[list[str], list[str]]:
    return list(_include), list(_exclude)


def in_scope(filename: str) -> bool:
    """True if code from ``filename`` (a code object's ``co_filename``) is in scope."""
    if filename.startswith("<"):
        # <stdin> and <ipython-input-...> are the user's, and so is <string>
        # when it is `python -c` code; <string> is otherwise code that
        # libraries generate with exec (namedtuple, dataclasses), and
        # <frozen ...> is the interpreter's.
        if _include or filename.startswith("<frozen"):
            return False
        if filename == "<string>":
            return bool(sys.argv) and sys.argv[0] == "-c"
        return True
    path = os.path.realpath(filename)
    if _include:
        return _matches(path, _include) and not _matches(path, _exclude)
    if _matches(path, _exclude):
        return False
    return not _matches(path, _DEFAULT_EXCLUDED)


# Functions that name files people do not know by their path (an IPython
# cell's `/tmp/ipykernel_…/….py`): each takes a path and returns a name or None.
_namers: list[Any] = []


def add_namer(namer: Any) -> None:
    """Makes ``namer(path) -> str | None`` name code objects learnt from now on."""
    if namer not in _namers:
        _namers.append(namer)


def remove_namer(namer: Any) -> None:
    if namer in _namers:
        _namers.remove(namer)


def display_name(filename: str) -> str:
    """The name code from ``filename`` is recorded under: ``cell [3]`` for a
    notebook cell (see :mod:`memwatch._ipython`), else the file name itself.
    Called once per code object, when the recorder first sees it."""
    for namer in _namers:
        try:
            name = namer(filename)
        except Exception:  # noqa: BLE001 - a namer must never break recording
            name = None
        if name:
            return str(name)
    return filename


_from_env()
