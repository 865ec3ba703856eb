"""What train mode does that eval mode would not (BN304, BN305).

- ``train_eval_gap``: train-mode vs eval-mode loss (or output) on the same batches (BN304); its train-mode
  half is the same ``running_stats.train_mode_pass`` that ``running_stats_fit`` reads.
- ``frozen_bn_drift``: BatchNorm layers whose affine parameters are frozen but that run, or will run after
  ``model.train()``, in train mode, and how far one train-mode forward moves their buffers (BN305).

Each probe runs on the model itself and puts it back afterwards (``probes.state.ModelState``), restores the
global RNG it seeds, and returns a small frozen record of numbers that a rule turns into a finding."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnaudit.probes.common import (
    affine_frozen,
    batch_size,
    bn_layers,
    first_output_tensor,
    forward,
    seeded,
    tracks_running_stats,
)
from bnaudit.probes.running_stats import TrainModePass, train_mode_pass
from bnaudit.probes.state import ModelState, state_for


@dataclass(frozen=True)
class GapResult:
    """Train-mode vs eval-mode quality on the same batches.

    Attributes:
        metric: ``cross_entropy`` (integer class targets), ``mse`` (float targets shaped like the output) or
            ``output`` (no usable targets: the relative RMS difference of the outputs).
        train_value, eval_value: the metric in train mode (BatchNorm on batch statistics, dropout off) and in
            eval mode. For ``output``: the RMS of each output.
        relative_change: for ``output``, RMS(train - eval) / RMS(eval); else (eval - train) / train.
        train_accuracy, eval_accuracy: for ``cross_entropy``, the top-1 accuracies.
        batches, samples: what went through.
        note: why the experiment could not run, when it could not.
    """

    metric: str = "output"
    train_value: float = 0.0
    eval_value: float = 0.0
    relative_change: float = 0.0
    train_accuracy: float | None = None
    eval_accuracy: float | None = None
    batches: int = 0
    samples: int = 0
    note: str = ""


def _metric_for(out: torch.Tensor, targets: Any) -> str:
    if not isinstance(targets, torch.Tensor) or out.dim() < 1 or targets.shape[:1] != out.shape[:1]:
        return "output"
    if not targets.is_floating_point() and not targets.is_complex():
        if out.dim() >= 2 and out.is_floating_point() and targets.dim() == out.dim() - 1:
            if targets.min() >= 0 and targets.max() < out.shape[1]:
                return "cross_entropy"
        return "output"
    if targets.is_floating_point() and targets.numel() == out.numel():
        return "mse"
    return "output"


def train_eval_gap(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    state: ModelState | None = None,
    train_pass: TrainModePass | None = None,
) -> GapResult:
    """Evaluate the same batches in eval mode and with BatchNorm in train mode.

    The eval-mode passes run first, on the untouched running statistics; the train-mode pass (which moves
    them) runs after, and the model is put back afterwards. Dropout stays off in both, so the gap measures
    normalization alone.

    Args:
        model: the model to probe; put back as it was afterwards.
        batches: ``Batch`` objects (with ``targets`` for a loss) or raw inputs; batches of one sample are
            skipped (train mode cannot normalize them).
        state: the model's ModelState when the caller keeps one (an audit does); else one is taken here.
        train_pass: a ``train_mode_pass`` already run over the same batches (an audit shares it with BN302);
            None runs one here.

    Returns:
        A GapResult; ``note`` is set when no batch could be used.

    Raises:
        Exception: whatever the model's forward raises; callers turn it into DataError.
    """
    state = state_for(model, state)
    batches = list(batches)
    eval_outputs: list[torch.Tensor | None] = []
    with state.restoring(), torch.no_grad():
        model.eval()
        for batch in batches:
            inputs = getattr(batch, "inputs", batch)
            if (batch_size(inputs) or 0) < 2:
                eval_outputs.append(None)
                continue
            out = first_output_tensor(forward(model, inputs))
            eval_outputs.append(out.detach() if out is not None else None)
    if train_pass is None:
        train_pass = train_mode_pass(model, batches, state=state)
    metric = None
    sums = {"train": 0.0, "eval": 0.0, "diff": 0.0, "train_ok": 0.0, "eval_ok": 0.0}
    count = samples = elements = 0
    for batch, out_e, out_t in zip(batches, eval_outputs, train_pass.outputs):
        targets = getattr(batch, "targets", None)
        n = batch_size(getattr(batch, "inputs", batch)) or 0
        if n < 2 or out_e is None or out_t is None or out_e.shape != out_t.shape:
            continue
        if metric is None:
            metric = _metric_for(out_e, targets)
        kind = metric if _metric_for(out_e, targets) == metric else "output"
        if kind != metric:
            continue
        e, t = out_e.double(), out_t.double()
        if metric == "cross_entropy":
            classes = targets.long()  # boolean labels are classes 0 and 1; cross_entropy refuses the bool dtype
            sums["eval"] += float(nn.functional.cross_entropy(e, classes, reduction="sum"))
            sums["train"] += float(nn.functional.cross_entropy(t, classes, reduction="sum"))
            sums["eval_ok"] += float((e.argmax(1) == classes).sum())
            sums["train_ok"] += float((t.argmax(1) == classes).sum())
            elements += n
        elif metric == "mse":
            tgt = targets.double().reshape(e.shape)
            sums["eval"] += float(((e - tgt) ** 2).sum())
            sums["train"] += float(((t - tgt) ** 2).sum())
            elements += e.numel()
        else:
            sums["eval"] += float((e**2).sum())
            sums["train"] += float((t**2).sum())
            sums["diff"] += float(((t - e) ** 2).sum())
            elements += e.numel()
        count += 1
        samples += n
    if count == 0 or metric is None or elements == 0:
        return GapResult(note="no batch of two or more samples with a usable output")
    if metric == "output":
        train_v, eval_v = math.sqrt(sums["train"] / elements), math.sqrt(sums["eval"] / elements)
        diff = math.sqrt(sums["diff"] / elements)
        rel = diff / eval_v if eval_v > 0 else (0.0 if diff == 0 else math.inf)
        return GapResult("output", train_v, eval_v, rel, None, None, count, samples)
    train_v, eval_v = sums["train"] / elements, sums["eval"] / elements
    rel = (eval_v - train_v) / train_v if train_v > 0 else (0.0 if eval_v == train_v else math.inf)
    acc_t = sums["train_ok"] / samples if metric == "cross_entropy" else None
    acc_e = sums["eval_ok"] / samples if metric == "cross_entropy" else None
    return GapResult(metric, train_v, eval_v, rel, acc_t, acc_e, count, samples)


@dataclass(frozen=True)
class FrozenLayer:
    """A BatchNorm layer with frozen affine parameters that normalizes in train mode.

    Attributes:
        layer: qualified name.
        training_now: whether it is in train mode as given.
        training_after_train: whether it is in train mode after ``model.train()`` (False when the model
            overrides ``train()`` to keep it in eval mode).
        moved: whether one train-mode forward changed its running buffers (None without data).
        mean_shift: max |Δrunning_mean| / sqrt(running_var + eps) after that forward (None without data).
        var_ratio: max over channels of the larger of new/old and old/new running_var (None without data).
        num_batches_tracked: (before, after) of that forward, when the layer counts batches.
    """

    layer: str
    training_now: bool
    training_after_train: bool
    moved: bool | None = None
    mean_shift: float | None = None
    var_ratio: float | None = None
    num_batches_tracked: tuple[int, int] | None = None


@dataclass(frozen=True)
class FrozenResult:
    """``frozen_bn_drift`` over the whole model.

    Attributes:
        layers: the frozen BatchNorm layers that normalize in train mode (now or after ``model.train()``).
        frozen_total: how many BatchNorm layers have frozen affine parameters.
        trainable_params: how many parameters of the model require grad (0: nothing is being trained).
        forward_ran: whether a train-mode forward measured the drift.
    """

    layers: tuple[FrozenLayer, ...] = ()
    frozen_total: int = 0
    trainable_params: int = 0
    forward_ran: bool = False


def frozen_bn_drift(
    model: nn.Module,
    batch: Any | None = None,
    *,
    device: torch.device | str | None = None,
    state: ModelState | None = None,
) -> FrozenResult:
    """Find BatchNorm layers whose affine parameters are frozen (``requires_grad=False``) but that run in
    train mode now, or will after ``model.train()``, and measure how far one train-mode forward moves their
    running buffers.

    Args:
        model: the model to probe; put back as it was afterwards (``train()`` is called on it, which also
            honours a ``train()`` override that keeps frozen layers in eval mode).
        batch: one batch (``Batch`` or raw inputs) for the forward pass; None measures nothing.
        device: the device the batch lives on (its RNG is restored after the forward).
        state: the model's ModelState when the caller keeps one (an audit does); else one is taken here.

    Returns:
        A FrozenResult.

    Raises:
        Exception: whatever the model's forward raises; callers turn it into DataError.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    now = {name: m.training for name, m in bn_layers(model).items()}
    frozen = {name: m for name, m in bn_layers(model).items() if affine_frozen(m)}
    if not frozen:
        return FrozenResult((), 0, trainable, False)
    state = state_for(model, state)
    with state.restoring():
        model.train()
        layers = bn_layers(model)
        candidates = {
            name: m for name, m in layers.items()
            if name in frozen and tracks_running_stats(m) and (now.get(name) or m.training)
        }
        if not candidates:
            return FrozenResult((), len(frozen), trainable, False)
        before = {
            name: (m.running_mean.detach().clone(), m.running_var.detach().clone(), _nbt(m))
            for name, m in candidates.items()
        }
        ran = False
        inputs = getattr(batch, "inputs", batch) if batch is not None else None
        if inputs is not None and (batch_size(inputs) or 0) >= 2:
            # Train mode exactly as model.train() leaves it (dropout included), under no_grad: buffers still move.
            with torch.no_grad(), seeded(0, device):
                forward(model, inputs)
            ran = True
        out = []
        for name, m in candidates.items():
            rm0, rv0, nbt0 = before[name]
            moved = shift = ratio = nbt = None
            if ran:
                rm1, rv1 = m.running_mean.detach(), m.running_var.detach()
                eps = float(getattr(m, "eps", 1e-5))
                shift = float(((rm1.double() - rm0.double()).abs() / torch.sqrt(rv0.double().clamp_min(0) + eps)).max())
                a, b = rv0.double().clamp_min(0) + eps, rv1.double().clamp_min(0) + eps
                ratio = float(torch.maximum(a / b, b / a).max())
                moved = not (torch.equal(rm0, rm1) and torch.equal(rv0, rv1))
                nbt1 = _nbt(m)
                nbt = (nbt0, nbt1) if nbt0 is not None and nbt1 is not None else None
            out.append(FrozenLayer(name, bool(now.get(name)), bool(m.training), moved, shift, ratio, nbt))
    return FrozenResult(tuple(out), len(frozen), trainable, ran)


def _nbt(m: nn.Module) -> int | None:
    t = getattr(m, "num_batches_tracked", None)
    return int(t) if isinstance(t, torch.Tensor) else None


__all__ = [
    "FrozenLayer",
    "FrozenResult",
    "GapResult",
    "frozen_bn_drift",
    "train_eval_gap",
]
