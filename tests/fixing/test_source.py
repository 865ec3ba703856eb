"""The LibCST layer of ``bnaudit fix``: exact edits, refusals, and the guard that never lets an edit that no
longer compiles reach the user's file."""

from __future__ import annotations

import shutil
from pathlib import Path

import libcst as cst
import pytest

import bnaudit
from bnaudit.fixing import fix_kind, fixable_codes
from bnaudit.fixing import source as fix_source
from bnaudit.fixing.source import FixSourceError, SourceEdit, apply_edits, render_checked, reorder

GOLDEN = Path(__file__).parent / "golden"


class _ReturnOutsideFunction(cst.CSTTransformer):
    """Puts a ``return`` at module level: LibCST renders it, Python refuses to compile it."""

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        return updated.with_changes(body=[cst.SimpleStatementLine([cst.Return()]), *updated.body])


def test_the_guard_refuses_code_that_does_not_compile() -> None:
    with pytest.raises(FixSourceError, match="would not compile"):
        render_checked(cst.parse_module("x = f(1)\n"), _ReturnOutsideFunction(), path="m.py")
    assert render_checked(cst.parse_module("x = f(1)\n"), cst.CSTTransformer(), path="m.py") == "x = f(1)\n"


def test_an_edit_that_breaks_the_file_is_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bias.py"
    shutil.copyfile(GOLDEN / "bias.before.py", path)
    before = path.read_bytes()

    class Broken(_ReturnOutsideFunction):
        def __init__(self, *args: object) -> None:
            super().__init__()

    monkeypatch.setattr(fix_source, "_Editor", Broken)
    with pytest.raises(FixSourceError):
        bnaudit.fix(str(path))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bias.py"]


def test_only_the_named_call_changes() -> None:
    text = "a = nn.Linear(4, 4)  # one\nb = nn.Linear(4, 4)  # two\n"
    edit = SourceEdit("BN101", "b", 2, "Linear", "set", "bias", "False", True)
    new, made, refused = apply_edits(text, [edit])
    assert new == "a = nn.Linear(4, 4)  # one\nb = nn.Linear(4, 4, bias=False)  # two\n"
    assert made == [edit] and refused == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("xs = [nn.Linear(4, 4) for _ in range(2)]\n", "inside a comprehension"),
        ("for i in range(2):\n    x = nn.Linear(4, 4)\n", "no literal Linear"),
        ("x = nn.Linear(4, 4, bias=use_bias)\n", "the expression `use_bias`"),
        ("x = nn.Linear(*sizes)\n", "*args"),
        ("x = nn.Linear(4, 4); y = nn.Linear(4, 4)\n", "2 Linear(...) calls"),
        ("x = make_linear(4, 4)\n", "the calls there: make_linear"),
    ],
)
def test_a_call_that_is_not_one_literal_is_refused(text: str, why: str) -> None:
    edit = SourceEdit("BN101", "x", 1, "Linear", "set", "bias", "False", True)
    new, made, refused = apply_edits(text, [edit])
    assert new == text and made == []
    assert len(refused) == 1 and why in refused[0][1]


def test_a_literal_that_differs_from_the_layer_is_refused() -> None:
    edit = SourceEdit("BN106", "bn", 1, "BatchNorm1d", "set", "momentum", "0.01", 0.99)
    _, made, refused = apply_edits("bn = nn.BatchNorm1d(8, momentum=0.9)\n", [edit])
    assert made == [] and "but the layer has momentum=0.99" in refused[0][1]


def test_moving_keeps_the_trailing_comma_where_it_was() -> None:
    text = "s = nn.Sequential(\n    nn.Dropout(0.1),\n    nn.BatchNorm1d(4)\n)\n"
    edit = SourceEdit("BN104", "0", 2, "Dropout", "move", after_line=3, after_callee="BatchNorm1d", after_layer="1")
    new, made, _ = apply_edits(text, [edit], indices={"0": 0})
    assert made == [edit]
    assert new == "s = nn.Sequential(\n    nn.BatchNorm1d(4),\n    nn.Dropout(0.1)\n)\n"
    assert reorder(4, [(0, 2)]) == [1, 2, 0, 3]


def test_the_catalog_covers_the_rules_it_names() -> None:
    from bnaudit.rules.catalog import all_rules

    codes = {r.code for r in all_rules()}
    assert set(fixable_codes()) <= codes
    assert fix_kind("BN101") == "safe" and fix_kind("BN104") == "unsafe" and fix_kind("BN302") == "checkpoint"
    assert fix_kind("BN110") is None
