"""``bnaudit train-compare``: train MODEL with and without normalization on identical init and batch order,
show a live progress display, then the summary table and the verdict; optionally plots, HTML and JSON. With
``--nproc N`` every run trains under torch.distributed with N DDP processes (``--batch-size`` per device).
The outputs are planned, drawn and rendered by ``bnaudit.report.train_compare_files``; torch, rich's live
display and matplotlib are imported inside the command only."""

from __future__ import annotations

from typing import Annotated

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
from bnaudit.cli.train_compare_options import (
    FORMATS,
    BatchSizesOpt,
    FmtOpt,
    HtmlOpt,
    IcsLayerOpt,
    KeepWeightsOpt,
    LossOpt,
    LrOpt,
    NoRecordOpt,
    NprocOpt,
    OutputOpt,
    PlotOpt,
    TargetLossOpt,
    ThreadsOpt,
    UnitLayerOpt,
    UserModelOpt,
    ValDataOpt,
    ValFractionOpt,
    VariantsOpt,
    WorkersOpt,
    parse_floats,
    parse_ints,
    parse_target,
)
from bnaudit.errors import UsageError


@command("train-compare")
def train_compare_cmd(
    model: ModelArg,
    data: DataOpt = None,
    val_data: ValDataOpt = None,
    variants: VariantsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchSizesOpt = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds per cell (0..N-1): init and batch order.")] = 3,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps per run (default 300).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Epochs per run instead of --steps.")] = None,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd or adam.")] = "sgd",
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.")] = 0.0,
    loss: LossOpt = "auto",
    target_loss: TargetLossOpt = "auto",
    val_fraction: ValFractionOpt = 0.2,
    user_model: UserModelOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    keep_weights: KeepWeightsOpt = False,
    no_record: NoRecordOpt = False,
    unit_layer: UnitLayerOpt = None,
    unit: Annotated[int, typer.Option("--unit", min=0, help="Channel of --unit-layer's input to follow.")] = 0,
    ics_layer: IcsLayerOpt = None,
    input_key: InputKeyOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    workers: WorkersOpt = 1,
    nproc: NprocOpt = 1,
    plot: PlotOpt = None,
    html: HtmlOpt = None,
    fmt: FmtOpt = "table",
    output: OutputOpt = None,
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
    lrs = parse_floats(lr, "--lr")
    batch_sizes = parse_ints(batch_size, "--batch-size") or [64]
    target = parse_target(target_loss)
    from bnaudit.report.train_compare_files import comparison_files, plan_comparison, render_comparison

    plan = plan_outputs([model, data, val_data, user_model, weights])
    plan_comparison(plan, output=output, html=html, plot=plot, force=force)

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
    text = render_comparison(result, fmt, color=output is None and stdout().isatty())
    files, pngs = comparison_files(result, text, output=output, html=html, plot=plot)
    plan.commit(files)
    if output is None:
        print_stdout(text)
    for path in (output, html):
        if path is not None:
            typer.echo(f"wrote {path}", err=True)
    if plot is not None:
        typer.echo(f"wrote {len(pngs)} plots to {plot}/ ({', '.join(pngs)})", err=True)
