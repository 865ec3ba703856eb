"""``bnaudit recalibrate``: re-estimate MODEL's BatchNorm running statistics from DATA and save the result.

The repair BN302/BN303/BN304 point to. The command calls ``bnaudit.api.transforms.recalibrate_prepared``
(PreciseBN / ``torch.optim.swa_utils.update_bn`` semantics), shows the per-layer before/after table of z and r
(``bnaudit.report.transforms``), and writes the new model atomically with ``-o OUT`` (never over an existing
file without --force) in bnaudit's model file format, or as a plain state_dict (for ``--weights``) when MODEL
is a pickled module or has lazy modules. torch is imported inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnaudit.cli.app import command, plan_model_output, print_view
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
    missing = "give -o OUT.pt for the recalibrated model"
    plan = plan_model_output(output, [model, data, weights], force=force, missing=missing)

    from bnaudit.api.transforms import recalibrate_prepared, recalibrated_writer
    from bnaudit.report.transforms import model_written, recalibration_view, state_dict_written

    done = recalibrate_prepared(model, data, batches=batches, device=device, weights=weights,
                                trust_pickle=trust_pickle, input_key=input_key, batch_size=batch_size)
    data_spec = done.prepared.data.spec
    print_view(recalibration_view(model, data_spec, done.table))
    path = plan.commit({output: recalibrated_writer(done, batches)})[0]
    if done.plain:
        print_view(state_dict_written(path, model=model, data_spec=data_spec, pickled=done.pickled))
    else:
        print_view(model_written(path, data_spec=data_spec, transform="recalibrate"))
