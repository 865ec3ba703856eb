"""The small modules the transforms put into a model, and the whitelist that rebuilds them from a saved plan.

``NormalizedLayer`` is the ``nn.Sequential(layer, norm)`` wrapper insert-bn puts where a layer was: a
Sequential, so any user forward that calls ``self.conv1(x)`` keeps working, that also answers attribute
reads (``self.conv1.weight``, ``.out_channels``) from the wrapped layer, so code that inspects the layer keeps
working too. ``FeatureBatchNorm1d`` is a BatchNorm1d that normalizes the *last* axis, the one a Linear layer
writes its features to, whatever the rank of its input (``(N, C)``, ``(N, L, C)``, ...).
``FrozenBatchNorm1d/2d/3d`` apply fixed running statistics and affine parameters, held as buffers, so
nothing in them trains or moves (detectron2/torchvision's FrozenBatchNorm2d, for any rank).
``build_module`` turns a ``{"type": ..., "args": {...}}`` record back into one of a fixed set of module
classes: saved files name classes only from this list, so loading one never imports arbitrary code."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class NormalizedLayer(nn.Sequential):
    """``nn.Sequential(layer, norm)`` that also exposes the wrapped layer's attributes.

    ``wrapper.weight`` is ``wrapper[0].weight``: model code that reads a layer's parameters or sizes
    (weight tying, ``self.fc.out_features``, fast paths that check ``self.linear1.weight``) keeps working
    after the layer is wrapped. Calling the wrapper runs the layer, then the normalization.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Never forward private or dunder names: copy/pickle probe them before _modules exists.
            modules = self.__dict__.get("_modules")
            if name.startswith("_") or not modules or "0" not in modules:
                raise
            return getattr(modules["0"], name)


class FeatureBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the last axis, for the output of a Linear layer applied to ``(N, *, C)`` input.

    On ``(N, C)`` it is exactly ``nn.BatchNorm1d``; on ``(N, L, C)`` (a Linear over a sequence) it
    normalizes each of the C features over all N*L positions, which is what BatchNorm after that Linear
    means. Its state_dict keys are BatchNorm1d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2:
            return super().forward(x)
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics: ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    All four tensors are buffers: an optimizer never sees them and ``train()`` changes nothing, which is
    what small-batch fine-tuning of a pretrained backbone wants. The channel axis is 1 (``(N, C, *)``), or
    the last axis when ``channel_last`` is set (the frozen form of FeatureBatchNorm1d).

    Args:
        num_features: number of channels C.
        eps: added to the variance, as in the BatchNorm it replaces.
        channel_last: normalize the last axis instead of axis 1.
    """

    _dims: int | None = None

    def __init__(self, num_features: int, eps: float = 1e-5, channel_last: bool = False) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.channel_last = bool(channel_last)
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        if self.channel_last or x.dim() < 2:
            return x * scale + shift
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(view) + shift.reshape(view)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + (", channel_last=True" if self.channel_last else "")


class FrozenBatchNorm1d(FrozenBatchNorm):
    """FrozenBatchNorm for ``(N, C)`` / ``(N, C, L)`` input (or the last axis with ``channel_last``)."""


class FrozenBatchNorm2d(FrozenBatchNorm):
    """FrozenBatchNorm for ``(N, C, H, W)`` input."""


class FrozenBatchNorm3d(FrozenBatchNorm):
    """FrozenBatchNorm for ``(N, C, D, H, W)`` input."""


# Classes a saved plan may name; nothing else is ever constructed from a file.
_BUILDABLE: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, FeatureBatchNorm1d, nn.SyncBatchNorm,
        nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
        FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, nn.Identity,
    )
}
_ARG_TYPES = (bool, int, float, str, type(None))


def module_record(module: nn.Module, **args: Any) -> dict[str, Any]:
    """The plan record that rebuilds ``module``: its class name and constructor arguments."""
    name = type(module).__name__
    if name not in _BUILDABLE:
        raise ValueError(f"{name} cannot be recorded in a plan")
    return {"type": name, "args": dict(args)}


def build_module(record: dict[str, Any], like: nn.Module | None = None) -> nn.Module:
    """Construct the module a plan record describes, on the device and dtype of ``like``'s first tensor.

    Args:
        record: ``{"type": class name, "args": {constructor keyword arguments}}``.
        like: a module whose parameters/buffers give the device and floating dtype, or None (CPU, default).

    Returns:
        The new module (freshly initialised; the caller loads its state).

    Raises:
        ValueError: the class is not one bnaudit builds, or an argument is not a plain value.
    """
    cls = _BUILDABLE.get(str(record.get("type")))
    if cls is None:
        raise ValueError(f"unknown module type {record.get('type')!r} in the saved plan")
    args = record.get("args") or {}
    if not all(isinstance(v, _ARG_TYPES) for v in args.values()) and not all(
        isinstance(v, (list, tuple)) for v in args.values() if not isinstance(v, _ARG_TYPES)
    ):
        raise ValueError(f"{record.get('type')}: plan arguments must be plain values")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    module = cls(**args)
    if like is not None:
        ref = next((t for t in [*like.parameters(), *like.buffers()] if t.is_floating_point()), None)
        if ref is not None:
            module = module.to(device=ref.device, dtype=ref.dtype)
    return module
