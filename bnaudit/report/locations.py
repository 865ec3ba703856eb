"""Where each layer of a model is written in its source file, for the report formats that point at lines
(SARIF regions, GitHub annotations).

A layer created as ``self.<name> = ...`` in a class defined in the model's file maps to that line. The
entries of an ``nn.Sequential`` written out as a call (``nn.Sequential(nn.Linear(...), ...)``, the first such
call with as many arguments at or after the Sequential's own line) map to their argument's line. Any other
layer (built in a loop, say) takes its nearest ancestor's line, and one with no located ancestor the line of
what the spec named (the ``build_model`` function or the model class), when that is in the file. Nothing is
imported or run: this reads the file and the source of classes already loaded."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

__all__ = ["layer_lines"]


def _source(obj: Any, target: Path) -> tuple[list[str], int] | None:
    """``obj``'s source lines and first line number, when it is defined in ``target``."""
    try:
        path = inspect.getsourcefile(obj)
        if path is None or Path(path).resolve() != target:
            return None
        return inspect.getsourcelines(obj)
    except (OSError, TypeError):
        return None


def layer_lines(model: Any, source_path: str | Path | None, named: Any = None) -> dict[str, int]:
    """Layer name -> line in ``source_path`` (1-based); the model itself under ``""`` when located.

    Args:
        model: the audited model (its layer names are what findings carry).
        source_path: the ``.py`` file the model came from; any other file gives an empty map.
        named: what the spec named (a factory function, a class or an instance), for the fallback line.
    """
    if source_path is None or Path(source_path).suffix != ".py":
        return {}
    target = Path(source_path).resolve()
    cache: dict[type, tuple[list[str], int] | None] = {}

    def assigned(cls: type, attr: str) -> int | None:
        if cls not in cache:
            cache[cls] = _source(cls, target)
        found = cache[cls]
        if found is None:
            return None
        lines, start = found
        pattern = re.compile(rf"\bself\.{re.escape(attr)}\s*(?::[^=]*)?=(?!=)")
        for i, text in enumerate(lines):
            if pattern.search(text):
                return start + i
        return None

    out: dict[str, int] = {}
    root = None
    for obj in (named, type(model)):
        if obj is None:
            continue
        found = _source(obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj), target)
        if found is not None:
            root = found[1]
            break
    if root is not None:
        out[""] = root
    calls = _sequential_calls(target)
    modules = dict(model.named_modules())
    for name in modules:  # parents come before their children
        if not name:
            continue
        parent, _, attr = name.rpartition(".")
        owner = modules[parent]
        line = assigned(type(owner), attr)
        if line is None and attr.isdigit() and parent in out and _is_sequential(owner):
            args = next((a for at, a in calls if at >= out[parent] and len(a) == len(owner)), None)
            if args is not None:
                line = args[int(attr)]
        if line is None:
            line = out.get(parent)
        if line is not None:
            out[name] = line
    return out


def _is_sequential(module: Any) -> bool:
    return any(c.__name__ == "Sequential" for c in type(module).__mro__)


def _sequential_calls(path: Path) -> list[tuple[int, list[int]]]:
    """Every ``Sequential(...)`` call written out in ``path`` (no ``*args``): its line and each argument's."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
        if name == "Sequential" and node.args and not any(isinstance(a, ast.Starred) for a in node.args):
            found.append((node.lineno, [a.lineno for a in node.args]))
    return sorted(found)
