"""The end-of-run checks of ``bnaudit.watch()`` (BN203, BN207, BN208) on small real training loops: each fires
on a loop built to have the problem and stays quiet on the same loop without it."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import bnaudit


def _digits(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:n], dtype=torch.float32)
    return (x - x.mean(0)) / (x.std(0) + 1e-6), torch.tensor(y[:n])


def _train(model: nn.Module, batch: int, steps: int = 40, lr: float = 0.01) -> list:
    x, y = _digits()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    with bnaudit.watch() as w:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return [f for r in w.reports for f in r.findings]


def _codes(findings) -> list[str]:
    return [f.code for f in findings]


@pytest.mark.parametrize(("batch", "fires"), [(4, True), (128, False)])
def test_bn203_batch_noise_from_step_to_step(batch, fires):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    got = [f for f in _train(model, batch) if f.code == "BN203"]
    assert bool(got) is fires
    if fires:
        assert got[0].layer == "1" and got[0].evidence["values_per_channel"] == 4


def _dead(bias: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        model[0].bias.fill_(bias)
    return model


def test_bn208_dead_relu_units():
    findings = _train(_dead(-100.0), 64, steps=10)
    (f,) = [f for f in findings if f.code == "BN208"]
    assert f.layer == "1" and f.evidence["dead_fraction"] == 1.0
    assert "BN208" not in _codes(_train(_dead(0.0), 64, steps=10))


def _deep(scale: float, bn: bool = False) -> nn.Module:
    """Ten tanh layers with weights at ``scale`` times the variance-preserving size and zero biases."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for k in range(10):
        lin = nn.Linear(64, 64)
        with torch.no_grad():
            nn.init.normal_(lin.weight, std=(1.0 if k == 0 else scale) / 64**0.5)
            lin.bias.zero_()
        layers += [lin, *([nn.BatchNorm1d(64)] if bn else []), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def test_bn207_signal_vanishing_with_depth():
    (f,) = [f for f in _train(_deep(0.3), 64, steps=10, lr=0.0) if f.code == "BN207"]
    assert "vanishes" in f.message and f.evidence["ratio"] < 1e-3
    assert "BN207" not in _codes(_train(_deep(0.3, bn=True), 64, steps=10, lr=0.0))
