"""``bnaudit fix``: apply the findings' fixes to the model's source file (and a copy of its checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnaudit.cli.app import command, print_stdout
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

_TITLES = {"applied": "fixed", "rolled-back": "rolled back", "not-fixable": "not fixable automatically",
           "skipped": "not applied"}


def fix_summary(result: Any, *, dry_run: bool) -> str:
    """The lines ``bnaudit fix`` prints about a FixResult: each fix, each refusal, and the re-audit."""
    lines = []
    for o in result.outcomes:
        where = f" (line {o.line})" if o.line is not None else ""
        title = "would fix" if dry_run and o.status == "applied" else _TITLES.get(o.status, o.status)
        lines.append(f"{title}: {o.code} {o.layer or '(model)'}{where} [{o.kind}]: {o.detail}")
    for note in result.checkpoint_notes:
        lines.append(f"checkpoint: {note}")
    gone, new = result.gone, result.new
    if result.applied:
        what = "the edited code" if result.diff else "the fixed checkpoint"
        lines.append(f"re-audit of {what}: {len(gone)} finding{'s' * (len(gone) != 1)} gone, {len(new)} new")
        lines += [f"  gone: {f.code} {f.layer or '(model)'}" for f in gone]
        lines += [f"  new: {f.code} {f.layer or '(model)'}: {f.message}" for f in new]
    elif not result.outcomes:
        lines.append("nothing to fix: no finding has an automatic fix")
    if dry_run and result.diff:
        lines.append("--diff: nothing was written")
    for path in result.written:
        lines.append(f"wrote {path}")
    return "\n".join(lines)


@command("fix")
def fix_cmd(
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
    select: Annotated[list[str] | None, typer.Option("--select", help="Rules to audit and fix: codes, prefixes or names.")] = None,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Rules to skip: codes, prefixes or names.")] = None,
    diff: Annotated[bool, typer.Option("--diff", help="Print a unified diff of the edits and write nothing.")] = False,
    unsafe_fixes: Annotated[bool, typer.Option("--unsafe-fixes", help="Also apply the fixes that change behaviour (BN103, BN104, BN105, BN107).")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the fixed checkpoint (from --weights) here.")] = None,
    force: ForceOpt = False,
    fmt: Annotated[str, typer.Option("--format", "-f", help="text or json.")] = "text",
    graph: Annotated[str, typer.Option("--graph", help="fx: torch.fx where the model traces; hooks: follow tensors at run time.")] = "fx",
) -> None:
    """Apply the fixes for MODEL's findings to its Python file, the way `ruff --fix` does.

    Safe fixes keep the model's function (BN101 bias=False, BN106 Keras momentum, BN108 eps); unsafe ones
    change it as the finding recommends and need --unsafe-fixes. Only the constructor calls the findings point
    at are edited, keeping comments and formatting; the edited code is audited again and a fix whose finding
    remains is rolled back. With --weights and -o OUT, a fixed copy of the checkpoint is written to OUT (the
    bias folded into running_mean; BN302/BN303/BN209 recalibrated on --data).

    [bold]Example[/]: bnaudit fix examples/seed_mlp_bn.py --diff
    """
    if fmt not in ("text", "json"):
        raise UsageError(f"--format {fmt!r}: choose text or json")
    if graph not in ("fx", "hooks"):
        raise UsageError(f"--graph {graph!r}: choose fx or hooks")
    from bnaudit.api import fix

    result = fix(
        model, data, predict=predict, weights=weights, trust_pickle=trust_pickle, select=split_list(select) or None,
        ignore=split_list(ignore), input_shape=input_shape, input_key=input_key, batch_size=batch_size, steps=steps,
        device=device, graph=graph, unsafe_fixes=unsafe_fixes, diff=diff, output=output, force=force,
    )
    if fmt == "json":
        import json

        print_stdout(json.dumps(result.to_dict(), indent=2))
        return
    summary = fix_summary(result, dry_run=diff)
    if result.diff:  # what was changed (or, with --diff, would be): the user's own file, so always shown
        print_stdout(result.diff)
    if diff:
        typer.echo(summary, err=True)
    else:
        print_stdout(summary)
