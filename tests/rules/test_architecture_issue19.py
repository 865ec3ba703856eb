"""BN111 (eps-too-large) and BN112 (unused-normalization), issue 19: the data-backed eps factor against a
naive float64 reference, and a never-called BatchNorm treated as absent by every other rule, the graph,
insert-bn and the recorder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnaudit
from bnaudit.recording import record
from bnaudit.rules.examples_architecture import MorvanNet


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data[:256], dtype=torch.float32) / 16.0, torch.tensor(d.target[:256])


def _keras_port() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32, 0.8), nn.LeakyReLU(0.2), nn.Linear(32, 10))


def _train_recorded(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 20):
    """A brief SGD run under bnaudit.record, with a plain float64 hook on the BatchNorm's input beside it:
    per step, the per-channel population variance of the batch (what train-mode BatchNorm divides by)."""
    seen: list[np.ndarray] = []
    handle = model[1].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().double().var(0, unbiased=False).numpy()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    try:
        with record(model) as rec:
            for _ in range(steps):
                idx = torch.randint(0, len(x), (32,), generator=g)
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step()
    finally:
        handle.remove()
    return rec.history, float(np.median(np.mean(seen, axis=0)))


def _reference_median_var(model: nn.Module, x: torch.Tensor, batch: int = 32, batches: int = 8) -> float:
    """The data probe's question answered naively: BatchNorm in train mode, one batch at a time, float64."""
    import copy

    work = copy.deepcopy(model).eval()
    work[1].train()
    seen: list[np.ndarray] = []
    work[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].double().var(0, unbiased=False).numpy()))
    with torch.no_grad():
        for chunk in x.split(batch)[:batches]:
            work(chunk)
    return float(np.median(np.mean(seen, axis=0)))


def test_bn111_reports_eps_against_input_variance_of_a_trained_model():
    x, y = _digits()
    model = _keras_port()
    history, recorded_var = _train_recorded(model, x, y)

    batches = list(zip(x.split(32), y.split(32)))  # in order, so the reference sees the same batches
    with_data = bnaudit.inspect(model, batches, select=["BN111"])
    [f] = with_data.findings
    assert f.layer == "1" and f.evidence["variance_source"] == "data"
    expected = _reference_median_var(model, x)
    assert f.evidence["median_input_var"] == pytest.approx(expected, rel=1e-4)
    assert f.evidence["eps_to_var"] == pytest.approx(0.8 / expected, rel=1e-4)
    assert f.evidence["eps_to_var"] > 0.1
    assert f"{0.8 / expected:.3g}x the median per-channel variance" in f.message
    assert "momentum=0.2" in f.fix and "not momentum" in f.message

    from_history = bnaudit.inspect(model, select=["BN111"], history=history)
    [h] = from_history.findings
    assert h.evidence["variance_source"] == "history" and h.evidence["variance_steps"] == 20
    assert h.evidence["median_input_var"] == pytest.approx(recorded_var, rel=1e-4)


def test_bn111_static_without_data_and_quiet_at_keras_eps():
    report = bnaudit.inspect(_keras_port(), select=["BN111"])
    [f] = report.findings
    assert "median_input_var" not in f.evidence and f.evidence["eps"] == pytest.approx(0.8)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32, eps=1e-3), nn.ReLU(), nn.Linear(32, 10))
    assert not bnaudit.inspect(model, select=["BN111"]).findings


def _without_bn_but_odd_arguments() -> nn.Module:
    net = MorvanNet(do_bn=False)
    # Every constructor argument another rule would object to, on a layer that never runs.
    net.bn_input = nn.BatchNorm1d(1, 0.8, momentum=0.99, track_running_stats=False)
    return net


def _scalar_data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(256, 1, generator=torch.Generator().manual_seed(0))
    return x, x**2


def test_bn112_unused_batchnorm_is_absent_for_every_other_rule():
    x, y = _scalar_data()
    net = _without_bn_but_odd_arguments()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    net.eval()  # trained in eval mode: BN307 would speak of bn_input if it were used
    with record(net) as rec:
        for _ in range(10):
            loss = ((net(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step()
    assert "bn_input" not in rec.history.layers
    report = bnaudit.inspect(net, (x, y), history=rec.history)
    assert not any("internal error" in why for why in report.rules_skipped.values()), report.rules_skipped
    about = [(f.code, f.message) for f in report.findings if f.layer == "bn_input"]
    assert [c for c, _ in about] == ["BN112"], about
    assert "MorvanNet.bn_input" in about[0][1] and "10 recorded steps" in about[0][1]
    assert "BN110" in {f.code for f in report.findings}  # its only BatchNorm never runs: unnormalized
    assert "bn_input" not in {layer.name for layer in report.layers}


def test_bn110_and_bn112_follow_the_call_alone():
    x, y = _scalar_data()
    unused = {f.code for f in bnaudit.inspect(MorvanNet(do_bn=False), (x, y), select=["BN110", "BN112"]).findings}
    used = {f.code for f in bnaudit.inspect(MorvanNet(do_bn=True), (x, y), select=["BN110", "BN112"]).findings}
    assert unused == {"BN110", "BN112"} and used == set()


def test_insert_bn_skips_an_unused_batchnorm():
    net = MorvanNet(do_bn=False)
    result = bnaudit.insert_bn(net)
    assert all("bn_input" not in (c.layer, c.new) for c in [*result.changes, *result.skipped])
    assert {c.layer for c in result.changes} == {f"fc{i}" for i in range(5)}
    assert result.model(torch.randn(8, 1)).shape == (8, 1)


class _BigBatchBN(nn.Module):
    """Normalizes only batches of more than 8 samples (fx cannot trace the branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.shape[0] > 8:
            h = self.bn(h)
        return self.head(torch.relu(h))


def test_bn112_a_recorded_step_that_called_the_layer_outweighs_the_example():
    net = _BigBatchBN()
    small = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    assert [f.layer for f in bnaudit.inspect(net, small, select=["BN112"]).findings] == ["bn"]
    with record(net) as rec:
        net(torch.randn(32, 4))
        rec.step()
    assert not bnaudit.inspect(net, small, select=["BN112"], history=rec.history).findings
