"""Streaming moments: per-channel statistics equal a direct float64 computation (NC, NCL, NCHW), merging over
batches equals the full-data statistics, and the variance survives a mean far from zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnaudit.stats import ChannelStats, Moments, as_3d, chan_merge, channel_stats, reduce_dims

SHAPES = [(16, 5), (8, 5, 7), (4, 5, 3, 6)]


def _ref(x: torch.Tensor, channel_dim: int = 1):
    xd = x.double()
    dims = reduce_dims(x, channel_dim)
    return xd.mean(dims), xd.var(dims, unbiased=False)


@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCL", "NCHW"])
def test_channel_stats_match_direct_computation(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3 + 2
    x[x < 0.5] = 0.0  # exact zeros to count
    st_ = channel_stats(as_3d(x, 1), count_nonfinite_values=True)
    mean, var = _ref(x)
    assert st_.n == x.numel() // shape[1]
    torch.testing.assert_close(st_.mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((st_.m2 / st_.n).double(), var, rtol=1e-5, atol=1e-6)
    assert float(st_.min) == float(x.min()) and float(st_.max) == float(x.max())
    assert int(st_.nonzero) == int((x != 0).sum())
    assert int(st_.nonfinite) == 0


def test_channel_last_layout():
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(2))  # (N, L, F)
    st_ = channel_stats(as_3d(x, -1))
    torch.testing.assert_close(st_.mean.double(), x.double().mean((0, 1)))
    assert st_.channels == 3 and st_.n == 24


def test_whole_tensor_layout_and_collapse():
    x = torch.randn(8, 4, 5, generator=torch.Generator().manual_seed(3))
    whole = channel_stats(as_3d(x, None))
    assert whole.channels == 1
    torch.testing.assert_close(whole.mean.double(), x.double().mean().reshape(1))
    collapsed = channel_stats(as_3d(x, 1)).whole()
    torch.testing.assert_close((collapsed.m2 / collapsed.n).double(), x.double().var(unbiased=False).reshape(1), rtol=1e-5, atol=1e-6)


def test_variance_stable_far_from_zero():
    x = torch.randn(4096, 3, generator=torch.Generator().manual_seed(4)) + 1e4  # mean 1e4 std 1: 1e4 std away
    st_ = channel_stats(as_3d(x, 1))
    var = (st_.m2 / st_.n).double()
    ref = x.double().var(0, unbiased=False)
    assert torch.allclose(var, ref, rtol=1e-3), (var, ref)
    naive = (x * x).mean(0).double() - x.mean(0).double() ** 2  # what E[x^2] - E[x]^2 gives in float32
    assert (naive - ref).abs().max() > 10 * (var - ref).abs().max()


@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCL", "NCHW"])
def test_moments_merged_over_batches_equal_full_data(shape):
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(*shape, generator=g) * (i + 1) + i for i in range(4)]
    full = torch.cat(batches)
    streamed = Moments()
    for b in batches:
        streamed.update(b)
    a, b = Moments(), Moments()
    for t in batches[:2]:
        a.update(t)
    for t in batches[2:]:
        b.update(t)
    merged = a.merge(b)
    mean, var = _ref(full)
    for m in (streamed, merged):
        torch.testing.assert_close(m.mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m.var, var, rtol=1e-10, atol=1e-10)
        assert float(m.min) == float(full.min()) and float(m.max) == float(full.max())


def test_channel_stats_merge_equals_concatenation():
    g = torch.Generator().manual_seed(6)
    x1, x2 = torch.randn(10, 4, generator=g), torch.randn(30, 4, generator=g) + 5
    merged = channel_stats(as_3d(x1, 1)).merge(channel_stats(as_3d(x2, 1)))
    mean, var = _ref(torch.cat([x1, x2]))
    assert isinstance(merged, ChannelStats) and merged.n == 40
    torch.testing.assert_close(merged.mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((merged.m2 / merged.n).double(), var, rtol=1e-5, atol=1e-6)


def test_moments_count_nonfinite_and_zeros():
    x = torch.tensor([[1.0, 0.0], [float("nan"), 2.0], [3.0, float("inf")], [0.0, 4.0]])
    m = Moments().update(x)
    host = m.to_numpy()
    assert host["nonfinite_frac"] == pytest.approx(2 / 8)
    assert host["zero_frac"] == pytest.approx(2 / 8)
    np.testing.assert_allclose(host["mean"], [4 / 3, 2.0])  # finite values only
    assert host["max"] == 4.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=6), st.floats(-1e3, 1e3))
def test_chan_merge_any_split(sizes, offset):
    rng = np.random.default_rng(len(sizes))
    data = rng.normal(offset, 2.0, size=sum(sizes))
    n, mean, m2 = 0, np.zeros(()), np.zeros(())
    start = 0
    for k in sizes:
        part = data[start:start + k]
        start += k
        n, mean, m2 = chan_merge(n, mean, m2, k, part.mean(), ((part - part.mean()) ** 2).sum())
    assert n == len(data)
    assert mean == pytest.approx(data.mean(), rel=1e-9, abs=1e-9)
    assert m2 / n == pytest.approx(data.var(), rel=1e-7, abs=1e-9)
