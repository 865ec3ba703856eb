"""The public functions behind every command. Each takes either spec strings (as the CLI does) or live
objects (an nn.Module, a DataLoader, a function), so people with their own training loops call the same code
the CLI runs. ``bnaudit/__init__.py`` loads them lazily from here; ``prepare`` is the one path by which each
loads its model, data and predict function, chooses the device and builds its example input.

``record`` is the one exception to specs: it watches the user's own training loop, so it takes the live
module being trained (a model built from a spec would not be the one that trains)."""

from __future__ import annotations

from bnaudit.api.distributed import inspect_distributed
from bnaudit.api.fixing import fix
from bnaudit.api.gate import check, run_checks
from bnaudit.api.inspection import inspect
from bnaudit.api.preparation import Prepared, prepare, preserved_rng
from bnaudit.api.training import train_compare
from bnaudit.api.transforms import fold_bn, insert_bn, recalibrate, swap_norm
from bnaudit.loading import load_data, load_model
from bnaudit.recording import record
from bnaudit.watching import watch

__all__ = [
    "Prepared",
    "check",
    "fix",
    "fold_bn",
    "insert_bn",
    "inspect",
    "inspect_distributed",
    "load_data",
    "load_model",
    "prepare",
    "preserved_rng",
    "recalibrate",
    "record",
    "run_checks",
    "swap_norm",
    "train_compare",
    "watch",
]
