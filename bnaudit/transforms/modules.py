"""The modules the transforms put into a model now live in ``bnaudit.loading.modules``, next to the model file
format that rebuilds them. This module keeps the old import path, which models pickled with
``torch.save(model)`` name: every attribute is read from the new home."""

from typing import Any

from bnaudit.loading import modules as _home


def __getattr__(name: str) -> Any:
    return getattr(_home, name)
