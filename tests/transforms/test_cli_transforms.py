"""The transform commands end to end: insert-bn/fold-bn/swap-norm on a model file with real data (sklearn
digits), the written file loading back in bnaudit (inspect, the loader, another working directory) and in
plain torch, refusal to overwrite, dry runs, and the one-line errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnaudit.cli import app
from bnaudit.loading import load_model
from bnaudit.transforms import NormalizedLayer, load, load_into

runner = CliRunner()

MODEL_PY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from sklearn.datasets import load_digits

    def build_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))

    def build_cnn():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3), nn.ReLU(),
            nn.Flatten(), nn.Linear(12 * 36, 10),
        )

    def build_data():
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.tensor(y)), batch_size=128)
    """
)


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "net.py").write_text(MODEL_PY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32)


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_insert_bn_calibrated_end_to_end(project: Path, monkeypatch: pytest.MonkeyPatch):
    res = invoke("insert-bn", "net.py", "-o", "net_bn.pt", "--calibrate", "net.py:build_data")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "+    (1): BatchNorm1d(32" in out and "-  (0): Linear(in_features=64, out_features=32, bias=True)" in out
    assert "output layer" in out and "max abs eval-output difference" in out
    assert "bnaudit train-compare net_bn.pt --data net.py:build_data" in out
    # plain torch reads the file safely; the state_dict has the wrapped layout
    obj = torch.load(project / "net_bn.pt", weights_only=True)
    assert obj["bnaudit_format"] == 1 and obj["source"] == str(project / "net.py")
    assert obj["transform"]["name"] == "insert_bn" and "0.1.running_var" in obj["state_dict"]
    # bnaudit's loader rebuilds it, from another working directory, computing the original function
    monkeypatch.chdir(project.parent)
    model = load_model(str(project / "net_bn.pt")).module
    assert isinstance(model[0], NormalizedLayer) and isinstance(model[2][1], nn.BatchNorm1d)
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = digits()
    with torch.no_grad():
        ref, new = original(x), model.eval()(x)
    assert ((new - ref).abs().max() / ref.abs().max()) < 1e-5
    # and a user who builds the architecture themselves replays the saved plan on it
    rebuilt = load_into(original, obj)
    assert torch.equal(rebuilt.state_dict()["0.1.weight"], model.state_dict()["0.1.weight"])
    # bnaudit inspect accepts the file as MODEL (exit 0/1 are reports, 2 would be an input error)
    res = invoke("inspect", str(project / "net_bn.pt"), "--data", str(project / "net.py") + ":build_data")
    assert res.exit_code in (0, 1), res.output
    assert "0.1" in res.output and "BatchNorm1d" in res.output


def test_refuses_to_overwrite_and_force_replaces(project: Path):
    (project / "out.pt").write_bytes(b"keep me")
    res = invoke("insert-bn", "net.py", "-o", "out.pt")
    assert res.exit_code == 2
    assert "already exists" in res.output and "--force" in res.output
    assert (project / "out.pt").read_bytes() == b"keep me"
    res = invoke("insert-bn", "net.py", "-o", "out.pt", "--force", "--layers", "linear")
    assert res.exit_code == 0, res.output
    assert isinstance(load(project / "out.pt")[0], NormalizedLayer)
    assert not [p for p in project.iterdir() if p.name.startswith(".out.pt")]  # no temporary file left


def test_dry_run_writes_nothing_and_output_is_required(project: Path):
    res = invoke("insert-bn", "net.py:build_cnn", "--dry-run", "--layers", "conv", "--placement", "after-activation")
    assert res.exit_code == 0, res.output
    assert "dry run" in res.output and "BatchNorm2d(8) after its activation 2" in res.output
    assert list(project.glob("*.pt")) == []
    res = invoke("insert-bn", "net.py")
    assert res.exit_code == 2 and "-o OUT.pt" in res.output
    res = invoke("insert-bn", "net.py", "--dry-run", "--layers", "rnn")
    assert res.exit_code == 2 and "choose from linear, conv" in res.output


def test_chain_insert_then_fold_does_not_need_the_intermediate_file(project: Path, monkeypatch: pytest.MonkeyPatch):
    assert invoke("insert-bn", "net.py:build_cnn", "-o", "cnn_bn.pt", "--calibrate", "net.py:build_data").exit_code == 0
    res = invoke("fold-bn", "cnn_bn.pt", "-o", "cnn_folded.pt", "--data", "net.py:build_data")
    assert res.exit_code == 2 and "model.eval()" in res.output and "--eval" in res.output
    res = invoke("fold-bn", "cnn_bn.pt", "--eval", "-o", "cnn_folded.pt", "--data", "net.py:build_data")
    assert res.exit_code == 0, res.output
    assert "fold_bn: 2 changed" in res.output and "max abs error" in res.output
    obj = torch.load(project / "cnn_folded.pt", weights_only=True)
    assert [t["name"] for t in obj["transforms"]] == ["insert_bn", "fold_bn"]
    assert obj["source"] == f"{project / 'net.py'}:build_cnn"
    (project / "cnn_bn.pt").unlink()
    monkeypatch.chdir(project.parent)
    folded = load(project / "cnn_folded.pt")
    assert not folded.training and isinstance(folded[1][1], nn.Identity)
    torch.manual_seed(0)
    original = load_model(f"{project / 'net.py'}:build_cnn").module.eval()
    x = digits()
    with torch.no_grad():
        assert torch.allclose(folded(x), original(x), atol=1e-4)
    # the file needs its source: once that is gone, loading says so in one line
    (project / "net.py").rename(project / "moved.py")
    res = invoke("inspect", str(project / "cnn_folded.pt"))
    assert res.exit_code == 2 and "cannot rebuild its source model" in res.output


def test_swap_norm_writes_group_norm(project: Path):
    assert invoke("insert-bn", "net.py:build_cnn", "-o", "cnn_bn.pt", "--input-shape", "64").exit_code == 0
    res = invoke("swap-norm", "cnn_bn.pt", "--to", "group", "-o", "cnn_gn.pt", "--input-shape", "64")
    assert res.exit_code == 0, res.output
    assert "GroupNorm(4, 8)" in res.output and "GroupNorm(6, 12)" in res.output
    model = load(project / "cnn_gn.pt")
    assert isinstance(model[1][1], nn.GroupNorm)
    model.train()(digits()[:1]).sum().backward()
    res = invoke("swap-norm", "cnn_bn.pt", "--to", "batch", "--dry-run")
    assert res.exit_code == 2 and "choose one of group, layer" in res.output


def test_bad_model_spec_is_one_line(project: Path):
    res = invoke("insert-bn", "missing.py", "-o", "x.pt")
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "missing.py" in res.output
