"""The options of ``bnaudit train-compare`` (Typer ``Annotated`` types) and the parsing of its comma lists."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnaudit.cli.options import split_list
from bnaudit.errors import UsageError

FORMATS = ("table", "json")

ValDataOpt = Annotated[
    str | None,
    typer.Option("--val-data", help="Validation data (same forms as --data); default: --val-fraction of --data."),
]
VariantsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--variants",
        "-V",
        help="Comma list of baseline, bn, syncbn (bn with SyncBatchNorm, for --nproc), groupnorm, layernorm, user.",
    ),
]
LrOpt = Annotated[
    list[str] | None,
    typer.Option("--lr", help="Learning rates, comma list (default sgd 0.01,0.1,1; adam 0.001,0.01,0.1)."),
]
BatchSizesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--batch-size",
        "-b",
        help="Batch sizes, comma list (default 64). With --nproc N they are per device (per process): "
        "each step trains on a global batch of N × batch size.",
    ),
]
LossOpt = Annotated[
    str, typer.Option("--loss", help="auto (cross-entropy for integer targets, else MSE), cross_entropy or mse.")
]
TargetLossOpt = Annotated[
    str,
    typer.Option(
        "--target-loss",
        help="Training loss to reach: a number, auto (1/4 of the constant predictor's loss) or none.",
    ),
]
ValFractionOpt = Annotated[
    float,
    typer.Option("--val-fraction", help="Share of --data held out for validation when --val-data is not given."),
]
UserModelOpt = Annotated[
    str | None,
    typer.Option("--user-model", help="The 'user' variant: your changed model, same spec forms as MODEL."),
]
KeepWeightsOpt = Annotated[
    bool,
    typer.Option(
        "--keep-weights",
        help="Start every seed from MODEL's weights instead of re-initialising (default with --weights).",
    ),
]
NoRecordOpt = Annotated[
    bool, typer.Option("--no-record", help="Skip the per-layer activation drift (bnaudit.record).")
]
UnitLayerOpt = Annotated[
    str | None,
    typer.Option(
        "--unit-layer",
        help="Module whose input unit is followed for the Fig. 1 percentiles (default: last activation).",
    ),
]
IcsLayerOpt = Annotated[
    str | None,
    typer.Option(
        "--ics-layer",
        help="Also measure Santurkar et al.'s gradient ICS (optimization view) for this Linear/Conv layer.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="Intra-op threads for the runs (default 1 below 1M parameters, else min(4, available)).",
    ),
]
WorkersOpt = Annotated[
    int, typer.Option("--workers", min=1, help="Parallel processes for independent runs (CPU only).")
]
NprocOpt = Annotated[
    int,
    typer.Option(
        "--nproc",
        min=1,
        help="Train every run with N DDP processes under torch.distributed (gloo on cpu; NCCL with N GPUs "
        "on cuda); --batch-size is then per device. SyncBatchNorm (syncbn) needs cuda.",
    ),
]
PlotOpt = Annotated[
    Path | None, typer.Option("--plot", help="Write PNG plots into this folder (needs bnaudit[plot]).")
]
HtmlOpt = Annotated[
    Path | None, typer.Option("--html", help="Write a self-contained HTML report with the plots.")
]
FmtOpt = Annotated[
    str, typer.Option("--format", "-f", help="table (terminal) or json (every run, every curve).")
]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write the table/JSON to this file instead of stdout.")
]


def _numbers(values: list[str] | None, name: str, kind: type, what: str, example: str) -> list | None:
    items = split_list(values)
    if not items:
        return None
    try:
        return [kind(v) for v in items]
    except ValueError:
        raise UsageError(f"{name} takes {what}, e.g. {name} {example}; got {','.join(items)}") from None


def parse_floats(values: list[str] | None, name: str) -> list[float] | None:
    """``--lr 0.01,0.1 --lr 1`` -> [0.01, 0.1, 1.0] (None when not given)."""
    return _numbers(values, name, float, "numbers", "0.01,0.1,1")


def parse_ints(values: list[str] | None, name: str) -> list[int] | None:
    """``--batch-size 16,64`` -> [16, 64] (None when not given)."""
    return _numbers(values, name, int, "whole numbers", "16,64")


def parse_target(text: str) -> float | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--target-loss takes a number, auto or none; got {text!r}") from None
