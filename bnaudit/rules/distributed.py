"""BN4xx: BatchNorm under data-parallel training: per-device batches, rank-divergent buffers, SyncBatchNorm.

Under DistributedDataParallel each rank normalizes over its own per-device batch, and each rank's running
statistics drift apart unless DDP broadcasts them. BN401 and BN402 measure that inside a torch.distributed
process group: they are collectives, so every rank must run the same audit (``bnaudit.distributed.
inspect_distributed`` does it and merges the report on rank 0). BN401 also runs in one process as a
pre-flight check when told how many devices the batch will be split over (its ``world_size`` option). BN403
is static (SyncBatchNorm without a process group, on CPU, converted after the DDP wrap, or mixed with layers
left unconverted) and runs anywhere. The multi-process scenarios live in ``tests/distributed/``."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from bnaudit.context import RuleContext
from bnaudit.distributed import (
    current_ddp_facts,
    ddp_facts,
    dist_info,
    gather_bn_buffers,
    gather_checked,
    unwrap_ddp,
)
from bnaudit.findings import Finding
from bnaudit.layers import is_batchnorm
from bnaudit.rules import examples_distributed as ex
from bnaudit.rules.base import Example, Rule, register

# --- helpers ---------------------------------------------------------------------------------------------------


def _batch_stat_norms(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Layers that normalize with batch statistics in training: torch BatchNorms and hand-written ones
    (running_mean/running_var buffers without being a torch _BatchNorm, InstanceNorm or FrozenBatchNorm)."""
    from torch.nn.modules.instancenorm import _InstanceNorm

    for name, m in model.named_modules():
        if not name:
            continue
        if is_batchnorm(m) or (
            isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor)
            and not isinstance(m, _InstanceNorm)
            and "Frozen" not in type(m).__name__
        ):
            yield name, m


def _values_per_channel(shape: tuple[int, ...]) -> tuple[int, int]:
    """(samples, values per channel) of a BatchNorm input shaped (N, C, ...)."""
    if len(shape) < 2 or not shape[1]:
        return 0, 0
    return int(shape[0]), int(math.prod(shape) // shape[1])


# --- rules -----------------------------------------------------------------------------------------------------


@register
class SmallPerDeviceBatch(Rule):
    """A BatchNorm (not SyncBatchNorm) that sees too few samples per device under data-parallel training.

    DistributedDataParallel splits the global batch across devices and every plain BatchNorm normalizes over
    its own device's share only. Below about 16 samples per device its batch statistics are noisy and
    accuracy drops sharply (Wu & He, "Group Normalization", 2018: ResNet-50 error rises from 23.6% at 32
    images per GPU to 34.7% at 2); with one value per channel BatchNorm cannot train at all.
    SyncBatchNorm computes the statistics over the whole global batch; GroupNorm does not depend on the
    batch. Values per channel are samples times spatial positions; for conv layers the sample count is what
    matters (positions of one image are correlated), for (N, C) layers the two are equal.

    Inside a process group with more than one rank each rank's measured batch (the first batch of its
    ``--data``) is used and the smallest one is reported (a rank whose batch never reaches the layer does not
    count). In one process, set ``world_size`` to check a plan:
    the ``--data`` batch is then taken as the global batch split evenly over that many devices. Without either
    there is nothing to check.

    Options:
        ```yaml
        min_batch: 16        # samples per device below this fire
        min_values: 16       # values per channel per device below this fire
        world_size: 0        # one process only: devices the --data batch will be split over (0: not planned)
        ```

    Bad:
        DDP over 8 GPUs, global batch 64, nn.BatchNorm2d: 8 samples per device
    Good:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model); DDP(model, device_ids=[rank])
    """

    code = "BN401"
    name = "small-per-device-batch"
    severity = "warning"
    family = "distributed"
    summary = "plain BatchNorm normalizes over a small per-device batch under data parallelism"
    fix = ("convert to SyncBatchNorm before wrapping in DDP (nn.SyncBatchNorm.convert_sync_batchnorm(model), or "
           "`bnaudit swap-norm MODEL --to sync`), or use GroupNorm (`--to group`)")
    requires = frozenset({"shapes", "data"})
    options = {"min_batch": int, "min_values": int, "world_size": int}
    defaults = {"min_batch": 16, "min_values": 16, "world_size": 0}
    invalid = (
        Example(lambda: ex.mlp(nn.BatchNorm1d(8)), ex.batch, options={"world_size": 4}, layer="1",
                note="a global batch of 32 split over 4 devices: 8 samples per BatchNorm1d"),
    )
    valid = (
        Example(lambda: nn.SyncBatchNorm.convert_sync_batchnorm(ex.mlp(nn.BatchNorm1d(8))), ex.batch,
                options={"world_size": 4}, note="SyncBatchNorm normalizes over the global batch"),
        Example(lambda: ex.mlp(nn.GroupNorm(2, 8)), ex.batch, options={"world_size": 4}, note="GroupNorm needs no batch"),
        Example(lambda: ex.mlp(nn.BatchNorm1d(8)), ex.batch, options={"world_size": 2}, note="16 samples per device"),
        Example(lambda: ex.mlp(nn.BatchNorm1d(8)), lambda: ex.batch(8), note="one device: nothing distributed to check"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        info = dist_info()
        model = unwrap_ddp(ctx.model)
        prefix = "module." if model is not ctx.model else ""
        layers = [(name, m) for name, m in _batch_stat_norms(model)]
        local = []
        for name, _ in layers:
            node = ctx.graph.nodes.get(prefix + name) if ctx.graph is not None else None
            shape = node.input_shapes[0] if node is not None and node.input_shapes else ()
            local.extend(_values_per_channel(tuple(shape)))
        vec = torch.tensor(local, dtype=torch.float64)
        if info.active:
            # A collective: every rank sends its own (samples, values) per layer, before any rank can skip.
            per_rank = np.stack([p.numpy() for p in gather_checked(vec, [n for n, _ in layers], "set of BatchNorm layers", None)])
            world, planned = info.world_size, False
        else:
            world, planned = int(self.config["world_size"]), True
            if world <= 1:
                return
            per_rank = (vec.numpy() // world)[None, :]
        min_batch, min_values = self.config["min_batch"], self.config["min_values"]
        for k, (name, m) in enumerate(layers):
            if isinstance(m, nn.SyncBatchNorm):
                continue
            samples, values = per_rank[:, 2 * k], per_rank[:, 2 * k + 1]
            called = samples > 0  # a rank whose data never reaches the layer does not normalize there at all
            if not called.any():
                continue  # not called on the example
            s, v = int(samples[called].min()), int(values[called].min())
            if s >= min_batch and v >= min_values:
                continue
            total = int(samples.sum()) if not planned else s * world
            where = f"{world} devices (planned)" if planned else f"{world} ranks"
            fix = (
                f"convert {prefix + name} to SyncBatchNorm before the DDP wrap (nn.SyncBatchNorm.convert_sync_batchnorm"
                f"(model) or `bnaudit swap-norm MODEL --to sync`): it would normalize over {total} samples; or use "
                "GroupNorm (`--to group`)"
                if total >= min_batch
                else f"use GroupNorm (`bnaudit swap-norm MODEL --to group`): even SyncBatchNorm would see only {total} "
                "samples; or raise the per-device batch"
            )
            yield self.finding(
                prefix + name,
                f"{type(m).__name__} {prefix + name} normalizes over {s} samples ({v} values per channel) per device "
                f"on {where}; below {min_batch} samples per device its batch statistics are noisy",
                {
                    "samples_per_device": s, "values_per_channel_per_device": v, "world_size": world,
                    "global_samples": total, "min_batch": min_batch, "min_values": min_values,
                    "per_rank_samples": [int(x) for x in samples], "planned": planned,
                },
                fix=fix,
                severity="error" if v <= 1 else None,
            )


@register
class RankDivergentBuffers(Rule):
    """BatchNorm running statistics that differ across ranks beyond tolerance.

    Every rank updates its own running mean and variance from its own per-device batches. DDP hides that by
    broadcasting rank 0's buffers at the start of every forward (``forward_sync_buffers=True``, called
    ``broadcast_buffers`` before torch 2.13); with it turned off, or with shards whose data differ (a dataset
    sorted by label and split without shuffling), the ranks' buffers drift apart. The checkpoint rank 0 saves
    then does not reproduce the validation numbers the other ranks computed, and evaluation differs by rank.
    Measured by gathering every rank's buffers (a collective): the running-mean gap in units of rank 0's
    running std, the running-variance ratio, and the counters.

    Options:
        ```yaml
        mean_tol: 0.2        # largest |mean_r - mean_0| / std_0 allowed, any channel
        var_ratio: 1.25      # largest var_r / var_0 (or its inverse) allowed
        ```

    Bad:
        DDP(model, broadcast_buffers=False) on shards of a label-sorted dataset
    Good:
        DDP(model) (buffers broadcast), or SyncBatchNorm, or averaging the buffers across ranks before saving
    """

    code = "BN402"
    name = "rank-divergent-buffers"
    severity = "warning"
    family = "distributed"
    summary = "BatchNorm running statistics differ across ranks"
    fix = ("keep DDP's buffer broadcast on (forward_sync_buffers=True / broadcast_buffers=True, the default) or use "
           "SyncBatchNorm; before saving or validating, broadcast rank 0's running_mean/running_var or all-reduce "
           "their average")
    requires = frozenset({"distributed"})
    options = {"mean_tol": float, "var_ratio": float}
    defaults = {"mean_tol": 0.2, "var_ratio": 1.25}
    invalid = (
        Example(lambda: ex.shard_trained(False), ex.digits_batch, layer="1",
                note="needs a process group: DDP(broadcast_buffers=False) on label-sorted shards"),
    )
    valid = (
        Example(lambda: ex.shard_trained(True), ex.digits_batch,
                note="needs a process group: the same run with DDP broadcasting rank 0's buffers"),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        bufs = gather_bn_buffers(ctx.model)  # a collective: first, before anything can differ between ranks
        facts = current_ddp_facts() or ddp_facts(ctx.model)
        model = unwrap_ddp(ctx.model)
        prefix = "module." if model is not ctx.model else ""
        modules = dict(model.named_modules())
        tol, vtol = self.config["mean_tol"], self.config["var_ratio"]
        for name, b in bufs.items():
            world = b.mean.shape[0]
            if world < 2:
                continue
            finite = np.isfinite(b.mean).all(1) & np.isfinite(b.var).all(1)
            with np.errstate(invalid="ignore", divide="ignore"):
                std0 = np.sqrt(np.maximum(b.var[0], 0) + b.eps)
                gap = np.abs(b.mean - b.mean[0]) / std0
                ratio = np.exp(np.abs(np.log((np.maximum(b.var, 0) + b.eps) / (np.maximum(b.var[0], 0) + b.eps))))
            gap = np.where(finite[:, None], gap, np.inf) if not finite.all() else gap
            ratio = np.where(finite[:, None], ratio, np.inf) if not finite.all() else ratio
            nbt = [int(v) for v in b.num_batches_tracked]
            worst_gap, worst_ratio = float(np.nanmax(gap)), float(np.nanmax(ratio))
            counters_differ = len(set(nbt)) > 1
            if worst_gap <= tol and worst_ratio <= vtol and not counters_differ:
                continue
            r, c = np.unravel_index(int(np.nanargmax(gap)), gap.shape)
            rv, cv = np.unravel_index(int(np.nanargmax(ratio)), ratio.shape)
            parts = []
            if worst_gap > tol:
                parts.append(f"rank {r}'s running_mean is {worst_gap:.2f} running std away from rank 0's (channel {c})")
            if worst_ratio > vtol:
                parts.append(f"rank {rv}'s running_var is {worst_ratio:.2f}x rank 0's (channel {cv})")
            if counters_differ:
                parts.append(f"num_batches_tracked differs ({nbt}: ranks ran different numbers of steps)")
            evidence = {
                "world_size": world, "max_mean_gap": worst_gap, "mean_tol": tol, "max_var_ratio": worst_ratio,
                "var_ratio": vtol, "worst_rank": int(r), "worst_channel": int(c), "num_batches_tracked": nbt,
            }
            fix = self.fix
            if facts is not None:
                evidence["forward_sync_buffers"] = facts.forward_sync_buffers
                if not facts.forward_sync_buffers:
                    fix = ("remove broadcast_buffers=False from DistributedDataParallel(...) (or use SyncBatchNorm); "
                           "before saving, broadcast rank 0's running statistics or all-reduce their average")
            m = modules.get(name)
            yield self.finding(
                prefix + name,
                f"{type(m).__name__ if m is not None else 'BatchNorm'} {prefix + name}: running statistics differ across "
                f"{world} ranks: {'; '.join(parts)}; a rank-0 checkpoint will not reproduce the other ranks' validation",
                evidence,
                fix=fix,
            )


@register
class SyncBNMisuse(Rule):
    """SyncBatchNorm that cannot do its job: no process group, CPU tensors, converted after the DDP wrap,
    or mixed with batch-statistics layers that were left unconverted.

    - Without an initialized process group (or with one rank) SyncBatchNorm silently runs as plain BatchNorm:
      fine for single-device inference, but single-device training does not synchronize anything (info).
    - SyncBatchNorm only runs on accelerator tensors: in training on CPU (a gloo group) its forward raises
      "SyncBatchNorm expected input tensor to be on GPU" (error).
    - ``convert_sync_batchnorm`` after ``DistributedDataParallel(model)``: DDP validated and logged the model
      without the SyncBatchNorm layers (on CPU it would have refused them); convert first, then wrap.
    - A model with SyncBatchNorm that also holds plain BatchNorm layers (a head added after conversion, a
      submodule converted alone) or hand-written BatchNorms that ``convert_sync_batchnorm`` does not recognise:
      those still normalize over the per-device batch.

    Options: none.

    Bad:
        model = DDP(model); model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    Good:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).cuda(rank); model = DDP(model, device_ids=[rank])
    """

    code = "BN403"
    name = "syncbn-misuse"
    severity = "warning"
    family = "distributed"
    summary = "SyncBatchNorm without a process group, on CPU, converted after DDP, or mixed with unconverted BN"
    fix = "call nn.SyncBatchNorm.convert_sync_batchnorm(model) on the whole model, on GPU, before wrapping it in DDP"
    requires = frozenset()
    invalid = (
        Example(lambda: nn.SyncBatchNorm.convert_sync_batchnorm(ex.mlp(nn.BatchNorm1d(8))), ex.batch, layer="1",
                note="SyncBatchNorm in a process without torch.distributed"),
        Example(ex.mixed_sync, ex.batch, layer="2", note="a BatchNorm1d head added after the conversion"),
        Example(ex.mixed_custom, ex.batch, layer="4", note="a hand-written BatchNorm convert_sync_batchnorm skips"),
    )
    valid = (
        Example(lambda: ex.mlp(nn.BatchNorm1d(8)), ex.batch, note="plain BatchNorm, no SyncBatchNorm"),
        Example(lambda: ex.mlp(nn.GroupNorm(2, 8)), ex.batch),
    )

    def check(self, ctx: RuleContext) -> Iterator[Finding]:
        facts = current_ddp_facts() or ddp_facts(ctx.model)
        model = unwrap_ddp(ctx.model)
        prefix = "module." if model is not ctx.model else ""
        sync = [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
        if not sync:
            return
        info = dist_info()
        shown = ", ".join(prefix + n for n in sync[:4]) + (f" and {len(sync) - 4} more" if len(sync) > 4 else "")
        first = prefix + sync[0]
        if not info.active:
            why = "torch.distributed is not initialized" if not info.initialized else "the process group has one rank"
            yield self.finding(
                first,
                f"{len(sync)} SyncBatchNorm layer(s) ({shown}) run as plain BatchNorm here: {why}",
                {"sync_bn_layers": [prefix + n for n in sync], "initialized": info.initialized,
                 "world_size": info.world_size},
                fix="train under torch.distributed (torchrun) for synchronized statistics; for single-device use, "
                "swap them back to BatchNorm",
                severity="info",
            )
        elif (facts is not None and facts.device_type == "cpu") or (
            facts is None and ctx.device.type == "cpu" and (info.backend or "") == "gloo"
        ):
            yield self.finding(
                first,
                f"{len(sync)} SyncBatchNorm layer(s) ({shown}) in a {info.backend} process group on CPU: SyncBatchNorm's "
                "training forward only runs on GPU tensors and raises here",
                {"sync_bn_layers": [prefix + n for n in sync], "backend": info.backend,
                 "device": facts.device_type if facts is not None else str(ctx.device)},
                fix="on CPU (gloo) keep BatchNorm or use GroupNorm; for SyncBatchNorm move the model to GPU with the "
                "nccl backend",
                severity="error",
            )
        if facts is not None and facts.converted_after_wrap:
            yield self.finding(
                first,
                f"SyncBatchNorm layers ({shown}) were converted after DistributedDataParallel wrapped the model: DDP "
                "logged and validated a model without them",
                {"sync_bn_layers": [prefix + n for n in sync], "has_sync_bn_at_wrap": False},
            )
        for name, m in _batch_stat_norms(model):
            if isinstance(m, nn.SyncBatchNorm):
                continue
            custom = not is_batchnorm(m)
            how = ("a hand-written BatchNorm that convert_sync_batchnorm does not recognise" if custom
                   else "left unconverted")
            yield self.finding(
                prefix + name,
                f"{type(m).__name__} {prefix + name} is {how} while {len(sync)} other layer(s) are SyncBatchNorm: it "
                "still normalizes over the per-device batch only",
                {"type": type(m).__name__, "sync_bn_layers": len(sync), "torch_batchnorm": not custom},
                fix=(f"subclass torch.nn.modules.batchnorm._BatchNorm or replace {prefix + name} with nn.SyncBatchNorm"
                     if custom else f"run nn.SyncBatchNorm.convert_sync_batchnorm on the whole model after adding "
                     f"{prefix + name}"),
            )
