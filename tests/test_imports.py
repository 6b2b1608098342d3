"""The import graph of lmkit runs one way: no module imports another inside a function to dodge a
cycle, and no module that another imports imports it back (lmkit.models' own imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

LMKIT = Path(__file__).resolve().parents[1] / "lmkit"


def _modules() -> dict[str, ast.Module]:
    modules = {}
    for path in LMKIT.rglob("*.py"):
        name = ".".join(path.relative_to(LMKIT.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = ast.parse(path.read_text(encoding="utf-8"))
    return modules


def _loads(node: ast.AST, modules: dict[str, ast.Module]) -> set[str]:
    """The lmkit modules an import statement loads (a package's submodules, not the package)."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lmkit":
        found = {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
        return found | ({node.module} if len(found) < len(node.names) and node.module in modules else set())
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    return set()


def _type_checking(tree: ast.Module) -> set[ast.AST]:
    """The imports under a top-level `if TYPE_CHECKING:`, which never run."""
    return {node for block in tree.body if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for node in ast.walk(block)}


def test_no_lmkit_module_imports_another_inside_a_function() -> None:
    modules = _modules()
    inner = [f"{name}:{node.lineno}" for name, tree in modules.items()
             for node in ast.walk(tree) if node not in tree.body and node not in _type_checking(tree)
             and _loads(node, modules)]
    assert inner == [], f"imports inside functions: {inner}"


def test_the_import_graph_has_no_cycles() -> None:
    modules = _modules()
    graph = {name: set().union(*(_loads(node, modules) for node in ast.walk(tree)
                                 if node not in _type_checking(tree))) - {name}
             for name, tree in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, f"import cycle: {' -> '.join([*path[path.index(name):], name])}"
        if name not in done:
            for child in sorted(graph[name]):
                visit(child, [*path, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])
