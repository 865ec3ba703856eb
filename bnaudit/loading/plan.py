"""The plan: a model's structural edits as plain records, and the surgery that performs them.

A transform records each edit it makes as a plan step (a plain dict: ``wrap``, ``replace``, ``add_bias``,
``drop_bias``) and performs it with ``apply_plan``. The same plan, stored in bnaudit's model file
(``bnaudit.loading.modelfile``), rebuilds the architecture later without re-deciding anything. Module
records name only the classes in ``bnaudit.loading.modules``, so replaying a plan never imports arbitrary
code. Modules are replaced through their parents, so every alias of a module sees the swap."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from bnaudit.errors import TransformError
from bnaudit.loading.modules import NormalizedLayer, build_module


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule at the qualified ``name`` ("" is the model itself).

    Raises:
        TransformError: no module of that name.
    """
    try:
        return model.get_submodule(name) if name else model
    except AttributeError as exc:
        raise TransformError(f"the model has no submodule {name!r}; it does not match the saved plan") from exc


def replace_module(model: nn.Module, target: nn.Module, new: nn.Module) -> list[str]:
    """Put ``new`` wherever ``target`` is registered in ``model`` (every parent, aliases included).

    Returns:
        The qualified names that now hold ``new``.

    Raises:
        TransformError: ``target`` is the model itself or is not inside it.
    """
    # Find every slot first, then swap: ``new`` may contain ``target`` (a wrapper), and must not be walked.
    slots = [
        (parent_name, parent, attr)
        for parent_name, parent in model.named_modules(remove_duplicate=False)
        if parent is not new
        for attr, child in parent._modules.items()
        if child is target
    ]
    names: list[str] = []
    for parent_name, parent, attr in slots:
        # Through __setattr__ so Module bookkeeping (and subclasses that override it) sees the swap.
        setattr(parent, attr, new)
        names.append(f"{parent_name}.{attr}" if parent_name else attr)
    if not names:
        raise TransformError(f"cannot replace the model itself ({type(target).__name__}); wrap it in a parent module")
    return sorted(set(names))


def drop_bias(layer: nn.Module) -> None:
    """Remove a Linear/Conv bias: the layer then computes ``W x`` (its forward passes ``bias=None``)."""
    layer.register_parameter("bias", None)


def add_zero_bias(layer: nn.Module) -> None:
    """Give a bias-free Linear/Conv a zero bias parameter on its weight's device and dtype."""
    w = layer.weight
    channels = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
    layer.bias = nn.Parameter(torch.zeros(channels, device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)


def apply_plan(model: nn.Module, plan: Iterable[dict[str, Any]]) -> nn.Module:
    """Perform a plan's structural edits on ``model`` in place (used on fresh copies only).

    Steps: ``{"op": "wrap", "target", "module"}`` puts ``NormalizedLayer(target, module)`` where ``target``
    was; ``{"op": "replace", "target", "module"}`` puts ``module`` there; ``{"op": "drop_bias"|"add_bias",
    "target"}`` removes or adds a Linear/Conv bias. Module records are rebuilt by ``build_module``.

    Returns:
        ``model``.

    Raises:
        TransformError: a step names a module the model lacks, or an unknown operation.
    """
    for step in plan:
        op = step.get("op")
        target = get_module(model, str(step.get("target", "")))
        if op == "wrap":
            norm = build_module(step["module"], like=target)
            norm.train(target.training)
            replace_module(model, target, NormalizedLayer(target, norm))
        elif op == "replace":
            new = build_module(step["module"], like=target)
            new.train(target.training)
            replace_module(model, target, new)
        elif op == "drop_bias":
            drop_bias(target)
        elif op == "add_bias":
            add_zero_bias(target)
        else:
            raise TransformError(f"unknown plan step {op!r}; the file was written by a newer bnaudit")
    return model


def pristine_copy(model: nn.Module) -> nn.Module:
    """A deep copy to transform.

    Raises:
        TransformError: the model cannot be deep-copied (the message says what to do).
    """
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - deepcopy failures come in many types
        raise TransformError(
            f"cannot copy the model ({type(exc).__name__}: {str(exc)[:120]}); bnaudit transforms a copy and never "
            "edits yours, so the model must support copy.deepcopy"
        ) from exc
