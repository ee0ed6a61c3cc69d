"""IPython and Jupyter: ``%load_ext memwatch``, the ``%%memwatch`` cell
magic, and cell names.

``%%memwatch NAME [NAME ...]`` watches those variables of the notebook for
one cell: the object each refers to (a buffer with :func:`memwatch.watch`,
an instance or container with :func:`memwatch.watch_object`) and the
variable itself (:func:`memwatch.watch_var`: rebinding, ``del``). After the
cell, its changes show as one table (HTML in a notebook, text in a terminal
IPython) instead of a ``[MEMWATCH]`` report each, and stay in the
notebook's ``_memwatch_changes``. What the user watched already keeps its
watch; what the magic watched is unwatched after the cell.

Code run in a cell is recorded as ``cell [N]`` (N the cell's execution
count, as IPython's ``In [N]``), not as the kernel's temporary file. The
namer is installed by ``%load_ext memwatch``, and by ``import memwatch``
in a running IPython. Lines are the cell's own: in a ``%%memwatch`` cell
the magic's line is line 1.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from memwatch import _memwatch, _scope

_INPUT = re.compile(r"<ipython-input-(\d+)-[0-9a-f]+>$")


class CellNamer:
    """``cell [N]`` for the files IPython compiles cells under."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell

    def __call__(self, path: str) -> str | None:
        compiler = getattr(self.shell, "compile", None)
        number = getattr(compiler, "_filename_map", {}).get(path)
        if number is None:
            m = _INPUT.match(path)
            number = int(m.group(1)) if m else None
        return None if number is None else f"cell [{number}]"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CellNamer) and other.shell is self.shell

    def __hash__(self) -> int:
        return id(self.shell)


def name_cells(shell: Any) -> None:
    """Names code compiled in ``shell``'s cells ``cell [N]`` from now on."""
    _scope.add_namer(CellNamer(shell))


def _in_ipython() -> None:
    """At ``import memwatch``: name cells if this runs in an IPython shell."""
    import sys

    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if get is not None else None
    if shell is not None:
        name_cells(shell)


def _split_last_expr(tree: ast.Module) -> tuple[ast.Module, ast.Expression | None]:
    """The cell's statements, and its last expression (whose value the cell shows), if it ends in one."""
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body.pop()
        return tree, ast.Expression(last.value)
    return tree, None


def _cell_number(shell: Any) -> int:
    """The execution count of the cell running now: that of the innermost
    frame running a cell's code (``shell.execution_count`` may already be
    the next cell's)."""
    import sys

    names = getattr(shell.compile, "_filename_map", {})
    f = sys._getframe(1)
    while f is not None:
        number = names.get(f.f_code.co_filename)
        if number is not None:
            return int(number)
        f = f.f_back
    return int(shell.execution_count)


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext memwatch``: registers ``%%memwatch`` and names cells."""
    from IPython.core.error import UsageError
    from IPython.core.magic import Magics, cell_magic, magics_class

    @magics_class
    class MemwatchMagics(Magics):
        @cell_magic
        def memwatch(self, line: str, cell: str) -> Any:
            """%%memwatch NAME [NAME ...]: watch these variables for this cell, then show its changes.

            Watches what each variable refers to (its elements or items,
            whoever writes them) and the variable itself (rebinding, del),
            and shows the changes of the cell as a table after it; they are
            kept in ``_memwatch_changes``."""
            names = line.split()
            if not names:
                raise UsageError("%%memwatch needs the names of the variables to watch: %%memwatch w b")
            bad = [n for n in names if not n.isidentifier()]
            if bad:
                raise UsageError(f"%%memwatch: {', '.join(map(repr, bad))} is not a variable name")
            return run_watched(self.shell, names, cell)

    shell.register_magics(MemwatchMagics)
    name_cells(shell)


def unload_ipython_extension(shell: Any) -> None:
    _scope.remove_namer(CellNamer(shell))


def run_watched(shell: Any, names: list[str], cell: str) -> Any:
    """Runs ``cell`` in ``shell`` with the variables ``names`` watched;
    shows and keeps its changes; returns the value of its last expression."""
    from IPython.display import display

    from memwatch._api import watch
    from memwatch._display import ChangeList
    from memwatch._freeze import _has_buffer, _watched_tags
    from memwatch._objects import watch_object
    from memwatch._session import on_change
    from memwatch._unwatch import unwatch
    from memwatch._vars import watch_var

    def watched(obj: Any, name: str) -> bool:
        """Already watched by the user: this object, or something under this name."""
        tags = [t for _, t, *_ in _memwatch._regions()] + [t for _, t, _ in _memwatch._object_watches()]
        return bool(_watched_tags(obj)) or name in tags

    ns = shell.user_ns
    tags = set(names)
    seen = ChangeList()

    def collect(change: Any) -> None:
        if change.tag in tags:
            seen.append(change)

    mine: list[Any] = []
    _memwatch.check()  # what earlier cells changed is theirs
    try:
        for name in names:
            if name in ns and not watched(ns[name], name):
                obj = ns[name]
                if _has_buffer(obj):
                    mine.append(watch(obj, name=name, _variable=name))
                else:
                    try:
                        mine.append(watch_object(obj, name=name, _variable=name))
                    except (TypeError, _memwatch.UnsupportedError):
                        pass  # an int, a str: only its rebinding can change it
            mine.append(watch_var(name, tag=name))
        on_change(collect)
        # A line of its own for the magic, so that lines are the cell's.
        source = "\n" + shell.transform_cell(cell)
        filename = shell.compile.cache(source, _cell_number(shell), raw_code="\n" + cell)
        tree, last = _split_last_expr(shell.compile.ast_parse(source, filename=filename))
        exec(shell.compile(tree, filename, "exec"), shell.user_global_ns, ns)
        value = eval(shell.compile(last, filename, "eval"), shell.user_global_ns, ns) if last is not None else None
        _memwatch.check()
        return value
    finally:
        for handle in reversed(mine):
            try:
                unwatch(handle)
            except _memwatch.NotWatchedError:
                pass  # collected, or unwatched by the cell
        _memwatch.remove_callback(collect)
        ns["_memwatch_changes"] = seen
        display(seen)
