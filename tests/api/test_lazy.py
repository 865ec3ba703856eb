"""Models with lazy modules (``nn.LazyLinear``, ``nn.LazyBatchNorm1d``): torch cannot copy an uninitialized
parameter, and every command copies the model. A model built from a spec is given its shapes by one eval-mode
forward of the example input (seeded, no running statistic moves); a module the caller passed in is theirs,
so they are asked to call it once first. Before: a raw torch ValueError traceback, exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import bnaudit
from bnaudit.cli import app
from bnaudit.errors import UsageError

runner = CliRunner()
SOURCE = (
    "from torch import nn\n"
    "def build_model():\n"
    "    return nn.Sequential(nn.LazyLinear(16), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(16, 3))\n"
)


@pytest.fixture
def lazy_file(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lazy.py").write_text(SOURCE)
    return tmp_path / "lazy.py"


def test_a_spec_is_initialized_from_input_shape_and_audited(lazy_file):
    result = runner.invoke(app, ["inspect", "lazy.py", "--input-shape", "8", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (f,) = [f for f in report["findings"] if f["code"] == "BN101"]
    assert f["layer"] == "0" and f["evidence"]["bias_values"] == 16
    first = report["layers"][0]
    assert first["name"] == "0" and first["input_shapes"] == [[4, 8]] and first["params"] == 8 * 16 + 16


def test_a_spec_without_an_input_is_one_clear_line(lazy_file):
    result = runner.invoke(app, ["inspect", "lazy.py"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "lazy modules not initialized yet (0, 1)" in line and "--input-shape" in line


def test_initializing_runs_in_eval_mode_and_is_seeded(lazy_file):
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    first = bnaudit.prepare("lazy.py:build_model", x)
    second = bnaudit.prepare("lazy.py:build_model", x)
    assert first.lazy_initialized and first.model[0].weight.shape == (16, 8)
    assert torch.equal(first.model[0].weight, second.model[0].weight)  # the same seed: the same report
    bn = first.model[1]
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(16))
    assert all(m.training for m in first.model.modules())  # the modes are put back


def test_a_callers_lazy_module_is_refused_and_left_alone():
    model = nn.Sequential(nn.LazyLinear(16), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(32, 8)
    with pytest.raises(UsageError, match=r"call the model once on a real batch \(model\(x\)\)"):
        bnaudit.inspect(model, x)
    assert isinstance(model[0], nn.LazyLinear) and model[0].has_uninitialized_params()
    model(x)  # what the message asks for
    assert any(f.code == "BN101" for f in bnaudit.inspect(model, x).findings)
