"""The package layers stay true: only http/ and server/ speak aiohttp.web (the layers contract itself is
import-linter's, run by .ci/run), and no module imports another in a cycle, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[1] / "cratemirror"
WEB_PACKAGES = {"http", "server"}


def _imports_aiohttp_web(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module == "aiohttp" and any(alias.name == "web" for alias in node.names):
                return True
            if node.module.startswith("aiohttp.web"):
                return True
        if isinstance(node, ast.Import) and any(a.name.startswith("aiohttp.web") for a in node.names):
            return True
    return False


def test_only_http_and_server_import_aiohttp_web() -> None:
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] not in WEB_PACKAGES
        and _imports_aiohttp_web(ast.parse(path.read_text("utf-8")))
    ]
    assert offenders == []


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("cratemirror")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("cratemirror") and graph.find_shortest_chain(imported, module):
                cycles.append(f"{module} <-> {imported}")
    assert cycles == []
