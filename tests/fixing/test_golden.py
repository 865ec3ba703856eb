"""``bnaudit.fix`` on golden before/after source files: one per fixable rule, with comments and odd
formatting that must survive. Each case is copied to a temporary folder, fixed, compared with its
``.after.py``, fixed again (nothing may change) and audited again (the fixed findings gone, no new ones).
Regenerate the ``.after.py`` files with ``BNAUDIT_REGEN_GOLDEN=1 python -m pytest tests/fixing``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import bnaudit

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("BNAUDIT_REGEN_GOLDEN") == "1"

# case -> (unsafe_fixes, the rule codes whose findings the fix must remove)
CASES = {
    "bias": (False, {"BN101"}),
    "bias_conv": (False, {"BN101"}),
    "momentum": (False, {"BN106"}),
    "eps": (False, {"BN108"}),
    "output_bn": (True, {"BN103"}),
    "dropout": (True, {"BN104"}),
    "running_stats": (True, {"BN107"}),
    "per_step": (True, {"BN105"}),
}


def _copy(case: str, tmp_path: Path) -> Path:
    target = tmp_path / f"{case}.py"
    shutil.copyfile(GOLDEN / f"{case}.before.py", target)
    return target


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_fix(case: str, tmp_path: Path) -> None:
    unsafe, codes = CASES[case]
    path = _copy(case, tmp_path)
    result = bnaudit.fix(str(path), unsafe_fixes=unsafe)
    applied = {o.code for o in result.applied}
    assert applied == codes, [str(o) for o in result.outcomes]
    expected = GOLDEN / f"{case}.after.py"
    text = path.read_text()
    if REGEN:
        expected.write_text(text)
    assert text == expected.read_text()
    assert result.written == [path.resolve()]

    # The fixed findings are gone, and nothing new appeared, in a fresh audit of the written file.
    fresh = bnaudit.inspect(str(path))
    assert not {f.code for f in fresh.findings} & codes
    before = {(f.code, result.renames.get(f.layer, f.layer)) for f in result.before.findings}
    assert {(f.code, f.layer) for f in fresh.findings} <= before
    assert codes <= {f.code for f in result.gone} and result.new == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_second_fix_changes_nothing(case: str, tmp_path: Path) -> None:
    unsafe, _ = CASES[case]
    path = tmp_path / f"{case}.py"
    shutil.copyfile(GOLDEN / f"{case}.after.py", path)
    result = bnaudit.fix(str(path), unsafe_fixes=unsafe)
    assert result.diff == "" and result.applied == [] and result.written == []
    assert path.read_text() == (GOLDEN / f"{case}.after.py").read_text()


def test_unsafe_fixes_need_the_flag(tmp_path: Path) -> None:
    path = _copy("dropout", tmp_path)
    before = path.read_text()
    result = bnaudit.fix(str(path))
    assert [(o.code, o.status) for o in result.outcomes] == [("BN104", "skipped")]
    assert "--unsafe-fixes" in result.outcomes[0].detail
    assert path.read_text() == before


def test_refused_findings_name_the_line_and_leave_the_file(tmp_path: Path) -> None:
    path = _copy("refused", tmp_path)
    before = path.read_text()
    result = bnaudit.fix(str(path))
    by_layer = {o.layer: o for o in result.outcomes}
    assert by_layer["fcs.0"].status == "not-fixable" and by_layer["fcs.0"].line == 12
    assert "2 Linear layers are built by this one line" in by_layer["fcs.0"].detail
    assert by_layer["bn_cfg"].status == "not-fixable" and by_layer["bn_cfg"].line == 14
    assert "`MOMENTUM`, not a literal" in by_layer["bn_cfg"].detail
    assert result.applied == [] and result.diff == "" and path.read_text() == before


def test_diff_writes_nothing(tmp_path: Path) -> None:
    path = _copy("bias", tmp_path)
    before = path.read_bytes()
    stamp = path.stat().st_mtime_ns
    result = bnaudit.fix(str(path), diff=True)
    assert "+        self.fc1 = nn.Linear(10,   16, bias=False)   # odd spacing, kept" in result.diff
    assert result.written == [] and path.read_bytes() == before and path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bias.py"]


def test_a_fix_whose_finding_remains_is_rolled_back(tmp_path: Path) -> None:
    path = tmp_path / "reset.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "def build_model():\n"
        "    model = nn.Sequential(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8, momentum=0.99), nn.Linear(8, 2))\n"
        "    model[1].momentum = 0.99  # set again after construction: the edit cannot remove the finding\n"
        "    return model\n"
    )
    before = path.read_text()
    result = bnaudit.fix(str(path))
    assert [(o.code, o.status) for o in result.outcomes] == [("BN106", "rolled-back")]
    assert result.diff == "" and path.read_text() == before


def test_per_step_checkpoint_copies_the_shared_statistics(tmp_path: Path) -> None:
    import torch

    path = _copy("per_step", tmp_path)
    model = bnaudit.load_model(str(GOLDEN / "per_step.before.py")).module
    with torch.no_grad():
        model.bn.running_mean.uniform_()
    weights, out = tmp_path / "w.pt", tmp_path / "out.pt"
    torch.save(model.state_dict(), weights)
    result = bnaudit.fix(str(path), unsafe_fixes=True, weights=weights, output=out)
    assert [o.code for o in result.applied] == ["BN105"]
    state = torch.load(out, weights_only=True)
    for i in range(3):
        assert torch.equal(state[f"bn.{i}.running_mean"], model.bn.running_mean)
        assert torch.equal(state[f"bn.{i}.weight"], model.bn.weight)
    assert "bn.weight" not in state


def test_windows_line_endings_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "bias.py"
    path.write_bytes((GOLDEN / "bias.before.py").read_bytes().replace(b"\n", b"\r\n"))
    bnaudit.fix(str(path))
    assert path.read_bytes() == (GOLDEN / "bias.after.py").read_bytes().replace(b"\n", b"\r\n")


def test_the_temporary_copies_are_forgotten(tmp_path: Path) -> None:
    """Ranks spawned for training import every file bnaudit imported; the deleted copies must not be among them."""
    import sys

    path = _copy("bias", tmp_path)
    bnaudit.fix(str(path), diff=True)
    assert not [m for m in list(sys.modules.values()) if "bnaudit-fix-" in str(getattr(m, "__file__", "") or "")]
