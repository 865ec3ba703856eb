"""Loss and accuracy for train-compare, and the default target loss.

``loss="auto"`` picks cross-entropy for integer class targets and mean squared error otherwise. The
default target for "steps to reach a target loss" is a quarter of the loss of the best constant predictor
(the entropy of the class prior for cross-entropy, the target variance for MSE): a level that needs real
learning on any dataset, stated in the units of the loss the user trains with."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bnaudit.errors import DataError, UsageError

LOSSES = ("auto", "cross_entropy", "mse")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_loss(loss: str | LossFn, targets: torch.Tensor) -> tuple[str, LossFn]:
    """Return ``(name, fn)`` for ``loss`` given the training targets.

    Args:
        loss: ``"auto"``, ``"cross_entropy"``, ``"mse"``, or a callable ``fn(outputs, targets) -> scalar``.
        targets: all training targets (their dtype decides ``auto``).

    Raises:
        UsageError: an unknown loss name.
        DataError: cross-entropy asked for with non-integer targets.
    """
    if callable(loss):
        return getattr(loss, "__name__", "custom"), loss
    if loss not in LOSSES:
        raise UsageError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    integer = not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool
    if loss == "auto":
        loss = "cross_entropy" if integer else "mse"
    if loss == "cross_entropy":
        if not integer:
            raise DataError("cross-entropy needs integer class targets; the targets are floats (use --loss mse)")
        return "cross_entropy", _cross_entropy
    return "mse", _mse


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets.long())


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    targets = targets.to(outputs.dtype)
    if outputs.shape != targets.shape and outputs.numel() == targets.numel():
        # (N, 1) outputs against (N,) targets: the usual regression head; broadcasting would be wrong.
        targets = targets.reshape(outputs.shape)
    return F.mse_loss(outputs, targets)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Number of correct class predictions (arg-max over dim 1)."""
    return int((outputs.argmax(dim=1) == targets.long()).sum())


def constant_predictor_loss(loss_name: str, targets: torch.Tensor) -> float | None:
    """Loss of the best prediction that ignores the input, or None for a custom loss."""
    if loss_name == "cross_entropy":
        counts = torch.bincount(targets.long().flatten()).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())
    if loss_name == "mse":
        t = targets.double()
        return float(t.var(unbiased=False).mean()) if t.numel() > 1 else None
    return None


def default_target(loss_name: str, targets: torch.Tensor) -> float | None:
    """A quarter of the constant predictor's loss (None when it cannot be computed)."""
    base = constant_predictor_loss(loss_name, targets)
    if base is None or not math.isfinite(base) or base <= 0:
        return None
    return round(base / 4.0, 4)


def check_outputs(outputs: torch.Tensor, targets: torch.Tensor, loss_name: str) -> None:
    """Raise a clear DataError when the model's outputs cannot go with the targets."""
    if not isinstance(outputs, torch.Tensor):
        raise DataError(f"the model returned {type(outputs).__name__}; train-compare needs a tensor output")
    if loss_name == "cross_entropy":
        if outputs.dim() < 2:
            raise DataError(
                f"cross-entropy needs (N, classes) outputs, the model returned shape {tuple(outputs.shape)}"
            )
        n_classes = int(outputs.shape[1])
        top = int(targets.max())
        if top >= n_classes or int(targets.min()) < 0:
            raise DataError(f"targets go up to class {top} but the model outputs {n_classes} classes")
