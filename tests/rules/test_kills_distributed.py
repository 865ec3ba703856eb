"""Edge cases of the BN4xx rules (rules/distributed.py) that the mutation check (`tools/mutation.py`,
`docs/mutation.md`) found unpinned: in one process, and on two ranks of a gloo group on CPU (one spawn for every
case). Each test decides a behaviour that a plausible one-token change would alter (a threshold at its edge, an
evidence value, an edge path). Test names carry `bn40`. The probes' edge cases: test_kills_probes.py."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import bnaudit
from bnaudit.distributed import DDPFacts, ddp_context
from bnaudit.rules import get_rule
from tests.rules.kills import features, rule_findings


# --- BN401-BN403 in one process (the two-rank cases are at the end) ------------------------------------------------
def _bn40(code: str, model: nn.Module, data=None, options=None, **kw):
    if data is None:
        kw.setdefault("input_shape", "4")
    return rule_findings(code, model, data, options, **kw)


class _Buffers(nn.Module):
    """A hand-written normalization that holds the running buffers named (subtracts its running mean, if any)."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        for name in names:
            self.register_buffer(name, torch.zeros(4) if name == "running_mean" else torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - getattr(self, "running_mean", torch.zeros(4))


class FrozenBatchNorm1d(_Buffers):
    """As torchvision's FrozenBatchNorm2d: fixed statistics and affine, no batch statistics ever."""

    def __init__(self) -> None:
        super().__init__("running_mean", "running_var")


def _batch_stat_zoo() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 4), nn.SyncBatchNorm(4), nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False),
        nn.Sequential(nn.Unflatten(1, (2, 2)), nn.InstanceNorm1d(2, track_running_stats=True), nn.Flatten()),
        FrozenBatchNorm1d(), _Buffers("running_mean"),
        _Buffers("running_var"), _Buffers("running_mean", "running_var"), nn.Linear(4, 2),
    ).eval()


def test_bn403_names_each_layer_that_normalizes_over_the_device_batch_next_to_syncbn():
    found = _bn40("BN403", _batch_stat_zoo())
    (info,) = [f for f in found if f.severity == "info"]
    assert info.layer == "1" and info.evidence["sync_bn_layers"] == ["1"] and "1 SyncBatchNorm layer(s) (1)" in info.message
    mixed = {f.layer: f for f in found if f.severity != "info"}
    # torch BatchNorms, tracked or not, and the hand-written one with both buffers; not InstanceNorm, not a
    # Frozen one, not a layer with only one of the two buffers
    assert set(mixed) == {"2", "3", "8"}
    assert [mixed[k].evidence["torch_batchnorm"] for k in ("2", "3", "8")] == [True, True, False]
    assert "left unconverted" in mixed["2"].message and "hand-written" in mixed["8"].message


def test_bn401_planned_counts_the_same_layers():
    found = _bn40("BN401", _batch_stat_zoo(), features(16), {"world_size": 2}, batch_size=16)
    assert sorted(f.layer for f in found) == ["2", "3", "8"]  # the SyncBatchNorm normalizes over the global batch


def test_bn403_shows_four_sync_layers_and_counts_the_rest():
    def sync(n: int) -> nn.Module:
        return nn.Sequential(*[nn.SyncBatchNorm(4) for _ in range(n)]).eval()

    (five,) = _bn40("BN403", sync(5))
    assert five.layer == "0" and "5 SyncBatchNorm layer(s) (0, 1, 2, 3 and 1 more)" in five.message
    (four,) = _bn40("BN403", sync(4))
    assert four.layer == "0" and "4 SyncBatchNorm layer(s) (0, 1, 2, 3) run" in four.message
    assert _bn40("BN403", nn.Sequential(nn.BatchNorm1d(4)).eval()) == []


def test_bn403_reads_the_ddp_facts_of_the_audit():
    model = nn.Sequential(nn.Linear(4, 4), nn.SyncBatchNorm(4)).eval()
    with ddp_context(DDPFacts(forward_sync_buffers=True, has_sync_bn_at_wrap=False, device_type="cpu",
                              sync_bn_layers=("1",))):
        late = [f for f in _bn40("BN403", model) if "converted after" in f.message]
    assert [f.layer for f in late] == ["1"] and late[0].evidence["has_sync_bn_at_wrap"] is False
    with ddp_context(DDPFacts(True, True, "cpu", ("1",))):  # converted before the wrap: fine
        assert [f.severity for f in _bn40("BN403", model)] == ["info"]


def test_bn403_in_a_process_group_of_one_rank():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("no gloo backend")
    hook = sys.excepthook  # init_process_group installs a rank-prefixing one for the rest of the process
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        (f,) = _bn40("BN403", nn.Sequential(nn.Linear(4, 4), nn.SyncBatchNorm(4)).eval())
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook
    assert f.severity == "info" and "the process group has one rank" in f.message
    assert f.evidence["initialized"] is True and f.evidence["world_size"] == 1


def test_bn401_planned_world_sizes_and_options():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert _bn40("BN401", model, features(8), {"world_size": 1}, batch_size=8) == []  # one device: nothing split
    (f,) = _bn40("BN401", model, features(16), {"world_size": 2}, batch_size=16)
    assert f.evidence["samples_per_device"] == 8 and f.evidence["world_size"] == 2
    # 16 samples per device meet min_batch; 16 values per channel do not meet a min_values of 17
    assert _bn40("BN401", model, features(32), {"world_size": 2}, batch_size=32) == []
    (f,) = _bn40("BN401", model, features(32), {"world_size": 2, "min_values": 17}, batch_size=32)
    assert f.evidence["values_per_channel_per_device"] == 16 and f.evidence["min_values"] == 17
    # 4 per device on 4 devices: SyncBatchNorm would see 16, exactly min_batch: converting is the fix
    (f,) = _bn40("BN401", model, features(16), {"world_size": 4}, batch_size=16)
    assert f.evidence["global_samples"] == 16 and "SyncBatchNorm" in f.fix and "over 16 samples" in f.fix
    (f,) = _bn40("BN401", model, features(12), {"world_size": 4}, batch_size=12)
    assert "GroupNorm" in f.fix and "only 12" in f.fix


# --- BN401-BN403 on two ranks of a gloo group on CPU: one spawn for every case ------------------------------------
def _bn40_findings(code: str, model: nn.Module, data=None, **options) -> dict:
    report = bnaudit.inspect(model, data, select=[code], input_shape=None if data is not None else "3",
                             rule_config={code: {"options": options}} if options else None)
    return {"run": code in report.rules_run,
            "found": [(f.layer, f.severity, f.message, f.fix, dict(f.evidence)) for f in report.findings]}


def _bn40_rank_buffers(rank: int) -> nn.Module:
    """Seven BatchNorms with running variance 0.25 everywhere; on rank 1: "0" a mean 0.15 off in channel 2 (0.3
    running std), "1" a variance twice rank 0's in channel 1, "2" one more batch counted, "3" the same, "4" a NaN
    mean, "5" both a mean 0.3 off and a variance twice rank 0's in channel 0, "6" a variance half rank 0's."""
    model = nn.Sequential(*[nn.BatchNorm1d(3) for _ in range(7)]).eval()
    with torch.no_grad():
        for m in model:
            m.running_var.fill_(0.25)
        if rank == 1:
            model[0].running_mean[2] = 0.15
            model[1].running_var[1] = 0.5
            model[2].num_batches_tracked += 1
            model[4].running_mean[0] = float("nan")
            model[5].running_mean[0] = 0.3
            model[5].running_var[0] = 0.5
            model[6].running_var[1] = 0.125
    return model


class _Branch(nn.Module):
    """A BatchNorm that only inputs with a positive first value reach: on rank 0's data, not on rank 1's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.bn, self.branch = nn.Linear(3, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.lin(x))
        return self.branch(h) if float(x[0, 0]) > 0 else h


def _bn40_scenarios(rank: int) -> dict:
    out = {}
    model = _bn40_rank_buffers(rank)
    default = out["402"] = _bn40_findings("BN402", model)
    ev = {layer: e for layer, _, _, _, e in default["found"]}
    gap, ratio = ev["5"]["max_mean_gap"], ev["5"]["max_var_ratio"]
    out["402_at"] = _bn40_findings("BN402", model, mean_tol=gap, var_ratio=ratio)
    out["402_at_gap"] = _bn40_findings("BN402", model, mean_tol=gap)
    out["402_at_ratio"] = _bn40_findings("BN402", model, var_ratio=ratio)
    out["402_below"] = _bn40_findings("BN402", model, mean_tol=math.nextafter(gap, 0), var_ratio=math.nextafter(ratio, 0))
    out["402_wide"] = _bn40_findings("BN402", model, mean_tol=0.4, var_ratio=2.5)
    with ddp_context(DDPFacts(False, True, "cpu")):
        out["402_no_broadcast"] = _bn40_findings("BN402", model)
    with ddp_context(DDPFacts(True, True, "cpu")):
        out["402_broadcast"] = _bn40_findings("BN402", model)
    sync = nn.Sequential(nn.Linear(3, 3), nn.SyncBatchNorm(3)).eval()
    out["403"] = _bn40_findings("BN403", sync)
    for device in ("cpu", "cuda"):  # the device DDP wrapped the model on decides, not the audit's
        with ddp_context(DDPFacts(True, True, device, ("1",))):
            out[f"403_{device}"] = _bn40_findings("BN403", sync)
    x = features(8, f=3, seed=rank).abs()
    out["401"] = _bn40_findings("BN401", _Branch(), -x)  # "branch" is reached on neither rank
    out["401_branch"] = _bn40_findings("BN401", _Branch(), x if rank == 0 else -x)
    return out


def _bn40_rank(rank: int, world: int, init: str, out_dir: str) -> None:
    """The spawn entry point: every case on this rank, pickled for the test."""
    import os
    import pickle
    import sys
    import traceback
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = _bn40_scenarios(rank)
    except Exception:  # noqa: BLE001 - shown by the test
        result = {"error": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def bn40_ranks(tmp_path_factory) -> list[dict]:
    import pickle
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("no gloo backend")
    out = tmp_path_factory.mktemp("bn40")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.start_processes(_bn40_rank, args=(2, f"tcp://127.0.0.1:{port}", str(out)), nprocs=2, join=False,
                             start_method="spawn")
    while not ctx.join(timeout=120):
        pass
    ranks = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    for got in ranks:
        assert "error" not in got, got["error"]
    return ranks


def _by_layer(got: dict) -> dict:
    assert got["run"]
    return {layer: (message, fix, ev) for layer, _, message, fix, ev in got["found"]}


def test_bn402_two_ranks_each_difference_alone_and_the_evidence(bn40_ranks):
    found = _by_layer(bn40_ranks[0]["402"])
    assert set(found) == {"0", "1", "2", "4", "5", "6"}  # "3" is the same on both ranks
    std0 = math.sqrt(float(torch.tensor(0.25)) + 1e-5)
    message, fix, ev = found["0"]
    assert ev["max_mean_gap"] == pytest.approx(float(torch.tensor(0.15)) / std0, rel=1e-12) and ev["max_var_ratio"] == 1.0
    assert (ev["world_size"], ev["worst_rank"], ev["worst_channel"], ev["num_batches_tracked"]) == (2, 1, 2, [0, 0])
    assert ev["mean_tol"] == 0.2 and ev["var_ratio"] == 1.25 and "forward_sync_buffers" not in ev
    assert "rank 1's running_mean is 0.30 running std away from rank 0's (channel 2)" in message
    assert "running_var is" not in message and "num_batches_tracked" not in message and fix == get_rule("BN402").fix
    message, _, ev = found["1"]
    assert ev["max_var_ratio"] == pytest.approx((0.5 + 1e-5) / (0.25 + 1e-5), rel=1e-12) and ev["max_mean_gap"] == 0.0
    assert "rank 1's running_var is 2.00x rank 0's (channel 1)" in message and "running_mean is" not in message
    message, _, ev = found["2"]
    assert ev["num_batches_tracked"] == [0, 1] and "num_batches_tracked differs ([0, 1]" in message
    assert "running_mean is" not in message and "running_var is" not in message
    _, _, ev = found["4"]
    assert ev["max_mean_gap"] == math.inf and ev["max_var_ratio"] == math.inf
    _, _, ev = found["5"]  # the mean gap is in units of rank 0's std, whatever rank 1's variance
    assert ev["max_mean_gap"] == pytest.approx(float(torch.tensor(0.3)) / std0, rel=1e-12)
    _, _, ev = found["6"]  # half the variance is as far as twice it
    assert ev["max_var_ratio"] == pytest.approx((0.25 + 1e-5) / (0.125 + 1e-5), rel=1e-12)
    assert set(_by_layer(bn40_ranks[0]["402_wide"])) == {"2", "4", "5"}  # 0.3 std and 2x are within 0.4 and 2.5


def test_bn402_two_ranks_at_the_tolerances(bn40_ranks):
    r = bn40_ranks[0]
    assert "5" not in _by_layer(r["402_at"])  # exactly at both tolerances: allowed
    message = _by_layer(r["402_at_gap"])["5"][0]  # at the mean tolerance, past the default variance one
    assert "running_var is" in message and "running_mean is" not in message
    message = _by_layer(r["402_at_ratio"])["5"][0]
    assert "running_mean is" in message and "running_var is" not in message
    message = _by_layer(r["402_below"])["5"][0]
    assert "running_mean is" in message and "running_var is" in message


def test_bn402_two_ranks_fix_follows_ddps_buffer_broadcast(bn40_ranks):
    _, fix, ev = _by_layer(bn40_ranks[0]["402_no_broadcast"])["0"]
    assert ev["forward_sync_buffers"] is False and "remove broadcast_buffers=False" in fix
    _, fix, ev = _by_layer(bn40_ranks[0]["402_broadcast"])["0"]
    assert ev["forward_sync_buffers"] is True and fix == get_rule("BN402").fix


def test_bn403_two_ranks_syncbn_on_cpu_is_an_error_unless_ddp_wrapped_it_on_gpu(bn40_ranks):
    for rank in bn40_ranks:
        plain = rank["403"]["found"]
        assert [(layer, sev) for layer, sev, *_ in plain] == [("1", "error")]  # no "runs as plain BatchNorm" info
        assert plain[0][4]["backend"] == "gloo" and plain[0][4]["device"] == "cpu"
        assert [(layer, sev) for layer, sev, *_ in rank["403_cpu"]["found"]] == [("1", "error")]
        assert rank["403_cuda"]["found"] == []


def test_bn401_two_ranks_skips_a_batchnorm_never_called(bn40_ranks):
    found = _by_layer(bn40_ranks[0]["401"])
    assert set(found) == {"bn"} and found["bn"][2]["per_rank_samples"] == [8, 8]


def test_bn401_two_ranks_a_batchnorm_one_rank_never_reaches_is_judged_where_it_runs(bn40_ranks):
    # rank 1's data never reaches "branch": it normalizes 8 samples on rank 0 and nothing on rank 1, which is
    # a small batch (a warning), not one value per channel (it used to be an error saying 0 samples)
    found = _by_layer(bn40_ranks[0]["401_branch"])
    assert set(found) == {"bn", "branch"}
    ev = found["branch"][2]
    assert ev["per_rank_samples"] == [8, 0] and ev["samples_per_device"] == 8
    assert ev["values_per_channel_per_device"] == 8
    assert {layer: sev for layer, sev, *_ in bn40_ranks[0]["401_branch"]["found"]}["branch"] == "warning"
