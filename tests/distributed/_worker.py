"""What every rank runs in the 2-process gloo session of ``test_gloo.py``.

One spawn per test session (starting processes dominates the cost): each rank joins the group, runs every
scenario in order (each one a collective, so the order is the same on every rank) and pickles its results
to ``OUT/rank{r}.pkl`` for the tests to assert on. A scenario that raises records its error instead of
stopping the others."""

from __future__ import annotations

import copy
import os
import pickle
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

GLOBAL = 64  # global batch of the recording scenario
SPLIT = 24  # rank 0's share of it (uneven on purpose)


def _cancer() -> np.ndarray:
    from sklearn.datasets import load_breast_cancer

    return load_breast_cancer().data.astype(np.float32)  # (569, 30), means up to ~900: a hard case for variance


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y


def _bn_mlp(norm: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16, bias=False), norm if norm is not None else nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 10))


def _findings(report) -> list[dict]:
    return [f.to_dict() for f in report.findings] if report is not None else None


# -- scenarios ------------------------------------------------------------------------------------------------


def moments(rank: int) -> dict:
    from bnaudit.distributed import reduce_channel_stats, reduce_moments
    from bnaudit.stats import Moments, as_3d, channel_stats

    x = torch.from_numpy(_cancer())
    mine = x[:250] if rank == 0 else x[250:]
    reduced = reduce_moments(Moments().update(mine))
    full = Moments().update(x)
    st = reduce_channel_stats(channel_stats(as_3d(mine.double(), 1)))
    ref = channel_stats(as_3d(x.double(), 1))
    return {
        "moments": {k: reduced.to_numpy()[k] for k in ("mean", "var", "min", "max", "count", "numel", "zero_frac")},
        "moments_ref": {k: full.to_numpy()[k] for k in ("mean", "var", "min", "max", "count", "numel", "zero_frac")},
        "cs": {"n": st.n, "mean": st.mean.numpy(), "var": (st.m2 / st.n).numpy(), "min": st.min.numpy(),
               "max": st.max.numpy(), "nonzero": st.nonzero.double().numpy()},
        "cs_ref": {"n": ref.n, "mean": ref.mean.numpy(), "var": (ref.m2 / ref.n).numpy(), "min": ref.min.numpy(),
                   "max": ref.max.numpy(), "nonzero": ref.nonzero.double().numpy()},
    }


STATS = ("channel_mean", "channel_var", "mean", "var", "min", "max", "zero_frac", "count")


def _recorded_split(rank: int, **kw):
    """Recorders over three global batches of cancer data: this rank's share of each (``record(**kw)``) and,
    as the reference, the whole batch in one process. Returns ``(rank_recorder, reference_recorder)``."""
    import bnaudit

    x = torch.from_numpy(_cancer())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 2)).eval()
    reference = copy.deepcopy(model)
    batches = [x[GLOBAL * t : GLOBAL * (t + 1)] for t in range(3)]
    with torch.no_grad(), bnaudit.record(model, **kw) as rec:
        for b in batches:
            model(b[:SPLIT] if rank == 0 else b[SPLIT:])
            rec.step()
    with torch.no_grad(), bnaudit.record(reference) as ref:
        for b in batches:
            reference(b)
            ref.step()
    return rec, ref


def recording(rank: int) -> dict:
    from bnaudit.recording import reduce_history, reduce_row

    rec, ref = _recorded_split(rank)
    reduced = reduce_history(rec.history)
    out = {"layers": reduced.layers, "ref_layers": ref.history.layers, "notes": reduced.notes}
    for layer in ref.history.layers:
        for stat in STATS:
            out[(layer, stat)] = reduced.series(layer, stat)
            out[(layer, stat, "ref")] = ref.history.series(layer, stat)
            out[(layer, stat, "local")] = rec.history.series(layer, stat)
    # The per-step path: reduce the first stored row in place, as the recorder would right after writing it.
    seg = rec.history.segments[0]
    values, ints = seg.take("values")[0].copy(), seg.take("ints")[0].copy()
    reduce_row(values, ints, seg.layout)
    out["row"], out["row_ints"] = values, ints
    red = reduced.segments[0]
    out["row_ref"], out["row_ints_ref"] = red.take("values")[0].copy(), red.take("ints")[0].copy()
    return out


def record_reduce(rank: int) -> dict:
    """``record(reduce=True)``: each rank's history, merged step by step, equals one process's history of
    the global batch."""
    rec, ref = _recorded_split(rank, reduce=True)
    out = {"layers": rec.history.layers, "ref_layers": ref.history.layers}
    for layer in ref.history.layers:
        for stat in STATS:
            out[(layer, stat)] = rec.history.series(layer, stat)
            out[(layer, stat, "ref")] = ref.history.series(layer, stat)
    return out


def small_batch(rank: int) -> dict:
    from bnaudit.api import inspect_distributed

    x, y = _digits()
    shard = slice(rank * 400, rank * 400 + 400)
    data = (torch.from_numpy(x[shard]), torch.from_numpy(y[shard]))
    kw = {"select": ["BN401"], "batch_size": 8}
    return {
        "bn": _findings(inspect_distributed(_bn_mlp(), data, **kw)),
        "sync": _findings(inspect_distributed(nn.SyncBatchNorm.convert_sync_batchnorm(_bn_mlp()), data, **kw)),
        "group": _findings(inspect_distributed(_bn_mlp(nn.GroupNorm(4, 16)), data, **kw)),
        "large": _findings(inspect_distributed(_bn_mlp(), data, select=["BN401"], batch_size=32)),
    }


def divergent(rank: int) -> dict:
    import bnaudit
    from bnaudit.api import inspect_distributed
    from bnaudit.distributed import gather_bn_buffers
    from bnaudit.rules import get_rule
    from bnaudit.rules.examples_distributed import shard_trained

    rule = get_rule("BN402")
    out = {}
    for kind, examples in (("invalid", rule.invalid), ("valid", rule.valid)):
        for i, ex in enumerate(examples):
            torch.manual_seed(0)
            model = ex.model()
            bufs = gather_bn_buffers(model)["1"]
            out[(kind, i, "gap")] = float(np.max(np.abs(bufs.mean - bufs.mean[0]) / np.sqrt(bufs.var[0] + bufs.eps)))
            report = bnaudit.inspect(model, ex.data() if ex.data else None, select=["BN402"])
            out[(kind, i)] = _findings(report)
            out[(kind, i, "skipped")] = dict(report.rules_skipped)
    # The live DDP wrapper: its broadcast setting reaches the evidence through inspect_distributed.
    model = shard_trained(False)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    out["ddp"] = _findings(inspect_distributed(ddp, None, select=["BN402"], input_shape="64"))
    # The same wrapper passed straight to bnaudit.inspect: it audits the inner module with the wrapper's facts.
    out["ddp_direct"] = _findings(bnaudit.inspect(ddp, None, select=["BN402"], input_shape="64"))
    return out


def syncbn(rank: int) -> dict:
    from bnaudit.api import inspect_distributed
    from bnaudit.distributed import ddp_facts

    out = {}
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(_bn_mlp())
    out["cpu"] = _findings(inspect_distributed(sync, None, select=["BN403"], input_shape="64"))
    plain = nn.parallel.DistributedDataParallel(_bn_mlp())
    out["plain_facts"] = ddp_facts(plain)
    out["plain"] = _findings(inspect_distributed(plain, None, select=["BN403"], input_shape="64"))
    late = nn.parallel.DistributedDataParallel(_bn_mlp())
    late = nn.SyncBatchNorm.convert_sync_batchnorm(late)  # the misuse: converted after the wrap
    out["late_facts"] = ddp_facts(late)
    out["late"] = _findings(inspect_distributed(late, None, select=["BN403"], input_shape="64"))
    import bnaudit

    out["late_direct"] = _findings(bnaudit.inspect(late, None, select=["BN403"], input_shape="64"))
    return out


def merging(rank: int) -> dict:
    from bnaudit.distributed import merge_reports
    from bnaudit.findings import Finding, Report

    common = Finding("BN106", "suspicious-momentum", "warning", "1", "same on every rank", "fix")
    own = Finding("BN201", "some-data-rule", "info", None, f"only on rank {rank}", "fix")
    merged = merge_reports(Report(model="m", findings=(common, own) if rank == 1 else (common,)))
    return {"merged": _findings(merged), "meta": dict(merged.meta) if merged is not None else None}


def failures(rank: int) -> dict:
    from bnaudit.api import inspect_distributed
    from bnaudit.distributed import DistributedError, gather_bn_buffers

    out = {}
    try:  # rank 1 gives data the model rejects: every rank must raise, none may hang
        data = torch.rand(8, 64) if rank == 0 else torch.rand(8, 5)
        inspect_distributed(_bn_mlp(), data, select=["BN401"])
        out["bad_data"] = None
    except Exception as exc:  # noqa: BLE001
        out["bad_data"] = (type(exc).__name__, str(exc))
    try:  # rank 1 has no data: its rules would differ from rank 0's and the collectives would not line up
        inspect_distributed(_bn_mlp(), torch.rand(8, 64) if rank == 0 else None, select=["BN401"], input_shape="64")
        out["no_data"] = None
    except DistributedError as exc:
        out["no_data"] = str(exc)
    try:  # different models on the two ranks
        gather_bn_buffers(_bn_mlp() if rank == 0 else nn.Sequential(nn.BatchNorm1d(3)))
        out["layout"] = None
    except DistributedError as exc:
        out["layout"] = str(exc)
    return out


def full_audit(rank: int) -> dict:
    """Every registered rule, probes included, on each rank's shard: nothing may hang or disagree."""
    from bnaudit.api import inspect_distributed

    x, y = _digits()
    shard = slice(rank * 200, rank * 200 + 200)
    report = inspect_distributed(_bn_mlp(), (torch.from_numpy(x[shard]), torch.from_numpy(y[shard])), batch_size=8,
                                 steps=2)
    if report is None:
        return {"report": None}
    return {"report": report.to_dict()}


SCENARIOS = (moments, recording, record_reduce, small_batch, divergent, syncbn, merging, failures, full_audit)


def run(rank: int, world: int, init: str, out_dir: str) -> None:
    """The spawn entry point."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # DDP's broadcast_buffers deprecation
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results: dict = {}
    try:
        for scenario in SCENARIOS:
            try:
                results[scenario.__name__] = scenario(rank)
            except Exception:  # noqa: BLE001 - recorded for the test to show
                results[scenario.__name__] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
        dist.destroy_process_group()
    # With scikit-learn imported next to gloo, interpreter teardown occasionally aborts ("terminate called
    # without an active exception", seen without bnaudit too); the results are written, so skip teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
