"""Fails (exit status 1) when modules of a package import each other in a cycle, printing each cycle found.

Every ``import``/``from ... import`` in a module counts, at the top or inside a function (a lazy import still
ties the two modules together for a reader, and runs in some order at run time); imports under
``if TYPE_CHECKING:`` do not. Usage: ``python tools/check_import_cycles.py [package folder, default lora_trainer]``.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Dict, List, Set


def module_name(root: str, path: str) -> str:
    """``lora_trainer/train/run.py`` -> ``lora_trainer.train.run``; a package's ``__init__.py`` -> the package."""
    rel = os.path.relpath(path, os.path.dirname(root))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: Set[str]) -> Set[str]:
    """The modules of ``known`` that the module ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    found: Set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    stack: List[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            stack.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        stack.extend(ast.iter_child_nodes(node))
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # ``import a.b.c`` imports a, a.b and a.b.c; the graph keeps the deepest module we know.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: str) -> Dict[str, Set[str]]:
    """{module: the package's modules it imports} for every ``.py`` file under ``root``."""
    files = {}
    for folder, _dirs, names in os.walk(root):
        for file_name in names:
            if file_name.endswith(".py"):
                path = os.path.join(folder, file_name)
                files[module_name(root, path)] = path
    known = set(files)
    graph = {}
    for name, path in files.items():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        edges = imported_modules(tree, name, path.endswith("__init__.py"), known)
        # A package's own __init__ runs before any of its modules: an edge to an enclosing package is not a cycle.
        graph[name] = {m for m in edges if not name.startswith(m + ".")}
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def main(argv: List[str]) -> int:
    root = argv[0] if argv else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lora_trainer")
    root = os.path.normpath(root)
    graph = import_graph(root)
    cycles = find_cycles(graph)
    for cycle in cycles:
        links = [f"{a} -> {b}" for a in cycle for b in sorted(graph[a]) if b in cycle]
        print("import cycle: " + ", ".join(links), file=sys.stderr)
    if not cycles:
        print(f"no import cycles among {len(graph)} modules of {os.path.basename(root)}")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
