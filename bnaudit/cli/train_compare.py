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

    from bnaudit.loading import load_data, load_model

    loaded = load_model(model, weights=weights, trust_pickle=trust_pickle)
    source = load_data(data, namespace=loaded.namespace, batch_size=max(batch_sizes), input_key=input_key)
    if source is None:
        raise UsageError("train-compare needs training data: pass --data (or define build_data in the model file)")
    val_source = load_data(val_data, batch_size=max(batch_sizes), input_key=input_key) if val_data else None
    user = load_model(user_model, trust_pickle=trust_pickle).module if user_model else None

    from bnaudit.training import train_compare

    progress_ctx, callback = _progress(quiet)
    with progress_ctx:
        result = train_compare(
            loaded.module,
            source,
            variants=variant_list,
            lrs=lrs,
            batch_sizes=batch_sizes,
            seeds=seeds,
            steps=steps,
            epochs=epochs,
            optimizer=optimizer,
            momentum=momentum,
            loss=loss,
            val_data=val_source,
            val_fraction=val_fraction,
            target_loss=target,
            reinit=not (keep_weights or weights is not None),
            user_model=user,
            record=not no_record,
            unit_layer=unit_layer,
            unit=unit,
            ics_layer=ics_layer,
            device=device,
            threads=threads,
            workers=workers,
            nproc=nproc,
            progress=callback,
        )
    result.settings["model"] = loaded.spec
    result.settings["data"] = source.spec
    if fmt == "json":
        text = result.to_json()
    else:
        text = _render_table(result, color=output is None and stdout().isatty())
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


def _progress(quiet: bool) -> tuple[Any, Any]:
    """A rich live progress display on stderr (runs, steps, ETA) and the callback feeding it."""
    import contextlib

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return contextlib.nullcontext(), None
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def callback(ev: Any) -> None:
        if ev.kind == "start":
            tasks["all"] = bar.add_task("runs", total=ev.total_runs, info="")
            tasks["steps"] = bar.add_task("steps", total=ev.total_steps, info="")
            return
        info = f"{ev.variant} lr={ev.lr:g} bs={ev.batch_size} seed={ev.seed}"
        if ev.kind == "run":
            tasks["run"] = ev.step
            tasks["last"] = 0
            bar.update(tasks["all"], info=info)
        elif ev.kind == "step":
            bar.update(
                tasks["steps"],
                advance=ev.step - tasks.get("last", 0),
                info=f"loss {ev.loss:.4g}" if ev.loss is not None else "",
            )
            tasks["last"] = ev.step
        elif ev.kind == "done":
            bar.update(tasks["steps"], advance=max(0, ev.total_steps - tasks.get("last", 0)))
            tasks["last"] = 0
            res = ev.result
            status = (
                "diverged" if res is not None and res.diverged else f"{res.seconds:.1f}s" if res is not None else ""
            )
            bar.update(tasks["all"], advance=1, info=f"{info}: {status}")

    return bar, callback


def _render_table(result: Any, *, color: bool) -> str:
    """The summary table, the verdict and the notes as terminal text (rich)."""
    import io

    from rich.console import Console
    from rich.table import Table

    from bnaudit.training.table import HEADERS, summary_rows

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=color, no_color=not color, width=120 if not color else None)
    s = result.settings
    table = Table(
        title=f"train-compare: {s.get('optimizer')}, loss {s.get('loss')}, target loss {s.get('target_loss')}, "
        f"{len(s.get('seeds', []))} seeds (mean ± std)"
        + (f", {s.get('nproc')} processes: batch per device" if int(s.get("nproc") or 1) > 1 else ""),
        title_justify="left",
    )
    for h in HEADERS:
        table.add_column(h, justify="left" if h == "variant" else "right")
    for row in summary_rows(result):
        table.add_row(*[f"[bold green]{v}*[/]" if h in row.best else v for h, v in zip(HEADERS, row.cells)])
    console.print(table)
    console.print("* best in its column among cells without divergence", style="dim")
    console.print()
    for line in result.verdict:
        console.print(f"- {line}", highlight=False)
    for variant, why in getattr(result, "unavailable", {}).items():
        console.print(f"- {variant}: unavailable here, not run ({why})", highlight=False)
    nproc = int(s.get("nproc") or 1)
    if nproc > 1:
        dist = s.get("distributed") or {}
        where = f"{nproc} processes ({dist.get('backend')}, DistributedDataParallel)"
        console.print(
            f"\n{where}: batch = per-device batch; global batch = {nproc} × batch "
            f"({', '.join(str(b) for b in s.get('global_batch_sizes', []))}); losses are global-batch losses",
            highlight=False,
        )
        workers = f"{s.get('threads')} thread(s) per process"
        shown: set[str] = set()
        for run in result.runs:  # BN402's evidence: one line per variant (its first run)
            for note in run.notes:
                if "across the" in note and run.variant not in shown:
                    shown.add(run.variant)
                    console.print(f"- {run.variant} (lr {run.lr:g}, seed {run.seed}): {note}", highlight=False)
    else:
        workers = f"{s.get('threads')} thread(s), {s.get('workers')} worker(s)"
    console.print(
        f"\n{len(result.runs)} runs in {s.get('seconds_total', 0):.1f} s ({s.get('seconds_per_run', 0):.2f} s per run, "
        f"{workers})",
        style="dim",
        highlight=False,
    )
    for note in result.notes:
        console.print(f"note: {note}", style="dim", highlight=False)
    return buf.getvalue()
