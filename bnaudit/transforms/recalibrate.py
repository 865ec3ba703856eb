"""Recalibration: new BatchNorm running statistics estimated precisely from data, the repair that BN302
(stale statistics), BN303 (statistics never set, e.g. SWA/EMA weights paired with stale buffers) and BN304
(train/eval gap) point to.

The semantics are those of PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm") and
``torch.optim.swa_utils.update_bn``: every BatchNorm layer's buffers are reset and re-estimated as the
cumulative average (``momentum=None``) of per-batch means and unbiased variances over one pass of the data,
with BatchNorm layers in train mode. Unlike ``update_bn``, every other module stays in eval mode while the
statistics are gathered, so dropout does not inflate the variances that inference will divide by (the
"variance shift" of Li et al. 2019); on a model without dropout the buffers equal ``update_bn``'s to float
tolerance. The model given is never modified: a deep copy is recalibrated and returned with a before/after
table of the fit measures ``z`` and ``r`` per layer (see ``bnaudit.probes.running_stats.LayerFit``)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnaudit.errors import DataError, TransformError
from bnaudit.loading.data import non_finite_at
from bnaudit.probes.common import batch_size, bn_layers, bn_statistics_mode, forward, tracks_running_stats
from bnaudit.probes.running_stats import ChannelMoments, collect_moments, layer_fit

__all__ = ["LayerRecalibration", "RecalibrationTable", "has_uninitialized", "recalibrate"]


@dataclass(frozen=True)
class LayerRecalibration:
    """One BatchNorm layer before and after recalibration.

    Attributes:
        layer: qualified name.
        channels: number of channels.
        z_before, r_before: the old buffers' fit to the data (z: mean shift in running standard deviations,
            0 is perfect; r: variance ratio, 1 is perfect).
        z_after, r_after: the new buffers' fit to the same data.
        num_batches_tracked_before, num_batches_tracked_after: the layer's counter (the new one counts the
            calls averaged).
    """

    layer: str
    channels: int
    z_before: float | None
    r_before: float | None
    z_after: float | None
    r_after: float | None
    num_batches_tracked_before: int | None
    num_batches_tracked_after: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "channels": self.channels,
            "z_before": self.z_before,
            "r_before": self.r_before,
            "z_after": self.z_after,
            "r_after": self.r_after,
            "num_batches_tracked_before": self.num_batches_tracked_before,
            "num_batches_tracked_after": self.num_batches_tracked_after,
        }


@dataclass(frozen=True)
class RecalibrationTable:
    """The per-layer before/after table ``recalibrate`` returns; iterating it yields the rows.

    Attributes:
        rows: one LayerRecalibration per recalibrated layer, in model order.
        skipped: layer -> why it kept its old buffers (no running statistics, never ran on the data).
        batches: batches used.
        samples: samples used.
        dropped_batches: batches left out because a train-mode pass cannot normalize a single sample.
    """

    rows: tuple[LayerRecalibration, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    dropped_batches: int = 0

    def __iter__(self) -> Iterator[LayerRecalibration]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, layer: str) -> LayerRecalibration:
        """The row of ``layer``.

        Raises:
            KeyError: the layer was not recalibrated.
        """
        for r in self.rows:
            if r.layer == layer:
                return r
        raise KeyError(layer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "samples": self.samples,
            "dropped_batches": self.dropped_batches,
            "layers": [r.to_dict() for r in self.rows],
            "skipped": dict(self.skipped),
        }


def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _dtype_of(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _source(data: Any, batch_size_: int, input_key: str | None) -> Any:
    from bnaudit.loading.data import DataSource, load_data

    if isinstance(data, DataSource):
        return data
    if data is None:
        raise DataError("recalibrate needs data: pass the batches the model will see (e.g. its training set)")
    source = load_data(data, batch_size=batch_size_, input_key=input_key)
    if source is None:  # pragma: no cover - load_data returns None only for a None spec
        raise DataError("recalibrate needs data: pass the batches the model will see (e.g. its training set)")
    return source


def recalibrate(
    model: nn.Module,
    data: Any,
    *,
    batches: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    input_key: str | None = None,
) -> tuple[nn.Module, RecalibrationTable]:
    """Re-estimate every BatchNorm layer's running statistics from ``data`` on a copy of ``model``.

    Each BatchNorm layer that keeps running statistics is reset and, over one pass of at most ``batches``
    batches, accumulates the cumulative average of its per-batch mean and unbiased variance (``momentum=None``,
    exactly as ``torch.optim.swa_utils.update_bn``), with BatchNorm layers in train mode and every other
    module (dropout) in eval mode. Momentum and every module's training flag are restored on the copy, which
    stays on the model's device and dtype. A layer that does not run on the data keeps its old buffers.

    Args:
        model: the model; never modified.
        data: a DataSource, a DATA spec or anything ``bnaudit.load_data`` accepts (DataLoader, Dataset,
            tensor, (inputs, targets) pair, iterable of batches). Use the data the model is trained on, or the
            data it will serve.
        batches: the most batches to use (None: one full pass).
        device: where to run the passes (default: where the model is); the result returns to the model's
            device.
        batch_size: batch size when bnaudit batches the data itself (tensors, datasets, files).
        input_key: the input's key in dict batches.

    Returns:
        ``(new_model, table)``: the recalibrated copy and a RecalibrationTable of z/r before and after.

    Raises:
        TransformError: the model has no BatchNorm layer with running statistics, or uninitialized lazy
            modules.
        DataError: no data, no batch of two or more samples, or the model rejects a batch.
    """
    if batches is not None and batches < 1:
        raise DataError(f"--batches must be at least 1, got {batches}")
    if has_uninitialized(model):
        raise TransformError(
            "the model has uninitialized lazy modules (LazyLinear, LazyBatchNorm...); run one forward pass on a "
            "batch first so their shapes are known (`bnaudit recalibrate` does this on its own copy)"
        )
    layers = bn_layers(model)
    tracked = {name: m for name, m in layers.items() if tracks_running_stats(m)}
    skipped = {
        name: "keeps no running statistics (track_running_stats=False)" for name in layers if name not in tracked
    }
    if not tracked:
        raise TransformError(
            "the model has no BatchNorm layer with running statistics; there is nothing to recalibrate"
        )
    source = _source(data, batch_size, input_key)
    home = _device_of(model)
    run_on = torch.device(device) if device is not None else home
    dtype = _dtype_of(model)

    new = copy.deepcopy(model).to(run_on)
    new_layers = {name: m for name, m in bn_layers(new).items() if name in tracked}
    moments = {name: ChannelMoments() for name in new_layers}
    momenta = {name: m.momentum for name, m in new_layers.items()}
    handles = [m.register_forward_pre_hook(collect_moments(moments[name])) for name, m in new_layers.items()]
    count = samples = dropped = 0
    try:
        for m in new_layers.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same, as in update_bn
        with bn_statistics_mode(new), torch.no_grad():
            for index, batch in enumerate(source.batches(limit=batches, device=run_on, dtype=dtype), start=1):
                n = batch_size_of(batch.inputs)
                if n < 2:
                    dropped += 1
                    continue
                bad = non_finite_at(batch.inputs)
                if bad is not None:
                    raise DataError(
                        f"{source.spec}: batch {index} holds a non-finite input (NaN or Inf at index {bad}); its "
                        "statistics would be NaN and poison every eval-mode prediction: clean the data. Nothing "
                        "was written"
                    )
                try:
                    forward(new, batch.inputs)
                except Exception as exc:  # noqa: BLE001 - the model's own error, reported with the data named
                    from bnaudit.loading.specs import describe_exception

                    raise DataError(
                        f"{source.spec}: the model rejected a batch while recalibrating ({describe_exception(exc)}); "
                        "check that the data matches the model's input"
                    ) from exc
                count += 1
                samples += n
    finally:
        for h in handles:
            h.remove()
        for name, m in new_layers.items():
            m.momentum = momenta[name]
    if count == 0:
        raise DataError(
            f"{source.spec}: no batch of two or more samples to estimate statistics from; use a batch size of 2 or more"
        )
    for name, m in new_layers.items():
        if not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()):
            raise DataError(
                f"{source.spec}: the recalibrated statistics of {name} are not finite (the model's activations "
                "overflow or its weights hold NaN/Inf on this data); nothing was written"
            )
    rows = []
    for name, m in new_layers.items():
        mom = moments[name]
        old = tracked[name]
        if mom.calls == 0 or int(m.num_batches_tracked) == 0:
            # It never ran on this data: keep what it had rather than the reset values.
            with torch.no_grad():
                m.running_mean.copy_(old.running_mean)
                m.running_var.copy_(old.running_var)
                m.num_batches_tracked.copy_(old.num_batches_tracked)
            skipped[name] = "did not run on this data; old statistics kept"
            continue
        before = layer_fit(name, old, mom)
        after = layer_fit(name, m, mom)
        rows.append(
            LayerRecalibration(
                layer=name,
                channels=before.channels,
                z_before=before.z,
                r_before=before.r,
                z_after=after.z,
                r_after=after.r,
                num_batches_tracked_before=before.num_batches_tracked,
                num_batches_tracked_after=after.num_batches_tracked,
            )
        )
    new.to(home)
    return new, RecalibrationTable(tuple(rows), skipped, count, samples, dropped)


def batch_size_of(inputs: Any) -> int:
    return batch_size(inputs) or 0


def has_uninitialized(model: nn.Module) -> bool:
    """Whether any parameter or buffer is still a lazy placeholder (nothing can copy or reset it yet)."""
    from torch.nn.parameter import is_lazy

    return any(is_lazy(t) for t in (*model.parameters(), *model.buffers()))
