"""``bnaudit insert-bn``, ``bnaudit fold-bn`` and ``bnaudit swap-norm``: the model transforms.

Each command calls one function of ``bnaudit.api.transforms`` (which loads MODEL, an example input and
calibration data), shows the before/after architecture diff and the list of changes
(``bnaudit.report.transforms``), writes the new model atomically with ``-o OUT`` (never over an existing file
without --force) and shows the commands to run next. torch is imported inside the commands only."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.cli import options as o
from bnaudit.cli import transforms_options as t
from bnaudit.cli.app import command, plan_model_output, print_view
from bnaudit.errors import UsageError

if TYPE_CHECKING:
    from bnaudit.api.transforms import Transformed


def _render(done: Transformed, *, title: str, output: Path | None, plan: Any) -> None:
    """Show the change; then write the new model (none with --dry-run) and show the commands to run next."""
    from bnaudit.report.transforms import model_written, transform_view

    setup, result = done.prepared, done.result
    print_view(transform_view(setup.spec, setup.example_note, setup.model, result, title=title))
    if plan is None:
        print_view([("dry run: nothing written", "")])
        return
    from bnaudit.api.transforms import model_file_writer

    path = plan.commit({output: model_file_writer(result, setup.spec)})[0]
    print_view(model_written(path, data_spec=setup.data_spec, transform=result.name))


def _plan(output: Path | None, shared: dict[str, Any], model: str, *more: str | None) -> Any:
    """The output plan for ``-o`` (None with --dry-run), checked before the (slow) load and transform; MODEL,
    the shared data, predict and weights and ``more`` inputs are protected from being overwritten."""
    if shared["dry_run"]:
        return None
    inputs = [model, shared["data"], *more, shared["predict"], shared["weights"]]
    missing = "give -o OUT.pt for the new model (or --dry-run to only show the changes)"
    return plan_model_output(output, inputs, force=shared["force"], missing=missing)


@command("insert-bn")
@t.with_shared_options
def insert_bn_cmd(
    model: o.ModelArg,
    output: t.OutOpt = None,
    layers: t.LayersOpt = ["conv,linear"],  # noqa: B006 - typer needs the list default
    include_output: t.IncludeOutputOpt = False,
    placement: t.PlacementOpt = "after-layer",
    keep_bias: t.KeepBiasOpt = False,
    calibrate: t.CalibrateOpt = None,
    calibrate_batches: t.CalibrateBatchesOpt = None,
    momentum: t.BnMomentumOpt = 0.1,
    eps: t.BnEpsOpt = 1e-5,
    *,
    shared: dict[str, Any],
) -> None:
    """Put BatchNorm after MODEL's hidden Linear/Conv layers, before their activations, and save the new model.

    BatchNorm1d after Linear and Conv1d, BatchNorm2d after Conv2d, BatchNorm3d after Conv3d; not on the output
    layer, not where a normalization layer already follows. Shapes come from an example input (--data,
    --input-shape, the model file's build_data, or one inferred from the first layer). With --calibrate the new
    model computes the same function as the old one in eval mode.

    [bold]Example[/]: bnaudit insert-bn model.py -o model_bn.pt --calibrate model.py:build_data
    """
    plan = _plan(output, shared, model, calibrate)
    from bnaudit.api.transforms import insert_bn_prepared

    done = insert_bn_prepared(
        model, shared["data"], layers=o.split_list(layers), skip_output=not include_output, placement=placement,
        drop_bias=not keep_bias, calibrate=calibrate, calibrate_batches=calibrate_batches, momentum=momentum,
        eps=eps, **t.prep(shared),
    )
    _render(done, title="insert-bn", output=output, plan=plan)


@command("fold-bn")
@t.with_shared_options
def fold_bn_cmd(
    model: o.ModelArg,
    output: t.OutOpt = None,
    eval_mode: t.EvalOpt = False,
    *,
    shared: dict[str, Any],
) -> None:
    """Fuse eval-mode BatchNorm into the Linear/Conv before it, for inference, and report the max abs error.

    Folding uses the running statistics, so a model in training mode is refused: pass --eval to switch it to
    eval mode (or return model.eval() from your factory).

    [bold]Example[/]: bnaudit fold-bn model_bn.pt --eval -o model_folded.pt --input-shape 3x32x32
    """
    plan = _plan(output, shared, model)
    from bnaudit.api.transforms import fold_bn_prepared

    done = fold_bn_prepared(
        model, shared["data"], eval_mode=eval_mode,
        **t.prep(shared),
    )
    _render(done, title="fold-bn", output=output, plan=plan)


@command("swap-norm")
@t.with_shared_options
def swap_norm_cmd(
    model: o.ModelArg,
    to: t.ToOpt,
    output: t.OutOpt = None,
    groups: t.GroupsOpt = None,
    *,
    shared: dict[str, Any],
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
    plan = _plan(output, shared, model)
    from bnaudit.api.transforms import swap_norm_prepared

    done = swap_norm_prepared(
        model, to, shared["data"], groups=groups,
        **t.prep(shared),
    )
    _render(done, title=f"swap-norm --to {to}", output=output, plan=plan)
