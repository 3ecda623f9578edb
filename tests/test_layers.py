"""The package's layout: stages import only the stages below them, and no module imports
itself round a circle (lazy imports inside functions included: grimp reads every import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("stylegen", cache_dir=None)


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_round_a_circle(graph):
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = grimp.build_graph("stylegen", cache_dir=None)
    graph.add_import(importer="stylegen.sources.images", imported="stylegen.apps.musiclib.genres")
    assert any("stylegen.sources.images" in c and "stylegen.apps.musiclib.genres" in c for c in cycles(graph))


def test_the_layer_contract_holds():
    """``lint-imports`` with the contract in pyproject.toml (the same run as .ci/run)."""
    run = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                          "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-2000:]
    assert "1 kept, 0 broken" in run.stdout


def test_at_most_ten_modules_beside_the_subpackages():
    top = sorted(p.name for p in (ROOT / "stylegen").glob("*.py"))
    assert len(top) <= 10, top
