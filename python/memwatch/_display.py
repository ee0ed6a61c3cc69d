"""How changes show in Jupyter and in a terminal: :class:`ChangeList` (what
``memwatch.history()`` and ``Trace.changes()`` return) and the HTML of one
:class:`memwatch.Change` (its ``_repr_html_``).

A table row per change: seq, line (``cell [3], line 2`` for a notebook
cell), function, tag, the op that made it (a column only when some change
has one: those of ``watch(t, via="dispatch")``), what changed and the thread;
first the process (pid, and rank) when the changes are of several, as
``Trace.changes()`` of a run of several processes gives them. A bytes change shows
its first elements as ``[index] old -> new`` (at most four, then how many
more), as the ``[MEMWATCH]`` report does; an object change its key and the
old and new reprs. Long lists show their first and last rows and say how
many were left out.
"""

from __future__ import annotations

import html
from typing import Any

# Rows a table shows at most: the first and the last half of these.
MAX_ROWS = 60
_COLUMNS = ("seq", "line", "function", "tag", "change", "thread")
_COLUMNS_OP = ("seq", "line", "function", "tag", "op", "change", "thread")


def _columns(changes: list[Any]) -> tuple[str, ...]:
    columns = _COLUMNS_OP if any(getattr(c, "op", None) for c in changes) else _COLUMNS
    if len({getattr(c, "pid", None) for c in changes}) > 1:
        columns = ("pid", *columns)
    return columns


def _process(change: Any) -> str:
    """``4242``, or ``4242 (rank 1)``, as ``memwatch query`` writes it."""
    rank = getattr(change, "rank", None)
    pid = str(getattr(change, "pid", "?"))
    return pid if rank is None else f"{pid} (rank {rank})"

_STYLE = (
    "<style>"
    "table.memwatch{border-collapse:collapse;font-size:90%}"
    "table.memwatch th,table.memwatch td{padding:2px 8px;text-align:left;vertical-align:top}"
    "table.memwatch td.change{font-family:monospace;white-space:pre-wrap}"
    "</style>"
)


def what_changed(change: Any) -> str:
    """One line saying what ``change`` changed."""
    if change.kind != "bytes":
        key = change.key or ""
        if change.kind in ("rebind", "unbind"):
            key = change.variable or key
        old, new = change.old_repr, change.new_repr
        if old is not None and new is not None:
            return f"{change.kind} {key}: {old} -> {new}".replace("  ", " ")
        return f"{change.kind} {key}: {new if new is not None else old}"
    for line in change.report().splitlines():
        if line.startswith("Elements: "):
            return line[len("Elements: ") :]
    changed = sum(len(o) for _, o, _ in change.ranges)
    old, new = change.old or b"", change.new or b""
    return f"{changed} bytes at offset {change.offset}: {old[:16]!r} -> {new[:16]!r}"


def _row(change: Any, columns: tuple[str, ...] = _COLUMNS) -> tuple[str, ...]:
    cells = {
        "pid": _process(change),
        "seq": str(change.seq),
        "line": change.location or "?",
        "function": change.function or "?",
        "tag": change.tag,
        "op": change.op or "-",
        "change": what_changed(change),
        "thread": change.thread_name,
    }
    return tuple(cells[c] for c in columns)


def _shown(rows: list[Any]) -> tuple[list[Any], list[Any], int]:
    if len(rows) <= MAX_ROWS:
        return rows, [], 0
    half = MAX_ROWS // 2
    return rows[:half], rows[-half:], len(rows) - 2 * half


def text_table(changes: list[Any]) -> str:
    """The changes as a plain-text table (a terminal's view)."""
    if not changes:
        return "memwatch: no changes"
    head, tail, left_out = _shown(changes)
    columns = _columns(changes)
    rows = [_row(c, columns) for c in head]
    if left_out:
        rows.append(("…", f"{left_out} more changes", *[""] * (len(columns) - 2)))
        rows.extend(_row(c, columns) for c in tail)
    widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns) - 1)]
    lines = []
    for r in [columns, *rows]:
        cells = [r[i].ljust(widths[i]) for i in range(len(widths))] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(columns[-1]))
    n = len(changes)
    lines.append(f"{n} change{'s' if n != 1 else ''}")
    return "\n".join(lines)


def html_table(changes: list[Any]) -> str:
    """The changes as one HTML table (a notebook's view)."""
    n = len(changes)
    caption = f"memwatch: {n} change{'s' if n != 1 else ''}"
    if not changes:
        return f"<p>{html.escape(caption)}</p>"
    head, tail, left_out = _shown(changes)
    columns = _columns(changes)

    def tr(cells: tuple[str, ...]) -> str:
        out = []
        for name, cell in zip(columns, cells):
            cls = ' class="change"' if name == "change" else ""
            out.append(f"<td{cls}>{html.escape(cell)}</td>")
        return "<tr>" + "".join(out) + "</tr>"

    body = [tr(_row(c, columns)) for c in head]
    if left_out:
        body.append(f'<tr><td colspan="{len(columns)}">… {left_out} more changes …</td></tr>')
        body.extend(tr(_row(c, columns)) for c in tail)
    header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return (
        f'{_STYLE}<table class="memwatch"><caption>{html.escape(caption)}</caption>'
        f"<thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def change_html(change: Any) -> str:
    """One change as an HTML table of its fields (``Change._repr_html_``)."""
    fields = [
        ("tag", change.tag),
        ("seq", str(change.seq)),
        ("process", _process(change)),
        ("line", f"{change.location or '?'} in {change.function or '?'}"),
        ("change", what_changed(change)),
        ("variable", change.variable or "<unknown>"),
        ("thread", change.thread_name),
    ]
    if change.kind == "bytes" and change.address is not None:
        fields.insert(3, ("address", f"{change.address:#x}"))
    if getattr(change, "op", None):
        fields.insert(3, ("op", change.op))
    if len(change.stack) > 1:
        from memwatch._memwatch import location  # noqa: PLC0415 - only for deep stacks

        fields.append(("stack", "\n".join(f"{location(f, ln)} in {fn}" for f, ln, fn in change.stack)))
    rows = "".join(
        f'<tr><th>{html.escape(k)}</th><td class="change">{html.escape(v)}</td></tr>' for k, v in fields
    )
    return f'{_STYLE}<table class="memwatch">{rows}</table>'


class ChangeList(list):  # type: ignore[type-arg]
    """A list of :class:`memwatch.Change`, shown as a table: HTML in a
    notebook (``_repr_html_``), text in a terminal IPython."""

    __slots__ = ()

    def _repr_html_(self) -> str:
        return html_table(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text("ChangeList(...)" if cycle else text_table(self))

    def __getitem__(self, i: Any) -> Any:
        got = super().__getitem__(i)
        return ChangeList(got) if isinstance(i, slice) else got
