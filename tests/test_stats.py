"""Streaming moments: per-channel statistics equal a direct float64 computation (NC, NCL, NCHW), merging over
batches equals the full-data statistics, and the variance survives a mean far from zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnaudit.stats import ChannelStats, Moments, StatsBuffer, as_3d, chan_merge, channel_stats, group_stats, reduce_dims

SHAPES = [(16, 5), (8, 5, 7), (4, 5, 3, 6)]


def _ref(x: torch.Tensor, channel_dim: int = 1):
    xd = x.double()
    dims = reduce_dims(x, channel_dim)
    return xd.mean(dims), xd.var(dims, unbiased=False)


def _assert_group_stats(got, x: torch.Tensor) -> None:
    """``group_stats``' five results for ``x`` (channels on dim 1) equal a direct computation."""
    mean, m2, mn, mx, nz = got
    ref_mean, ref_var = _ref(x)
    dims = reduce_dims(x, 1)
    n = x.numel() // x.shape[1]
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((m2 / n).double(), ref_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mn, x.amin(dims))
    torch.testing.assert_close(mx, x.amax(dims))
    torch.testing.assert_close(nz, (x != 0).sum(dims).float())


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


@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCL", "NCHW"])
def test_group_stats_per_channel(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).relu()
    _assert_group_stats(group_stats(as_3d(x, 1)), x)


@pytest.mark.parametrize("shape", [(16, 5), (6, 5, 7), (3, 5, 9, 10)], ids=["B=1", "B=7", "B=90"])
@pytest.mark.parametrize("with_work", [False, True], ids=["alloc", "scratch"])
def test_stats_with_scratch_and_both_reduction_orders(shape, with_work):
    # B <= 64 and B > 64 take different reduction orders; a scratch buffer (dirty, larger than needed) must
    # not change a single result
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x[x.abs() < 0.3] = 0.0
    x3 = as_3d(x, 1)
    work = torch.full((x.numel() + 11,), float("nan")) if with_work else None
    _assert_group_stats(group_stats(x3, work=work), x)
    ref_mean, ref_var = _ref(x)
    st_ = channel_stats(x3, count_nonfinite_values=True, work=work)
    torch.testing.assert_close(st_.mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((st_.m2 / st_.n).double(), ref_var, rtol=1e-5, atol=1e-6)
    assert int(st_.nonzero) == int((x != 0).sum()) and int(st_.nonfinite) == 0
    assert float(st_.min) == float(x.min()) and float(st_.max) == float(x.max())
    # a buffer too small or of another dtype is ignored, not overrun
    small = channel_stats(x3, work=torch.zeros(3))
    other = channel_stats(x3, work=torch.zeros(x.numel(), dtype=torch.float64))
    torch.testing.assert_close(small.m2, st_.m2)
    torch.testing.assert_close(other.m2, st_.m2)


@pytest.mark.parametrize("shape", [(16, 5), (6, 5, 7), (3, 5, 9, 10)], ids=["NC", "NCL", "NCHW"])
def test_results_written_into_buffers_equal_fresh_ones(shape):
    # The recorder's allocation-free forms: channel_stats into a StatsBuffer (laid out mean | m2 | min | max |
    # nonzero | nonfinite) and group_stats into five slices give what the allocating forms give.
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7)) * 3 - 1
    x[x.abs() < 0.5] = 0.0
    x3 = as_3d(x, 1)
    if shape[2:] == () or len(shape) == 2:
        x3 = x3.reshape(shape[0], shape[1])  # the (A, C) form the recorder holds for B == 1
    fresh = channel_stats(x3, count_nonfinite_values=True)
    buf = StatsBuffer(5, x.device)
    buf.flat.fill_(float("nan"))  # dirty: every part must be overwritten
    into = channel_stats(x3, count_nonfinite_values=True, work=torch.empty(x.numel() + 3), out=buf)
    assert into.flat is buf.flat and into.n == fresh.n
    torch.testing.assert_close(buf.flat[:5], fresh.mean)
    torch.testing.assert_close(buf.flat[5:10], fresh.m2, rtol=1e-5, atol=1e-5)
    assert buf.flat[10:].tolist() == [float(fresh.min), float(fresh.max), float(fresh.nonzero), 0.0]
    # float64 is not written into the float32 buffer: the statistics come back as fresh tensors
    wide = channel_stats(x3.double(), work=torch.empty(x.numel(), dtype=torch.float64), out=buf)
    assert wide.flat is None and wide.mean.dtype == torch.float64
    slices = torch.full((5, 5), float("nan"))
    got = group_stats(x3, work=torch.empty(x.numel()), out=tuple(slices))
    for a, b in zip(got, group_stats(x3)):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)


def test_buffer_counts_nonfinite_values():
    x = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0], [0.0, 3.0]])
    buf = StatsBuffer(2, x.device)
    st_ = channel_stats(x, count_nonfinite_values=True, work=torch.empty(6), out=buf)
    assert int(st_.nonfinite) == 2 and float(buf.flat[-1]) == 2.0
    assert not torch.isfinite(st_.mean).all()


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
