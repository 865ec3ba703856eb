"""Shared fixtures for the train-compare tests: the real digits data (sklearn's bundled copy) and the
examples folder on sys.path so the example modules import their neighbour ``bundled_data``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# The keys every run in `--format json` must carry: the documented contract (README, issue 6), spelled out
# here rather than read from the library so that a renamed key fails the tests.
RUN_KEYS = frozenset({
    "variant", "lr", "batch_size", "seed", "losses", "final_loss", "val_loss", "val_accuracy", "steps_to_target",
    "diverged",
})


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x, torch.tensor(d.target)


@pytest.fixture(scope="session")
def small_digits(digits: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits
    return x[:400], y[:400]


def load_example(name: str):
    """Import examples/<name>.py with the examples folder importable (as the CLI's loader does)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))
