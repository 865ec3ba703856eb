"""The public functions behind every command. Each takes either spec strings (as the CLI does) or live
objects (an nn.Module, a DataLoader, a function), so people with their own training loops call the same code
the CLI runs. ``bnaudit/__init__.py`` loads them lazily from here; ``prepare`` is the one path by which each
loads its model, data and predict function, chooses the device and builds its example input."""

from __future__ import annotations

from bnaudit.api.distributed import inspect_distributed
from bnaudit.api.inspection import inspect
from bnaudit.api.preparation import Prepared, prepare, preserved_rng
from bnaudit.api.transforms import fold_bn, insert_bn, recalibrate, swap_norm
from bnaudit.loading import load_data, load_model

__all__ = [
    "Prepared",
    "fold_bn",
    "insert_bn",
    "inspect",
    "inspect_distributed",
    "load_data",
    "load_model",
    "prepare",
    "preserved_rng",
    "recalibrate",
    "swap_norm",
]
