"""``bnaudit inspect``: lint the architecture and probe it on real batches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnaudit.cli.app import command, plan_outputs, print_stdout, stdout
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
from bnaudit.findings import FAIL_ON_CHOICES


@command("inspect")
def inspect_cmd(
    model: ModelArg,
    data: DataOpt = None,
    predict: PredictOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_shape: InputShapeOpt = None,
    input_key: InputKeyOpt = None,
    batch_size: BatchSizeOpt = 32,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Batches the dynamic probes may use.")] = 8,
    device: DeviceOpt = "cpu",
    select: Annotated[list[str] | None, typer.Option("--select", help="Rules to run: codes, prefixes or names (BN1,BN301).")] = None,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Rules to skip: codes, prefixes or names.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="auto, rich, json, sarif, junit, github or markdown.")] = "auto",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the report to this file instead of stdout.")] = None,
    force: ForceOpt = False,
    fail_on: Annotated[str, typer.Option("--fail-on", help="Exit 1 when a finding is at or above: error, warning, info, never.")] = "error",
    graph: Annotated[str, typer.Option("--graph", help="fx: torch.fx where the model traces; hooks: follow tensors at run time.")] = "fx",
    no_layers: Annotated[bool, typer.Option("--no-layers", help="Leave the per-layer table out of the rich report.")] = False,
    width: Annotated[int | None, typer.Option("--width", help="Width of the rich report (default: the terminal's).")] = None,
    fix: Annotated[bool, typer.Option("--fix", help="Apply the safe fixes to MODEL's file first (as `bnaudit fix`); report the fixed model.")] = False,
) -> None:
    """Lint how MODEL's normalization is wired and, with --data, probe it on real batches.

    Prints a per-layer table and every finding with its evidence and fix. Exit status: 0 clean, 1 findings at
    or above --fail-on, 2 bad input.

    [bold]Example[/]: bnaudit inspect examples/tabular_mlp.py --data examples/tabular_mlp.py:build_data
    """
    if fail_on not in FAIL_ON_CHOICES:
        raise UsageError(f"--fail-on {fail_on!r}: choose one of {', '.join(FAIL_ON_CHOICES)}")
    if graph not in ("fx", "hooks"):
        raise UsageError(f"--graph {graph!r}: choose fx or hooks")
    from bnaudit.report import render, resolve_format

    concrete = resolve_format(fmt)  # validate before the (slow) audit runs
    plan = plan_outputs([model, data, predict, weights])
    plan.file(output, label="--output", replace=force)
    plan.check()

    from bnaudit.api import inspect

    audit = {
        "predict": predict, "weights": weights, "trust_pickle": trust_pickle, "select": split_list(select),
        "ignore": split_list(ignore), "input_shape": input_shape, "input_key": input_key, "batch_size": batch_size,
        "steps": steps, "device": device, "graph": graph,
    }
    if fix:
        from bnaudit.api import fix as fix_model
        from bnaudit.cli.fix import fix_summary

        fixed = fix_model(model, data, **audit)
        typer.echo(fix_summary(fixed, dry_run=False), err=True)
        report = fixed.after
    else:
        report = inspect(model, data, **audit)
    color = output is None and concrete == "rich" and stdout().isatty()
    text = render(report, concrete, color=color, width=width, layers=not no_layers)
    if output is not None:
        plan.commit({output: text})
        typer.echo(f"wrote {output} ({report.summary['total']} findings)", err=True)
    else:
        print_stdout(text)
    if report.fails(fail_on):
        raise typer.Exit(1)
