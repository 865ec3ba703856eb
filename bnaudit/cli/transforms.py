"""``bnaudit insert-bn``, ``bnaudit fold-bn`` and ``bnaudit swap-norm``: the model transforms.

Each command loads MODEL (and, when given, an example input and calibration data), calls one function of
``bnaudit.transforms``, prints the before/after architecture diff and the list of changes, writes the new
model atomically with ``-o OUT`` (never over an existing file without --force) and prints the command to run
next. torch is imported inside the commands so that ``bnaudit --help`` stays fast."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bnaudit.cli.app import command, plan_outputs, stdout_console
from bnaudit.cli.options import (
    BatchSizeOpt,
    DataOpt,
    DeviceOpt,
    ForceOpt,
    InputKeyOpt,
    InputShapeOpt,
    ModelArg,
    PredictOpt,
    TrustPickleOpt,
    WeightsOpt,
    split_list,
)
from bnaudit.errors import UsageError

if TYPE_CHECKING:
    from bnaudit.api.transforms import Transformed

OutOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Where to write the new model (.pt; loads back in bnaudit and torch)."),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would change; write nothing.")]


def _text(text: str, style: str = "") -> Any:
    """A rich Text: module reprs contain brackets that console markup would swallow."""
    from rich.text import Text

    return Text(text, style=style)


def _console() -> Any:
    return stdout_console(highlight=False, soft_wrap=True)


def _show(done: Transformed, *, title: str) -> None:
    from rich.table import Table

    from bnaudit.transforms import architecture_diff

    setup, result = done.prepared, done.result
    console = _console()
    console.print(_text(f"{title}: {setup.spec}", style="bold"))
    if setup.example_note:
        console.print(_text(f"example input: {setup.example_note}", style="dim"))
    lines = architecture_diff(setup.model, result.model)
    if lines:
        console.print(_text("architecture (before -> after):", style="bold"))
        for line in lines:
            style = {"+": "green", "-": "red", "@": "cyan"}.get(line[:1], "dim")
            console.print(_text(line, style=style))
    if result.changes or result.skipped:
        table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
        table.add_column("")
        table.add_column("layer", overflow="fold")
        table.add_column("change", overflow="fold")
        table.add_column("why", overflow="fold")
        for c in result.changes:
            table.add_row(_text(c.action, style="green"), c.layer, c.detail, c.reason)
        for c in result.skipped:
            table.add_row(_text("skip", style="yellow"), c.layer, c.detail, c.reason)
        console.print(table)
    console.print(_text(result.summary(), style="bold"))


def _finish(done: Transformed, output: Path | None, plan: Any) -> None:
    import torch

    from bnaudit.transforms.saving import saved_dict

    setup, result = done.prepared, done.result
    console = _console()
    if plan is None:
        console.print(_text("dry run: nothing written"))
        return
    assert output is not None
    payload = saved_dict(result, setup.spec)
    path = plan.commit({output: lambda tmp: torch.save(payload, tmp)})[0]
    out = shlex.quote(str(path))
    console.print(_text(f"wrote {path}"))
    data = f" --data {shlex.quote(setup.data_spec)}" if setup.data_spec else " --data DATA"
    console.print(_text("next:", style="bold"))
    console.print(_text(f"  bnaudit inspect {out}{data if setup.data_spec else ''}"))
    if result.name == "insert_bn":
        console.print(_text(f"  bnaudit train-compare {out}{data}"))
    console.print(_text(
        f"  python -c \"import bnaudit.transforms as t; m = t.load({str(path)!r})\"", style="dim"
    ))


def _prep(
    input_shape: str | None, input_key: str | None, batch_size: int, predict: str | None, weights: Path | None,
    trust_pickle: bool, device: str,
) -> dict[str, Any]:
    """The preparation options every transform command passes on (the CLI infers an example input when it
    has neither data nor a shape)."""
    return {"input_shape": input_shape, "input_key": input_key, "batch_size": batch_size, "predict": predict,
            "weights": weights, "trust_pickle": trust_pickle, "device": device, "infer_example": True}


def _need_output(output: Path | None, dry_run: bool, force: bool, inputs: list[Any]) -> Any:
    """The output plan for ``-o`` (None with --dry-run), checked before the (slow) load and transform."""
    if dry_run:
        return None
    if output is None:
        raise UsageError("give -o OUT.pt for the new model (or --dry-run to only show the changes)")
    plan = plan_outputs(inputs)
    plan.file(output, label="--output", replace=force)
    plan.check()
    return plan


@command("insert-bn")
def insert_bn_cmd(
    model: ModelArg,
    output: OutOpt = None,
    layers: Annotated[
        list[str], typer.Option("--layers", help="Layer kinds that get BatchNorm: conv, linear or conv,linear.")
    ] = ["conv,linear"],  # noqa: B006 - typer needs the list default
    include_output: Annotated[bool, typer.Option("--include-output", help="Normalize the output layer too.")] = False,
    placement: Annotated[
        str, typer.Option("--placement", help="after-layer (Linear/Conv -> BN -> activation) or after-activation.")
    ] = "after-layer",
    keep_bias: Annotated[
        bool, typer.Option("--keep-bias", help="Keep the bias of layers followed by BatchNorm.")
    ] = False,
    calibrate: Annotated[
        str | None,
        typer.Option(
            "--calibrate", help="DATA whose statistics make the new model compute the same function in eval mode."
        ),
    ] = None,
    calibrate_batches: Annotated[
        int | None, typer.Option("--calibrate-batches", min=1, help="Use at most this many calibration batches.")
    ] = None,
    momentum: Annotated[float, typer.Option("--momentum", help="Momentum of the new BatchNorms.")] = 0.1,
    eps: Annotated[float, typer.Option("--eps", help="eps of the new BatchNorms.")] = 1e-5,
    data: DataOpt = None,
    input_shape: InputShapeOpt = None,
    input_key: InputKeyOpt = None,
    batch_size: BatchSizeOpt = 32,
    predict: PredictOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "cpu",
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
) -> None:
    """Put BatchNorm after MODEL's hidden Linear/Conv layers, before their activations, and save the new model.

    BatchNorm1d after Linear and Conv1d, BatchNorm2d after Conv2d, BatchNorm3d after Conv3d; not on the output
    layer, not where a normalization layer already follows. Shapes come from an example input (--data,
    --input-shape, the model file's build_data, or one inferred from the first layer). With --calibrate the new
    model computes the same function as the old one in eval mode.

    [bold]Example[/]: bnaudit insert-bn model.py -o model_bn.pt --calibrate model.py:build_data
    """
    plan = _need_output(output, dry_run, force, [model, data, calibrate, predict, weights])
    from bnaudit.api.transforms import insert_bn_prepared

    done = insert_bn_prepared(
        model, data, layers=split_list(layers), skip_output=not include_output, placement=placement,
        drop_bias=not keep_bias, calibrate=calibrate, calibrate_batches=calibrate_batches, momentum=momentum,
        eps=eps, **_prep(input_shape, input_key, batch_size, predict, weights, trust_pickle, device),
    )
    _show(done, title="insert-bn")
    if done.result.max_abs_error is not None:
        err = done.result.max_abs_error
        _console().print(_text(f"calibrated: max abs eval-output difference to the original {err:.3g}"))
    _finish(done, output, plan)


@command("fold-bn")
def fold_bn_cmd(
    model: ModelArg,
    output: OutOpt = None,
    eval_mode: Annotated[
        bool,
        typer.Option("--eval", help="Put the model in eval mode first (models from a factory start in train mode)."),
    ] = False,
    data: DataOpt = None,
    input_shape: InputShapeOpt = None,
    input_key: InputKeyOpt = None,
    batch_size: BatchSizeOpt = 32,
    predict: PredictOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "cpu",
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
) -> None:
    """Fuse eval-mode BatchNorm into the Linear/Conv before it, for inference, and report the max abs error.

    Folding uses the running statistics, so a model in training mode is refused: pass --eval to switch it to
    eval mode (or return model.eval() from your factory).

    [bold]Example[/]: bnaudit fold-bn model_bn.pt --eval -o model_folded.pt --input-shape 3x32x32
    """
    plan = _need_output(output, dry_run, force, [model, data, predict, weights])
    from bnaudit.api.transforms import fold_bn_prepared

    done = fold_bn_prepared(
        model, data, eval_mode=eval_mode,
        **_prep(input_shape, input_key, batch_size, predict, weights, trust_pickle, device),
    )
    _show(done, title="fold-bn")
    if done.result.max_abs_error is None:
        _console().print(_text("max abs error not measured: no example input (pass --data or --input-shape)"))
    _finish(done, output, plan)


@command("swap-norm")
def swap_norm_cmd(
    model: ModelArg,
    to: Annotated[str, typer.Option("--to", help="group, layer, instance, frozen or sync.")],
    output: OutOpt = None,
    groups: Annotated[
        int | None,
        typer.Option("--groups", min=1, help="GroupNorm groups for every layer (default: per layer, <= 32)."),
    ] = None,
    data: DataOpt = None,
    input_shape: InputShapeOpt = None,
    input_key: InputKeyOpt = None,
    batch_size: BatchSizeOpt = 32,
    predict: PredictOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "cpu",
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
) -> None:
    """Replace every BatchNorm in MODEL by another normalization and save the new model.

    --to group: GroupNorm (the small-batch fix), group count = largest divisor of C <= 32 leaving >= 2
    channels per group. layer: GroupNorm(1, C). instance: InstanceNorm. frozen: FrozenBatchNorm (fixed
    statistics, same eval output). sync: SyncBatchNorm for multi-GPU training.

    [bold]Example[/]: bnaudit swap-norm model.py --to group -o model_gn.pt --input-shape 3x32x32
    """
    from bnaudit.transforms.swap_norm import TARGETS

    if to not in TARGETS:
        raise UsageError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    plan = _need_output(output, dry_run, force, [model, data, predict, weights])
    from bnaudit.api.transforms import swap_norm_prepared

    done = swap_norm_prepared(
        model, to, data, groups=groups,
        **_prep(input_shape, input_key, batch_size, predict, weights, trust_pickle, device),
    )
    _show(done, title=f"swap-norm --to {to}")
    _finish(done, output, plan)
