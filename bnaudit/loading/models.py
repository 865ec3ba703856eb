"""Loading the model to audit: from a Python spec (a module instance or a zero-argument factory), from a
file saved by bnaudit (rebuilt safely: its source from the spec, then its plans and weights through
``bnaudit.loading.modelfile``), or — only with ``trust_pickle`` — from a whole pickled module. Weights files
are read with ``torch.load(weights_only=True)`` or safetensors, never unpickled by default."""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnaudit import usercode
from bnaudit.errors import BnauditError, SpecError, WeightsError
from bnaudit.loading.modelfile import MODEL_FILE_SUFFIXES, check_model_file, is_model_file, load_into, read_model_file
from bnaudit.loading.specs import describe_exception, import_target, lookup, missing_file, parse_py_spec

_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass
class LoadedModel:
    """A model and where it came from.

    Attributes:
        module: the nn.Module.
        spec: the spec text (or the class name for an object passed in).
        source_path: the .py or .pt file it came from, when known.
        namespace: the Python module the spec pointed into (to find build_data / predict), or None.
        named: what the spec named in it (a factory function, a class or an instance), or None.
    """

    module: nn.Module
    spec: str
    source_path: Path | None = None
    namespace: types.ModuleType | None = None
    named: Any = None


def _call_factory(obj: Any, spec: str) -> Any:
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise SpecError(f"{spec}: names a {type(obj).__name__}, not an nn.Module or a function returning one")
    needs = required_arguments(obj)
    if needs:
        raise SpecError(
            f"{spec}: calling it with no arguments failed (it needs {', '.join(needs)}); point the spec at a "
            "zero-argument function, e.g. "
            "def build_model(): return MyNet(num_features=64)"
        )
    return usercode.call(obj, spec=spec, action="building the model", argv0=_file_of(obj) or spec)


def required_arguments(fn: Any) -> list[str]:
    """Names of the parameters ``fn()`` would be missing (empty when it can be called with no arguments, or
    when its signature cannot be read)."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [
        p.name for p in sig.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _file_of(obj: Any) -> str | None:
    code = getattr(obj, "__code__", None) or getattr(getattr(obj, "__init__", None), "__code__", None)
    return getattr(code, "co_filename", None)


def load_model(
    spec: str | nn.Module | Path,
    *,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Resolve a MODEL spec.

    Args:
        spec: ``PATH.py:NAME``, ``PATH.py`` (NAME defaults to ``build_model``), ``package.module:NAME``, a
            ``.pt`` file written by bnaudit (or a pickled module with ``trust_pickle``), or an nn.Module.
        weights: a state_dict file (``.pt``/``.pth`` via ``torch.load(weights_only=True)``, ``.safetensors``).
        trust_pickle: allow unpickling a whole module from a ``.pt`` file (runs code from the file).

    Returns:
        The LoadedModel.

    Raises:
        SpecError: the spec names nothing usable.
        WeightsError: the weights cannot be read or do not match the model.
    """
    if isinstance(spec, nn.Module):
        loaded = LoadedModel(spec, type(spec).__name__)
    else:
        text = str(spec)
        if text.endswith(MODEL_FILE_SUFFIXES):
            loaded = _load_model_file(Path(text), trust_pickle=trust_pickle)
        else:
            py = parse_py_spec(text)
            if py is None and Path(text).exists() and not Path(text).is_file():
                raise SpecError(f"{text}: {missing_file(Path(text))}")
            if py is None:
                raise SpecError(
                    f"{text}: not a model spec; use PATH.py, PATH.py:NAME, package.module:NAME or a .pt file saved by bnaudit"
                )
            namespace = import_target(py)
            obj = lookup(namespace, py.attr or "build_model", text, "model")
            module = _call_factory(obj, text)
            if not isinstance(module, nn.Module):
                raise SpecError(f"{text}: returned a {type(module).__name__}, not a torch.nn.Module; return the model itself")
            loaded = LoadedModel(module, text, py.path.resolve() if py.path else _module_file(namespace), namespace, obj)
    if weights is not None:
        load_weights(loaded.module, weights)
    return loaded


def _module_file(namespace: types.ModuleType) -> Path | None:
    f = getattr(namespace, "__file__", None)
    return Path(f) if f else None


def _torch_load_safe(path: Path, what: str) -> Any:
    if not path.is_file():
        raise WeightsError(f"{what} {missing_file(path)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for unsafe or corrupt files
        # Only a pickle that names Python classes or functions (GLOBAL) needs --trust-pickle; anything else
        # torch cannot read (random bytes, a truncated file, a text file) is simply not a torch file.
        if "Unsupported global" in str(exc):
            raise _UnsafePickle(str(exc)) from exc
        raise WeightsError(
            f"{path}: not a file torch.save wrote, or a damaged one ({_torch_error(exc)}); check the path"
        ) from exc


def _torch_error(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("WeightsUnpickler error:", "Unpickler error:"):
        if marker in text:
            detail = text.split(marker, 1)[1].strip().splitlines()
            return f"{type(exc).__name__}: {detail[0].strip()}" if detail else type(exc).__name__
    return describe_exception(exc)


class _UnsafePickle(Exception):
    pass


def _load_model_file(path: Path, *, trust_pickle: bool) -> LoadedModel:
    try:
        obj = _torch_load_safe(path, "model")
    except WeightsError as exc:
        raise SpecError(str(exc)) from exc
    except _UnsafePickle:
        if not trust_pickle:
            raise SpecError(
                f"{path} holds a pickled Python object, which can run arbitrary code when loaded; pass "
                "--trust-pickle only if you trust the file, or save model.state_dict() and use "
                "MODEL.py:build_model --weights FILE"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise SpecError(f"{path}: unpickling failed ({describe_exception(exc)})") from exc
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, str(path), path.resolve())
    if is_model_file(obj):
        return LoadedModel(load_saved(obj, path), str(path), path.resolve())
    if isinstance(obj, dict):
        raise SpecError(
            f"{path} holds weights only (a state_dict), not an architecture; run "
            f"`bnaudit inspect MODEL.py:build_model --weights {path}`"
        )
    raise SpecError(f"{path} holds a {type(obj).__name__}, not a model")


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
    check_model_file(obj, str(path))
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
    return load_saved(read_model_file(path), Path(path))


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    raise WeightsError(f"{path} holds no state_dict (expected a dict of tensors, or a checkpoint with a 'state_dict' key)")


def load_weights(model: nn.Module, weights: str | Path) -> None:
    """Load a state_dict file into ``model`` strictly (a ``module.`` prefix from DDP is stripped).

    Raises:
        WeightsError: unreadable file, a pickled object without weights, or keys/shapes that do not match.
    """
    path = Path(weights)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise WeightsError(f"weights file {path} not found")
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise WeightsError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)") from None
        state = load_file(str(path))
    else:
        try:
            obj = _torch_load_safe(path, "weights")
        except _UnsafePickle:
            raise WeightsError(
                f"{path} is not a plain state_dict (it needs unpickling); save model.state_dict() instead"
            ) from None
        state = _extract_state_dict(obj, path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = " ".join(lines[1:3]) if len(lines) > 1 else lines[0]
        raise WeightsError(f"{path} does not match the model: {detail[:300]}") from exc
    del result
