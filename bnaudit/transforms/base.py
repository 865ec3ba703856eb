"""What every model transform shares: the ``Change`` and ``TransformResult`` records, the inputs a transform
runs its model on, and the before/after presentation.

A transform never edits the model it is given. It deep-copies it, decides from the layer graph what to
change, and records each structural edit as a plan step that ``bnaudit.loading.plan.apply_plan`` performs.
The same plan, stored in a saved file, rebuilds the architecture later without re-deciding anything, so a
saved model loads back identically even without the data or example input it was made with."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from bnaudit.errors import DataError, TransformError
from bnaudit.graph import LayerGraph, build_graph
from bnaudit.layers import eval_mode

RunFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class Change:
    """One thing a transform did, or decided not to do.

    Attributes:
        action: ``insert``, ``fold``, ``swap`` or ``skip``.
        layer: qualified name (in the original model) of the layer the change is about.
        detail: what was done, e.g. ``BatchNorm2d(64) after Conv2d(3, 64, ...)``.
        reason: why (for ``skip``: why the layer was left alone).
        new: qualified name of the new or changed module in the result model, when there is one.
    """

    action: str
    layer: str
    detail: str
    reason: str = ""
    new: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action, "layer": self.layer, "detail": self.detail, "reason": self.reason, "new": self.new
        }

    def __str__(self) -> str:
        text = f"{self.action} {self.layer}: {self.detail}"
        return f"{text} ({self.reason})" if self.reason else text


@dataclass
class TransformResult:
    """The outcome of a transform: the new model and the list of what changed.

    Attributes:
        name: the transform (``insert_bn``, ``fold_bn``, ``swap_norm``).
        model: the new model; the input model is untouched.
        changes: what was changed, in model order.
        skipped: candidate layers left alone, each with the reason.
        options: the options the transform ran with (stored in saved files).
        plan: the structural edits, replayable with ``apply_plan`` on a fresh copy of the source model.
        max_abs_error: for transforms meant to keep the function (fold-bn, calibrated insert-bn, frozen
            swap): the largest absolute difference between old and new eval-mode outputs on the example
            input; None when not measured.
        graph_method: how the layer graph was found (``fx`` or ``hooks``), or "" when none was needed.
    """

    name: str
    model: nn.Module
    changes: list[Change] = field(default_factory=list)
    skipped: list[Change] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    plan: list[dict[str, Any]] = field(default_factory=list)
    max_abs_error: float | None = None
    graph_method: str = ""

    def summary(self) -> str:
        """One line: how many changes and skips, and the measured error when there is one."""
        text = f"{self.name}: {len(self.changes)} changed, {len(self.skipped)} skipped"
        if self.max_abs_error is not None:
            text += f", max abs error {self.max_abs_error:.3g}"
        return text


# --------------------------------------------------------------------------------------------- inputs
# The transforms call a model with bnaudit.graph.default_run and move a batch with
# bnaudit.loading.data.move_to: one way each, shared with the audit.


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """The device of the model's first tensor and the dtype of its first floating tensor."""
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    return device, dtype


def iter_inputs(data: Any, limit: int | None = None) -> Iterator[Any]:
    """Model inputs from anything a caller may pass as data.

    Accepts a tensor or an ``(inputs, targets)`` tuple of tensors (one batch), a bnaudit DataSource (its
    batches' inputs), or an iterable of batches (a DataLoader, a list) where a batch is a tensor, an
    ``(inputs, targets)`` tuple/list, a dict, or an object with ``.inputs``.

    Raises:
        DataError: the object yields no batches or is not data.
    """
    if isinstance(data, torch.Tensor):
        yield data
        return
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(v, torch.Tensor) for v in data):
        yield data[0]  # an (inputs, targets) pair is one batch; a list of tensors is several
        return
    if hasattr(data, "batches") and callable(data.batches):
        source: Iterable[Any] = (b.inputs for b in data.batches(limit=limit))
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
        source = data
    else:
        raise DataError(f"calibration data is a {type(data).__name__}; pass a tensor, a DataLoader or a DataSource")
    count = 0
    for batch in source:
        if limit is not None and count >= limit:
            return
        if hasattr(batch, "inputs"):
            batch = batch.inputs
        elif isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], (int, float)):
            batch = batch[0]
        count += 1
        yield batch
    if count == 0:
        raise DataError("the data yields no batches; check the data (empty dataset?)")


def first_input(data: Any) -> Any:
    """The first batch of model inputs in ``data`` (see ``iter_inputs``)."""
    for inputs in iter_inputs(data, limit=1):
        return inputs
    raise DataError("the data yields no batches; check the data (empty dataset?)")


def _tensors(value: Any) -> list[torch.Tensor]:
    flat, _ = tree_flatten(value)
    return [t for t in flat if isinstance(t, torch.Tensor)]


@torch.no_grad()
def eval_outputs(model: nn.Module, example: Any, run: RunFn) -> list[torch.Tensor]:
    """The model's eval-mode output tensors on ``example``; every module's training flag is restored."""
    with eval_mode(model):
        return [t.detach().clone() for t in _tensors(run(model, example))]


def max_abs_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute elementwise difference between two lists of output tensors (inf on a shape mismatch)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    if not a:
        return 0.0
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))


def transform_graph(work: nn.Module, example: Any, run: RunFn) -> LayerGraph:
    """The layer graph a transform decides from, traced on ``example``.

    Raises:
        TransformError: no example and the graph cannot be found without one.
        DataError: the model's forward fails on the example.
    """
    try:
        return build_graph(work, example, run=run)
    except ValueError as exc:
        if example is None:
            raise TransformError(
                f"{exc}; pass example= (CLI: --data DATA or --input-shape 3x32x32)"
            ) from exc
        raise DataError(f"the model rejected the example input ({type(exc).__name__}: {str(exc)[:160]})") from exc
    except Exception as exc:  # noqa: BLE001 - whatever the user's forward raises on the example
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise DataError(
            f"the model raised {type(exc).__name__} on the example input ({first}); "
            "check the input shape (--input-shape) or the data"
        ) from exc


# ----------------------------------------------------------------------------------------- presentation


def architecture_diff(before: nn.Module, after: nn.Module, context: int = 1) -> list[str]:
    """A unified diff of ``print(before)`` against ``print(after)``: the before/after architecture.

    Returns:
        Diff lines without the file headers, each starting with ``+``, ``-``, `` `` or ``@@``.
    """
    lines = difflib.unified_diff(str(before).splitlines(), str(after).splitlines(), lineterm="", n=context)
    return [ln for ln in lines if not ln.startswith(("---", "+++"))]


def describe(module: nn.Module) -> str:
    """A compact label: the class and its size, e.g. ``BatchNorm2d(64)``, ``GroupNorm(32, 64)``, ``Conv2d(3, 64)``."""
    name = type(module).__name__
    if isinstance(module, nn.GroupNorm):
        return f"{name}({module.num_groups}, {module.num_channels})"
    if isinstance(module, nn.LayerNorm):
        return f"{name}({', '.join(map(str, module.normalized_shape))})"
    if hasattr(module, "num_features"):
        return f"{name}({module.num_features})"
    if hasattr(module, "out_channels") and hasattr(module, "in_channels"):
        return f"{name}({module.in_channels}, {module.out_channels})"
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return f"{name}({module.in_features}, {module.out_features})"
    return name
