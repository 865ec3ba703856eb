"""bnaudit's modules import each other without a circle (lazy imports inside functions included), and none
uses another module's private name. ``tools/import_graph.py`` finds both; import-linter checks the direction
of the layers in CI (``lint-imports``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

KNOWN_EDGES: set[tuple[str, str]] = set()
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_no_import_circle_among_bnaudit_modules(tool):
    graph, _ = tool.scan(ROOT)
    assert "bnaudit.rules.base" in graph and "bnaudit.loading.modelfile" in graph
    found = tool.circles(graph, ignore=KNOWN_EDGES)
    assert not found, "\n".join(" -> ".join(tool.cycle_path(graph, c)) for c in found)


def test_no_module_uses_another_modules_private_name(tool):
    _, private = tool.scan(ROOT)
    unexpected = [use for use in private if (use.module, use.owner, use.name) not in KNOWN_PRIVATE]
    assert not unexpected, "\n".join(map(str, unexpected))


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "bnaudit" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_scan_sees_lazy_circles_and_private_names_but_not_type_checking_imports(tool, tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "low.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from bnaudit.top import Thing  # a checker-only import ties nothing
            def _helper(): ...
            def late():
                from bnaudit import mid  # lazy: still an edge
                return mid._secret
        """,
        "mid.py": "from .low import late\n_secret = 1\n",
        "top.py": "import bnaudit.low as low\nfrom bnaudit.low import _helper\nThing = getattr(low, '_helper')\n",
        "pkg/__init__.py": "from bnaudit.pkg.leaf import VALUE\n",
        "pkg/leaf.py": "VALUE = 1\n",
    })
    graph, private = tool.scan(root)
    assert graph["bnaudit.low"] == {"bnaudit.mid"}
    assert graph["bnaudit.top"] == {"bnaudit.low"}
    assert graph["bnaudit.pkg"] == {"bnaudit.pkg.leaf"}
    assert tool.circles(graph) == [["bnaudit.low", "bnaudit.mid"]]
    assert tool.circles(graph, ignore={("bnaudit.mid", "bnaudit.low")}) == []
    assert sorted((u.module, u.owner, u.name) for u in private) == [
        ("bnaudit.low", "bnaudit.mid", "_secret"),
        ("bnaudit.top", "bnaudit.low", "_helper"),
        ("bnaudit.top", "bnaudit.low", "_helper"),
    ]


def test_the_script_prints_the_circle_and_fails(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "from bnaudit import __version__ as v\n__version__ = '0'\n",
        "a.py": "def f():\n    from bnaudit import b\n",
        "b.py": "from bnaudit.a import f\n",
    })
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "import_graph.py"), str(root)], capture_output=True, text=True
    )
    assert run.returncode == 1
    assert "circle of 2 modules: bnaudit.a -> bnaudit.b -> bnaudit.a" in run.stdout
    assert "private name" not in run.stdout  # a dunder such as __version__ is public
