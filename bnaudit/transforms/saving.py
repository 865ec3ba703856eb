"""Saving a transformed model so that bnaudit and plain torch load it back, without pickled code.

The file is a ``torch.save``'d dict that ``torch.load(path, weights_only=True)`` reads safely::

    {"bnaudit_format": 1, "bnaudit_version": "0.1.0",
     "source": "/abs/path/model.py:build_model",          # how to build the original architecture
     "transforms": [{"name": "insert_bn", "options": {...}, "plan": [...]}],   # replayable edits, in order
     "transform": {"name": "insert_bn", "options": {...}},  # the last one, for a quick look
     "training": false,                                     # the saved model's top-level mode
     "state_dict": {...}}                                   # every parameter and buffer, on CPU

Loading (``load_saved``) builds the source model again from its spec, replays each plan (plain records of
which module to wrap or replace by which whitelisted normalization class), and loads the state_dict
strictly. A relative ``.py`` source is stored as an absolute path so the file loads from any folder, and a
source that is itself a bnaudit file is inlined (its source and transforms are copied), so chains such as
insert-bn then fold-bn do not depend on the intermediate file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnaudit.errors import BnauditError, TransformError, WeightsError
from bnaudit.files import atomic_write
from bnaudit.transforms.base import TransformResult, apply_plan, pristine_copy

FORMAT = 1
_MODEL_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def _plain(value: Any) -> Any:
    """Options and plans as the plain containers ``weights_only`` loading accepts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def resolve_source(spec: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """The source spec to store and the transforms it already carries.

    ``model.py:NAME`` becomes ``/abs/model.py:NAME``; a bnaudit-saved ``.pt`` file contributes its own source
    and transform chain; anything else (``package.module:NAME``) is kept as written.

    Returns:
        (source spec, list of earlier transform records).
    """
    text = str(spec)
    if text.endswith(_MODEL_SUFFIXES):
        path = Path(text).expanduser()
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - not a bnaudit file (or a pickled module): keep it as a path
            obj = None
        if isinstance(obj, dict) and "bnaudit_format" in obj:
            return str(obj["source"]), list(obj.get("transforms", []))
        return str(path.resolve()), []
    head, sep, tail = text.rpartition(":")
    if sep and head.endswith(".py"):
        return f"{Path(head).expanduser().resolve()}:{tail}", []
    if text.endswith(".py"):
        return str(Path(text).expanduser().resolve()), []
    return text, []


def saved_dict(result: TransformResult, source: str | Path) -> dict[str, Any]:
    """The dict ``save_model`` writes (exposed for callers that store it elsewhere)."""
    base, chain = resolve_source(source)
    record = {"name": result.name, "options": _plain(result.options), "plan": _plain(result.plan)}
    state = {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}
    from bnaudit import __version__

    return {
        "bnaudit_format": FORMAT,
        "bnaudit_version": __version__,
        "source": base,
        "transforms": [*chain, record],
        "transform": {"name": result.name, "options": record["options"]},
        "training": bool(result.model.training),
        "state_dict": state,
    }


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
    payload = saved_dict(result, source)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp), force=force)


def _check(obj: Any, where: str) -> None:
    if not isinstance(obj, dict) or "bnaudit_format" not in obj:
        raise WeightsError(f"{where} is not a model file written by bnaudit (no 'bnaudit_format' key)")
    fmt = obj["bnaudit_format"]
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise WeightsError(f"{where} has bnaudit_format {fmt!r}; this bnaudit reads format {FORMAT}: upgrade bnaudit")
    for key in ("source", "transforms", "state_dict"):
        if key not in obj:
            raise WeightsError(f"{where} lacks the {key!r} entry; the file is damaged")


def load_into(model: nn.Module, obj: dict[str, Any], *, where: str = "the saved file") -> nn.Module:
    """Rebuild a saved model on top of a freshly built source model (which is not modified).

    Use it when you build the original architecture yourself::

        obj = torch.load("model_bn.pt", weights_only=True)
        model = load_into(build_model(), obj)

    Args:
        model: the original, untransformed architecture (its weights do not matter).
        obj: the dict read from the file.
        where: the file name, for messages.

    Returns:
        A new module with every saved transform replayed and the saved weights loaded strictly.

    Raises:
        WeightsError: the dict is not a bnaudit file, or its plan or weights do not fit ``model``.
    """
    _check(obj, where)
    work = pristine_copy(model)
    try:
        for record in obj["transforms"]:
            apply_plan(work, record.get("plan") or [])
    except (TransformError, ValueError, KeyError) as exc:
        raise WeightsError(f"{where}: replaying its transforms on {obj['source']} failed: {exc}") from exc
    try:
        work.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise WeightsError(
            f"{where}: its weights do not fit the rebuilt model ({' '.join(lines[1:3])[:240]}); "
            "was the source model changed since the file was written?"
        ) from exc
    work.train(bool(obj.get("training", False)))
    return work


def load_saved(obj: dict[str, Any], path: Path) -> nn.Module:
    """Rebuild the model stored in a bnaudit file: build its source from the spec, replay, load weights.

    Args:
        obj: the dict ``torch.load(path, weights_only=True)`` returned.
        path: the file, for messages.

    Returns:
        The transformed model, in the mode it was saved in.

    Raises:
        WeightsError: the dict is damaged, from a newer format, or does not fit the rebuilt source.
        SpecError: the source spec no longer builds (file moved or changed).
    """
    from bnaudit.errors import SpecError
    from bnaudit.loading import load_model

    _check(obj, str(path))
    try:
        source = load_model(str(obj["source"])).module
    except BnauditError as exc:
        raise SpecError(f"{path}: cannot rebuild its source model {obj['source']} ({exc})") from exc
    return load_into(source, obj, where=str(path))


def load(path: str | Path) -> nn.Module:
    """Load a model file written by ``save_model`` (or ``bnaudit insert-bn -o``).

    Raises:
        WeightsError: the file is missing, unreadable or not a bnaudit model file.
        SpecError: its source model cannot be rebuilt.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"model file {p} not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for corrupt files
        raise WeightsError(f"{p}: cannot read it as a torch file ({type(exc).__name__})") from exc
    return load_saved(obj, p)
