"""The models train-compare trains: one base model per seed, and each variant derived from a copy of it.

Fairness is the point of the comparison, so within a seed every variant starts from the same base weights:
the base is initialised once from the seed, deep-copied, and the copy transformed ("bn" inserts BatchNorm
with ``bnaudit.insert_bn``; "groupnorm"/"layernorm" swap the normalization with ``bnaudit.swap_norm``;
"syncbn" is the "bn" model with its BatchNorm layers swapped for SyncBatchNorm, for ``nproc > 1``). The
Linear/Conv layers the variants share therefore hold identical initial weights; only the layers a transform
adds are new. "user" is a second model the user already changed; its weight layers that match the base's in
order and shape are copied from the base, so it too starts from the same weights where it can."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bnaudit.errors import SpecError, TransformError, UsageError
from bnaudit.layers import batchnorm_layers, is_weight_layer

VARIANTS = ("baseline", "bn", "syncbn", "groupnorm", "layernorm", "user")

ModelArg = nn.Module | Callable[[], nn.Module]


def check_variants(variants: tuple[str, ...] | list[str], user_model: Any) -> tuple[str, ...]:
    """Validate the variant names (order kept, duplicates dropped).

    Raises:
        UsageError: an unknown name, no variants, or "user" without a user model.
    """
    out: list[str] = []
    for v in variants:
        if v not in VARIANTS:
            raise UsageError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        if v not in out:
            out.append(v)
    if not out:
        raise UsageError("no variants to compare; give at least one, e.g. baseline,bn")
    if "user" in out and user_model is None:
        raise UsageError("variant 'user' needs the changed model: pass user_model= (CLI: --user-model SPEC)")
    return tuple(out)


def reinitialize(model: nn.Module, seed: int) -> list[str]:
    """Re-draw every parameter that has a ``reset_parameters()`` from ``seed``, in module order.

    Returns:
        Names of modules holding parameters that could not be re-drawn (no ``reset_parameters``); they
        keep their given values in every seed.
    """
    kept: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in model.named_modules():
            if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
                module.reset_parameters()
            elif any(True for _ in module.parameters(recurse=False)):
                kept.append(name or "<root>")
    return kept


def base_model(model: ModelArg, seed: int, *, reinit: bool) -> tuple[nn.Module, list[str]]:
    """The seed's base model: a factory called under the seed, or a copy of the module re-initialised.

    Returns:
        (model, notes) where notes say what could not be re-initialised.

    Raises:
        SpecError: the factory does not return an nn.Module.
    """
    notes: list[str] = []
    if isinstance(model, nn.Module):
        base = copy.deepcopy(model)
        if reinit:
            kept = reinitialize(base, seed)
            if kept:
                notes.append(
                    "parameters of "
                    + ", ".join(kept[:5])
                    + (" ..." if len(kept) > 5 else "")
                    + " have no reset_parameters(); they keep their given values in every seed"
                )
        return base, notes
    if callable(model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base = model()
        if not isinstance(base, nn.Module):
            raise SpecError(f"the model factory returned {type(base).__name__}, not a torch.nn.Module")
        return base, notes
    raise SpecError(f"train-compare needs an nn.Module or a factory returning one, got {type(model).__name__}")


def _unwrap(result: Any, what: str, notes: list[str] | None) -> nn.Module:
    """The model inside a transform's TransformResult; its changes are summarised into ``notes``."""
    model = getattr(result, "model", None)
    if not isinstance(model, nn.Module):
        raise TransformError(f"{what} returned {type(result).__name__}, not a TransformResult with a model")
    if notes is not None:
        changes = list(getattr(result, "changes", []) or [])
        skipped = list(getattr(result, "skipped", []) or [])
        layers = ", ".join(c.layer for c in changes[:6]) + (" ..." if len(changes) > 6 else "")
        notes.append(f"{what} changed {len(changes)} layer(s)" + (f" ({layers})" if changes else ""))
        if not changes:
            notes.append(f"{what} found nothing to change: this variant trains the same model as the baseline")
        for c in skipped[:4]:
            notes.append(f"{what} skipped {c.layer}: {c.reason}")
    return model


def insert_bn_variant(base: nn.Module, example: torch.Tensor, notes: list[str] | None = None) -> nn.Module:
    """The "bn" variant: ``bnaudit.insert_bn`` on a copy of the base (hidden Linear/Conv layers get
    BatchNorm; the output layer does not).

    Raises:
        TransformError: insert_bn is unavailable or cannot transform this model.
    """
    try:
        from bnaudit.transforms import insert_bn
    except ImportError as exc:
        raise TransformError(
            f"the 'bn' variant needs bnaudit.insert_bn, which cannot be imported ({exc}); "
            "use --variants baseline,user with a model you changed yourself"
        ) from None
    # insert_bn never modifies its input, so the seed's base model stays shared by every variant.
    return _unwrap(insert_bn(base, example=example), "insert_bn", notes)


def swap_norm_variant(base: nn.Module, to: str, example: torch.Tensor, notes: list[str] | None = None) -> nn.Module:
    """The "groupnorm"/"layernorm" variants: the base's BatchNorm layers (inserted first when it has none)
    swapped by ``bnaudit.swap_norm``.

    Raises:
        TransformError: swap_norm is unavailable or cannot transform this model.
    """
    try:
        from bnaudit.transforms import swap_norm
    except ImportError as exc:
        raise TransformError(
            f"the '{to}norm' variant needs bnaudit.swap_norm, which cannot be imported ({exc}); "
            "use --variants baseline,bn"
        ) from None
    with_bn = base if batchnorm_layers(base) else insert_bn_variant(base, example, notes)
    return _unwrap(swap_norm(with_bn, to, example=example), f"swap_norm({to})", notes)


def syncbn_variant(base: nn.Module, example: torch.Tensor, notes: list[str] | None = None) -> nn.Module:
    """The "syncbn" variant: the "bn" model (the base itself when it already has BatchNorm) with every
    BatchNorm swapped for ``nn.SyncBatchNorm`` by ``bnaudit.swap_norm(to="sync")``. Its new BatchNorm layers
    start like the "bn" variant's (weight 1, bias 0), so "bn" and "syncbn" start from identical weights.

    Raises:
        TransformError: insert_bn/swap_norm is unavailable or cannot transform this model.
    """
    try:
        from bnaudit.transforms import swap_norm
    except ImportError as exc:
        raise TransformError(
            f"the 'syncbn' variant needs bnaudit.swap_norm, which cannot be imported ({exc}); use --variants bn"
        ) from None
    with_bn = base if batchnorm_layers(base) else insert_bn_variant(base, example, notes)
    return _unwrap(swap_norm(with_bn, "sync", example=example), "swap_norm(sync)", notes)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear/Conv layers in module order: the layers that variants share."""
    return [(n, m) for n, m in model.named_modules() if is_weight_layer(m)]


def copy_shared_weights(src: nn.Module, dst: nn.Module) -> int:
    """Copy the weights (and biases where both have one) of ``src``'s Linear/Conv layers into ``dst``'s,
    pairing them in module order, as long as the shapes agree.

    Returns:
        How many layers were copied (pairing stops at the first shape mismatch).
    """
    copied = 0
    with torch.no_grad():
        for (_, a), (_, b) in zip(weight_layers(src), weight_layers(dst)):
            if a.weight.shape != b.weight.shape:
                break
            b.weight.copy_(a.weight)
            if getattr(a, "bias", None) is not None and getattr(b, "bias", None) is not None:
                b.bias.copy_(a.bias)
            copied += 1
    return copied


def build_variant(
    name: str,
    base: nn.Module,
    *,
    example: torch.Tensor,
    seed: int,
    reinit: bool,
    user_model: ModelArg | None = None,
) -> tuple[nn.Module, list[str]]:
    """Build one variant from the seed's base model (never modifying ``base``).

    Returns:
        (model, notes): notes say what was shared or could not be.

    Raises:
        UsageError: unknown variant. TransformError: the transform failed.
    """
    notes: list[str] = []
    if name == "baseline":
        return copy.deepcopy(base), notes
    if name == "bn":
        return insert_bn_variant(base, example, notes), notes
    if name == "syncbn":
        return syncbn_variant(base, example, notes), notes
    if name in ("groupnorm", "layernorm"):
        return swap_norm_variant(base, name[: -len("norm")], example, notes), notes
    if name == "user":
        if user_model is None:
            raise UsageError("variant 'user' needs user_model")
        model, notes = base_model(user_model, seed, reinit=reinit)
        shared = copy_shared_weights(base, model)
        total = len(weight_layers(model))
        notes.append(f"user model: {shared}/{total} Linear/Conv layers start from the base model's weights")
        return model, notes
    raise UsageError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
