"""What kind of layer a module is: normalization, BatchNorm, activation, dropout, Linear/Conv.

One place for these checks so that every rule and transform agrees, and third-party subclasses
(SyncBatchNorm, LazyBatchNorm, a vendor's BatchNorm2d subclass) are recognised the same way everywhere.

Normalization is recognised beyond torch's classes (``is_norm``): much of the model zoo normalizes with
classes of its own (timm's RmsNorm2d, LayerNorm2d, EvoNorm2dB0/S0, FilterResponseNormTlu2d; torchvision's and
detectron2's FrozenBatchNorm2d; apex's FusedLayerNorm), known by a class name with "Norm" in it or by running
statistics among their buffers. Where a rule needs BatchNorm's own semantics (running buffers updated by
momentum, ``track_running_stats``, train/eval behaviour), ``is_batchnorm`` stays the strict isinstance check.

``eval_mode`` runs a block with every module in eval mode and puts each module's own flag back."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.GLU,
)
DROPOUTS: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
NORMS: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, _InstanceNorm, nn.LocalResponseNorm, nn.RMSNorm)

# Functional spellings of activations as they appear in torch.fx graphs and in __torch_function__ calls.
ACTIVATION_FUNCTIONS = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "rrelu", "elu", "elu_", "selu", "selu_",
    "celu", "gelu", "silu", "mish", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardsigmoid",
    "hardtanh", "hardtanh_", "softplus", "softsign", "logsigmoid", "threshold", "glu",
})
DROPOUT_FUNCTIONS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"})
# Functional spellings of normalization, as they appear on graph edges when a module normalizes inside its
# own forward (F.layer_norm in a block that is not itself a normalization layer).
NORM_FUNCTIONS = frozenset({
    "layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm", "local_response_norm", "normalize",
})
# Softmax divides by its own sum: what enters it comes out as weights of a convex combination, whatever its
# scale. Scaled dot-product attention applies one to its logits (queries, keys and its bias/mask).
SOFTMAXES: tuple[type[nn.Module], ...] = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)
SOFTMAX_FUNCTIONS = frozenset({"softmax", "softmin", "log_softmax", "scaled_dot_product_attention"})
# Operations that move values around without mixing channels or adding anything: a per-channel constant
# survives them unchanged, so a bias before them is still cancelled by a following BatchNorm.
RESHAPE_FUNCTIONS = frozenset({
    "view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "clone", "to", "float", "type_as",
    "identity", "__getitem__", "getitem",
})


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` in eval mode for the block; each module's own training flag is put back
    afterwards, whatever happens (``model.train()`` would not restore a BatchNorm the user holds in eval)."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm layer in ``model`` (``_BatchNorm`` subclasses: BatchNorm1d/2d/3d, their lazy forms,
    SyncBatchNorm) by qualified name, in module order. A layer registered twice appears once, under its first
    name; the model itself appears under ``""`` when it is a BatchNorm."""
    return {name: m for name, m in model.named_modules() if is_batchnorm(m)}


# "Norm" in a class name, but not "Normal..." (Normalize transforms, initialisers).
_NORM_NAME = re.compile(r"Norm(?!al)")
# Buffers only a normalization layer keeps.
_NORM_BUFFERS = frozenset({"running_mean", "running_var"})


def is_norm(m: nn.Module) -> bool:
    """Whether ``m`` is a normalization layer: one of torch's, or a class of its own named like one (…Norm…,
    FrozenBatchNorm…) or keeping running statistics among its buffers. A module that holds a Linear/Conv
    (timm's NormMlpClassifierHead, a weight-normalized Linear) is a block or a weight layer, not a norm."""
    if isinstance(m, NORMS):
        return True
    if not (_NORM_NAME.search(type(m).__name__) or _NORM_BUFFERS & set(m._buffers)):
        return False
    return not any(is_weight_layer(sub) for sub in m.modules())


def is_activation(m: nn.Module) -> bool:
    return isinstance(m, ACTIVATIONS)


def is_dropout(m: nn.Module) -> bool:
    return isinstance(m, DROPOUTS)


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Bilinear, nn.LazyLinear))


def is_conv(m: nn.Module) -> bool:
    return isinstance(m, _ConvNd)


def is_weight_layer(m: nn.Module) -> bool:
    """Linear or Conv (transposed included): the layers BatchNorm is inserted after."""
    return is_linear(m) or is_conv(m)


def out_features(m: nn.Module) -> int | None:
    """Output channels/features of a Linear or Conv layer, or None."""
    if is_conv(m):
        return int(m.out_channels)
    if is_linear(m):
        return int(m.out_features) if not isinstance(m, nn.LazyLinear) or m.out_features else None
    return None


def has_bias(m: nn.Module) -> bool:
    return isinstance(getattr(m, "bias", None), torch.Tensor)


def norm_kind(m: nn.Module) -> str | None:
    """A short label for the normalization a module performs, for the per-layer table."""
    if is_batchnorm(m):
        return "batch"
    if isinstance(m, nn.GroupNorm):
        return "group"
    if isinstance(m, nn.LayerNorm):
        return "layer"
    if isinstance(m, _InstanceNorm):
        return "instance"
    if isinstance(m, nn.RMSNorm):
        return "rms"
    if isinstance(m, nn.LocalResponseNorm):
        return "local-response"
    if not is_norm(m):
        return None
    name = type(m).__name__
    for part, kind in (("FrozenBatchNorm", "frozen-batch"), ("BatchNorm", "batch"), ("GroupNorm", "group"),
                       ("LayerNorm", "layer"), ("InstanceNorm", "instance"), ("RmsNorm", "rms"), ("RMSNorm", "rms"),
                       ("EvoNorm", "evo"), ("FilterResponseNorm", "filter-response")):
        if part in name:
            return kind
    return "batch" if _NORM_BUFFERS & set(m._buffers) else "other"


def param_count(m: nn.Module) -> int:
    total = 0
    for p in m.parameters(recurse=False):
        if isinstance(p, nn.parameter.UninitializedParameter):
            continue
        total += p.numel()
    return total
