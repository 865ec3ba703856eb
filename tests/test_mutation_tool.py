"""The mutation check's own bookkeeping (``tools/mutation.py``, not in CI itself): a test path in ``TESTS`` that
does not exist would make pytest fail on every mutant of its module and count each as killed, and a module of
bnaudit/rules or bnaudit/probes without an entry stops a run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("mutation_tool", ROOT / "tools" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_tool"] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["mutation_tool"]


def _modules(tool) -> list[Path]:
    return sorted(p for d in tool.DEFAULT_PATHS for p in (ROOT / d).glob("*.py") if p.name not in tool.SKIP_FILES)


def test_every_rule_and_probe_module_has_its_tests_and_every_test_path_exists(tool):
    modules = {p.relative_to(ROOT).as_posix() for p in _modules(tool)}
    assert modules <= set(tool.TESTS), sorted(modules - set(tool.TESTS))
    paths = {a for commands in tool.TESTS.values() for cmd in commands for a in cmd if a.endswith(".py")}
    assert paths and all((ROOT / p).is_file() for p in paths), sorted(p for p in paths if not (ROOT / p).is_file())


def test_every_equivalent_key_names_a_mutant_of_the_code_as_it_is(tool):
    keys = {m.key for f in _modules(tool) for m in tool.find_mutants(f)}
    stale = sorted(set(tool.EQUIVALENT) - keys)
    assert not stale, f"EQUIVALENT names mutants that no longer exist: {stale}"
