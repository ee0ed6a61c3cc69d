"""Modules call down, never up: no circle of imports in the Python package
(imports inside functions count) or of `crate::` paths in the Rust crates.

The graphs are read from the sources: a Python module's edges are every
``import memwatch.X`` / ``from memwatch(.X) import ...`` anywhere in it. A
Rust crate is read at every level of its folders: a module (a file, or a
folder with its ``mod.rs``) names another through ``crate::``, ``super::``
and ``self::`` paths (``use`` groups included) outside ``#[cfg(test)]``
code, with names a ``mod.rs`` (or ``lib.rs``) re-exports resolved to the
module that defines them; within each folder, the modules it holds must
not form a circle. The recorder's top-level folders are also checked
against the order of its layers (``RECORDER_LAYERS``): each calls only
those before it. The checker is tested on small made-up sources first, so
that a checker that finds nothing cannot pass for a clean graph.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "memwatch"

# The recorder's layers, bottom first (see recorder/src/lib.rs and
# docs/architecture.md): each may call only those before it.
RECORDER_LAYERS = ["mem", "model", "trace", "runtime", "deliver", "watch", "boundary", "monitor", "py"]


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


def _test_only_files(src: Path) -> set[Path]:
    """Files declared as ``#[cfg(test)] mod NAME;`` (and what they hold)."""
    out: set[Path] = set()
    for p in src.rglob("*.rs"):
        folder = p.parent if p.name in ("mod.rs", "lib.rs", "main.rs") else p.with_suffix("")
        for name in re.findall(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", _strip_rust(p.read_text())):
            out.add(folder / f"{name}.rs")
            out.add(folder / name)
    return out


def _module_of(src: Path, p: Path) -> tuple[str, ...]:
    parts = p.relative_to(src).with_suffix("").parts
    if parts in (("lib",), ("main",)):
        return ()
    return parts[:-1] if parts[-1] == "mod" else parts


def _paths_in(text: str) -> list[tuple[str, list[str]]]:
    """Every ``crate::``/``super::``/``self::`` path, ``use`` groups expanded,
    as (root, segments)."""
    found: list[tuple[str, list[str]]] = []

    def parse(i: int, prefix: list[str], root: str) -> int:
        segs = list(prefix)
        while i < len(text):
            m = re.match(r"\s*(\w+)(?:\s+as\s+\w+)?", text[i:])
            if m:
                segs.append(m.group(1))
                i += m.end()
                n = re.match(r"\s*::", text[i:])
                if not n:
                    break
                i += n.end()
                continue
            b = re.match(r"\s*\{", text[i:])
            if b:
                i += b.end()
                while True:
                    i = parse(i, segs, root)
                    c = re.match(r"\s*,", text[i:])
                    if c:
                        i += c.end()
                        if re.match(r"\s*\}", text[i:]):
                            break
                        continue
                    break
                e = re.match(r"\s*\}", text[i:])
                if e:
                    i += e.end()
                return i
            break
        found.append((root, segs))
        return i

    done = 0
    for m in re.finditer(r"(?<![\w:])(crate|super|self)((?:\s*::\s*super)*)\s*::", text):
        if m.start() < done:
            continue  # inside a group already read (`use super::{a, super::b}`)
        root = m.group(1) + "".join("/super" for _ in re.findall("super", m.group(2)))
        done = parse(m.end(), [], root)
    return found


def rust_modules(src: Path) -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    """Module path -> the modules of the crate its code names (test code and
    test-only files left out)."""
    skip = _test_only_files(src)
    files = [p for p in sorted(src.rglob("*.rs")) if not any(p == s or s in p.parents for s in skip)]
    modules = {_module_of(src, p) for p in files}
    # Names each module re-exports (`pub use a::{X, b::Y}`) -> the module defining them.
    exported: dict[tuple[str, ...], dict[str, tuple[str, ...]]] = {}
    for p in files:
        me = _module_of(src, p)
        if p.name not in ("mod.rs", "lib.rs", "main.rs"):
            continue
        text = _strip_rust(p.read_text())
        for m in re.finditer(r"pub(?:\([^)]*\))?\s+use\s+((?:self::)?[\w:]+(?:::\{[^;]*\})?)\s*;", text):
            for root, segs in _paths_in("self::" + m.group(1).removeprefix("self::")):
                target = _resolve(me, ("self", segs[:-1]), modules, {})
                if target is not None and target != me:
                    exported.setdefault(me, {})[segs[-1]] = target
                    for alias in re.findall(rf"\b{segs[-1]}\s+as\s+(\w+)", m.group(1)):
                        exported[me][alias] = target
    edges: dict[tuple[str, ...], set[tuple[str, ...]]] = {m: set() for m in modules}
    for p in files:
        me = _module_of(src, p)
        text = _strip_rust(p.read_text())
        for root, segs in _paths_in(text):
            target = _resolve(me, (root, segs), modules, exported)
            if target is not None and target != me:
                edges[me].add(target)
        # A module's own children, named by a bare path (`child::f()`, `use
        # child::X`); re-exporting one (`pub use child::X`) is not a use.
        uses = re.sub(r"pub(?:\([^)]*\))?\s+use\s[^;]*;", "", text)
        for child in (m for m in modules if len(m) == len(me) + 1 and m[: len(me)] == me):
            if re.search(rf"(?<![\w:]){child[-1]}\s*::", uses):
                edges[me].add(child)
    return edges


def _resolve(me, path, modules, exported):
    root, segs = path
    if root == "crate":
        base: tuple[str, ...] = ()
    else:
        base = me
        for _ in range(root.count("super")):
            if not base:
                return None
            base = base[:-1]
    segs = list(segs)
    while segs and segs[0] in ("super", "self"):
        if segs.pop(0) == "super":
            if not base:
                return None
            base = base[:-1]
    cur = base
    for seg in segs:
        if cur + (seg,) in modules:
            cur = cur + (seg,)
        elif seg in exported.get(cur, {}):
            return exported[cur][seg]
        else:
            break
    return cur


def folder_graphs(edges: dict[tuple[str, ...], set[tuple[str, ...]]]) -> dict[tuple[str, ...], dict[str, set[str]]]:
    """Per folder (module with children): its children -> the children they
    name, directly or through anything inside them; ``mod`` stands for the
    folder's own ``mod.rs`` code."""
    graphs: dict[tuple[str, ...], dict[str, set[str]]] = {}
    parents = {m[:-1] for m in edges if m} | {()}
    for folder in parents:
        graphs[folder] = {m[len(folder)]: set() for m in edges if len(m) > len(folder) and m[: len(folder)] == folder}
    for src_m, targets in edges.items():
        for t in targets:
            common = 0
            while common < min(len(src_m), len(t)) and src_m[common] == t[common]:
                common += 1
            folder = src_m[:common]
            a = src_m[common] if len(src_m) > common else "mod"
            b = t[common] if len(t) > common else "mod"
            if a != b:
                graphs.setdefault(folder, {}).setdefault(a, set()).add(b)
    return graphs


def rust_graph(src: Path) -> dict[str, set[str]]:
    """Top-level module of the crate -> the crate's top-level modules its code names."""
    return {k: v - {"mod"} for k, v in folder_graphs(rust_modules(src)).get((), {}).items() if k != "mod"}


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
    (src / "lib.rs").write_text("mod a;\nmod b;\nmod c;\nmod deep;\npub use c::{Thing as Renamed, other::Inner};\n")
    (src / "a.rs").write_text("use crate::{b::f, Renamed};\n// crate::deep is only named in a comment\n")
    (src / "b.rs").write_text('fn g() { let _ = "crate::deep"; crate::Inner::new(); }\n')
    (src / "c.rs").write_text("pub struct Thing;\n#[cfg(test)]\nmod tests {\n    use crate::a::x;\n}\n")
    (src / "deep" / "mod.rs").write_text("mod inner;\n")
    (src / "deep" / "inner.rs").write_text("use crate::a::y;\n")
    edges = rust_graph(src)
    assert edges == {"a": {"b", "c"}, "b": {"c"}, "c": set(), "deep": {"a"}}
    assert circles(edges) == []
    (src / "c.rs").write_text("pub struct Thing;\nfn h() { crate::deep::z(); }\n")
    assert circles(rust_graph(src)) == [{"a", "b", "c", "deep"}]


def test_the_rust_checker_reads_every_folder_level(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "low" / "engine").mkdir(parents=True)
    (src / "lib.rs").write_text("pub mod low;\npub mod high;\n")
    (src / "high.rs").write_text("use crate::low::engine::Engine;\n")
    low = src / "low"
    (low / "mod.rs").write_text("pub mod engine;\npub mod kernel;\n#[cfg(test)]\nmod tests;\n")
    (low / "kernel.rs").write_text("pub fn gettid() {}\n")
    (low / "tests.rs").write_text("use crate::high::anything;\n")  # test-only: not an edge
    (low / "engine" / "mod.rs").write_text("mod check;\nmod region;\npub use check::Engine;\nfn f() { region::x(); }\n")
    (low / "engine" / "region.rs").write_text("pub fn x() { super::super::kernel::gettid(); }\n")
    (low / "engine" / "check.rs").write_text("use super::{region::x, super::kernel};\npub struct Engine;\n")
    graphs = folder_graphs(rust_modules(src))
    assert graphs[()] == {"high": {"low"}, "low": set()}
    assert graphs[("low",)] == {"engine": {"kernel"}, "kernel": set()}
    assert graphs[("low", "engine")] == {"check": {"region"}, "region": set(), "mod": {"region"}}
    assert all(not circles(g) for g in graphs.values())
    # A sibling calling back up, through a re-export of the folder: a circle.
    (low / "engine" / "region.rs").write_text("pub fn x() { crate::low::engine::Engine; }\n")
    graphs = folder_graphs(rust_modules(src))
    assert circles(graphs[("low", "engine")]) == [{"check", "region"}]
    # Calling the folder's own code from a child, while it calls the child.
    (low / "engine" / "region.rs").write_text("pub fn x() { super::f(); }\n")
    assert circles(folder_graphs(rust_modules(src))[("low", "engine")]) == [{"mod", "region"}]


# --- the real sources --------------------------------------------------------------


def test_the_python_package_has_no_import_circle() -> None:
    edges = python_graph(PACKAGE)
    assert {"_api", "_session", "_vars", "_objects", "_guard", "_freeze", "_unwatch"} <= set(edges)
    assert "_api" in edges["_unwatch"] and "_vars" in edges["_unwatch"], "the graph was not read"
    found = circles(edges)
    assert not found, "import circles: " + " | ".join(describe(edges, c) for c in found)


@pytest.mark.parametrize("crate", ["format", "analyzer", "cli", "recorder"])
def test_a_rust_crate_has_no_module_circle_at_any_level(crate: str) -> None:
    edges = rust_modules(ROOT / crate / "src")
    assert len(edges) >= 5 and any(edges.values()), f"{crate}: the graph was not read"
    found = []
    for folder, graph in sorted(folder_graphs(edges).items()):
        for c in circles(graph):
            found.append(f"{crate}/src/{'/'.join(folder)}: " + describe(graph, c))
    assert not found, "module circles: " + " | ".join(found)


def test_the_recorder_calls_only_down_its_layers() -> None:
    graph = folder_graphs(rust_modules(ROOT / "recorder" / "src"))[()]
    assert set(graph) - {"mod"} == set(RECORDER_LAYERS), "recorder/src's top-level modules are not its layers"
    up = [
        f"{low} -> {high}"
        for low in RECORDER_LAYERS
        for high in sorted(graph.get(low, ()))
        if high != "mod" and RECORDER_LAYERS.index(high) > RECORDER_LAYERS.index(low)
    ]
    assert not up, "calls up a layer: " + ", ".join(up)
    # Only the mem layer touches no Python.
    for p in (ROOT / "recorder" / "src" / "mem").rglob("*.rs"):
        assert "pyo3" not in _strip_rust(p.read_text()), f"{p.relative_to(ROOT)} uses pyo3"
