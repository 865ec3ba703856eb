"""bnaudit's model file format, both sides: writing a model with the plan that rebuilds it, and reading one back
without pickled code.

The file is a ``torch.save``'d dict that ``torch.load(path, weights_only=True)`` reads safely::

    {"bnaudit_format": 1, "bnaudit_version": "0.1.0",
     "source": "/abs/path/model.py:build_model",          # how to build the original architecture
     "transforms": [{"name": "insert_bn", "options": {...}, "plan": [...]}],   # replayable edits, in order
     "transform": {"name": "insert_bn", "options": {...}},  # the last one, for a quick look
     "training": false,                                     # the saved model's top-level mode
     "state_dict": {...}}                                   # every parameter and buffer, on CPU

Reading (``load_into``) replays each plan (``bnaudit.loading.plan``: plain records of which module to wrap or
replace by which whitelisted normalization class) on a fresh copy of the source model and loads the
state_dict strictly. Building that source model from its spec is ``load_model``'s job, so ``load_saved`` and
``load``, which do both, live in ``bnaudit.loading.models``. A relative ``.py`` source is stored as an
absolute path so the file loads from any folder, and a source that is itself a bnaudit file is inlined (its
source and transforms are copied), so chains such as insert-bn then fold-bn do not depend on the
intermediate file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnaudit.errors import TransformError, WeightsError
from bnaudit.files import atomic_write
from bnaudit.loading.plan import apply_plan, pristine_copy

FORMAT = 1
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def is_model_file(obj: Any) -> bool:
    """True when ``obj`` (what ``torch.load`` returned) is a dict in bnaudit's model file format."""
    return isinstance(obj, dict) and "bnaudit_format" in obj


def holds_model_file(path: str | Path) -> bool:
    """True when ``path`` is a file in bnaudit's model file format; False for anything else, including what
    ``torch.load(weights_only=True)`` refuses (a pickled module, a missing or damaged file)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled module or anything else: not ours
        return False
    return is_model_file(obj)


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
    if text.endswith(MODEL_FILE_SUFFIXES):
        path = Path(text).expanduser()
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - not a bnaudit file (or a pickled module): keep it as a path
            obj = None
        if is_model_file(obj):
            return str(obj["source"]), list(obj.get("transforms", []))
        return str(path.resolve()), []
    head, sep, tail = text.rpartition(":")
    if sep and head.endswith(".py"):
        return f"{Path(head).expanduser().resolve()}:{tail}", []
    if text.endswith(".py"):
        return str(Path(text).expanduser().resolve()), []
    return text, []


def model_file_dict(
    model: nn.Module,
    *,
    source: str | Path,
    name: str,
    options: Mapping[str, Any],
    plan: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The dict a model file holds for ``model``, made from ``source`` by the transform ``name`` whose
    structural edits are ``plan``; the transforms ``source`` already carries come first."""
    base, chain = resolve_source(source)
    record = {"name": name, "options": _plain(options), "plan": _plain(plan)}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from bnaudit import __version__

    return {
        "bnaudit_format": FORMAT,
        "bnaudit_version": __version__,
        "source": base,
        "transforms": [*chain, record],
        "transform": {"name": name, "options": record["options"]},
        "training": bool(model.training),
        "state_dict": state,
    }


def write_model_file(payload: Mapping[str, Any], path: str | Path, *, force: bool = False) -> Path:
    """Write a ``model_file_dict`` atomically (a temporary file renamed into place).

    Returns:
        The path written.

    Raises:
        OutputError: the file exists without ``force``, or its folder is missing.
    """
    return atomic_write(path, lambda tmp: torch.save(dict(payload), tmp), force=force)


def check_model_file(obj: Any, where: str) -> None:
    """Refuse what is not a model file this bnaudit can read.

    Raises:
        WeightsError: not a bnaudit file, a newer format, or a required entry is missing.
    """
    if not is_model_file(obj):
        raise WeightsError(f"{where} is not a model file written by bnaudit (no 'bnaudit_format' key)")
    fmt = obj["bnaudit_format"]
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise WeightsError(f"{where} has bnaudit_format {fmt!r}; this bnaudit reads format {FORMAT}: upgrade bnaudit")
    for key in ("source", "transforms", "state_dict"):
        if key not in obj:
            raise WeightsError(f"{where} lacks the {key!r} entry; the file is damaged")


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The dict in a model file, read with ``weights_only=True`` (no format check: see ``check_model_file``).

    Raises:
        WeightsError: the file is missing or torch cannot read it.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"model file {p} not found")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for corrupt files
        raise WeightsError(f"{p}: cannot read it as a torch file ({type(exc).__name__})") from exc


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
    check_model_file(obj, where)
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
