"""Option declarations shared by several commands (MODEL, --data, --weights, ...), so every command spells
and documents them the same way. Only typer and the standard library are imported here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelArg = Annotated[
    str,
    typer.Argument(
        help="The model: [bold]PATH.py[:NAME][/] (NAME defaults to build_model), [bold]package.module:NAME[/], "
        "or a .pt file written by bnaudit. NAME is an nn.Module or a zero-argument function/class returning one.",
        show_default=False,
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", "-d",
        help="Batches to probe with: PATH.py[:NAME] (default build_data in the model file), package.module:NAME, "
        "random:SHAPE (e.g. random:3x32x32), or a .pt/.npz/.csv file.",
    ),
]
PredictOpt = Annotated[
    str | None,
    typer.Option("--predict", help="Your inference function predict(model, inputs): PATH.py:NAME (default: predict in the model file)."),
]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", "-w", help="A state_dict file to load (torch.load weights_only=True, or .safetensors).")
]
TrustPickleOpt = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow a .pt MODEL that holds a whole pickled module (runs code from the file).")
]
InputShapeOpt = Annotated[
    str | None, typer.Option("--input-shape", help="One sample's shape, e.g. 3x32x32, when there is no --data.")
]
InputKeyOpt = Annotated[str | None, typer.Option("--input-key", help="The input's key when batches are dicts.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Batch size where bnaudit batches the data itself.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]


def split_list(values: list[str] | None) -> list[str]:
    """``--select BN1,BN2 --select BN301`` -> ["BN1", "BN2", "BN301"]."""
    out: list[str] = []
    for v in values or []:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out
