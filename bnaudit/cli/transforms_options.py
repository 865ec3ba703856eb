"""The options of ``bnaudit insert-bn``, ``fold-bn`` and ``swap-norm`` (Typer ``Annotated`` types) and the
options they all share, declared once (``with_shared_options``)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from bnaudit.cli import options as o

OutOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Where to write the new model (.pt; loads back in bnaudit and torch)."),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would change; write nothing.")]
LayersOpt = Annotated[
    list[str], typer.Option("--layers", help="Layer kinds that get BatchNorm: conv, linear or conv,linear.")
]
IncludeOutputOpt = Annotated[bool, typer.Option("--include-output", help="Normalize the output layer too.")]
PlacementOpt = Annotated[
    str, typer.Option("--placement", help="after-layer (Linear/Conv -> BN -> activation) or after-activation.")
]
KeepBiasOpt = Annotated[bool, typer.Option("--keep-bias", help="Keep the bias of layers followed by BatchNorm.")]
CalibrateOpt = Annotated[
    str | None,
    typer.Option(
        "--calibrate", help="DATA whose statistics make the new model compute the same function in eval mode."
    ),
]
CalibrateBatchesOpt = Annotated[
    int | None, typer.Option("--calibrate-batches", min=1, help="Use at most this many calibration batches.")
]
BnMomentumOpt = Annotated[float, typer.Option("--momentum", help="Momentum of the new BatchNorms.")]
BnEpsOpt = Annotated[float, typer.Option("--eps", help="eps of the new BatchNorms.")]
EvalOpt = Annotated[
    bool, typer.Option("--eval", help="Put the model in eval mode first (models from a factory start in train mode).")
]
ToOpt = Annotated[str, typer.Option("--to", help="group, layer, instance, frozen or sync.")]
GroupsOpt = Annotated[
    int | None, typer.Option("--groups", min=1, help="GroupNorm groups for every layer (default: per layer, <= 32).")
]


# The options every transform command takes after its own, in this order: name -> (type, default).
_SHARED = {
    "data": (o.DataOpt, None),
    "input_shape": (o.InputShapeOpt, None),
    "input_key": (o.InputKeyOpt, None),
    "batch_size": (o.BatchSizeOpt, 32),
    "predict": (o.PredictOpt, None),
    "weights": (o.WeightsOpt, None),
    "trust_pickle": (o.TrustPickleOpt, False),
    "device": (o.DeviceOpt, "cpu"),
    "dry_run": (DryRunOpt, False),
    "force": (o.ForceOpt, False),
}


def with_shared_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give the command ``fn`` the options every transform shares (``--data`` ... ``--force``), declared
    once: they join the end of its command line, and ``fn`` receives them as one ``shared`` dict."""
    hints = get_type_hints(fn, include_extras=True)
    own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values()
           if p.name != "shared"]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    added = [inspect.Parameter(name, kind, annotation=ann, default=default) for name, (ann, default) in _SHARED.items()]

    @functools.wraps(fn)
    def with_shared(**kwargs: Any) -> Any:
        shared = {name: kwargs.pop(name) for name in _SHARED}
        return fn(**kwargs, shared=shared)

    # Typer reads the command line from the signature and the resolved annotations.
    with_shared.__signature__ = inspect.Signature([*own, *added])  # type: ignore[attr-defined]
    with_shared.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
    return with_shared


def prep(shared: dict[str, Any]) -> dict[str, Any]:
    """The preparation options a transform passes on to ``bnaudit.api.transforms`` (the CLI infers an
    example input when it has neither data nor a shape)."""
    keys = ("input_shape", "input_key", "batch_size", "predict", "weights", "trust_pickle", "device")
    return {**{k: shared[k] for k in keys}, "infer_example": True}


__all__ = ["BnEpsOpt", "BnMomentumOpt", "CalibrateBatchesOpt", "CalibrateOpt", "DryRunOpt", "EvalOpt", "GroupsOpt",
           "IncludeOutputOpt", "KeepBiasOpt", "LayersOpt", "OutOpt", "PlacementOpt", "ToOpt", "prep",
           "with_shared_options"]
