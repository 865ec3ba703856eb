"""swap-norm: replace every BatchNorm with another normalization, copying what carries over.

``group``: GroupNorm, the small-batch fix (Wu & He, 2018): statistics per sample, so batch size no longer
matters. The group count is the largest divisor of C that is at most 32 and leaves at least 2 channels per
group (32 for 64..1024 channels, 8 for 16, 3 for 6, 1 for a prime C), see ``group_count``.
``layer``: GroupNorm(1, C), i.e. LayerNorm over ``(C, *spatial)`` with BatchNorm's per-channel affine
(LayerNorm(C) for a FeatureBatchNorm1d, whose channels are the last axis). ``instance``: InstanceNorm1d/2d/3d,
only where there is a spatial or sequence axis. ``frozen``: FrozenBatchNorm1d/2d/3d with the running
statistics and affine parameters as fixed buffers; identical in eval mode. ``sync``: SyncBatchNorm (as
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does it, one layer at a time), for multi-GPU training.
Affine parameters are copied wherever the target has per-channel ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bnaudit.errors import UsageError
from bnaudit.graph import default_run
from bnaudit.layers import batchnorm_layers
from bnaudit.loading.data import move_to
from bnaudit.loading.modules import FeatureBatchNorm1d, module_record
from bnaudit.loading.plan import apply_plan, get_module, pristine_copy
from bnaudit.transforms.base import (
    Change,
    TransformResult,
    describe,
    eval_outputs,
    max_abs_difference,
    model_device_dtype,
    transform_graph,
)

TARGETS = ("group", "layer", "instance", "frozen", "sync")
MAX_GROUPS = 32
MIN_GROUP_SIZE = 2


def group_count(channels: int, max_groups: int = MAX_GROUPS, min_group_size: int = MIN_GROUP_SIZE) -> int:
    """GroupNorm's group count for ``channels``: the largest divisor of ``channels`` that is at most
    ``max_groups`` and leaves at least ``min_group_size`` channels per group; 1 when none does.

    Args:
        channels: number of channels C (>= 1).
        max_groups: the most groups (32, GroupNorm's paper default).
        min_group_size: the fewest channels per group (one channel per group would be InstanceNorm).

    Returns:
        The group count, a divisor of ``channels``.
    """
    for g in range(min(max_groups, channels // max(min_group_size, 1)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _spatial_dims(bn: nn.Module, rank: int | None) -> int | None:
    """How many axes follow the channel axis in the BatchNorm's input (None when unknown)."""
    if isinstance(bn, nn.BatchNorm2d):
        return 2
    if isinstance(bn, nn.BatchNorm3d):
        return 3
    return None if rank is None else rank - 2


def _target(bn: nn.Module, to: str, rank: int | None, groups: int | None) -> tuple[nn.Module | None, dict, str]:
    """The replacement for ``bn``, its constructor arguments, and a note (or None and why not)."""
    c = int(bn.num_features)
    last = isinstance(bn, FeatureBatchNorm1d)
    affine = bn.weight is not None
    if to == "frozen":
        if not bn.track_running_stats or bn.running_mean is None:
            return None, {}, "has no running statistics to freeze (track_running_stats=False)"
        dims = _spatial_dims(bn, rank)
        cls = {2: "FrozenBatchNorm2d", 3: "FrozenBatchNorm3d"}.get(dims or 0, "FrozenBatchNorm1d")
        from bnaudit.loading import modules

        args = {"num_features": c, "eps": float(bn.eps), "channel_last": last}
        return getattr(modules, cls)(**args), args, ""
    if to == "sync":
        if last:
            return None, {}, "normalizes the last axis; SyncBatchNorm normalizes axis 1"
        args = {"num_features": c, "eps": float(bn.eps), "momentum": bn.momentum, "affine": affine,
                "track_running_stats": bool(bn.track_running_stats)}
        return nn.SyncBatchNorm(**args), args, ""
    if to == "layer":
        if last:
            args = {"normalized_shape": c, "eps": float(bn.eps), "elementwise_affine": True}
            return nn.LayerNorm(**args), args, "LayerNorm over the features"
        args = {"num_groups": 1, "num_channels": c, "eps": float(bn.eps), "affine": True}
        return nn.GroupNorm(**args), args, "GroupNorm(1, C): LayerNorm over (C, *spatial) with per-channel affine"
    if last:
        return None, {}, f"normalizes the last axis of a Linear's output; {to} norm needs channels on axis 1"
    if to == "group":
        g = groups if groups is not None else group_count(c)
        if c % g:
            return None, {}, f"{c} channels do not split into {g} groups"
        args = {"num_groups": g, "num_channels": c, "eps": float(bn.eps), "affine": True}
        return nn.GroupNorm(**args), args, f"{g} groups of {c // g} channels"
    # instance
    dims = _spatial_dims(bn, rank)
    if dims is None:
        return None, {}, "input rank unknown: InstanceNorm needs a spatial axis; pass an example input"
    if dims < 1:
        return None, {}, "input is (N, C): no spatial or sequence axis to normalize over per sample"
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
    args = {"num_features": c, "eps": float(bn.eps), "affine": affine}
    return cls(**args), args, ""


@torch.no_grad()
def _copy_state(bn: nn.Module, new: nn.Module) -> None:
    gamma = bn.weight if bn.weight is not None else None
    beta = bn.bias if bn.bias is not None else None
    target_w = getattr(new, "weight", None)
    target_b = getattr(new, "bias", None)
    if isinstance(target_w, torch.Tensor) and gamma is not None:
        target_w.copy_(gamma.reshape(target_w.shape))
    if isinstance(target_b, torch.Tensor) and beta is not None:
        target_b.copy_(beta.reshape(target_b.shape))
    for buf in ("running_mean", "running_var", "num_batches_tracked"):
        src, dst = getattr(bn, buf, None), getattr(new, buf, None)
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
            dst.copy_(src)


def swap_norm(
    model: nn.Module,
    to: str,
    *,
    example: Any | None = None,
    groups: int | None = None,
    run: Callable[[nn.Module, Any], Any] | None = None,
) -> TransformResult:
    """A copy of ``model`` with every BatchNorm replaced by the normalization ``to``.

    Args:
        model: the model; never modified.
        to: ``group``, ``layer``, ``instance``, ``frozen`` or ``sync`` (see the module docstring).
        example: one batch of input: tells BatchNorm1d's input rank (needed for ``instance``) and measures the
            max abs eval-output difference to the original (0 up to rounding for ``frozen`` and ``sync``).
        groups: GroupNorm group count for every layer instead of ``group_count(C)``; layers whose channel
            count it does not divide are skipped.
        run: how to call the model, ``run(model, inputs)``; default ``model(inputs)``.

    Returns:
        TransformResult: ``.changes`` one ``swap`` per replaced BatchNorm, ``.skipped`` those left with the
        reason, ``.max_abs_error`` as above (None without an example).

    Raises:
        UsageError: an unknown target, a non-positive group count, or one that divides no layer's channels.
        DataError: the model rejects the example input.
    """
    if to not in TARGETS:
        raise UsageError(f"swap-norm target {to!r}: choose one of {', '.join(TARGETS)}")
    if groups is not None and groups < 1:
        raise UsageError(f"groups must be a positive integer, got {groups}")
    run_fn = run or default_run
    work = pristine_copy(model)
    device, dtype = model_device_dtype(work)
    ranks: dict[str, int] = {}
    method = ""
    if example is not None:
        example = move_to(example, device, dtype)
        graph = transform_graph(work, example, run_fn)
        method = graph.method
        ranks = {n: len(node.input_shapes[0]) for n, node in graph.nodes.items() if node.input_shapes}

    plan: list[dict[str, Any]] = []
    changes: list[Change] = []
    skipped: list[Change] = []
    pending: list[tuple[str, nn.Module]] = []
    for name, module in batchnorm_layers(work).items():
        if to == "sync" and isinstance(module, nn.SyncBatchNorm):
            continue
        if any(name.startswith(p + ".") for p, _ in pending):
            continue
        new, args, note = _target(module, to, ranks.get(name), groups)
        if new is None:
            skipped.append(Change("skip", name, describe(module), note))
            continue
        plan.append({"op": "replace", "target": name, "module": module_record(new, **args)})
        pending.append((name, module))
        changes.append(Change("swap", name, f"{describe(module)} -> {describe(new)}", note, new=name))

    if to == "group" and groups is not None and skipped and not changes:
        channels = sorted({int(getattr(m, "num_features", 0)) for m in batchnorm_layers(work).values()})
        divisors = sorted({g for c in channels for g in range(2, min(c, 32) + 1) if c % g == 0 and c // g >= 2})
        raise UsageError(
            f"--groups {groups} divides none of the BatchNorm channel counts ({', '.join(map(str, channels))}), so "
            f"nothing would change; choose a divisor ({', '.join(map(str, divisors[-4:])) or '1'}) or leave "
            "--groups out for a per-layer choice"
        )
    reference = pristine_copy(work) if example is not None and plan else None
    apply_plan(work, plan)
    for name, old in pending:
        _copy_state(old, get_module(work, name))
    options = {"to": to, "groups": groups}
    result = TransformResult("swap_norm", work, changes, skipped, options, plan, graph_method=method)
    if example is not None:
        result.max_abs_error = (
            max_abs_difference(eval_outputs(reference, example, run_fn), eval_outputs(work, example, run_fn))
            if reference is not None
            else 0.0
        )
    return result
