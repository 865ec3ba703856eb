"""The public functions behind every command. Each takes either spec strings (as the CLI does) or live
objects (an nn.Module, a DataLoader, a function), so people with their own training loops call the same code
the CLI runs. ``bnaudit/__init__.py`` loads them lazily from here."""

from __future__ import annotations

from bnaudit.api.distributed import inspect_distributed
from bnaudit.api.inspection import inspect
from bnaudit.loading import load_data, load_model

__all__ = ["inspect", "inspect_distributed", "load_data", "load_model"]
