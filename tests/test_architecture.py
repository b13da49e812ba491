"""The layout's promises, checked on the source: no import cycles, imports only in the allowed direction
(docs/architecture.md draws the same table), one reader of export files, one reader of the environment."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .support import PACKAGE

pytestmark = pytest.mark.fast

ROOT_PACKAGE = "goatcounter_exports"

# What each part of the package may import of the package itself (beyond its own modules).
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "__main__": {"cli"},
    "capabilities": set(),
    "errors": set(),
    "spec": {"errors"},
    "validation": {"errors"},
    "settings": {"errors"},
    "progress": set(),
    "upstream": {"__init__", "errors"},
    "runtime": {"errors", "spec", "upstream", "validation"},
    "adapters": {"__init__", "errors", "progress", "runtime", "spec", "upstream", "validation"},
    "goatcounter": {"adapters", "errors", "progress", "runtime", "settings", "spec", "upstream"},
    "testbed": {"errors"},
    "server": {"errors"},
    "app": {"adapters", "errors", "goatcounter", "progress", "runtime", "server", "settings", "spec", "upstream"},
    "demo": {"app", "server", "settings", "spec", "testbed"},
    "doctor": {"app", "errors", "goatcounter", "upstream"},
    "browse": {"errors", "goatcounter", "server", "settings"},
    "sites": {"app", "errors", "goatcounter", "progress", "settings", "spec"},
    "cli": {
        "__init__",
        "adapters",
        "app",
        "browse",
        "demo",
        "doctor",
        "errors",
        "goatcounter",
        "progress",
        "settings",
        "sites",
        "spec",
    },
}
# Libraries of the adapters' frameworks, which the generic core must never import.
FRAMEWORKS = ("starlette", "mcp", "mcp_types", "uvicorn")
CORE = ("errors", "spec", "validation", "settings", "upstream", "runtime")


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        found[name] = ast.parse(path.read_text("utf-8"))
    return found


def imports_of(name: str, tree: ast.Module, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of the package, top-level third-party names) that `name` imports, anywhere in it."""
    is_package = (PACKAGE / Path(*name.split("."))).is_dir() or name == "__init__"
    base = name.split(".") if is_package and name != "__init__" else name.split(".")[:-1]
    ours: set[str] = set()
    theirs: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            theirs.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                theirs.add((node.module or "").split(".")[0])
                continue
            anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                candidate = f"{target}.{alias.name}" if target else alias.name
                ours.add(candidate if candidate in known else (target or "__init__"))
    return ours, theirs - {ROOT_PACKAGE}


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    found = modules()
    known = set(found)
    edges, libraries = {}, {}
    for name, tree in found.items():
        edges[name], libraries[name] = imports_of(name, tree, known)
    return edges, libraries


def test_the_import_graph_has_no_cycles() -> None:
    edges, _ = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt == node or nxt not in edges:
                continue
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_each_part_imports_only_what_the_layering_allows() -> None:
    edges, _ = graph()
    wrong = []
    for name, targets in edges.items():
        part = name.split(".")[0]
        assert part in ALLOWED, f"{name} belongs to no part of the layering table"
        for target in targets:
            other = target.split(".")[0]
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_the_generic_core_imports_no_web_framework_or_mcp_sdk() -> None:
    _, libraries = graph()
    wrong = [
        f"{name} -> {library}"
        for name, used in libraries.items()
        if name.split(".")[0] in CORE
        for library in used
        if library in FRAMEWORKS
    ]
    assert wrong == []


def test_only_the_adapters_hook_modules_are_imported_by_goatcounter() -> None:
    """GoatCounter implements the adapters' hooks; it never reaches into an adapter's server or app."""
    edges, _ = graph()
    used = {t for name, targets in edges.items() if name.startswith("goatcounter") for t in targets}
    assert {t for t in used if t.startswith("adapters")} <= {"adapters.tools", "adapters.rest"}


def test_exactly_one_module_reads_export_files() -> None:
    """Decompression, and the download operation itself, appear in goatcounter/exportfile.py alone."""
    readers = set()
    for name, tree in modules().items():
        source = ast.unparse(tree)
        _, libraries = imports_of(name, tree, set())
        if {"zlib", "gzip", "zipfile"} & libraries or "ops.download" in source:
            readers.add(name)
    assert readers == {"goatcounter.exportfile"}


def reads_environment(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
            return True
        if isinstance(node, ast.alias) and node.name in ("environ", "getenv"):
            return True
    return False


def test_only_the_cli_reads_the_process_environment() -> None:
    assert {name for name, tree in modules().items() if reads_environment(tree)} == {"cli"}
