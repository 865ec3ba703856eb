"""``bnaudit.recalibrate`` and ``bnaudit recalibrate``: running statistics equal torch's own
``swa_utils.update_bn`` on the same data, dropout stays off, the variance is torch's unbiased one, the
before/after table tells the truth, the input model is untouched, and the CLI writes a file that loads back
in bnaudit and in plain torch, atomically and never over an existing file without --force."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import bnaudit
from bnaudit.cli import app
from bnaudit.errors import DataError, TransformError
from bnaudit.rules import examples_modes as R
from bnaudit.transforms.recalibrate import recalibrate

runner = CliRunner()


def _cnn(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Dropout(dropout) if dropout else nn.Identity(),
        nn.Linear(6 * 6 * 6, 8, bias=False), nn.BatchNorm1d(8, momentum=0.3), nn.ReLU(), nn.Linear(8, 3),
    )


def _images(n: int = 100) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=gen) * 2 + 0.5


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_matches_update_bn_including_an_uneven_last_batch():
    model = _cnn()
    original = copy.deepcopy(model.state_dict())
    loader = DataLoader(TensorDataset(_images(100)), batch_size=30)  # 30, 30, 30, 10
    ref = copy.deepcopy(model)
    update_bn(loader, ref)
    new, table = recalibrate(model, loader)
    for key, value in _buffers(ref).items():
        torch.testing.assert_close(new.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    assert int(new[1].num_batches_tracked) == 4 and table.batches == 4 and table.samples == 100
    for k, v in original.items():  # the input model is untouched
        assert torch.equal(model.state_dict()[k], v), k
    assert new[6].momentum == 0.3 and new[1].momentum == 0.1  # momentum restored on the copy


def test_dropout_stays_off_while_estimating():
    model = _cnn(dropout=0.5)
    loader = DataLoader(TensorDataset(_images(64)), batch_size=16)
    new, _ = recalibrate(model, loader)
    without = copy.deepcopy(model)
    without[4] = nn.Identity()  # the same weights with the dropout removed
    update_bn(loader, without)
    torch.testing.assert_close(new[6].running_var, without[6].running_var, rtol=1e-6, atol=1e-6)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        active = copy.deepcopy(model)
        update_bn(loader, active)  # update_bn's model.train() turns dropout on: a different variance
    assert not torch.allclose(active[6].running_var, new[6].running_var, rtol=1e-3)


def test_variance_is_the_unbiased_batch_variance():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    bn = nn.BatchNorm1d(4)
    new, table = recalibrate(bn, [x])  # one batch of everything
    torch.testing.assert_close(new.running_mean, x.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new.running_var, x.var(0, unbiased=True), rtol=1e-5, atol=1e-6)
    row = table.row("")
    assert row.z_after < 1e-6 and row.r_after == pytest.approx(1.0, abs=1e-5)
    assert row.z_before > 0.2 and row.r_before > 5  # data variance ~9 against running_var 1


def test_modes_restored_per_module_and_device_dtype_kept():
    model = _cnn().eval()
    model[6].train()  # one layer deliberately in train mode
    new, _ = recalibrate(model, _images(40))
    assert {n: m.training for n, m in new.named_modules()} == {n: m.training for n, m in model.named_modules()}
    assert next(new.parameters()).dtype == torch.float32 and next(new.parameters()).device.type == "cpu"


def test_table_rows_and_skipped_layers():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 5)
            self.bn = nn.BatchNorm1d(5)
            self.free = nn.BatchNorm1d(5, track_running_stats=False)
            self.unused = nn.BatchNorm1d(5)

        def forward(self, x):
            return self.free(self.bn(self.lin(x)))

    torch.manual_seed(0)
    model = Branchy()
    model.unused.running_mean.fill_(3.0)
    new, table = recalibrate(model, torch.randn(64, 4), batches=1)
    assert [r.layer for r in table] == ["bn"] and len(table) == 1
    assert table.batches == 1 and table.samples == 32  # bnaudit batches a tensor by 32; one batch asked for
    assert "track_running_stats=False" in table.skipped["free"]
    assert "old statistics kept" in table.skipped["unused"]
    assert torch.equal(new.unused.running_mean, torch.full((5,), 3.0))
    d = table.to_dict()
    assert d["layers"][0]["num_batches_tracked_after"] == 1 and set(d["skipped"]) == {"free", "unused"}


def test_errors():
    with pytest.raises(TransformError, match="nothing to recalibrate"):
        recalibrate(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), torch.randn(8, 3))
    with pytest.raises(DataError, match="needs data"):
        recalibrate(_cnn(), None)
    with pytest.raises(DataError, match="two or more samples"):
        recalibrate(nn.BatchNorm1d(3), [torch.randn(1, 3), torch.randn(1, 3)])
    with pytest.raises(DataError, match="rejected a batch"):
        recalibrate(_cnn(), torch.randn(16, 5))
    new, table = recalibrate(nn.BatchNorm1d(3), [torch.randn(1, 3), torch.randn(6, 3)])
    assert table.dropped_batches == 1 and table.batches == 1


def test_repairs_the_ema_model_that_bn303_reports():
    broken = R.ema_params_only()
    from bnaudit.api import recalibrate as api_recalibrate

    assert bnaudit.recalibrate is api_recalibrate  # the lazily exported public name (specs or objects)
    fixed, table = bnaudit.recalibrate(broken, R.digits())
    assert all(r.num_batches_tracked_before == 0 and r.num_batches_tracked_after > 0 for r in table)
    assert all(abs(r.r_after - 1) < 1e-4 and r.z_after < 1e-4 for r in table)
    report = bnaudit.inspect(fixed, R.digits(), select=["BN302", "BN303", "BN304"])
    assert not report.findings


MODEL_PY = """
import torch
from torch import nn
from sklearn.datasets import load_digits


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10),
    )


def build_data():
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "net.py").write_text(textwrap.dedent(MODEL_PY))
    torch.save(R.ema_params_only().state_dict(), tmp_path / "ema.pt")  # trained weights, buffers never set
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_writes_a_file_that_loads_back_and_refuses_to_overwrite(project: Path):
    before = bnaudit.inspect("net.py", "net.py:build_data", weights="ema.pt", select=["BN303"])
    assert {f.layer for f in before.findings} == {"1", "4"}

    result = runner.invoke(app, ["recalibrate", "net.py", "--weights", "ema.pt", "--data", "net.py:build_data",
                                 "-o", "fixed.pt", "--batches", "20"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "z before" in out and "r after" in out and "0 -> 20" in out and "wrote fixed.pt" in out
    assert "bnaudit inspect fixed.pt --data" in out

    saved = torch.load(project / "fixed.pt", weights_only=True)  # plain torch, no pickled code
    assert saved["transform"]["name"] == "recalibrate" and int(saved["state_dict"]["1.num_batches_tracked"]) == 20
    from bnaudit.transforms import load

    reloaded = load(project / "fixed.pt")
    expected, _ = recalibrate(bnaudit.load_model("net.py", weights="ema.pt").module, "net.py:build_data", batches=20)
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[k], v)
    after = bnaudit.inspect("fixed.pt", "net.py:build_data", select=["BN303", "BN304"])
    assert not after.findings

    mtime = (project / "fixed.pt").stat().st_mtime_ns
    again = runner.invoke(app, ["recalibrate", "net.py", "--data", "net.py:build_data", "-o", "fixed.pt"])
    assert again.exit_code == 2 and "already exists" in again.output and "--force" in again.output
    assert (project / "fixed.pt").stat().st_mtime_ns == mtime
    forced = runner.invoke(app, ["recalibrate", "net.py", "--data", "net.py:build_data", "-o", "fixed.pt", "--force"])
    assert forced.exit_code == 0, forced.output
    assert int(torch.load(project / "fixed.pt", weights_only=True)["state_dict"]["1.num_batches_tracked"]) == 57
    assert not [p for p in project.iterdir() if p.name.startswith(".fixed.pt.")]  # no temporary left behind


def test_cli_input_errors_are_one_line(project: Path):
    missing = runner.invoke(app, ["recalibrate", "net.py", "--data", "net.py:build_data"])
    assert missing.exit_code == 2 and "-o OUT.pt" in missing.output
    no_folder = runner.invoke(app, ["recalibrate", "net.py", "--data", "net.py:build_data", "-o", "nope/out.pt"])
    assert no_folder.exit_code == 2 and "does not exist" in no_folder.output
    (project / "ln.py").write_text(
        "from torch import nn\ndef build_model():\n    return nn.Sequential(nn.Linear(64, 4), nn.LayerNorm(4))\n"
    )
    nothing = runner.invoke(app, ["recalibrate", "ln.py", "--data", "net.py:build_data", "-o", "x.pt"])
    assert nothing.exit_code == 2 and "nothing to recalibrate" in nothing.output
    assert not (project / "x.pt").exists()


def test_cli_pickled_module_gets_a_plain_state_dict(project: Path):
    torch.save(R.ema_params_only(), project / "whole.pt")
    result = runner.invoke(app, ["recalibrate", "whole.pt", "--trust-pickle", "--data", "net.py:build_data",
                                 "-o", "whole_fixed.pt", "--batches", "4"])
    assert result.exit_code == 0, result.output
    assert "plain state_dict" in result.output
    state = torch.load(project / "whole_fixed.pt", weights_only=True)
    assert int(state["1.num_batches_tracked"]) == 4
    model = R._mlp()
    model.load_state_dict(state)  # loads into the architecture with plain torch


def test_lazy_modules(project: Path):
    lazy = nn.Sequential(nn.LazyLinear(8), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(8, 10))
    with pytest.raises(TransformError, match="lazy"):
        recalibrate(lazy, torch.randn(16, 64))
    (project / "lazy.py").write_text(
        "from torch import nn\n"
        "def build_model():\n"
        "    return nn.Sequential(nn.LazyLinear(8), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(8, 10))\n"
    )
    result = runner.invoke(app, ["recalibrate", "lazy.py", "--data", "net.py:build_data", "-o", "lazy_fixed.pt",
                                 "--batches", "3"])
    assert result.exit_code == 0, result.output
    assert "plain state_dict" in result.output  # a lazy model cannot be rebuilt by copying before its first call
    state = torch.load(project / "lazy_fixed.pt", weights_only=True)
    assert int(state["1.num_batches_tracked"]) == 3 and state["1.running_mean"].shape == (8,)
    loaded = bnaudit.load_model("lazy.py", weights="lazy_fixed.pt").module
    assert torch.equal(loaded[1].running_var, state["1.running_var"])
