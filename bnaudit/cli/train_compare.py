"""``bnaudit train-compare``: train MODEL with and without normalization on identical init and batch order,
show a live progress display, then the summary table and the verdict; optionally plots, HTML and JSON. With
``--nproc N`` every run trains under torch.distributed with N DDP processes (``--batch-size`` per device).
torch, rich's live display and matplotlib are imported inside the command only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnaudit.cli.app import command, plan_outputs, print_stdout, stdout
from bnaudit.cli.options import (
    DataOpt,
    DeviceOpt,
    ForceOpt,
    InputKeyOpt,
    ModelArg,
    TrustPickleOpt,
    WeightsOpt,
    split_list,
)
from bnaudit.errors import UsageError

FORMATS = ("table", "json")


def _floats(values: list[str] | None, name: str) -> list[float] | None:
    items = split_list(values)
    if not items:
        return None
    try:
        return [float(v) for v in items]
    except ValueError:
        raise UsageError(f"{name} takes numbers, e.g. {name} 0.01,0.1,1; got {','.join(items)}") from None


def _ints(values: list[str] | None, name: str) -> list[int] | None:
    items = split_list(values)
    if not items:
        return None
    try:
        return [int(v) for v in items]
    except ValueError:
        raise UsageError(f"{name} takes whole numbers, e.g. {name} 16,64; got {','.join(items)}") from None


def _target(text: str) -> float | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--target-loss takes a number, auto or none; got {text!r}") from None


@command("train-compare")
def train_compare_cmd(
    model: ModelArg,
    data: DataOpt = None,
    val_data: Annotated[
        str | None,
        typer.Option("--val-data", help="Validation data (same forms as --data); default: --val-fraction of --data."),
    ] = None,
    variants: Annotated[
        list[str] | None,
        typer.Option(
            "--variants",
            "-V",
            help="Comma list of baseline, bn, syncbn (bn with SyncBatchNorm, for --nproc), groupnorm, layernorm, user.",
        ),
    ] = None,
    lr: Annotated[
        list[str] | None,
        typer.Option("--lr", help="Learning rates, comma list (default sgd 0.01,0.1,1; adam 0.001,0.01,0.1)."),
    ] = None,
    batch_size: Annotated[
        list[str] | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Batch sizes, comma list (default 64). With --nproc N they are per device (per process): "
            "each step trains on a global batch of N × batch size.",
        ),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds per cell (0..N-1): init and batch order.")] = 3,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps per run (default 300).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Epochs per run instead of --steps.")] = None,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd or adam.")] = "sgd",
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.")] = 0.0,
    loss: Annotated[
        str, typer.Option("--loss", help="auto (cross-entropy for integer targets, else MSE), cross_entropy or mse.")
    ] = "auto",
    target_loss: Annotated[
        str,
        typer.Option(
            "--target-loss",
            help="Training loss to reach: a number, auto (1/4 of the constant predictor's loss) or none.",
        ),
    ] = "auto",
    val_fraction: Annotated[
        float,
        typer.Option("--val-fraction", help="Share of --data held out for validation when --val-data is not given."),
    ] = 0.2,
    user_model: Annotated[
        str | None,
        typer.Option("--user-model", help="The 'user' variant: your changed model, same spec forms as MODEL."),
    ] = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    keep_weights: Annotated[
        bool,
        typer.Option(
            "--keep-weights",
            help="Start every seed from MODEL's weights instead of re-initialising (default with --weights).",
        ),
    ] = False,
    no_record: Annotated[
        bool, typer.Option("--no-record", help="Skip the per-layer activation drift (bnaudit.record).")
    ] = False,
    unit_layer: Annotated[
        str | None,
        typer.Option(
            "--unit-layer",
            help="Module whose input unit is followed for the Fig. 1 percentiles (default: last activation).",
        ),
    ] = None,
    unit: Annotated[int, typer.Option("--unit", min=0, help="Channel of --unit-layer's input to follow.")] = 0,
    ics_layer: Annotated[
        str | None,
        typer.Option(
            "--ics-layer",
            help="Also measure Santurkar et al.'s gradient ICS (optimization view) for this Linear/Conv layer.",
        ),
    ] = None,
    input_key: InputKeyOpt = None,
    device: DeviceOpt = "cpu",
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="Intra-op threads for the runs (default 1 below 1M parameters, else min(4, available)).",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Parallel processes for independent runs (CPU only).")
    ] = 1,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Train every run with N DDP processes under torch.distributed (gloo on cpu; NCCL with N GPUs "
            "on cuda); --batch-size is then per device. SyncBatchNorm (syncbn) needs cuda.",
        ),
    ] = 1,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write PNG plots into this folder (needs bnaudit[plot]).")
    ] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Write a self-contained HTML report with the plots.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="table (terminal) or json (every run, every curve).")
    ] = "table",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the table/JSON to this file instead of stdout.")
    ] = None,
    force: ForceOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Train MODEL with and without normalization and compare convergence, stability and drift.

    Every variant starts from the same weights within a seed and sees the same batches in the same order.
    Prints a summary (mean ± std across seeds per variant × learning rate × batch size, best cells
    highlighted) and a verdict in words.

    With [bold]--nproc N[/] every run is trained by N processes with DistributedDataParallel; --batch-size
    is per device and the loss shown is the global-batch loss. Compare BatchNorm, SyncBatchNorm and GroupNorm
    at a small per-device batch with --variants bn,syncbn,groupnorm.

    [bold]Example[/]: bnaudit train-compare examples/deep_sigmoid_digits.py --lr 0.1,1,4 --plot plots/
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    variant_list = split_list(variants) or ["baseline", "bn"]
    lrs = _floats(lr, "--lr")
    batch_sizes = _ints(batch_size, "--batch-size") or [64]
    target = _target(target_loss)
    # Every output is checked before training (a refusal after minutes of work helps no one) and written
    # together at the end: all of them or none.
    plan = plan_outputs([model, data, val_data, user_model, weights])
    plan.file(output, label="--output", replace=force)
    plan.file(html, label="--html", replace=force)
    if plot is not None:
        from bnaudit.report.plots import FIGURES

        # Which figures a run draws depends on its results; any of them may be written.
        plan.folder(plot, [f"{name}.png" for name in FIGURES], label="--plot", replace=force)
    plan.check()
    if plot is not None or html is not None:
        from bnaudit.report.plots import require_matplotlib

        require_matplotlib()  # fail before training when the plot extra is missing

    from bnaudit.api import train_compare
    from bnaudit.cli.progress import live_progress

    progress_ctx, callback = live_progress(quiet)
    with progress_ctx:
        result = train_compare(
            model, data, variants=variant_list, lrs=lrs, batch_sizes=batch_sizes, seeds=seeds, steps=steps,
            epochs=epochs, optimizer=optimizer, momentum=momentum, loss=loss, val_data=val_data,
            val_fraction=val_fraction, target_loss=target, weights=weights, trust_pickle=trust_pickle,
            input_key=input_key, reinit=not (keep_weights or weights is not None), user_model=user_model,
            record=not no_record, unit_layer=unit_layer, unit=unit, ics_layer=ics_layer, device=device,
            threads=threads, workers=workers, nproc=nproc, progress=callback,
        )
    if fmt == "json":
        text = result.to_json()
    else:
        from bnaudit.report.train_compare import render_table

        text = render_table(result, color=output is None and stdout().isatty())
    files: dict[Path, Any] = {}
    if output is not None:
        files[output] = text
    if plot is not None or html is not None:
        from bnaudit.report.plots import figures

        pngs = figures(result)  # drawn once for both the PNG files and the HTML report
        if plot is not None:
            files.update({plot / f"{name}.png": data for name, data in pngs.items()})
        if html is not None:
            from bnaudit.report.html import render

            files[html] = render(result, pngs=pngs)
    plan.commit(files)
    if output is None:
        print_stdout(text)
    for path in (output, html):
        if path is not None:
            typer.echo(f"wrote {path}", err=True)
    if plot is not None:
        names = [f"{name}.png" for name in pngs]
        typer.echo(f"wrote {len(names)} plots to {plot}/ ({', '.join(names)})", err=True)
