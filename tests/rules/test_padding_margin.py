"""BN205 decides with a margin for its own estimation noise: it fires when a 95% lower confidence bound on
the all-zero-position fraction, over samples, exceeds ``max_zero_positions``. The bound is compared with a
naive recomputation (scipy's t quantile, numpy's sample standard deviation) at values just either side of
the threshold, and a correct fresh model whose measured fraction is above the threshold only by noise stays
silent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import bnaudit
from bnaudit.probes.data import run_data_probe
from bnaudit.rules import examples_data as XD
from tests.fixtures.architectures import images, resnet_bottleneck_zero_init

L = 100  # positions per sample: zero counts below are percentages


def _bn_seq() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(3 * L, 2))


def _with_zero_positions(counts: list[int]) -> torch.Tensor:
    """(n, 3, L) inputs, every value nonzero except ``counts[i]`` whole positions of sample i."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(len(counts), 3, L, generator=g) + 0.5
    for i, k in enumerate(counts):
        x[i, :, :k] = 0.0
    return x


def _naive_lower(counts: list[int]) -> float:
    f = np.asarray(counts, dtype=float) / L
    return f.mean() - stats.t.ppf(0.95, len(f) - 1) * f.std(ddof=1) / math.sqrt(len(f))


def _bn205(x: torch.Tensor, **kw):
    report = bnaudit.inspect(_bn_seq(), x, select=["BN205"], **kw)
    assert "BN205" in report.rules_run, report.rules_skipped
    return report.findings


@pytest.mark.parametrize(("counts", "fires"), [
    ([11] * 7 + [9], True),          # mean 10.75%, bound 10.28%: just above 10%
    ([11] * 6 + [9, 9], False),      # mean 10.5%, bound 9.88%: above 10% only within its noise
    ([12] * 8, True),                # no spread: the bound is the mean
    ([10] * 8, False),               # exactly at the threshold is not above it
    ([6, 8, 10, 12, 14, 16, 4, 18], False),  # mean 11%, bound 7.7%: too spread to tell
])
def test_bn205_fires_only_when_the_lower_bound_clears_the_threshold(counts, fires):
    expected = _naive_lower(counts)
    assert (expected > 0.1) == fires  # the cases mean what their comments say
    findings = _bn205(_with_zero_positions(counts))
    assert bool(findings) == fires
    if fires:
        (f,) = findings
        ev = f.evidence
        assert f.layer == "0" and ev["samples"] == len(counts)
        assert ev["zero_positions"] == pytest.approx(sum(counts) / (L * len(counts)), abs=1e-12)
        assert ev["zero_positions_lower"] == pytest.approx(expected, rel=1e-3)  # the t quantile is approximate
        assert ev["max_zero_positions"] == 0.1


def test_bn205_threshold_option_moves_the_decision():
    counts = [11] * 7 + [9]  # bound 10.28%
    assert not _bn205(_with_zero_positions(counts), rule_config={"BN205": {"options": {"max_zero_positions": 0.103}}})
    assert _bn205(_with_zero_positions(counts), rule_config={"BN205": {"options": {"max_zero_positions": 0.102}}})


def test_bn205_one_sample_bounds_nothing_and_reports_nothing():
    x = _with_zero_positions([50])  # half the positions zero, but one sample cannot say how that varies
    probe = run_data_probe(_bn_seq(), [_batch(x)])
    assert probe.zero_positions["0"] == 0.5 and list(probe.zero_samples["0"]) == [0.5]
    assert not _bn205(x)


def test_probe_counts_zero_positions_per_sample_against_a_naive_count():
    counts = [0, 3, 7, 20, 100]
    x = _with_zero_positions(counts)
    probe = run_data_probe(_bn_seq(), [_batch(x[:2]), _batch(x[2:])])  # two batches, samples in order
    np.testing.assert_array_equal(probe.zero_samples["0"], np.asarray(counts) / L)
    assert probe.zero_positions["0"] == pytest.approx(sum(counts) / (L * len(counts)))
    # (N, C) input: a sample is one position, zero or not
    m = nn.Sequential(nn.BatchNorm1d(3))
    flat = torch.ones(4, 3)
    flat[1] = 0.0
    np.testing.assert_array_equal(run_data_probe(m, [_batch(flat)]).zero_samples["0"], [0.0, 1.0, 0.0, 0.0])


def test_padded_sequences_still_fire_with_a_bound_far_above_the_threshold():
    report = bnaudit.inspect(XD.PaddedSeq(), XD.padded_tokens(), select=["BN205"])
    (f,) = report.findings
    assert f.evidence["samples"] == 64 and 0.6 < f.evidence["zero_positions_lower"] < f.evidence["zero_positions"]


def test_bottleneck_of_four_relu_channels_is_not_called_padding_at_four_samples():
    # A 1x1 convolution over 4 ReLU channels outputs a zero vector wherever all 4 are zero: about 9% of
    # positions at layers.0.0.bn3 of this fresh model. 4 samples measure 10.1% (above 0.1 by noise); 64
    # samples measure under 0.1. The bound over 4 samples stays under 0.1, so nothing is reported.
    small = run_data_probe(resnet_bottleneck_zero_init(), [_batch(images(4))])
    assert small.zero_positions["layers.0.0.bn3"] > 0.1
    large = run_data_probe(resnet_bottleneck_zero_init(), [_batch(images(64))])
    assert large.zero_positions["layers.0.0.bn3"] < 0.1
    report = bnaudit.inspect(resnet_bottleneck_zero_init(), images(4), select=["BN205"])
    assert "BN205" in report.rules_run and not report.findings, [f.message for f in report.findings]


def _batch(x: torch.Tensor):
    from bnaudit.loading.data import Batch

    return Batch(x, None)
