"""Finding the models a script trains, with no names given.

torch's global optimizer hooks (``register_optimizer_step_pre_hook`` / ``post_hook``) show every optimizer of
the process at its steps. At an optimizer's first step its parameters say what it trains; the models are the
root modules that own those parameters: every live ``nn.Module`` (the garbage collector's list, scanned once
per new optimizer) that is no other module's child and holds at least one of them. A
``DistributedDataParallel``/``DataParallel`` wrapper (``.module``) and a ``torch.compile`` wrapper
(``_orig_mod``) are unwrapped, so the watched module is the user's own. Two optimizers over separate models
(a GAN's generator and discriminator) give two models; a second optimizer over a model already found joins
it (its steps do not count as the model's steps: the first optimizer's do).

Cost: nothing per module call; at each optimizer step a dictionary lookup (the optimizer is known after its
first step)."""

from __future__ import annotations

import gc
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["find_roots", "is_compiled", "model_name", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP/DataParallel and ``torch.compile`` wrappers."""
    for _ in range(8):
        inner = None
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner = model._orig_mod
        if inner is None:
            return model
        model = inner
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is (or wraps) a ``torch.compile`` module."""
    for _ in range(8):
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            return True
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return False
    return False


def find_roots(params: Iterable[torch.Tensor]) -> list[tuple[nn.Module, bool]]:
    """The root modules owning any of ``params``, unwrapped, each with whether it was compiled; in the
    order their parameters come first in ``params``."""
    order = {id(p): i for i, p in enumerate(params)}
    if not order:
        return []
    # type(), not isinstance(): a weak proxy claims its referent's class (and fails once it is dead), and a
    # deprecated torch alias warns when asked
    modules = [o for o in gc.get_objects() if issubclass(type(o), nn.Module)]
    children = {id(c) for m in modules for c in m.children()}
    found: dict[int, tuple[int, nn.Module, bool]] = {}
    for m in modules:
        if id(m) in children:
            continue
        first = min((order[id(p)] for p in m.parameters() if id(p) in order), default=None)
        if first is None:
            continue
        inner = unwrap(m)
        prev = found.get(id(inner))
        if prev is None or first < prev[0]:
            found[id(inner)] = (first, inner, is_compiled(m) or (prev is not None and prev[2]))
    return [(m, compiled) for _, m, compiled in sorted(found.values(), key=lambda t: t[0])]


def model_name(model: nn.Module, taken: Iterable[str]) -> str:
    """The model's class name, with ``-2``, ``-3``... when another watched model has it already."""
    base = type(model).__name__
    taken = set(taken)
    if base not in taken:
        return base
    k = 2
    while f"{base}-{k}" in taken:
        k += 1
    return f"{base}-{k}"
