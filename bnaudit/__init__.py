"""bnaudit: audit a PyTorch model's normalization behaviour.

The public API (``bnaudit.inspect``, ``bnaudit.insert_bn``, ``bnaudit.train_compare``, ``bnaudit.record``,
...) is loaded lazily from ``bnaudit.api`` so that ``import bnaudit`` and ``bnaudit --help`` do not import
torch."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "inspect": "bnaudit.api",
    "load_model": "bnaudit.api",
    "load_data": "bnaudit.api",
    "prepare": "bnaudit.api",
    "insert_bn": "bnaudit.api",
    "fold_bn": "bnaudit.api",
    "swap_norm": "bnaudit.api",
    "recalibrate": "bnaudit.api",
    "record": "bnaudit.api",
    "watch": "bnaudit.api",
    "train_compare": "bnaudit.api",
    "check": "bnaudit.api",
    "run_checks": "bnaudit.api",
    "inspect_distributed": "bnaudit.api",
    "fix": "bnaudit.api",
    "Report": "bnaudit.findings",
    "Finding": "bnaudit.findings",
    "BnauditError": "bnaudit.errors",
}


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'bnaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
