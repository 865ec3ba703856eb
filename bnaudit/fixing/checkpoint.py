"""Fixes to a copy of the user's checkpoint (a state_dict), so that it matches the edited source and keeps
the trained model's function.

``fold_bias`` is BN101's checkpoint half: a bias ``b`` feeding a BatchNorm is dropped and folded into the
BatchNorm's ``running_mean`` (``running_mean - b``). In eval mode the BatchNorm computes
``(y + b - running_mean) / sqrt(running_var + eps)``, which is ``(y - (running_mean - b)) / ...``: equal up to
float rounding. In train mode the batch mean absorbs ``b`` in both, and the running-mean update stays offset
by exactly ``b`` (``(1 - m)(rm - b) + m * mean(y) = rm' - b``), so training is unchanged. ``adapt_state``
renames keys after moved ``nn.Sequential`` elements, drops the entries of removed layers and adds fresh ones
for new buffers (``track_running_stats=True``), naming each. ``recalibrated`` re-estimates running statistics
(BN302, BN303, and BN209's NaN/Inf buffers) with ``bnaudit.transforms.recalibrate``. The user's tensors are
never modified: every function returns new ones."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from bnaudit.fixing.source import Unfixable

__all__ = ["adapt_state", "fold_bias", "recalibrated"]

State = dict[str, torch.Tensor]


def fold_bias(state: Mapping[str, torch.Tensor], layer: str, batchnorms: Iterable[str]) -> State:
    """``state`` with ``layer.bias`` dropped and folded into each BatchNorm's ``running_mean``.

    Raises:
        Unfixable: the bias is missing, or a BatchNorm's running_mean does not have one value per bias value
            (the bias reaches it through a reshape), so folding would not be exact.
    """
    out = dict(state)
    bias = out.pop(f"{layer}.bias", None)
    if bias is None:
        raise Unfixable(f"the checkpoint has no {layer}.bias")
    for bn in batchnorms:
        key = f"{bn}.running_mean"
        mean = out.get(key)
        if mean is None:
            continue  # no running statistics: the batch mean removes the bias in eval mode too
        if mean.shape != bias.shape:
            raise Unfixable(f"{layer}.bias has {bias.numel()} values and {key} {mean.numel()}: it is not folded exactly")
        out[key] = (mean.double() - bias.detach().double()).to(mean.dtype)
    return out


def adapt_state(
    state: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor], rename: Callable[[str], str],
) -> tuple[State, list[str]]:
    """``state``'s entries under the edited model's names, fitted to ``template`` (the edited model's own
    state_dict): entries it no longer has are dropped, new ones are taken from it.

    Returns:
        (the new state, one note per entry dropped or added).
    """
    moved = {rename(k): v for k, v in state.items()}
    notes = [f"dropped {k} (the layer is gone)" for k in moved if k not in template]
    out = {k: v for k, v in moved.items() if k in template}
    for k, v in template.items():
        if k not in out:
            out[k] = v.detach().clone()
            notes.append(f"added {k} at its initial value" + (" (run `bnaudit recalibrate` to estimate it)"
                                                               if "running_" in k else ""))
    return out, notes


def recalibrated(model: nn.Module, data: Any, *, batch_size: int = 32, input_key: str | None = None) -> State:
    """The state_dict of ``model`` (not modified) after its BatchNorm running statistics are re-estimated on
    ``data``, one pass, as ``bnaudit recalibrate`` does."""
    from bnaudit.transforms.recalibrate import recalibrate

    new, _ = recalibrate(model, data, batch_size=batch_size, input_key=input_key)
    return {k: v.detach().clone() for k, v in new.state_dict().items()}
