"""The options of ``bnaudit insert-bn``, ``fold-bn`` and ``swap-norm`` (Typer ``Annotated`` types) and the
preparation options they all pass on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

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


def prep(
    input_shape: str | None, input_key: str | None, batch_size: int, predict: str | None, weights: Path | None,
    trust_pickle: bool, device: str,
) -> dict[str, Any]:
    """The preparation options every transform command passes on (the CLI infers an example input when it
    has neither data nor a shape)."""
    return {"input_shape": input_shape, "input_key": input_key, "batch_size": batch_size, "predict": predict,
            "weights": weights, "trust_pickle": trust_pickle, "device": device, "infer_example": True}


__all__ = ["BnEpsOpt", "BnMomentumOpt", "CalibrateBatchesOpt", "CalibrateOpt", "DryRunOpt", "EvalOpt", "GroupsOpt",
           "IncludeOutputOpt", "KeepBiasOpt", "LayersOpt", "OutOpt", "PlacementOpt", "ToOpt", "prep"]
