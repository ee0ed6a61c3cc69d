"""Modules call down, never up: no circle of imports in the Python package
(imports inside functions count) or of `crate::` paths in the Rust crates.

The graphs are read from the sources: a Python module's edges are every
``import memwatch.X`` / ``from memwatch(.X) import ...`` anywhere in it; a
Rust module's (a file of ``src/``, or a folder with its ``mod.rs``) are its
``crate::NAME`` paths outside ``#[cfg(test)]`` modules, with names that
``lib.rs`` re-exports resolved to the module that defines them. The
checker is tested on small made-up sources first, so that a checker that
finds nothing cannot pass for a clean graph.

recorder/src is not layered yet (issue 20): its known circle may shrink but
must not grow or gain members.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "memwatch"

# The recorder's circle as it is today; issue 20 removes it.
RECORDER_CIRCLE = {"api", "fastline", "guard", "monitor", "objects", "vars"}


# --- the graphs ----------------------------------------------------------------


def python_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``__init__`` for the
    package itself); the extension ``_memwatch`` is a leaf and left out."""
    files = {p.stem: p for p in package.glob("*.py")}
    names = set(files)
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = "memwatch" + (f".{node.module}" if node.module else "")
                else:
                    base = node.module or ""
                if base == "memwatch":
                    targets = [f"memwatch.{a.name}" for a in node.names]
                else:
                    targets = [base]
            for t in targets:
                parts = t.split(".")
                if parts[0] != "memwatch":
                    continue
                if len(parts) == 1:
                    out.add("__init__")
                elif parts[1] in names:
                    out.add(parts[1])
                elif parts[1] == "_memwatch":
                    continue  # the extension module: imports nothing of ours
                elif t.count(".") == 1 and isinstance(node, ast.ImportFrom) and node.module == "memwatch":
                    out.add("__init__")  # `from memwatch import watch`: the package
        out.discard(name)
        edges[name] = out
    return edges


def _strip_rust(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    # Test modules may use anything; they are not part of the layering.
    return re.split(r"#\[cfg\(test\)\]\s*(?:pub\s+)?mod\s+\w+\s*\{", text)[0]


def rust_graph(src: Path) -> dict[str, set[str]]:
    """Top-level module of the crate -> the crate's modules its code names."""
    files: dict[str, list[Path]] = {}
    for p in sorted(src.rglob("*.rs")):
        parts = p.relative_to(src).with_suffix("").parts
        root = parts == ("lib",) or parts == ("main",)
        files.setdefault("<root>" if root else parts[0], []).append(p)
    modules = set(files) - {"<root>"}
    # Names the crate root re-exports (`pub use module::{A, b::C}`) -> module.
    exported: dict[str, str] = {}
    for p in files.get("<root>", []):
        for m in re.finditer(r"pub\s+use\s+(\w+)::(\{[^;]*\}|[^;]*);", _strip_rust(p.read_text())):
            for name in re.findall(r"(\w+)\s*(?:,|$)", m.group(2).strip("{} \n") + ","):
                exported[name] = m.group(1)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module in modules:
        for p in files[module]:
            for m in re.finditer(r"crate::(\{[^;]*?\}|\w+)", _strip_rust(p.read_text())):
                seg = m.group(1)
                heads = re.findall(r"(?:^|[{,])\s*(\w+)", seg) if seg.startswith("{") else [seg]
                for head in heads:
                    target = head if head in modules else exported.get(head)
                    if target and target != module:
                        edges[module].add(target)
    return edges


def circles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The graph's circles: its strongly connected components of two or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[set[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def describe(edges: dict[str, set[str]], circle: set[str]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(edges[m] & circle))}" for m in sorted(circle))


# --- the checker, on made-up sources -------------------------------------------


def test_the_python_checker_sees_a_circle_through_an_import_inside_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "memwatch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from memwatch._a import f\n")
    (pkg / "_a.py").write_text("from memwatch import _memwatch, _b\n\ndef f():\n    return _b.g()\n")
    (pkg / "_b.py").write_text("def g():\n    from memwatch._a import f\n    return f\n")
    (pkg / "_c.py").write_text("import memwatch._a\nfrom . import _b\n")
    edges = python_graph(pkg)
    assert edges == {"__init__": {"_a"}, "_a": {"_b"}, "_b": {"_a"}, "_c": {"_a", "_b"}}
    assert circles(edges) == [{"_a", "_b"}]


def test_the_rust_checker_sees_paths_groups_and_reexports_but_not_tests_or_comments(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    (src / "lib.rs").write_text("mod a;\nmod b;\nmod c;\nmod deep;\npub use c::{Thing, other::Inner};\n")
    (src / "a.rs").write_text("use crate::{b::f, Thing};\n// crate::deep is only named in a comment\n")
    (src / "b.rs").write_text('fn g() { let _ = "crate::deep"; crate::Inner::new(); }\n')
    (src / "c.rs").write_text("pub struct Thing;\n#[cfg(test)]\nmod tests {\n    use crate::a::x;\n}\n")
    (src / "deep" / "mod.rs").write_text("mod inner;\n")
    (src / "deep" / "inner.rs").write_text("use crate::a::y;\n")
    edges = rust_graph(src)
    assert edges == {"a": {"b", "c"}, "b": {"c"}, "c": set(), "deep": {"a"}}
    assert circles(edges) == []
    (src / "c.rs").write_text("pub struct Thing;\nfn h() { crate::deep::z(); }\n")
    assert circles(rust_graph(src)) == [{"a", "b", "c", "deep"}]


# --- the real sources --------------------------------------------------------------


def test_the_python_package_has_no_import_circle() -> None:
    edges = python_graph(PACKAGE)
    assert {"_api", "_session", "_vars", "_objects", "_guard", "_freeze", "_unwatch"} <= set(edges)
    assert "_api" in edges["_unwatch"] and "_vars" in edges["_unwatch"], "the graph was not read"
    found = circles(edges)
    assert not found, "import circles: " + " | ".join(describe(edges, c) for c in found)


@pytest.mark.parametrize("crate", ["format", "analyzer", "cli"])
def test_a_rust_crate_has_no_module_circle(crate: str) -> None:
    edges = rust_graph(ROOT / crate / "src")
    assert len(edges) >= 5 and any(edges.values()), f"{crate}: the graph was not read"
    found = circles(edges)
    assert not found, f"{crate}: module circles: " + " | ".join(describe(edges, c) for c in found)


def test_the_recorder_circle_does_not_grow() -> None:
    edges = rust_graph(ROOT / "recorder" / "src")
    assert {"engine", "kernel", "signals", "store", "sink"} <= set(edges)
    for c in circles(edges):
        assert c <= RECORDER_CIRCLE, (
            f"recorder: a module circle beyond the known one ({sorted(RECORDER_CIRCLE)}): " + describe(edges, c)
        )
    # The bottom of the recorder already calls only down.
    for low in ("kernel", "signals", "store", "engine"):
        assert not edges[low] & RECORDER_CIRCLE, f"{low} calls up into {sorted(edges[low] & RECORDER_CIRCLE)}"
