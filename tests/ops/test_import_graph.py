"""The import graph of the project's own modules: one-way layers and no cycles.

Read statically (ast), every import counts, including ones inside functions: a lazy import is
still a dependency. ``from pkg import sub`` where ``sub`` is a module counts as importing ``sub``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOPS = {"common": "fedrad.common", "client": "fedrad.client", "server": "fedrad.server"}

#: Within client/: a subpackage may import only those listed for it (and itself, and fedrad.common).
CLIENT_LAYERS: dict[str, set[str]] = {
    "privacy": set(),
    "training": {"dicom"},
    "dicom": set(),
    "governance": {"privacy"},
    "runtime": {"governance", "privacy", "training", "dicom"},
    "commands": {"runtime", "governance", "privacy", "training", "dicom"},
    "cli": set(),
}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for top, name in TOPS.items():
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([name, *parts])] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                found = subs or [target]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            graph[mod].update(t for t in found if t in mods and t != mod)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_client_and_server_use_only_common() -> None:
    bad = [
        f"{m} -> {t}"
        for m, targets in _graph().items()
        for t in targets
        if m.split(".")[1] != t.split(".")[1] and t.split(".")[1] != "common"
    ]

    assert bad == []


def test_client_subpackages_import_downwards_only() -> None:
    bad = []
    for m, targets in _graph().items():
        if not m.startswith("fedrad.client."):
            continue
        group = m.split(".")[2]
        for t in targets:
            if t.startswith("fedrad.client.") and t.split(".")[2] != group:
                if t.split(".")[2] not in CLIENT_LAYERS.get(group, set()):
                    bad.append(f"{m} -> {t}")

    assert bad == []


def test_client_has_no_flat_modules_but_the_entry_point() -> None:
    flat = sorted(p.name for p in (ROOT / "client").glob("*.py") if p.name not in {"__init__.py", "cli.py"})

    assert flat == []
