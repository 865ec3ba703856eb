"""``bnaudit recalibrate``: re-estimate MODEL's BatchNorm running statistics from DATA and save the result.

The repair BN302/BN303/BN304 point to. The command loads MODEL and DATA, calls
``bnaudit.transforms.recalibrate.recalibrate`` (PreciseBN / ``torch.optim.swa_utils.update_bn`` semantics),
prints the per-layer before/after table of z and r, and writes the new model atomically with ``-o OUT``
(never over an existing file without --force) in bnaudit's model file format (``bnaudit.transforms.saving``),
or as a plain state_dict (for ``--weights``) when MODEL is a pickled module or has lazy modules. torch is imported inside the command."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from bnaudit.cli.app import command, plan_outputs, stdout_console
from bnaudit.cli.options import (
    BatchSizeOpt,
    DataOpt,
    DeviceOpt,
    ForceOpt,
    InputKeyOpt,
    ModelArg,
    TrustPickleOpt,
    WeightsOpt,
)
from bnaudit.errors import UsageError


def _is_bnaudit_file(spec: str) -> bool:
    import torch

    try:
        obj = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled module or anything else: not ours
        return False
    return isinstance(obj, dict) and "bnaudit_format" in obj


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _table(table: Any) -> Any:
    from rich.table import Table

    out = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for col in ("layer", "channels", "z before", "r before", "z after", "r after", "batches tracked"):
        out.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
    for row in table:
        out.add_row(
            row.layer,
            str(row.channels),
            _fmt(row.z_before),
            _fmt(row.r_before),
            _fmt(row.z_after),
            _fmt(row.r_after),
            f"{row.num_batches_tracked_before} -> {row.num_batches_tracked_after}",
        )
    return out


@command("recalibrate")
def recalibrate_cmd(
    model: ModelArg,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Where to write the recalibrated model (.pt; loads back in bnaudit and torch)."
        ),
    ] = None,
    data: DataOpt = None,
    batches: Annotated[
        int | None,
        typer.Option("--batches", "-n", min=1, help="Use at most this many batches (default: one full pass)."),
    ] = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_key: InputKeyOpt = None,
    batch_size: BatchSizeOpt = 32,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
) -> None:
    """Re-estimate MODEL's BatchNorm running statistics on DATA (PreciseBN) and save the new model.

    Every BatchNorm layer's running mean and variance are reset and re-estimated as the average over one
    pass of DATA (torch.optim.swa_utils.update_bn semantics; dropout stays off). Use the data the model is
    trained on or will serve. Prints, per layer, how well the old and new statistics fit the data: z (mean
    shift in running standard deviations, 0 is perfect) and r (variance ratio, 1 is perfect).

    [bold]Example[/]: bnaudit recalibrate model.py --weights swa.pt --data model.py:build_data -o model_recal.pt
    """
    if output is None:
        raise UsageError("give -o OUT.pt for the recalibrated model")
    plan = plan_outputs([model, data, weights])
    plan.file(output, label="--output", replace=force)
    plan.check()  # fail before the (slow) load and data pass

    from rich.text import Text

    from bnaudit.api import prepare
    from bnaudit.api.transforms import recalibrate
    from bnaudit.loading.models import MODEL_FILE_SUFFIXES
    from bnaudit.transforms.recalibrate import has_uninitialized

    prepared = prepare(model, data, device=device, weights=weights, trust_pickle=trust_pickle, input_key=input_key,
                       batch_size=batch_size, example=False)
    lazy = has_uninitialized(prepared.model)  # decided before the first call gives the lazy modules their shapes
    new, table = recalibrate(prepared, batches=batches, device=device)
    source = prepared.data
    assert source is not None

    console = stdout_console(highlight=False, soft_wrap=True)
    console.print(Text(f"recalibrate: {model}", style="bold"))
    console.print(
        Text(f"data: {source.spec} ({table.batches} batches, {table.samples} samples"
             + (f", {table.dropped_batches} single-sample batches left out" if table.dropped_batches else "") + ")",
             style="dim")
    )
    console.print(_table(table))
    for layer, why in table.skipped.items():
        console.print(Text(f"skip {layer}: {why}", style="yellow"))

    pickled = model.endswith(MODEL_FILE_SUFFIXES) and not _is_bnaudit_file(model)
    if pickled or lazy:
        _write_weights(console, new, plan, output, model, source.spec, pickled)
    else:
        _write_model(console, new, table, plan, output, model, source.spec, batches)


def _write_weights(
    console: Any, new: Any, plan: Any, output: Path, model: str, data_spec: str, pickled: bool
) -> None:
    """A pickled module cannot be rebuilt from a spec, and a model with lazy modules cannot be copied before
    its first call (which bnaudit's model files need): store the weights for ``--weights``."""
    import torch
    from rich.text import Text

    state = {k: v.detach().cpu().clone() for k, v in new.state_dict().items()}
    path = plan.commit({output: lambda tmp: torch.save(state, tmp)})[0]
    console.print(Text(f"wrote {path} (a plain state_dict: load it with --weights or model.load_state_dict)"))
    console.print(Text("next:", style="bold"))
    weights_arg = f"--weights {shlex.quote(str(path))}"
    trust = " --trust-pickle" if pickled else ""
    console.print(Text(f"  bnaudit inspect {shlex.quote(model)}{trust} {weights_arg} --data {shlex.quote(data_spec)}"))


def _write_model(
    console: Any, new: Any, table: Any, plan: Any, output: Path, model: str, data_spec: str, batches: int | None
) -> None:
    """The recalibrated model in bnaudit's model file format, and the commands to run next."""
    import torch
    from rich.text import Text

    from bnaudit.transforms import TransformResult
    from bnaudit.transforms.saving import saved_dict

    result = TransformResult(
        name="recalibrate",
        model=new,
        options={"data": data_spec, "batches": batches, "batches_used": table.batches, "samples": table.samples},
    )
    payload = saved_dict(result, model)
    path = plan.commit({output: lambda tmp: torch.save(payload, tmp)})[0]
    console.print(Text(f"wrote {path}"))
    console.print(Text("next:", style="bold"))
    console.print(Text(f"  bnaudit inspect {shlex.quote(str(path))} --data {shlex.quote(data_spec)}"))
    console.print(Text(f"  python -c \"import bnaudit.transforms as t; m = t.load({str(path)!r})\"", style="dim"))
