"""Activation measurements during a train-compare run, taken through ``bnaudit.record``.

One small adapter keeps the runner independent of the recorder's internals. ``ActivationRecording`` records
the *input* of every activation module (what the nonlinearity sees: a Linear/Conv output in the baseline, a
normalized one with BatchNorm) every ``every`` steps, and watches one unit for the Ioffe & Szegedy (2015)
Fig. 1 view. A model without activation modules (functional activations only) is recorded at its
Linear/Conv outputs instead. From the History it derives:

* ``drift`` per layer: mean over units of |mean_t - mean_0| / std_0, i.e. how far each unit's mean has moved
  since the first recorded step, in units of its initial spread (0 = no shift; 1 = one initial standard
  deviation);
* ``percentiles``: the 15th/50th/85th percentiles of the watched unit's input at each recorded step."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from bnaudit.layers import is_activation, is_weight_layer

DRIFT_MEASURE = "mean |Δ unit mean| / initial unit std"


def recorded_layers(model: nn.Module) -> dict[str, str]:
    """Layer name -> ``input``/``output``: activation inputs, else Linear/Conv outputs."""
    acts = {n: "input" for n, m in model.named_modules() if n and is_activation(m)}
    if acts:
        return acts
    return {n: "output" for n, m in model.named_modules() if n and is_weight_layer(m)}


class ActivationRecording:
    """Context manager around ``bnaudit.record`` for one run; call ``step()`` after every optimizer step.

    Args:
        model: the model being trained (only read).
        every: record one step in ``every``.
        unit_layer: the layer whose input unit is followed (None: no percentiles).
        unit: the channel followed.
    """

    def __init__(self, model: nn.Module, *, every: int, unit_layer: str | None, unit: int):
        from bnaudit.recording import record

        self.layers = recorded_layers(model)
        if unit_layer is not None and unit_layer not in self.layers:
            self.layers[unit_layer] = "input"
        self.unit_layer = unit_layer
        self.unit = unit
        units = {unit_layer: [unit]} if unit_layer is not None else None
        self._rec = record(model, layers=self.layers, per_channel=True, every=every, units=units)
        self._reduced: Any = None

    def reduce_across_ranks(self, group: Any = None) -> None:
        """Replace this rank's history by the global-batch history of every rank (a collective: every rank
        calls it once, after its recording ended). Quantiles (the Fig. 1 percentiles) stay rank 0's."""
        from bnaudit.recording import reduce_history

        self._reduced = reduce_history(self._rec.history, group)

    def __enter__(self) -> ActivationRecording:
        self._rec.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._rec.__exit__(*exc)

    def step(self) -> None:
        self._rec.step()

    def results(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``(drift, percentiles)`` from the recorded history (None when nothing was recorded)."""
        h = self._reduced if self._reduced is not None else self._rec.history
        steps = [int(s) + 1 for s in np.asarray(h.steps).tolist()]  # recorder: 0-based count; runs: 1-based
        if not steps:
            return None, None
        drift: dict[str, list[float]] = {}
        for layer in h.layers:
            if layer not in self.layers:
                continue
            try:
                mean = np.asarray(h.series(layer, "channel_mean"), dtype=np.float64)
                var = np.asarray(h.series(layer, "channel_var"), dtype=np.float64)
            except Exception:  # a layer the recorder could not measure per channel: leave it out
                continue
            if mean.ndim != 2 or mean.shape[0] == 0:
                continue
            std0 = np.sqrt(np.maximum(var[0], 0.0)) + 1e-6
            with np.errstate(all="ignore"):
                d = np.abs(mean - mean[:1]) / std0
                series = np.nanmean(d, axis=1)
            drift[layer] = [float(v) if np.isfinite(v) else None for v in series]  # type: ignore[misc]
        percentiles = None
        if self.unit_layer is not None:
            try:
                q = np.asarray(h.series(self.unit_layer, "quantiles"), dtype=np.float64)  # (steps, Q, U)
            except Exception:
                q = np.zeros((0,))
            if q.ndim == 3 and q.shape[0] and q.shape[1] >= 3 and q.shape[2] >= 1:

                def col(i: int) -> list[float | None]:
                    return [float(v) if np.isfinite(v) else None for v in q[:, i, 0]]

                percentiles = {
                    "layer": self.unit_layer,
                    "unit": self.unit,
                    "steps": steps[: q.shape[0]],
                    "p15": col(0),
                    "p50": col(1),
                    "p85": col(2),
                }
        drift_out = {"measure": DRIFT_MEASURE, "steps": steps, "layers": drift} if drift else None
        return drift_out, percentiles
