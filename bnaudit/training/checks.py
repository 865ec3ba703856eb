"""What train-compare checks before the first run, so that a bad option or bad data ends in one clear
message instead of a raw torch error minutes into the runs or a table of confident wrong results.

Options: learning rates, momentum and weight decay must be finite and in torch's range. Data: inputs and
float targets must be finite (NaN data made every run "diverged" without a word about NaN); validation data
must be shaped like the training data. Models: one forward pass on two examples (the model takes the
inputs; the outputs go with the loss); a variant with BatchNorm cannot train on one-example batches; the
followed unit must exist in its layer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bnaudit.errors import DataError, UsageError
from bnaudit.layers import batchnorm_layers, is_activation
from bnaudit.training.data import TensorData
from bnaudit.training.losses import check_outputs
from bnaudit.usercode import describe


def check_numbers(lrs: Sequence[float], momentum: float, weight_decay: float) -> None:
    """Learning rates positive and finite, momentum and weight decay finite and non-negative.

    Raises:
        UsageError: naming the value and the range.
    """
    for lr in lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise UsageError(f"--lr {lr!r}: a learning rate must be a positive finite number, e.g. 0.01,0.1,1")
    if not (math.isfinite(momentum) and momentum >= 0):
        raise UsageError(f"--momentum {momentum!r}: SGD momentum must be a finite number >= 0 (usually 0 to 0.99)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise UsageError(f"weight decay {weight_decay!r} must be a finite number >= 0")


def check_finite(data: TensorData, what: str) -> None:
    """Raise when inputs (or floating targets) hold NaN or Inf, naming the first bad example.

    Raises:
        DataError: ``what`` has a non-finite value.
    """
    for name, t in (("inputs", data.inputs), ("targets", data.targets)):
        if not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            index = [int(i) for i in bad.nonzero()[0]]
            kind = "NaN" if bool(torch.isnan(t[tuple(index)])) else "Inf"
            n = int(bad.sum())
            raise DataError(
                f"{what} {name} hold {n} non-finite value{'s' if n != 1 else ''} ({kind}); the first is in example "
                f"{index[0]} (index {tuple(index[1:])} within it). Every run would diverge on it: clean or drop "
                "those examples"
            )


def check_like(val: TensorData, train: TensorData) -> None:
    """Validation examples shaped like training examples.

    Raises:
        DataError: the per-example input shapes (or target shapes) differ.
    """
    if tuple(val.inputs.shape[1:]) != tuple(train.inputs.shape[1:]):
        raise DataError(
            f"--val-data examples have shape {tuple(val.inputs.shape[1:])}, the training data "
            f"{tuple(train.inputs.shape[1:])}; give validation data shaped like the training data"
        )
    if tuple(val.targets.shape[1:]) != tuple(train.targets.shape[1:]):
        raise DataError(
            f"--val-data targets have shape {tuple(val.targets.shape[1:])} per example, the training data's "
            f"{tuple(train.targets.shape[1:])}; give targets of the same kind"
        )


def check_model(
    model: nn.Module, train: TensorData, loss_name: str, device: torch.device, what: str = "the model"
) -> None:
    """One forward pass on two examples, so a model/data mismatch fails with a clear message before any run.

    Raises:
        DataError: the model rejects the inputs, or its outputs cannot go with the targets and the loss.
    """
    x = train.inputs[:2].to(device)
    y = train.targets[:2].to(device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # the user's forward: any failure here is a data/model mismatch
        raise DataError(
            f"{what} cannot take the training inputs of shape {tuple(train.inputs.shape[1:])} per example: "
            f"{describe(exc)}"
        ) from exc
    finally:
        model.train(was)
    check_outputs(out, train.targets, loss_name)
    if loss_name == "mse" and isinstance(out, torch.Tensor) and out.numel() != y.numel() and out.shape != y.shape:
        raise DataError(
            f"MSE needs outputs shaped like the targets: model gives {tuple(out.shape)}, targets {tuple(y.shape)}"
        )


def check_batch_norm_batch(model: nn.Module, variant: str, batch_size: int) -> None:
    """A model with BatchNorm needs two or more examples per batch (per process) to train.

    Raises:
        DataError: ``batch_size`` is 1 and the model has a BatchNorm layer.
    """
    if batch_size >= 2:
        return
    layer = next(iter(batchnorm_layers(model)), None)
    if layer is not None:
        raise DataError(
            f"the {variant!r} variant has BatchNorm ({layer}), which cannot train on batches of one example "
            "(a batch of one has no variance); use --batch-size 2 or more, or leave that variant out"
        )


def unit_layer_of(model: nn.Module, unit_layer: str | None) -> str | None:
    """The layer whose input unit is followed: ``unit_layer``, else the model's last activation."""
    if unit_layer is not None:
        return unit_layer
    acts = [n for n, m in model.named_modules() if n and is_activation(m)]
    return acts[-1] if acts else None


def check_unit(model: nn.Module, train: TensorData, layer: str | None, unit: int, device: torch.device) -> None:
    """The followed unit is a channel of the layer's input.

    Raises:
        UsageError: ``unit`` is negative or not below the layer's input channel count.
    """
    if layer is None:
        return
    module = dict(model.named_modules()).get(layer)
    if module is None:
        raise UsageError(f"no layer named {layer!r} in the model for the percentiles")
    seen: list[int] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor):
            seen.append(int(x.shape[1]) if x.dim() > 1 else 1)

    handle = module.register_forward_pre_hook(hook)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(train.inputs[:2].to(device))
    finally:
        handle.remove()
        model.train(was)
    if seen and not 0 <= unit < seen[0]:
        raise UsageError(
            f"--unit {unit}: the input of {layer} has {seen[0]} units (0 to {seen[0] - 1}); choose one of them"
        )


__all__ = [
    "check_batch_norm_batch",
    "check_finite",
    "check_like",
    "check_model",
    "check_numbers",
    "check_unit",
    "unit_layer_of",
]
