"""Data the rule examples of every family share: scikit-learn's digits (real data, bundled, no download) and
seeded random generators. The family-specific factories live in ``examples_<family>.py``."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn


@functools.lru_cache(maxsize=1)
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digits as float32 pixels in [0, 1] (exactly ``k / 16``) and int64 labels, loaded once.
    Shared, not copied: read it, never change it in place (``digits`` gives copies)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def digits(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as (x in [0, 1], labels), the data the example models are trained on: the first ``n``
    samples, or all 1797; a fresh copy each call."""
    x, y = digits_tensors()
    return x[:n].clone(), y[:n].clone()


def seeded(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the examples' random data never touches the global RNG."""
    return torch.Generator().manual_seed(seed)


def train_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    gen: torch.Generator,
    *,
    batch: int = 64,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """A user's training loop: ``steps`` minibatches of ``batch`` samples drawn with ``gen``, cross-entropy,
    one optimizer step each; ``after_step(step)`` runs after each step (an EMA update, a validation pass, a
    recorder's step)."""
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)


__all__ = ["digits", "digits_tensors", "seeded", "train_steps"]
