"""Saving a transformed model in bnaudit's model file format (``bnaudit.loading.modelfile``), so that bnaudit
and plain torch load it back without pickled code.

What is transform-specific lives here: turning a ``TransformResult`` (its model, name, options and plan) into
the file's dict and writing it. Reading the file back (``load``, ``load_saved``, ``load_into``) belongs to
``bnaudit.loading``; ``bnaudit.transforms`` re-exports those names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnaudit.loading.modelfile import model_file_dict, write_model_file
from bnaudit.transforms.base import TransformResult


def saved_dict(result: TransformResult, source: str | Path) -> dict[str, Any]:
    """The dict ``save_model`` writes (exposed for callers that store it elsewhere)."""
    return model_file_dict(result.model, source=source, name=result.name, options=result.options, plan=result.plan)


def save_model(result: TransformResult, path: str | Path, *, source: str | Path, force: bool = False) -> Path:
    """Write a transformed model atomically (a temporary file renamed into place).

    Args:
        result: what ``insert_bn``/``fold_bn``/``swap_norm`` returned.
        path: the output file (``.pt``).
        source: the MODEL spec the original was loaded from (``model.py:build_model``, ``pkg.mod:NAME`` or a
            bnaudit ``.pt`` file); it must rebuild the original architecture when the file is loaded.
        force: replace an existing file.

    Returns:
        The path written.

    Raises:
        OutputError: the file exists without ``force``, or its folder is missing.
    """
    return write_model_file(saved_dict(result, source), path, force=force)
