"""``train_compare(..., nproc=2)`` and ``bnaudit train-compare --nproc 2``: real 2-process gloo groups on the CPU
training tiny MLPs on the digits with DistributedDataParallel.

What is checked: a run completes with the single-process JSON shape plus the distributed settings; SyncBatchNorm
is reported unavailable on the CPU with torch's reason (not a crash, not dropped); 2 processes with a per-device
batch B give the losses of 1 process with batch 2B for a model without BatchNorm (DDP averages the gradients of
equal shards, and the logged loss is all-reduced); a rank's typed error reaches the caller with its type and no
rank is left waiting; the spawn launcher (used for CUDA) works with a model loaded from a user's file; options
that cannot work are refused before any process starts. Skipped only where gloo is unavailable."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from typer.testing import CliRunner

from bnaudit.errors import DataError, UsageError
from bnaudit.training import train_compare
from tests.training.conftest import EXAMPLES, RUN_KEYS

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)



def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


class _FailsOnRank1(nn.Module):
    """Trains normally on rank 0; rank 1 raises a typed error in its third training forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and dist.is_initialized() and dist.get_rank() == 1:
            self.calls += 1
            if self.calls == 3:
                raise DataError("rank 1 met a corrupt shard")
        return self.body(x)


@pytest.fixture(scope="module")
def two_proc(small_digits):
    """One 2-process comparison of bn, groupnorm and syncbn, shared by the tests that read it."""
    return train_compare(
        _mlp,
        small_digits,
        variants=("bn", "groupnorm", "syncbn"),
        lrs=0.1,
        batch_sizes=8,
        seeds=1,
        steps=12,
        nproc=2,
    )


def test_two_process_run_completes_with_the_single_process_shape(two_proc):
    data = json.loads(two_proc.to_json())
    s = data["settings"]
    assert s["nproc"] == 2 and s["batch_size_per"] == "device"
    assert s["batch_sizes"] == [8] and s["global_batch_sizes"] == [16]
    assert s["distributed"]["backend"] == "gloo" and s["distributed"]["wrapper"] == "DistributedDataParallel"
    assert s["variants"] == ["bn", "groupnorm"]
    assert [r["variant"] for r in data["runs"]] == ["bn", "groupnorm"]
    for run in data["runs"]:
        assert set(run) >= RUN_KEYS
        assert run["batch_size"] == 8 and run["steps_run"] == 12 and not run["diverged"]
        assert len(run["losses"]) == 12 and all(np.isfinite(run["losses"]))
        assert run["val_loss"] is not None and 0.0 <= run["val_accuracy"] <= 1.0
        assert run["grad_norms"]["steps"] and run["drift"] is not None
    assert {c["variant"] for c in data["summary"]} == {"bn", "groupnorm"}
    assert data["verdict"]


def test_syncbn_is_reported_unavailable_on_cpu_with_torchs_reason(two_proc):
    assert set(two_proc.unavailable) == {"syncbn"}
    reason = two_proc.unavailable["syncbn"]
    assert "SyncBatchNorm" in reason and "GPU" in reason  # torch 2.13: "...only work with GPU modules"
    assert json.loads(two_proc.to_json())["unavailable"] == {"syncbn": reason}
    assert any(n.startswith("syncbn: unavailable with 2 processes on cpu") for n in two_proc.notes)
    from bnaudit.report.html import render

    page = render(two_proc, plots=False)
    assert "Variants not run" in page and "syncbn" in page.split("Variants not run", 1)[1]
    assert not two_proc.runs_of(variant="syncbn")


def test_bn_buffer_spread_across_ranks_is_noted(two_proc):
    (bn,) = two_proc.runs_of(variant="bn")
    assert any("differ across the 2 ranks" in n and "BN402" in n for n in bn.notes), bn.notes
    (gn,) = two_proc.runs_of(variant="groupnorm")
    assert not any("ranks" in n for n in gn.notes)  # no BatchNorm buffers to compare


def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(small_digits):
    common = {"variants": ("baseline",), "lrs": 0.2, "seeds": [3], "steps": 15, "momentum": 0.9, "record": False}
    ddp = train_compare(_mlp, small_digits, batch_sizes=8, nproc=2, **common)
    one = train_compare(_mlp, small_digits, batch_sizes=16, nproc=1, **common)
    a, b = ddp.runs[0], one.runs[0]
    assert a.batch_size == 8 and b.batch_size == 16
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5, atol=1e-6)
    assert a.losses[-1] < a.losses[0] - 0.3  # it trained, so the equality covers real updates
    np.testing.assert_allclose(a.val_losses, b.val_losses, rtol=1e-5, atol=1e-6)
    assert a.val_accuracy == pytest.approx(b.val_accuracy, abs=1e-9)
    for layer, norms in b.grad_norms["layers"].items():  # DDP's averaged gradients are the 2B-batch gradients
        np.testing.assert_allclose(a.grad_norms["layers"][layer], norms, rtol=1e-4, atol=1e-6)
    assert ddp.settings["global_batch_sizes"] == [16] and one.settings["nproc"] == 1


def test_a_ranks_typed_error_reaches_the_caller_and_no_rank_hangs(small_digits):
    with pytest.raises(DataError, match="rank 1 met a corrupt shard"):
        train_compare(
            _FailsOnRank1, small_digits, variants=("baseline",), lrs=0.1, batch_sizes=4, seeds=1, steps=6, nproc=2
        )


def test_spawn_launch_with_a_model_from_a_users_file(monkeypatch):
    """CUDA ranks are spawned, not forked: the same path on the CPU, with classes from a user's file."""
    from bnaudit.loading import load_data, load_model
    from bnaudit.training import ddp

    original = ddp.plan_launch
    monkeypatch.setattr(ddp, "plan_launch", lambda *a: dataclasses.replace(original(*a), start_method="spawn"))
    loaded = load_model(str(EXAMPLES / "batch_size_sweep.py"))
    source = load_data(None, namespace=loaded.namespace, batch_size=8)
    events = []
    result = train_compare(
        loaded.module,
        source,
        variants=("bn",),
        lrs=0.1,
        batch_sizes=4,
        seeds=1,
        steps=6,
        nproc=2,
        record=False,
        progress=events.append,
    )
    assert result.settings["distributed"]["start_method"] == "spawn"
    assert len(result.runs) == 1 and len(result.runs[0].losses) == 6 and not result.runs[0].diverged
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and events[-1].result is not None


def test_syncbn_with_one_process_trains_like_bn(small_digits):
    result = train_compare(
        _mlp, small_digits, variants=("bn", "syncbn"), lrs=0.1, batch_sizes=8, seeds=1, steps=8, record=False
    )
    bn, sync = result.runs_of(variant="bn")[0], result.runs_of(variant="syncbn")[0]
    assert bn.losses == sync.losses
    assert any("syncbn: with one process" in n for n in result.notes)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"nproc": 0}, UsageError, "nproc must be"),
        ({"nproc": 2, "workers": 2}, UsageError, "cannot be combined"),
        ({"nproc": 2, "batch_sizes": 300}, DataError, r"2 processes × per-device batch 300"),
        ({"nproc": 2, "device": "meta"}, UsageError, "supports --device cpu"),
    ],
)
def test_impossible_settings_are_refused_before_any_process_starts(small_digits, kwargs, error, match):
    with pytest.raises(error, match=match):
        train_compare(_mlp, small_digits, variants=("baseline",), lrs=0.1, seeds=1, steps=2, **kwargs)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has 2 GPUs")
def test_cuda_needs_one_gpu_per_process(small_digits):
    with pytest.raises(UsageError, match="needs 2 GPUs"):
        train_compare(_mlp, small_digits, variants=("bn",), lrs=0.1, seeds=1, steps=2, nproc=2, device="cuda")


def test_cli_nproc_json_and_table(tmp_path):
    from bnaudit.cli import app

    runner = CliRunner()
    example = str(EXAMPLES / "batch_size_sweep.py")
    args = [
        "train-compare",
        example,
        "--variants",
        "bn,syncbn",
        "--nproc",
        "2",
        "-b",
        "4",
        "--lr",
        "0.1",
        "--seeds",
        "1",
        "--steps",
        "5",
        "--no-record",
    ]
    out = tmp_path / "r.json"
    res = runner.invoke(app, [*args, "--format", "json", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["settings"]["nproc"] == 2 and data["settings"]["global_batch_sizes"] == [8]
    assert list(data["unavailable"]) == ["syncbn"] and len(data["runs"]) == 1
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "syncbn: unavailable here, not run" in res.output
    assert "global batch = 2 × batch" in res.output.replace("\n", " ")
    res = runner.invoke(app, ["train-compare", "--help"])
    assert "--nproc" in res.output and "per device" in res.output
