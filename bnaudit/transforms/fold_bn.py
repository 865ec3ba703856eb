"""fold-bn: fuse eval-mode BatchNorm into the Linear/Conv before it, for inference.

In eval mode BatchNorm is a per-channel affine map ``y = x * s + t`` with ``s = weight / sqrt(running_var +
eps)`` and ``t = bias - running_mean * s``; when it directly follows a Linear/Conv that feeds nothing else,
the two collapse into one layer with weight ``W * s`` (scaled along the output channels) and bias
``(b - running_mean) * s + bias``. The math runs in float64 and is cast back, and grouped and transposed
convolutions are scaled along their true output-channel axis. The BatchNorm is replaced by ``nn.Identity``.
A train-mode model is refused: in training BatchNorm normalizes with batch statistics, which no folded
weight can reproduce."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from bnaudit.errors import TransformError
from bnaudit.graph import LayerGraph, default_run
from bnaudit.layers import RESHAPE_FUNCTIONS, batchnorm_layers, has_bias, is_batchnorm, is_conv, is_linear
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


def fused_weights(layer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``layer`` followed by eval-mode ``bn``, as one layer.

    Args:
        layer: a Conv (any dims, grouped, transposed) or Linear.
        bn: a BatchNorm with running statistics, over ``layer``'s output channels.

    Returns:
        (weight, bias) in ``layer``'s dtype and device.
    """
    w = layer.weight.detach().double()
    mean = bn.running_mean.double()
    b = layer.bias.detach().double() if has_bias(layer) else torch.zeros_like(mean)
    var = bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * torch.rsqrt(var + bn.eps)
    if isinstance(layer, _ConvTransposeNd):
        # Weight is (in, out/groups, *k): output channel g*(out/groups)+j lives at [group g's rows, j].
        groups = layer.groups
        cin, cout_g = w.shape[0], w.shape[1]
        grouped = w.reshape(groups, cin // groups, cout_g, *w.shape[2:])
        s = scale.reshape(groups, 1, cout_g, *([1] * (w.dim() - 2)))
        new_w = (grouped * s).reshape(w.shape)
    else:
        new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = (b - mean) * scale + beta
    return new_w.to(layer.weight.dtype), new_b.to(layer.weight.dtype)


def _why_not(graph: LayerGraph, bn_name: str) -> tuple[str | None, str]:
    """The Linear/Conv ``bn_name`` can fold into, or None and why not."""
    bn = graph.nodes[bn_name].module
    if not bn.track_running_stats or bn.running_mean is None:
        return None, "has no running statistics (track_running_stats=False): it always uses batch statistics"
    if graph.nodes[bn_name].calls > 1:
        return None, f"called {graph.nodes[bn_name].calls} times per forward"
    parents = graph.parents(bn_name)
    if len(parents) != 1:
        return None, "fed by more than one producer" if parents else "nothing feeds it that bnaudit can see"
    edge = parents[0]
    node = graph.nodes.get(edge.src)
    if node is None or not (is_conv(node.module) or is_linear(node.module)) or isinstance(node.module, nn.Bilinear):
        return None, f"not preceded by a Linear/Conv (fed by {edge.src})"
    if edge.via:
        if any(op not in RESHAPE_FUNCTIONS for op in edge.via):
            return None, f"{', '.join(edge.via)} comes between {edge.src} and it"
        return None, f"{', '.join(edge.via)} reshapes the output of {edge.src} before it"
    if len(graph.children(edge.src)) != 1 or node.calls > 1:
        return None, f"{edge.src} also feeds other layers; folding would change them"
    layer = node.module
    channels = layer.out_channels if is_conv(layer) else layer.out_features
    if channels != bn.num_features:
        return None, f"{edge.src} has {channels} output channels, the BatchNorm {bn.num_features}"
    if is_linear(layer) and not isinstance(bn, FeatureBatchNorm1d):
        shapes = graph.nodes[edge.src].output_shapes
        if not graph.shapes_known or not shapes:
            return None, "Linear -> BatchNorm1d folds only when the input rank is known; pass an example input"
        if len(shapes[0]) != 2:
            return None, f"BatchNorm1d on the {shapes[0]} output of a Linear normalizes axis 1, not its features"
    return edge.src, ""


def fold_bn(
    model: nn.Module,
    *,
    example: Any | None = None,
    run: Callable[[nn.Module, Any], Any] | None = None,
) -> TransformResult:
    """A copy of ``model`` with each eval-mode BatchNorm fused into the Linear/Conv that feeds only it.

    Args:
        model: an eval-mode model (``model.eval()``); never modified.
        example: one batch of input: records shapes (needed to fold Linear -> BatchNorm1d) and measures the
            max abs error of the folded model against the original; without it, fx-traceable models only.
        run: how to call the model, ``run(model, inputs)``; default ``model(inputs)``.

    Returns:
        TransformResult: ``.changes`` one ``fold`` per fused pair, ``.skipped`` each BatchNorm left with the
        reason, ``.max_abs_error`` the largest eval output difference on ``example`` (None without one).

    Raises:
        TransformError: a BatchNorm is in training mode (call ``model.eval()``), or no graph can be built.
        DataError: the model rejects the example input.
    """
    training = [name for name, m in batchnorm_layers(model).items() if m.training]
    if training:
        raise TransformError(
            f"fold-bn needs an eval-mode model, but BatchNorm {training[0]} is in training mode "
            f"({len(training)} in all); call model.eval() first (CLI: --eval), since folding uses running statistics"
        )
    run_fn = run or default_run
    work = pristine_copy(model)
    device, dtype = model_device_dtype(work)
    if example is not None:
        example = move_to(example, device, dtype)
    graph = transform_graph(work, example, run_fn)

    plan: list[dict[str, Any]] = []
    changes: list[Change] = []
    skipped: list[Change] = []
    fused: list[tuple[str, str, torch.Tensor, torch.Tensor]] = []
    for name, node in graph.nodes.items():
        if not is_batchnorm(node.module):
            continue
        src, why = _why_not(graph, name)
        if src is None:
            skipped.append(Change("skip", name, describe(node.module), why))
            continue
        layer = graph.nodes[src].module
        weight, bias = fused_weights(layer, node.module)
        fused.append((src, name, weight, bias))
        if not has_bias(layer):
            plan.append({"op": "add_bias", "target": src})
        plan.append({"op": "replace", "target": name, "module": module_record(nn.Identity())})
        detail = f"{describe(node.module)} {name} folded into {describe(layer)} {src}"
        changes.append(Change("fold", src, detail, new=src))

    reference = pristine_copy(work) if example is not None else None
    apply_plan(work, plan)
    with torch.no_grad():
        for src, _, weight, bias in fused:
            layer = get_module(work, src)
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    result = TransformResult("fold_bn", work, changes, skipped, {}, plan, graph_method=graph.method)
    if reference is not None:
        before = eval_outputs(reference, example, run_fn)
        result.max_abs_error = max_abs_difference(before, eval_outputs(work, example, run_fn))
    return result
