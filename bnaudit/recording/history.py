"""The recorded history: a compact table of per-step statistics, and one accessor per question.

Storage. Rows of one structure (which layers were called, their channel counts, the BatchNorm layers) form a
segment; a ``Layout`` says where each value sits in a row. Rows live in host float32 chunks preallocated
16, 32, ... up to ``chunk`` rows at a time (untouched pages cost nothing until written). Per recorded layer
a row holds the mergeable moments of everything the layer saw in the step::

    channel_mean (C) | channel_var (C, population) | min | max | nonzero count | nonfinite count | quantiles

and two integers beside it (calls, values per channel). Per BatchNorm layer: ``running_mean (C) |
running_var (C) | num_batches_tracked`` as they were at the end of the step, and two flags (training,
affine parameters require grad). Whole-layer ``mean``/``var`` are derived when read: every channel holds the
same number of values, so the layer mean is the mean of channel means and its variance adds the spread
between channels. ``zero_frac`` is ``1 - nonzero / (values per channel x C)``.

Reading gathers one column range over segments; a layer absent from a segment (not called in those steps)
reads as NaN there, and a channel series whose width changed is padded with NaN to the widest."""

from __future__ import annotations

import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnaudit.errors import UsageError
from bnaudit.recording.export import HistoryExport
from bnaudit.recording.layout import EXTRA, Layout, Segment

__all__ = ["BN_STATS", "CHANNEL_STATS", "SCALAR_STATS", "STATS", "BNModes", "History"]

SCALAR_STATS = ("mean", "var", "std", "min", "max", "zero_frac", "nonfinite_frac", "count", "calls")
CHANNEL_STATS = ("channel_mean", "channel_var", "channel_std")
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
STATS = (*SCALAR_STATS, *CHANNEL_STATS, *BN_STATS, "quantiles")


@dataclass(frozen=True)
class BNModes:
    """The mode series of one BatchNorm layer, one entry per recorded step (read at the end of the step).

    Attributes:
        steps: the recorded step numbers.
        training: the layer's ``training`` flag.
        num_batches_tracked: its counter (-1 when it tracks no running statistics).
        requires_grad: whether its affine weight/bias require grad (False when it has none).
        updated: whether any model parameter changed during the step (an optimizer step ran).
    """

    steps: np.ndarray
    training: np.ndarray
    num_batches_tracked: np.ndarray
    requires_grad: np.ndarray
    updated: np.ndarray


class History(HistoryExport):
    """A compact per-step table of recorded statistics, with one accessor per question.

    Built by ``Recorder``; loaded by ``History.load``. Arrays returned are fresh float64 numpy arrays, one row
    per recorded step; a layer not called in a step has NaN there and ``calls`` 0.
    """

    def __init__(self, chunk: int = 256):
        self.chunk = chunk
        self.segments: list[Segment] = []
        self._steps = array.array("q")  # 8 bytes a step
        self._updated = bytearray()  # 1 byte a step
        self._model_training = bytearray()  # 1 byte a step: 0 eval, 1 train, 2 unknown (a file from before)
        self.info: dict[str, dict[str, Any]] = {}  # layer -> type, where, channel_dim, units
        self.bn_info: dict[str, dict[str, Any]] = {}  # BN layer -> type, channels, momentum, eps, initial buffers
        self.quantile_levels: tuple[float, ...] = ()
        self.notes: list[str] = []
        # While recording on an accelerator: writes the row whose host copy is still in flight.
        self.settle: Callable[[], None] | None = None

    # -- writing (the recorder, loading, reductions) --
    def append(self, layout: Layout, step: int, updated: bool,
               model_training: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A new row for ``step``: views of its values, ints and flags (zeros) to fill in."""
        if not self.segments or self.segments[-1].layout != layout:
            self.segments.append(Segment(layout, self.chunk))
        self._steps.append(step)
        self._updated.append(updated)
        self._model_training.append(2 if model_training is None else int(bool(model_training)))
        return self.segments[-1].next_row()

    # -- reading --
    def __len__(self) -> int:
        return len(self._steps)

    @property
    def steps(self) -> np.ndarray:
        """The recorded step numbers (how many ``step()`` calls came before the row was taken)."""
        return np.array(self._steps, dtype=np.int64)

    @property
    def updated(self) -> np.ndarray:
        """Per recorded step: whether any parameter changed during it (an optimizer step ran)."""
        return np.frombuffer(bytes(self._updated), dtype=bool).copy() if self._updated else np.zeros(0, bool)

    @property
    def model_training(self) -> list[bool | None]:
        """Per recorded step: the recorded model's own training flag at the end of the step (None where
        unknown: a history saved before it was recorded)."""
        return [None if v == 2 else bool(v) for v in self._model_training]

    @property
    def layers(self) -> list[str]:
        """Recorded layer names, in the order they were first called."""
        return list(self.info)

    @property
    def bn_layers(self) -> list[str]:
        """Every BatchNorm layer of the model (their buffers and modes are recorded whatever ``layers`` says)."""
        return list(self.bn_info)

    @property
    def bytes_per_step(self) -> int:
        """Host bytes one recorded step keeps under the latest row structure."""
        if not self.segments:
            return 0
        lay = self.segments[-1].layout
        return 4 * lay.width + 16 * len(lay.layers) + 2 * len(lay.bns) + 9

    @property
    def nbytes(self) -> int:
        """Host bytes allocated for the history so far (whole chunks)."""
        return sum(s.nbytes for s in self.segments) + 9 * len(self._steps)

    def _check_layer(self, layer: str, bn: bool = False) -> None:
        known = self.bn_info if bn else self.info
        if layer not in known:
            what = "BatchNorm layer" if bn else "recorded layer"
            names = ", ".join(list(known)[:8]) or "none"
            raise UsageError(f"no {what} {layer!r} in this history (have: {names})")

    def _gather(self, pick: Callable[[Segment], np.ndarray | None], width: int | None) -> np.ndarray:
        """``pick(segment)`` concatenated over segments, NaN where it returns None, padded with NaN to
        ``width`` columns (None: one value per row)."""
        if self.settle is not None:
            self.settle()
        parts = []
        for seg in self.segments:
            shape = (seg.rows,) if width is None else (seg.rows, width)
            got = pick(seg)
            out = np.full(shape, np.nan)
            if got is not None:
                got = np.asarray(got, dtype=np.float64)
                if width is None:
                    out[:] = got
                else:
                    k = min(width, got.shape[1])
                    out[:, :k] = got[:, :k]
            parts.append(out)
        if not parts:
            return np.zeros((0,) if width is None else (0, width))
        return np.concatenate(parts, axis=0)

    def channels(self, layer: str) -> int:
        """The widest per-channel record of ``layer`` (its channel series have this many columns)."""
        self._check_layer(layer)
        widths = [s.layout.layers[s.layout.at[layer][0]][1] for s in self.segments if layer in s.layout.at]
        return max(widths, default=0)

    def series(self, layer: str, stat: str) -> np.ndarray:
        """One statistic of one layer over the recorded steps.

        Args:
            layer: a recorded layer (``layers``) or, for ``running_mean``/``running_var``/
                ``num_batches_tracked``, a BatchNorm layer (``bn_layers``).
            stat: one of ``STATS``: ``mean``, ``var``, ``std``, ``min``, ``max``, ``zero_frac``,
                ``nonfinite_frac``, ``count``, ``calls``, ``num_batches_tracked`` (shape ``(steps,)``);
                ``channel_mean``, ``channel_var``, ``channel_std``, ``running_mean``, ``running_var``
                (``(steps, C)``); ``quantiles`` (``(steps, Q, U)``, watched units only).

        Returns:
            A float64 array (NaN where the layer was not called in a step).

        Raises:
            UsageError: an unknown layer or statistic.
        """
        if stat not in STATS:
            raise UsageError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
        if stat in BN_STATS:
            return self._bn_series(layer, stat)
        self._check_layer(layer)
        if stat == "quantiles":
            return self._quantiles(layer)
        width = self.channels(layer) if stat in CHANNEL_STATS else None
        got = self._gather(lambda seg: _layer_stat(seg, layer, stat), width)
        return np.nan_to_num(got, nan=0.0) if stat in ("calls", "count") else got

    def _bn_series(self, layer: str, stat: str) -> np.ndarray:
        self._check_layer(layer, bn=True)
        c = int(self.bn_info[layer]["channels"])

        def pick(seg: Segment) -> np.ndarray | None:
            at = seg.layout.bn_at.get(layer)
            if at is None:
                return None
            k, pos = at
            ch = seg.layout.bns[k][1]
            if ch < 0 or (ch == 0 and stat != "num_batches_tracked"):
                return None
            v = seg.take("values")
            start = {"running_mean": pos, "running_var": pos + ch, "num_batches_tracked": pos + 2 * ch}[stat]
            return v[:, start] if stat == "num_batches_tracked" else v[:, start: start + ch]

        if stat == "num_batches_tracked":
            if not c:
                return np.full(len(self), -1.0)
            return self._gather(pick, None)
        return self._gather(pick, c)

    def _quantiles(self, layer: str) -> np.ndarray:
        units = self.info[layer].get("units") or ()
        qu = len(self.quantile_levels) * len(units)
        if not qu:
            raise UsageError(f"layer {layer!r} has no watched units; pass units={{{layer!r}: [0]}} to record()")

        def pick(seg: Segment) -> np.ndarray | None:
            at = seg.layout.at.get(layer)
            if at is None:
                return None
            k, pos = at
            _, c, q, _ = seg.layout.layers[k]
            return seg.take("values")[:, pos + 2 * c + EXTRA: pos + 2 * c + EXTRA + q] if q == qu else None

        flat = self._gather(pick, qu)
        return flat.reshape(len(flat), len(self.quantile_levels), len(units))

    def layer(self, layer: str) -> dict[str, np.ndarray]:
        """Every statistic of one recorded layer as ``stat -> array`` (``quantiles`` only when watched)."""
        self._check_layer(layer)
        out = {s: self.series(layer, s) for s in (*SCALAR_STATS, *CHANNEL_STATS)}
        if self.info[layer].get("units"):
            out["quantiles"] = self.series(layer, "quantiles")
        return out

    def bn_modes(self, layer: str) -> BNModes:
        """The mode series of one BatchNorm layer (for BN307 and friends): its training flag,
        num_batches_tracked, whether its affine parameters require grad, and whether the step updated
        parameters.

        Raises:
            UsageError: ``layer`` is not a BatchNorm layer of the recorded model.
        """
        self._check_layer(layer, bn=True)

        def flag(j: int) -> Callable[[Segment], np.ndarray | None]:
            def pick(seg: Segment) -> np.ndarray | None:
                at = seg.layout.bn_at.get(layer)
                return None if at is None else seg.take("flags")[:, at[0], j]
            return pick

        training = self._gather(flag(0), None)
        req = self._gather(flag(1), None)
        nbt = self.series(layer, "num_batches_tracked")
        return BNModes(
            steps=self.steps,
            training=np.nan_to_num(training, nan=0).astype(bool),
            num_batches_tracked=np.nan_to_num(nbt, nan=-1).astype(np.int64),
            requires_grad=np.nan_to_num(req, nan=0).astype(bool),
            updated=self.updated,
        )


def _layer_stat(seg: Segment, layer: str, stat: str) -> np.ndarray | None:
    """One statistic of one layer over a segment's rows (None: the layer is not in these rows)."""
    at = seg.layout.at.get(layer)
    if at is None:
        return None
    k, pos = at
    _, c, _, mixed = seg.layout.layers[k]
    n = seg.take("ints")[:, k, :].astype(np.float64)
    calls, count = n[:, 0], n[:, 1]
    if stat == "calls":
        return calls
    if stat == "count":
        return count
    v = seg.take("values")
    cm = v[:, pos: pos + c].astype(np.float64)
    cv = v[:, pos + c: pos + 2 * c].astype(np.float64)
    mn, mx, nonzero, nonfinite = (v[:, pos + 2 * c + j].astype(np.float64) for j in range(EXTRA))
    numel = count * c
    with np.errstate(invalid="ignore", divide="ignore"):
        if stat in CHANNEL_STATS:
            out = np.full_like(cm, np.nan) if mixed else {"channel_mean": cm, "channel_var": cv,
                                                          "channel_std": np.sqrt(cv)}[stat]
        elif stat in ("mean", "var", "std"):
            # Whole-layer moments from per-channel ones (equal counts per channel): the mean of the means; the
            # variance is the mean within-channel variance plus the variance of the channel means.
            mean = cm.mean(axis=1)
            var = cv.mean(axis=1) + cm.var(axis=1)
            out = {"mean": mean, "var": var, "std": np.sqrt(var)}[stat]
        else:
            out = {"min": mn, "max": mx, "zero_frac": 1.0 - nonzero / numel, "nonfinite_frac": nonfinite / numel}[stat]
    out = np.array(out, dtype=np.float64)
    out[calls == 0] = np.nan
    return out
