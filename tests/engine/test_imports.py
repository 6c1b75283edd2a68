"""local_engine's import graph has no cycle, counting imports inside functions too (an import
tucked into a function to break a cycle still is one); imports for type checking only are left
out (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "local_engine"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                continue
            if isinstance(ch, ast.Import):
                found.update(a.name for a in ch.names)
            elif isinstance(ch, ast.ImportFrom) and ch.module:
                found.add(ch.module)
                found.update(f"{ch.module}.{a.name}" for a in ch.names)  # `from pkg import module`
            visit(ch)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return [*stack[stack.index(v):], v]
            if v not in state and (c := dfs(v)) is not None:
                return c
        stack.pop()
        state[u] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := dfs(m)) is not None:
            return c
    return None


def test_local_engine_has_no_import_cycle() -> None:
    mods = _modules()
    graph = {m: _imports(p, set(mods)) - {m} for m, p in mods.items()}
    assert "local_engine.sequence" in graph["local_engine.generation"]  # the checker sees real edges
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_checker_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
