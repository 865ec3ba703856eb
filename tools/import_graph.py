"""Print the import circles among bnaudit's modules, and every use of another module's private name.

An import inside a function counts like one at the top of the module: a lazy import still ties the two
modules together. Imports under ``if TYPE_CHECKING:`` do not count, since they never run. A package's
``__init__`` is its own node; importing ``bnaudit.a.b`` is an edge to ``bnaudit.a.b`` only (not to the
package ``bnaudit.a`` that Python initialises on the way), as import-linter counts it.

A private name is one with a single leading underscore (``_graph``), met as ``from bnaudit.x import _name``,
or as ``x._name`` or ``getattr(x, "_name")`` where ``x`` is bound to a bnaudit module by an import; dunder
names (``__version__``) are public.

Usage: ``python tools/import_graph.py [ROOT]`` (ROOT holds the ``bnaudit`` folder; default: this checkout).
Exit status 1 when it prints a circle or a private-name use, 0 otherwise."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "bnaudit"


@dataclass(frozen=True)
class PrivateUse:
    """``module`` uses ``name``, a private name of ``owner``, at ``line``."""

    module: str
    owner: str
    name: str
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.line} uses {self.owner}.{self.name}"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def find_modules(root: Path) -> dict[str, Path]:
    """Every module under ``root/bnaudit``, by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def _attribute_use(node: ast.AST) -> tuple[str, str] | None:
    """``(name, attribute)`` for ``name.attribute`` and for ``getattr/setattr/hasattr(name, "attribute", ...)``."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    if (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
        and isinstance(node.args[0], ast.Name) and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        return node.args[0].id, node.args[1].value
    return None


class ModuleScan:
    """The bnaudit modules one module imports, and the private names of other modules it uses."""

    def __init__(self, module: str, path: Path, modules: dict[str, Path]) -> None:
        self.module = module
        self.modules = modules
        self.imports: set[str] = set()
        self.private: list[PrivateUse] = []
        self.bound: dict[str, str] = {}  # local name -> the bnaudit module it is bound to
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        nodes = list(_runtime_nodes(tree))
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                self._import_from(node, path.name == "__init__.py")
            elif isinstance(node, ast.Import):
                self._import(node)
        for node in nodes:
            used = _attribute_use(node)
            if used is not None and is_private(used[1]):
                owner = self.bound.get(used[0])
                if owner is not None and owner != module:
                    self.private.append(PrivateUse(module, owner, used[1], node.lineno))

    def _import_from(self, node: ast.ImportFrom, is_package: bool) -> None:
        target = _absolute(self.module, is_package, node)
        if target.split(".")[0] != PACKAGE:
            return
        for alias in node.names:
            full = f"{target}.{alias.name}"
            if full in self.modules:
                self._edge(full)
                self.bound[alias.asname or alias.name] = full
            elif target in self.modules:
                self._edge(target)
                if is_private(alias.name) and target != self.module:
                    self.private.append(PrivateUse(self.module, target, alias.name, node.lineno))

    def _import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] != PACKAGE:
                continue
            if alias.name in self.modules:
                self._edge(alias.name)
            if alias.asname and alias.name in self.modules:
                self.bound[alias.asname] = alias.name

    def _edge(self, target: str) -> None:
        if target != self.module:
            self.imports.add(target)


def scan(root: Path) -> tuple[dict[str, set[str]], list[PrivateUse]]:
    """The import graph of bnaudit's modules (module -> modules it imports) and the private-name uses."""
    modules = find_modules(root)
    graph: dict[str, set[str]] = {}
    private: list[PrivateUse] = []
    for name, path in modules.items():
        result = ModuleScan(name, path, modules)
        graph[name] = result.imports
        private += result.private
    return graph, private


def circles(graph: dict[str, set[str]], ignore: Iterable[tuple[str, str]] = ()) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, after dropping the
    ``ignore`` edges (importer, imported)."""
    dropped = set(ignore)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        # Recursive: the depth is at most the number of modules (about 150), far below the recursion limit.
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if (v, w) in dropped or w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest closed path through a circle's first module, for a readable message: a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    queue = [start]
    for node in queue:  # breadth first, so the first way back to start is a shortest one
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    return [start]  # not reached for a strongly connected component


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    graph, private = scan(root)
    found = circles(graph)
    for component in found:
        print(f"circle of {len(component)} modules: {' -> '.join(cycle_path(graph, component))}")
        print(f"  members: {', '.join(component)}")
    for use in private:
        print(f"private name: {use}")
    if not found and not private:
        print(f"no circle and no private-name use among {len(graph)} modules")
    return 1 if found or private else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
