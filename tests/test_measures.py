"""Derived measures: BatchNorm batch statistics recovered from running buffers equal the recorded ones
(momentum 0.1 and the cumulative average), drift in known units, percentiles (watched and approximated),
signal propagation, dead and saturated fractions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnaudit.errors import UsageError
from bnaudit.recording import record
from bnaudit.recording.measures import (
    batch_stats_from_buffers,
    bn_batch_stats,
    dead_fraction,
    depth_trend,
    drift,
    drift_all,
    percentiles,
    saturated_fraction,
    signal_propagation,
)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("shape", [(32, 4), (8, 4, 3, 3)], ids=["NC", "NCHW"])
def test_batch_stats_recovered_from_running_buffers(momentum, shape):
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4, momentum=momentum) if len(shape) == 2 else nn.BatchNorm2d(4, momentum=momentum)
    model = nn.Sequential(bn)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad(), record(model) as rec:
        for i in range(5):
            model(torch.randn(*shape, generator=g) * (i + 1) + i)
            rec.step()
    h = rec.history
    mean, var = bn_batch_stats(h, "0")
    np.testing.assert_allclose(mean, h.series("0", "channel_mean"), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(var, h.series("0", "channel_var"), rtol=1e-4, atol=1e-4)


def test_batch_stats_from_buffers_formula():
    old_m, old_v = np.array([0.0, 1.0]), np.array([1.0, 2.0])
    batch_m, batch_v, n = np.array([2.0, -1.0]), np.array([4.0, 0.5]), 10
    new_m = 0.9 * old_m + 0.1 * batch_m
    new_v = 0.9 * old_v + 0.1 * batch_v * n / (n - 1)
    m, v = batch_stats_from_buffers(old_m, old_v, new_m, new_v, momentum=0.1, num_batches_tracked=7, n=n)
    np.testing.assert_allclose(m, batch_m)
    np.testing.assert_allclose(v, batch_v)
    with pytest.raises(UsageError):
        batch_stats_from_buffers(old_m, old_v, new_m, new_v, momentum=0.0, num_batches_tracked=1, n=n)


def _identity_history(shift_per_step: float, steps: int = 10):
    lin = nn.Linear(3, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(3))
        lin.bias.zero_()
    model = nn.Sequential(lin)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), record(model, units={"0": [0]}) as rec:
        for t in range(steps):
            model(torch.randn(4096, 3, generator=g) + t * shift_per_step)
            rec.step()
    return rec.history


def test_drift_in_units_of_early_std():
    h = _identity_history(0.5)
    d = drift(h, "0", window=2)
    # first window steps 0-1 (means 0, 0.5: pooled std sqrt(1 + 0.0625)), last window steps 8-9 (means 4, 4.5)
    assert d.shift == pytest.approx(4.0 / np.sqrt(1.0625), rel=0.03)
    assert d.first == (0, 1) and d.last == (8, 9)
    assert d.scale_ratio == pytest.approx(1.0, abs=0.05)
    still = drift(_identity_history(0.0), "0")
    assert still.shift < 0.1
    assert set(drift_all(h)) == {"0"}


def test_percentiles_watched_and_approximated():
    h = _identity_history(1.0, steps=4)
    exact = percentiles(h, "0", 0)
    approx = percentiles(h, "0", 1)
    assert exact.shape == approx.shape == (4, 3)
    # standard normal + t: 15/50/85th percentiles at t -1.036, t, t + 1.036
    expected = np.arange(4)[:, None] + np.array([-1.0364, 0.0, 1.0364])[None, :]
    np.testing.assert_allclose(exact, expected, atol=0.08)
    np.testing.assert_allclose(approx, expected, atol=0.08)
    with pytest.raises(UsageError):
        percentiles(h, "0", 0, levels=(0.99,))


def test_signal_propagation_and_depth_trend():
    assert depth_trend([1.0, 0.5, 0.25, 0.125]) == pytest.approx(0.5)
    assert np.isnan(depth_trend([1.0, 2.0]))
    torch.manual_seed(0)
    layers = []
    for _ in range(5):
        lin = nn.Linear(16, 16, bias=False)
        nn.init.normal_(lin.weight, std=0.5 / 4)  # second moment x0.25 per layer
        layers.append(lin)
    model = nn.Sequential(*layers)
    with torch.no_grad(), record(model) as rec:
        model(torch.randn(2048, 16))
        rec.step()
    prop = signal_propagation(rec.history)
    assert [p.depth for p in prop] == [0, 1, 2, 3, 4]
    assert depth_trend([p.second_moment for p in prop]) == pytest.approx(0.25, rel=0.25)


def test_dead_and_saturated_fractions():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.Sigmoid())
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # half the ReLU units dead
        model[2].weight.zero_()
        model[2].bias.copy_(torch.tensor([50.0, -50.0, 0.0, 0.0]))  # two sigmoid units pinned at 1 and 0
    with torch.no_grad(), record(model) as rec:
        for _ in range(3):
            model(torch.randn(64, 4))
            rec.step()
    assert dead_fraction(rec.history, "1") == pytest.approx(0.5)
    assert saturated_fraction(rec.history, "3", kind="sigmoid") == pytest.approx(0.5)
    with pytest.raises(UsageError):
        saturated_fraction(rec.history, "3", kind="relu")
