"""The distributed helpers in one process, without a process group: the merge arithmetic they apply to every
rank's data (checked against statistics of the concatenated data), and the no-op behaviour outside a group.
Fast; the real 2-process runs are in ``test_gloo.py``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

import bnaudit
from bnaudit.api import inspect_distributed
from bnaudit.distributed import (
    DDPFacts,
    current_ddp_facts,
    ddp_context,
    ddp_facts,
    dist_info,
    gather_bn_buffers,
    is_active,
    is_main_process,
    merge_channel_stats,
    merge_reports,
    reduce_channel_stats,
    reduce_moments,
)
from bnaudit.findings import Finding, Report
from bnaudit.recording import History, reduce_history, reduce_row
from bnaudit.recording.reduce import merge_ranks
from bnaudit.stats import Moments, as_3d, channel_stats


@pytest.fixture(scope="module")
def cancer() -> torch.Tensor:
    return torch.from_numpy(load_breast_cancer().data.astype(np.float32))


def test_outside_a_group_everything_is_local():
    info = dist_info()
    assert not info.initialized and info.world_size == 1 and info.rank == 0 and not info.active
    assert not is_active() and is_main_process()


def test_merge_channel_stats_equals_concatenation(cancer):
    x = cancer.double()
    parts = [channel_stats(as_3d(x[a:b], 1)) for a, b in ((0, 100), (100, 101), (101, 569))]
    merged = merge_channel_stats(parts)
    whole = channel_stats(as_3d(x, 1))
    assert merged.n == whole.n == 569
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(merged.m2, whole.m2, rtol=1e-10, atol=0)
    assert float(merged.min) == float(whole.min) and float(merged.max) == float(whole.max)
    assert int(merged.nonzero) == int(whole.nonzero)
    with pytest.raises(ValueError, match="channel counts differ"):
        merge_channel_stats([parts[0], channel_stats(as_3d(x[:, :3], 1))])


def test_reductions_are_no_ops_outside_a_group(cancer):
    m = Moments().update(cancer)
    r = reduce_moments(m)
    assert r is not m and torch.equal(r.mean, m.mean)
    st = channel_stats(as_3d(cancer, 1))
    assert reduce_channel_stats(st) is st


def _histories(cancer, splits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 2)).eval()
    out = []
    for part in splits:
        m = copy.deepcopy(model)
        with torch.no_grad(), bnaudit.record(m) as rec:
            for t in range(3):
                m(cancer[64 * t : 64 * (t + 1)][part])
                rec.step()
        out.append(rec.history)
    return out


def test_merge_rows_of_two_shards_equals_the_whole_batch(cancer):
    """The arithmetic reduce_row/reduce_history apply to the gathered rows, on two real recorded histories."""
    a, b, whole = _histories(cancer, (slice(0, 24), slice(24, 64), slice(0, 64)))
    pa, pb = a.to_payload(), b.to_payload()
    seg_a, seg_b = a.segments[0], b.segments[0]
    vals = np.stack([seg_a.take("values"), seg_b.take("values")])
    ints = np.stack([seg_a.take("ints"), seg_b.take("ints")])
    merged, out_ints = merge_ranks(vals, ints, seg_a.layout)
    pa["segments"][0]["values"], pa["segments"][0]["ints"] = torch.from_numpy(merged.astype(np.float32)), torch.from_numpy(out_ints)
    h = History.from_payload(pa)
    for layer in whole.layers:
        for stat in ("channel_mean", "channel_var", "min", "max", "zero_frac", "nonfinite_frac"):
            np.testing.assert_allclose(h.series(layer, stat), whole.series(layer, stat), rtol=2e-5, atol=1e-5,
                                       err_msg=f"{layer} {stat}")
        np.testing.assert_array_equal(h.series(layer, "count"), whole.series(layer, "count"))
    # BatchNorm buffers are rank 0's, untouched
    np.testing.assert_array_equal(h.series("1", "running_mean"), a.series("1", "running_mean"))
    assert pb["segments"][0]["values"].shape == pa["segments"][0]["values"].shape


def test_reduce_history_and_row_outside_a_group(cancer):
    (h,) = _histories(cancer, (slice(0, 64),))
    r = reduce_history(h)
    assert r is not h
    np.testing.assert_array_equal(r.series("0", "channel_var"), h.series("0", "channel_var"))
    seg = h.segments[0]
    values, ints = seg.take("values")[0].copy(), seg.take("ints")[0].copy()
    reduce_row(values, ints, seg.layout)
    np.testing.assert_array_equal(values, seg.take("values")[0])


def test_gather_bn_buffers_single_process():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2), nn.BatchNorm1d(2, track_running_stats=False))
    bufs = gather_bn_buffers(model)
    assert list(bufs) == ["1"]  # the layer without running statistics has nothing to compare
    assert bufs["1"].mean.shape == (1, 3) and bufs["1"].num_batches_tracked.tolist() == [0.0]


def test_ddp_facts_and_context():
    assert ddp_facts(nn.Linear(2, 2)) is None
    facts = DDPFacts(forward_sync_buffers=False, has_sync_bn_at_wrap=False, device_type="cpu", sync_bn_layers=("1",))
    assert facts.converted_after_wrap
    assert current_ddp_facts() is None
    with ddp_context(facts):
        assert current_ddp_facts() is facts
    assert current_ddp_facts() is None


def test_merge_reports_and_inspect_distributed_outside_a_group():
    rep = Report(model="m", findings=(Finding("BN106", "suspicious-momentum", "warning", "1", "msg", "fix"),))
    assert merge_reports(rep) is rep
    model = nn.Sequential(nn.Linear(10, 8, bias=False), nn.SyncBatchNorm(8), nn.ReLU(), nn.Linear(8, 2))
    report = inspect_distributed(model, torch.randn(16, 10), select=["BN4"])
    assert report is not None and "BN402" in report.rules_skipped
    hits = [f for f in report.findings if f.code == "BN403"]
    assert [f.severity for f in hits] == ["info"]
    assert "torch.distributed is not initialized" in hits[0].message


def test_bn401_planned_world_size_evidence():
    model = nn.Sequential(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    report = bnaudit.inspect(model, torch.randn(64, 10), batch_size=64, select=["BN401"],
                             rule_config={"BN401": {"options": {"world_size": 8}}})
    (f,) = [f for f in report.findings if f.code == "BN401"]
    assert f.evidence["samples_per_device"] == 8 and f.evidence["planned"] is True
    assert f.evidence["global_samples"] == 64 and "SyncBatchNorm" in f.fix
    tiny = bnaudit.inspect(model, torch.randn(8, 10), batch_size=8, select=["BN401"],
                           rule_config={"BN401": {"options": {"world_size": 8}}})
    (g,) = [f for f in tiny.findings if f.code == "BN401"]
    assert g.severity == "error" and "GroupNorm" in g.fix  # one sample per device: BatchNorm cannot train
