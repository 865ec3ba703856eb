"""The running-statistics experiment (BN302, BN303, and the before/after table of ``bnaudit recalibrate``):
per BatchNorm layer, the train-mode statistics of the data against the running buffers, as ``z`` (mean
shift in running standard deviations) and ``r`` (variance ratio).

``train_mode_pass`` runs the batches once with BatchNorm layers in train mode (and dropout in eval mode),
collecting per-channel moments and outputs; ``running_stats_fit`` and ``train_eval.train_eval_gap`` read
the same pass. The model is put back afterwards (``probes.state.ModelState``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnaudit.probes.common import (
    affine_trained,
    batch_size,
    bn_layers,
    bn_statistics_mode,
    first_output_tensor,
    forward,
    tracks_running_stats,
)
from bnaudit.probes.state import ModelState, state_for


@dataclass(frozen=True)
class LayerFit:
    """How well one BatchNorm layer's running statistics describe the data.

    With m and v the layer's train-mode input mean and (unbiased) variance per channel, averaged over the
    batches the way ``momentum=None`` accumulates them, and eps the layer's epsilon:
    ``z = mean_c |m - running_mean| / sqrt(running_var + eps)`` (how far eval mode shifts the normalized
    output, in its own standard deviations) and ``r = mean_c (v + eps) / (running_var + eps)`` (how much eval
    mode mis-scales it; 1 is a perfect fit).

    Attributes:
        layer: qualified name.
        channels: number of channels.
        z, r: as above; None when the layer keeps no running statistics.
        z_max: the worst channel's shift.
        r_min, r_max: the extreme channels' variance ratios.
        calls: how many train-mode calls of the layer were averaged.
        samples: samples seen per channel (batch x spatial positions), summed over calls.
        tracks: whether the layer keeps running statistics at all.
        at_init: running_mean is all 0 and running_var all 1 (the values a fresh layer starts with).
        num_batches_tracked: the layer's counter, when it has one.
        affine_trained: whether weight and bias vary across channels, as training makes them and no
            initialisation does (``affine_trained``; None without affine).
        mean, var: the data's per-channel statistics (float64, CPU), for transforms that need them.
    """

    layer: str
    channels: int
    z: float | None
    r: float | None
    z_max: float | None
    r_min: float | None
    r_max: float | None
    calls: int
    samples: int
    tracks: bool
    at_init: bool
    num_batches_tracked: int | None
    affine_trained: bool | None
    mean: torch.Tensor | None = field(default=None, repr=False, compare=False)
    var: torch.Tensor | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class FitResult:
    """``running_stats_fit`` for every BatchNorm layer that ran.

    Attributes:
        layers: layer name -> LayerFit, in model order.
        batches: how many batches went through.
        samples: how many samples went through.
        skipped: batches skipped and why (e.g. a batch of one sample cannot give a train-mode variance).
    """

    layers: Mapping[str, LayerFit]
    batches: int
    samples: int
    skipped: tuple[str, ...] = ()


class ChannelMoments:
    """Per-channel batch mean and unbiased variance, accumulated as a cumulative average over calls in
    float64: the estimate ``momentum=None`` running statistics converge to."""

    def __init__(self) -> None:
        self.calls = 0
        self.samples = 0
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        if n < 2:
            return
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=True)
        self.calls += 1
        self.samples += n
        if self.mean is None:
            self.mean, self.var = mean, var
        else:
            self.mean = self.mean + (mean - self.mean) / self.calls
            self.var = self.var + (var - self.var) / self.calls


def layer_fit(name: str, m: nn.Module, moments: ChannelMoments) -> LayerFit:
    """Compare one layer's running buffers with the data statistics accumulated for it."""
    channels = int(getattr(m, "num_features", 0) or (moments.mean.numel() if moments.mean is not None else 0))
    tracks = tracks_running_stats(m)
    nbt_buf = getattr(m, "num_batches_tracked", None)
    nbt = int(nbt_buf) if isinstance(nbt_buf, torch.Tensor) else None
    trained = affine_trained(m)
    at_init = False
    z = r = z_max = r_min = r_max = None
    mean = moments.mean.cpu() if moments.mean is not None else None
    var = moments.var.cpu() if moments.var is not None else None
    if tracks:
        rm = m.running_mean.detach().to(torch.float64).cpu()
        rv = m.running_var.detach().to(torch.float64).cpu()
        at_init = bool(torch.all(rm == 0) and torch.all(rv == 1))
        if mean is not None and var is not None and mean.shape == rm.shape:
            eps = float(getattr(m, "eps", 1e-5))
            shift = (mean - rm).abs() / torch.sqrt(rv.clamp_min(0) + eps)
            ratio = (var + eps) / (rv.clamp_min(0) + eps)
            z, z_max = float(shift.mean()), float(shift.max())
            r, r_min, r_max = float(ratio.mean()), float(ratio.min()), float(ratio.max())
    return LayerFit(
        layer=name,
        channels=channels,
        z=z,
        r=r,
        z_max=z_max,
        r_min=r_min,
        r_max=r_max,
        calls=moments.calls,
        samples=moments.samples,
        tracks=tracks,
        at_init=at_init,
        num_batches_tracked=nbt,
        affine_trained=trained,
        mean=mean,
        var=var,
    )


def running_stats_fit(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    reference: nn.Module | None = None,
    state: ModelState | None = None,
) -> FitResult:
    """Collect each BatchNorm layer's train-mode input statistics on ``batches`` and compare them with the
    running buffers.

    The statistics come from the model with BatchNorm layers in train mode and everything else in eval mode:
    every layer then sees the inputs it sees during training (upstream layers normalize with batch
    statistics), without dropout noise, and its running buffers (as they were before these passes) can be
    compared with what the data says they should be.

    Args:
        model: the model whose data statistics are collected; put back as it was afterwards.
        batches: batches (``Batch`` objects or raw inputs); batches of one sample are skipped.
        reference: the model whose running buffers are compared (default ``model``); it must have the same
            BatchNorm layer names. ``recalibrate`` passes the recalibrated copy here.
        state: the model's ModelState when the caller keeps one (an audit does); else one is taken here.

    Returns:
        A FitResult with one LayerFit per BatchNorm layer that ran.

    Raises:
        Exception: whatever the model's forward raises on a batch; callers turn it into DataError.
    """
    return fit_from_pass(train_mode_pass(model, batches, state=state), reference if reference is not None else model)


def fit_from_pass(passes: TrainModePass, reference: nn.Module) -> FitResult:
    """Compare the moments a ``train_mode_pass`` collected with ``reference``'s running buffers (the model's
    own, put back after the pass, or another model with the same BatchNorm layer names)."""
    out = {}
    for name, m in bn_layers(reference).items():
        mom = passes.moments.get(name)
        if mom is None or mom.calls == 0:
            continue
        out[name] = layer_fit(name, m, mom)
    return FitResult(out, passes.batches, passes.samples, passes.skipped)


@dataclass
class TrainModePass:
    """One pass over the batches with BatchNorm layers in train mode and everything else in eval mode.

    Attributes:
        moments: per BatchNorm layer, the per-channel mean and variance of its inputs (``ChannelMoments``).
        outputs: per batch that ran, the model's first output tensor (detached), for BN304.
        batches, samples: what went through.
        skipped: batches skipped and why.
    """

    moments: dict[str, ChannelMoments]
    outputs: list[torch.Tensor | None]
    batches: int
    samples: int
    skipped: tuple[str, ...]


def train_mode_pass(model: nn.Module, batches: Iterable[Any], *, state: ModelState | None = None) -> TrainModePass:
    """Run ``batches`` (those of two samples or more) through the model with BatchNorm in train mode and every
    other module in eval mode, under no_grad, collecting each BatchNorm's input moments and the outputs; the
    model is put back afterwards. ``running_stats_fit`` and ``train_eval_gap`` read the same pass.

    Raises:
        Exception: whatever the model's forward raises on a batch; callers turn it into DataError.
    """
    state = state_for(model, state)
    layers = bn_layers(model)
    moments = {name: ChannelMoments() for name in layers}
    outputs: list[torch.Tensor | None] = []
    count = samples = 0
    skipped = []
    with state.restoring():
        handles = [m.register_forward_pre_hook(collect_moments(moments[name])) for name, m in layers.items()]
        try:
            with bn_statistics_mode(model), torch.no_grad():
                for batch in batches:
                    inputs = getattr(batch, "inputs", batch)
                    n = batch_size(inputs) or 0
                    if n < 2:
                        skipped.append(f"a batch of {n} sample(s) (train-mode statistics need at least 2)")
                        outputs.append(None)
                        continue
                    out = first_output_tensor(forward(model, inputs))
                    outputs.append(out.detach() if out is not None else None)
                    count += 1
                    samples += n
        finally:
            for h in handles:
                h.remove()
    return TrainModePass(moments, outputs, count, samples, tuple(skipped))


def collect_moments(moments: ChannelMoments):
    """A forward pre-hook adding each call's input to ``moments``."""

    def hook(m: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            moments.add(args[0])

    return hook


__all__ = [
    "ChannelMoments",
    "FitResult",
    "LayerFit",
    "TrainModePass",
    "collect_moments",
    "fit_from_pass",
    "layer_fit",
    "running_stats_fit",
    "train_mode_pass",
]
