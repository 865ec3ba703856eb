"""What the BN3xx experiments share: the user's inputs taken apart and put together again (a batch's size,
some of its samples, several batches as one, one sample's output), seeded runs, and the BatchNorm layers'
state (which track running statistics, which have trained or frozen affine parameters, a hash of every
buffer, a mode that computes batch statistics without dropout noise).

Train-mode statistics are collected with BatchNorm layers in train mode and every other module (dropout
above all) in eval mode, so they describe the data rather than dropout noise."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from bnaudit.graph import default_run as forward  # model(inputs), as the audit's graph pass calls it
from bnaudit.layers import eval_mode, is_batchnorm

Predict = Callable[[nn.Module, Any], Any]


def _first_dim(leaf: Any) -> int | None:
    if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
        return int(leaf.shape[0])
    return None


def batch_size(inputs: Any) -> int | None:
    """The number of samples in ``inputs`` (a tensor or a tuple/list/dict of tensors): the leading size of
    its first tensor, or None when it holds no tensor with a batch dimension."""
    for leaf in tree_flatten(inputs)[0]:
        n = _first_dim(leaf)
        if n is not None:
            return n
    return None


def take(inputs: Any, index: Sequence[int]) -> Any:
    """The samples ``index`` of ``inputs``, in that order: every tensor whose leading size is the batch
    size is indexed, anything else (a mask shared by all samples, a flag) is passed through."""
    n = batch_size(inputs)
    idx = torch.as_tensor(list(index), dtype=torch.long)
    return tree_map(lambda x: x[idx.to(x.device)] if _first_dim(x) == n else x, inputs)


def concat(parts: Sequence[Any]) -> Any:
    """Concatenate batches of the same structure along the batch dimension.

    Raises:
        ValueError: the batches do not share one structure.
    """
    flat = [tree_flatten(p) for p in parts]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        raise ValueError("batches differ in structure")
    sizes = [batch_size(p) for p in parts]
    leaves = []
    for i, leaf in enumerate(flat[0][0]):
        if _first_dim(leaf) == sizes[0]:
            leaves.append(torch.cat([f[0][i] for f in flat]))
        else:
            leaves.append(leaf)
    return tree_unflatten(leaves, spec)


def sample_output(output: Any, n: int, position: int) -> torch.Tensor:
    """One sample's output as a flat float64 vector: row ``position`` of every output tensor whose leading
    size is the batch size ``n``.

    Raises:
        ValueError: the output holds no tensor with a batch dimension of size ``n``.
    """
    rows = [
        leaf[position].detach().reshape(-1).to(torch.float64).cpu()
        for leaf in tree_flatten(output)[0]
        if _first_dim(leaf) == n
    ]
    if not rows:
        raise ValueError(f"the output has no tensor with a leading batch dimension of {n}")
    return torch.cat(rows)


def first_output_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor in a model's output (logits for most classifiers)."""
    for leaf in tree_flatten(output)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None):
    """Seed torch's global RNG for the block and restore the caller's RNG state afterwards, so two calls
    draw the same dropout masks and the user's random stream is left where it was."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm layer (``_BatchNorm`` subclass, SyncBatchNorm included) by qualified name."""
    return {name: m for name, m in model.named_modules() if is_batchnorm(m)}


def tracks_running_stats(m: nn.Module) -> bool:
    return bool(getattr(m, "track_running_stats", False)) and getattr(m, "running_mean", None) is not None


def _varies(t: torch.Tensor) -> bool:
    flat = t.detach().reshape(-1)
    return flat.numel() > 1 and bool((flat != flat[0]).any())


def affine_trained(m: nn.Module) -> bool | None:
    """Whether a normalization layer's affine parameters show training: None without affine parameters.

    Initialisation sets each of gamma and beta to one constant per layer: 1 and 0 by default, but gamma = 0
    for the last BatchNorm of a residual branch (torchvision's ``zero_init_residual``, timm's
    ``zero_init_last`` in resnet26t, resnetrs, regnet, repvit) and other constants elsewhere; DCGAN-style
    code draws gamma around 1 but keeps beta at 0. Gradient steps move the channels of both apart, so they
    count as trained only when every one of them varies from channel to channel."""
    params = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, torch.Tensor)]
    if not params:
        return None
    return all(_varies(p) for p in params)


def affine_frozen(m: nn.Module) -> bool:
    """True when the layer has affine parameters and none of them requires grad."""
    params = list(m.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def _hash(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous()
    # view as bytes so that every dtype (bfloat16 included) hashes without a numpy conversion
    raw = data.reshape(-1).view(torch.uint8) if data.numel() else data.reshape(-1)
    return hashlib.sha256(bytes(raw.numpy().tobytes()) + str((data.dtype, tuple(data.shape))).encode()).hexdigest()


def buffer_hashes(model: nn.Module) -> dict[str, str]:
    """sha256 of every buffer's bytes, dtype and shape, by qualified buffer name."""
    return {name: _hash(b) for name, b in model.named_buffers() if b is not None}


@contextmanager
def bn_statistics_mode(model: nn.Module):
    """BatchNorm layers in train mode, every other module in eval mode (dropout off), for the block; every
    module's own training flag is restored afterwards, whatever happens."""
    with eval_mode(model):
        for m in model.modules():
            if is_batchnorm(m):
                m.train()
        yield model


__all__ = [
    "Predict",
    "affine_frozen",
    "affine_trained",
    "batch_size",
    "bn_layers",
    "bn_statistics_mode",
    "buffer_hashes",
    "concat",
    "first_output_tensor",
    "forward",
    "sample_output",
    "seeded",
    "short_error",
    "take",
    "tracks_running_stats",
]
