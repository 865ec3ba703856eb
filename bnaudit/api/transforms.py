"""``bnaudit.insert_bn``, ``fold_bn``, ``swap_norm`` and ``recalibrate`` from objects or specs, as the CLI runs
them: the model, data and predict function go through ``prepare``, and the transform of ``bnaudit.transforms``
runs on the result. Each returns what the transform returns; the model given is never modified."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.api.preparation import Prepared, prepare, preserved_rng

if TYPE_CHECKING:
    from torch import nn

    from bnaudit.transforms import TransformResult
    from bnaudit.transforms.recalibrate import RecalibrationTable

__all__ = [
    "Recalibrated",
    "Transformed",
    "fold_bn",
    "fold_bn_prepared",
    "insert_bn",
    "insert_bn_prepared",
    "model_file_writer",
    "prepare_transform",
    "recalibrate",
    "recalibrate_prepared",
    "recalibrated_writer",
    "swap_norm",
    "swap_norm_prepared",
]

_NO_EXAMPLE = "none (the model rejected an inferred input; pass --data or --input-shape)"


def prepare_transform(
    model: Any,
    data: Any = None,
    *,
    example: Any = None,
    predict: Any = None,
    input_shape: str | tuple[int, ...] | None = None,
    input_key: str | None = None,
    batch_size: int = 32,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    device: str | None = None,
    infer_example: bool = False,
    seed: int = 0,
) -> Prepared:
    """The preparation every transform shares: the model (moved to ``device``: a model loaded from a spec in
    place, a given module as a copy, so the caller's is never moved), the example input (``example``, else
    ``input_shape``, else the data's first batch, else with ``infer_example`` one inferred from the first
    layer), and the predict function.

    Raises:
        SpecError, WeightsError, DataError, UsageError: bad input, with a one-line message.
    """
    from dataclasses import replace

    from torch import nn

    prepared = prepare(
        model, data, predict, device=device, weights=weights, trust_pickle=trust_pickle, input_shape=input_shape,
        input_key=input_key, batch_size=batch_size, seed=seed, example=example is None,
        data_default=input_shape is None,
    )
    if example is not None:
        prepared = replace(prepared, example=example, example_note="given")
    elif prepared.example_inferred and not infer_example:
        prepared = prepared.without_example("")
    if device is not None:
        module = prepared.model
        if isinstance(model, nn.Module):
            import copy

            if any(t.device != prepared.device for t in (*module.parameters(), *module.buffers())):
                module = copy.deepcopy(module)
        prepared = replace(prepared, loaded=replace(prepared.loaded, module=module.to(prepared.device)))
    return prepared


def _apply(prepared: Prepared, transform: Callable[..., TransformResult], run: Any, **kwargs: Any) -> Transformed:
    """Run ``transform``; an inferred example the model rejects is dropped, not fatal."""
    from bnaudit.errors import DataError

    run = run if run is not None else prepared.predict
    with preserved_rng(prepared.device):
        try:
            return Transformed(prepared, transform(prepared.model, example=prepared.example, run=run, **kwargs))
        except DataError:
            if not prepared.example_inferred:
                raise
        prepared = prepared.without_example(_NO_EXAMPLE)
        return Transformed(prepared, transform(prepared.model, example=None, run=run, **kwargs))


@dataclass(frozen=True)
class Transformed:
    """A transform's result with what it was prepared from (the CLI shows both).

    Attributes:
        prepared: the model before the transform, its example input and data.
        result: the TransformResult.
    """

    prepared: Prepared
    result: TransformResult


def insert_bn_prepared(
    model: Any,
    data: Any = None,
    *,
    example: Any = None,
    layers: Sequence[str] | str = ("linear", "conv"),
    skip_output: bool = True,
    placement: str = "after-layer",
    drop_bias: bool = True,
    calibrate: Any = None,
    calibrate_batches: int | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    run: Callable[[nn.Module, Any], Any] | None = None,
    **prep: Any,
) -> Transformed:
    """Put BatchNorm after the hidden Linear/Conv layers of a model or MODEL spec (``bnaudit insert-bn``).

    Args:
        model: an nn.Module or a MODEL spec; never modified.
        data: DATA (spec or object) whose first batch is the example input; without it and without
            ``input_shape``, the ``calibrate`` data is the example.
        example: one batch of input (overrides ``data``).
        layers, skip_output, placement, drop_bias, momentum, eps, calibrate_batches: as
            ``bnaudit.transforms.insert_bn``.
        calibrate: DATA (spec or object) whose statistics make the new model compute the same eval function.
        run: how to call the model, ``run(model, inputs)``; default the predict function, else ``model(inputs)``.
        **prep: ``predict``, ``input_shape``, ``input_key``, ``batch_size``, ``weights``, ``trust_pickle``,
            ``device``, ``infer_example``, ``seed`` (see ``prepare_transform``).

    Returns:
        The Transformed result: ``.result`` the TransformResult, ``.prepared`` the input and its example.

    Raises:
        TransformError, DataError, SpecError, UsageError: as the transform and the loaders say.
    """
    from bnaudit.loading import load_data
    from bnaudit.transforms import insert_bn as transform

    # Without data or an input shape the calibration data is also the example input (loaded once).
    own_data = data is not None or prep.get("input_shape") is not None or example is not None
    prepared = prepare_transform(model, data if own_data else calibrate, example=example, **prep)
    cal = None
    if calibrate is not None:
        if not own_data and prepared.data is not None:
            cal = prepared.data
        else:
            cal = load_data(calibrate, namespace=prepared.loaded.namespace, batch_size=prep.get("batch_size", 32),
                            input_key=prep.get("input_key"))
    names = [s for item in ([layers] if isinstance(layers, str) else layers) for s in item.split(",") if s]
    return _apply(
        prepared, transform, run, layers=names, skip_output=skip_output, placement=placement, drop_bias=drop_bias,
        calibrate=cal, calibrate_batches=calibrate_batches, momentum=momentum, eps=eps,
    )


def fold_bn_prepared(
    model: Any,
    data: Any = None,
    *,
    example: Any = None,
    eval_mode: bool = False,
    run: Callable[[nn.Module, Any], Any] | None = None,
    **prep: Any,
) -> Transformed:
    """Fuse eval-mode BatchNorm into the Linear/Conv before it (``bnaudit fold-bn``).

    Args:
        model: an nn.Module (in eval mode, or pass ``eval_mode``) or a MODEL spec; never modified.
        data: DATA whose first batch is the example input (measures the max abs error).
        example: one batch of input (overrides ``data``).
        eval_mode: fold an eval-mode copy of the model (models from a factory start in train mode).
        run: how to call the model; default the predict function, else ``model(inputs)``.
        **prep: as ``insert_bn``.

    Returns:
        The Transformed result, as ``insert_bn_prepared``.

    Raises:
        TransformError: a BatchNorm is in training mode. DataError, SpecError, UsageError: bad input.
    """
    from dataclasses import replace

    from bnaudit.transforms import fold_bn as transform

    prepared = prepare_transform(model, data, example=example, **prep)
    if eval_mode and any(m.training for m in prepared.model.modules()):
        import copy

        module = prepared.model if prepared.model is not model else copy.deepcopy(prepared.model)
        prepared = replace(prepared, loaded=replace(prepared.loaded, module=module.eval()))
    return _apply(prepared, transform, run)


def swap_norm_prepared(
    model: Any,
    to: str,
    data: Any = None,
    *,
    example: Any = None,
    groups: int | None = None,
    run: Callable[[nn.Module, Any], Any] | None = None,
    **prep: Any,
) -> Transformed:
    """Replace every BatchNorm by another normalization (``bnaudit swap-norm``).

    Args:
        model: an nn.Module or a MODEL spec; never modified.
        to: ``group``, ``layer``, ``instance``, ``frozen`` or ``sync``.
        data: DATA whose first batch is the example input.
        example: one batch of input (overrides ``data``).
        groups: GroupNorm group count for every layer (default: per layer).
        run: how to call the model; default the predict function, else ``model(inputs)``.
        **prep: as ``insert_bn``.

    Returns:
        The Transformed result, as ``insert_bn_prepared``.

    Raises:
        UsageError: an unknown ``to``. TransformError, DataError, SpecError: as the transform and loaders say.
    """
    from bnaudit.errors import UsageError
    from bnaudit.transforms import swap_norm as transform
    from bnaudit.transforms.swap_norm import TARGETS

    if to not in TARGETS:
        raise UsageError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    prepared = prepare_transform(model, data, example=example, **prep)
    return _apply(prepared, transform, run, to=to, groups=groups)


def model_file_writer(result: TransformResult, source: str | Path) -> Callable[[Path], Any]:
    """What writes ``result`` in bnaudit's model file format to a path (an ``OutputPlan.commit`` writer); the
    file's dict is built now, so a failure comes before any file is touched.

    Args:
        result: the TransformResult to save.
        source: the MODEL spec that rebuilds the original architecture.
    """
    import torch

    from bnaudit.transforms.saving import saved_dict

    payload = saved_dict(result, source)
    return lambda tmp: torch.save(payload, tmp)


def insert_bn(model: Any, data: Any = None, **kwargs: Any) -> TransformResult:
    """``insert_bn_prepared(...).result``: BatchNorm after the hidden Linear/Conv layers of a model or MODEL spec.

    Args and Raises: as ``insert_bn_prepared``.
    """
    return insert_bn_prepared(model, data, **kwargs).result


def fold_bn(model: Any, data: Any = None, **kwargs: Any) -> TransformResult:
    """``fold_bn_prepared(...).result``: eval-mode BatchNorm fused into the layer before it.

    Args and Raises: as ``fold_bn_prepared``.
    """
    return fold_bn_prepared(model, data, **kwargs).result


def swap_norm(model: Any, to: str, data: Any = None, **kwargs: Any) -> TransformResult:
    """``swap_norm_prepared(...).result``: every BatchNorm replaced by another normalization.

    Args and Raises: as ``swap_norm_prepared``.
    """
    return swap_norm_prepared(model, to, data, **kwargs).result


def recalibrate(
    model: Any,
    data: Any = None,
    *,
    batches: int | None = None,
    device: str | None = None,
    batch_size: int = 32,
    input_key: str | None = None,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
) -> tuple[nn.Module, RecalibrationTable]:
    """Re-estimate a model's BatchNorm running statistics on DATA (``bnaudit recalibrate``).

    Args:
        model: an nn.Module, a MODEL spec, or what ``prepare`` made of one; never modified.
        data: DATA (spec or object); None: ``build_data`` in the model's file.
        batches, batch_size, input_key: as ``bnaudit.transforms.recalibrate.recalibrate``.
        device: where to run the data pass (default: the model's device, the CPU for a spec).
        weights: a state_dict file to load into the model first.
        trust_pickle: allow a ``.pt`` MODEL holding a whole pickled module.

    Returns:
        ``(new_model, table)``: the recalibrated copy and the per-layer before/after fit.

    Raises:
        UsageError: no data. DataError, SpecError, WeightsError: bad input.
    """
    from bnaudit.errors import UsageError
    from bnaudit.transforms.recalibrate import recalibrate as transform

    prepared = model if isinstance(model, Prepared) else prepare(
        model, data, device=device, weights=weights, trust_pickle=trust_pickle, input_key=input_key,
        batch_size=batch_size, example=False,
    )
    if prepared.data is None:
        raise UsageError("recalibrate needs --data: the batches the model is trained on or will serve")
    module = prepared.model
    with preserved_rng(prepared.device):
        return transform(module, prepared.data, batches=batches, device=device and prepared.device)


@dataclass(frozen=True)
class Recalibrated:
    """``recalibrate_prepared``'s result (``bnaudit recalibrate`` shows and writes it).

    Attributes:
        source: the MODEL as given.
        prepared: the model before recalibration and its data.
        model: the recalibrated copy.
        table: the per-layer before/after fit.
        pickled: MODEL is a ``.pt`` file holding a whole pickled module (not a bnaudit model file).
        plain: the new model can only be saved as a plain state_dict (for ``--weights``): a pickled module
            cannot be rebuilt from a spec, and a model with lazy modules cannot be copied before its first
            call, which bnaudit's model files need.
    """

    source: str
    prepared: Prepared
    model: nn.Module
    table: RecalibrationTable
    pickled: bool
    plain: bool


def recalibrate_prepared(
    model: str, data: Any = None, *, batches: int | None = None, device: str = "cpu", **prep: Any
) -> Recalibrated:
    """Re-estimate the BatchNorm running statistics of a MODEL spec on DATA, keeping what the CLI shows.

    Args:
        model: a MODEL spec.
        data: DATA (spec or object); None: ``build_data`` in the model's file.
        batches, device: as ``recalibrate``.
        **prep: ``weights``, ``trust_pickle``, ``input_key``, ``batch_size`` (see ``prepare``).

    Raises:
        UsageError: no data. DataError, SpecError, WeightsError: bad input.
    """
    from bnaudit.loading.modelfile import MODEL_FILE_SUFFIXES, holds_model_file

    prepared = prepare(model, data, device=device, example=False, **prep)
    new, table = recalibrate(prepared, batches=batches, device=device)
    pickled = model.endswith(MODEL_FILE_SUFFIXES) and not holds_model_file(model)
    return Recalibrated(model, prepared, new, table, pickled, pickled or prepared.lazy_initialized)


def recalibrated_writer(done: Recalibrated, batches: int | None) -> Callable[[Path], Any]:
    """What writes the recalibrated model to a path (an ``OutputPlan.commit`` writer): a plain state_dict
    when ``done.plain``, else bnaudit's model file with the data and batch counts as the options."""
    from bnaudit.transforms import TransformResult

    if done.plain:
        import torch

        state = {k: v.detach().cpu().clone() for k, v in done.model.state_dict().items()}
        return lambda tmp: torch.save(state, tmp)
    table = done.table
    options = {"data": done.prepared.data.spec, "batches": batches, "batches_used": table.batches,
               "samples": table.samples}
    return model_file_writer(TransformResult(name="recalibrate", model=done.model, options=options), done.source)
